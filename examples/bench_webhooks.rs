//! Webhook delivery throughput: `cargo run --release --example bench_webhooks`.
//!
//! Runs a real guildgate (fan-out, outbox relay, delivery workers; default webhook
//! settings) against the local PostgreSQL and RabbitMQ, with 10 receivers on loopback
//! (two businesses of five endpoints). Grant events are published straight to
//! `<prefix>.grant-events`; a run ends when every receiver has what it should. Then the
//! same again with one endpoint that accepts connections and never answers. The last
//! line is JSON: `{"deliveries_per_s":…, "deliveries_per_s_with_dead_endpoint":…}`.
//!
//! `GUILDGATE_BENCH_DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432`),
//! `GUILDGATE_BENCH_AMQP_URL` (default `amqp://guest:guest@127.0.0.1:5672/%2f`) and
//! `GUILDGATE_BENCH_EVENTS` (grant events per run, default 4000) adjust it.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use guildgate::app::{App, Options};
use guildgate::config::Settings;
use guildgate::webhooks::endpoints::{self, NewEndpoint};
use guildgate::webhooks::ssrf::TargetPolicy;
use lapin::options::{BasicPublishOptions, QueueDeleteOptions};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use rand::Rng;
use rand::distr::Alphanumeric;
use serde_json::json;
use sqlx::{Connection as _, PgConnection, PgPool};
use tokio_util::sync::CancellationToken;

const BUSINESSES: [&str; 2] = ["bus_bench_a", "bus_bench_b"];

fn env_or(key: &str, default: &str) -> String {
    std::env::var(key).unwrap_or_else(|_| default.to_string())
}

async fn receiver(hits: Arc<AtomicU64>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let app = Router::new()
        .route(
            "/hook",
            axum::routing::post(|State(h): State<Arc<AtomicU64>>| async move {
                h.fetch_add(1, Ordering::Relaxed);
                "ok"
            }),
        )
        .with_state(hits);
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

/// Accepts connections and never answers.
async fn black_hole() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    url
}

fn grant_event(business: &str, grant_id: &str) -> Vec<u8> {
    let body = json!({
        "business_id": business,
        "type": "entitlement_grant.created",
        "timestamp": "2026-05-01T10:31:00Z",
        "data": {
            "payload_type": "EntitlementGrant",
            "id": grant_id,
            "business_id": business,
            "brand_id": "brd_3hQp",
            "entitlement_id": "ent_9Xc2Lw7QpR",
            "customer_id": "cus_8wM2kq1Zr7",
            "payment_id": "pay_1",
            "subscription_id": null,
            "status": "Pending",
            "integration_type": "discord",
            "license_key": null,
            "digital_product_delivery": null,
            "delivered_at": null,
            "revoked_at": null,
            "revocation_reason": null,
            "error_code": null,
            "error_message": null,
            "oauth_url": "https://discord.com/oauth2/authorize?client_id=1&response_type=code&scope=identify+guilds.join&state=x",
            "oauth_expires_at": "2026-05-08T10:31:00Z",
            "metadata": {},
            "created_at": "2026-05-01T10:31:00Z",
            "updated_at": "2026-05-01T10:31:00Z"
        }
    });
    serde_json::to_vec(&body).unwrap()
}

/// Publishes `n` grant events (alternating businesses) and waits until `done` says the
/// receivers have everything; returns the elapsed time.
async fn run(
    publisher: &Connection,
    queue: &str,
    run: &str,
    n: usize,
    done: impl Fn() -> bool,
) -> Duration {
    let ch = publisher.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    let started = Instant::now();
    for chunk in (0..n).collect::<Vec<_>>().chunks(500) {
        let mut confirms = Vec::new();
        for &i in chunk {
            let grant = format!("grant_{run}_{i}");
            let body = grant_event(BUSINESSES[i % 2], &grant);
            let c = ch
                .basic_publish(
                    "".into(),
                    queue.into(),
                    BasicPublishOptions::default(),
                    &body,
                    BasicProperties::default()
                        .with_delivery_mode(2)
                        .with_message_id(format!("{grant}:entitlement_grant.created").into()),
                )
                .await
                .unwrap();
            confirms.push(c);
        }
        for c in confirms {
            assert!(c.await.unwrap().is_ack());
        }
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    while !done() {
        assert!(Instant::now() < deadline, "deliveries did not complete");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let _ = ch.close(200, "done".into()).await;
    started.elapsed()
}

#[tokio::main]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let tag: String = rand::rng()
        .sample_iter(&Alphanumeric)
        .take(8)
        .map(char::from)
        .collect::<String>()
        .to_lowercase();
    let db_base = env_or(
        "GUILDGATE_BENCH_DATABASE_URL",
        "postgres://postgres@127.0.0.1:5432",
    );
    let amqp_url = env_or(
        "GUILDGATE_BENCH_AMQP_URL",
        "amqp://guest:guest@127.0.0.1:5672/%2f",
    );
    let n: usize = env_or("GUILDGATE_BENCH_EVENTS", "4000").parse().unwrap();
    let db_name = format!("ggbench_{tag}");
    let prefix = format!("ggbench-{tag}");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let env: HashMap<String, String> = [
        ("GUILDGATE_DATABASE__URL", format!("{db_base}/{db_name}")),
        ("GUILDGATE_AMQP__URL", amqp_url.clone()),
        ("GUILDGATE_AMQP__QUEUE_PREFIX", prefix.clone()),
        ("GUILDGATE_AMQP__EXCHANGE", format!("{prefix}.payments")),
        ("GUILDGATE_HTTP__ADDR", format!("127.0.0.1:{port}")),
        (
            "GUILDGATE_HTTP__PUBLIC_URL",
            format!("http://127.0.0.1:{port}"),
        ),
        ("GUILDGATE_WEBHOOKS__ALLOW_PRIVATE_TARGETS", "true".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let settings = Settings::load_with_env(None, Some(env)).expect("settings");
    let options = Options {
        consumers: false,
        sync: false,
        ..Options::default()
    };
    let app = App::build_with_listener(settings.clone(), options, listener)
        .await
        .expect("guildgate starts (PostgreSQL and RabbitMQ must be running)");
    let names = guildgate::amqp::Names::from_settings(&settings);
    let shutdown = CancellationToken::new();
    let handle = tokio::spawn(app.run_until_stopped(shutdown.clone()));
    let pool = PgPool::connect(&format!("{db_base}/{db_name}"))
        .await
        .unwrap();

    let counters: Vec<Arc<AtomicU64>> = (0..10).map(|_| Arc::default()).collect();
    let mut endpoint_ids = Vec::new();
    let mut conn = pool.acquire().await.unwrap();
    for (i, c) in counters.iter().enumerate() {
        let url = receiver(c.clone()).await;
        let ep = endpoints::create(
            &mut conn,
            BUSINESSES[i / 5],
            NewEndpoint {
                url,
                ..NewEndpoint::default()
            },
            TargetPolicy {
                allow_private: true,
            },
        )
        .await
        .unwrap();
        endpoint_ids.push(ep.id);
    }
    let publisher = Connection::connect(&amqp_url, ConnectionProperties::default())
        .await
        .unwrap();
    let total = |cs: &[Arc<AtomicU64>]| cs.iter().map(|c| c.load(Ordering::Relaxed)).sum::<u64>();

    // Warm-up: connections, plans, pools.
    let warm = 200;
    run(&publisher, &names.grant_events(), "warm", warm, || {
        total(&counters) >= (warm * 5) as u64
    })
    .await;
    counters.iter().for_each(|c| c.store(0, Ordering::Relaxed));

    let expected = (n * 5) as u64;
    let t = run(&publisher, &names.grant_events(), "healthy", n, || {
        total(&counters) >= expected
    })
    .await;
    let healthy_rate = expected as f64 / t.as_secs_f64();
    println!(
        "10 endpoints: {expected} deliveries in {:.2} s = {healthy_rate:.0}/s",
        t.as_secs_f64()
    );

    // One endpoint of business b never answers from now on.
    let dead_url = black_hole().await;
    sqlx::query("UPDATE webhook_endpoints SET url = $1 WHERE id = $2")
        .bind(&dead_url)
        .bind(&endpoint_ids[9])
        .execute(&mut *conn)
        .await
        .unwrap();
    drop(conn);
    counters.iter().for_each(|c| c.store(0, Ordering::Relaxed));
    let healthy = &counters[..9];
    let expected_healthy = (n.div_ceil(2) * 5 + (n / 2) * 4) as u64;
    let t = run(&publisher, &names.grant_events(), "dead", n, || {
        total(healthy) >= expected_healthy
    })
    .await;
    let dead_rate = expected_healthy as f64 / t.as_secs_f64();
    println!(
        "9 endpoints + 1 never answering: {expected_healthy} deliveries to the healthy ones in {:.2} s = {dead_rate:.0}/s",
        t.as_secs_f64()
    );

    // Clean up without waiting for the requests held by the dead endpoint.
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(20), handle).await;
    if let Ok(ch) = publisher.create_channel().await {
        for q in guildgate::amqp::topology::all_queues(&names, &settings) {
            let _ = ch
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        for ex in [settings.amqp.exchange.clone(), names.dead_letter_exchange()] {
            let _ = ch
                .exchange_delete(ex.as_str().into(), Default::default())
                .await;
        }
    }
    pool.close().await;
    if let Ok(mut admin) = PgConnection::connect(&format!("{db_base}/postgres")).await {
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {db_name} WITH (FORCE)"
        )))
        .execute(&mut admin)
        .await;
    }
    println!(
        "{}",
        json!({
            "deliveries_per_s": healthy_rate.round(),
            "deliveries_per_s_with_dead_endpoint": dead_rate.round(),
        })
    );
}
