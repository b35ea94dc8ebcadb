//! Webhook delivery throughput: `cargo run --release --example bench_webhooks`
//! (`-- healthy` for the rounds below alone, `-- slow` for the slow-endpoint phases of
//! [`slow`] alone; both by default).
//!
//! Runs a real guildgate (fan-out, outbox relay, delivery workers; default webhook
//! settings) against the local PostgreSQL and RabbitMQ, with 10 receivers on loopback.
//! Each round has two phases, each on endpoints of its own (two businesses of five):
//! all ten answering, then nine answering and one that accepts connections and never
//! answers (deleted after its phase, so its backlog does not spill into later rounds).
//! Grant events are published straight to `<prefix>.grant-events`; a phase ends when
//! every answering receiver has what it should. Per phase it prints the delivery
//! outcomes and the machine's CPU time per 1,000 deliveries (and this process's share).
//! Alternating the phases spreads drift (a growing database, other load) over both;
//! the summary gives the medians and the median of the rounds' ratios. The last line is
//! JSON: `deliveries_per_s` and `deliveries_per_s_with_dead_endpoint` (medians) and
//! `dead_endpoint_ratio` (median of the rounds' ratios).
//!
//! `GUILDGATE_BENCH_DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432`),
//! `GUILDGATE_BENCH_AMQP_URL` (default `amqp://guest:guest@127.0.0.1:5672/%2f`),
//! `GUILDGATE_BENCH_EVENTS` (grant events per phase, default 4000) and
//! `GUILDGATE_BENCH_ROUNDS` (default 3) adjust it; `GUILDGATE_WEBHOOKS__*` and
//! `GUILDGATE_OUTBOX__*` settings pass through.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use guildgate::app::{App, Options};
use guildgate::config::Settings;
use guildgate::metrics::Metrics;
use guildgate::webhooks::endpoints::{self, NewEndpoint};
use guildgate::webhooks::ssrf::TargetPolicy;
use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use rand::Rng;
use rand::distr::Alphanumeric;
use serde_json::json;
use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;

#[path = "../common/measure.rs"]
mod measure;
mod slow;
#[path = "../common/world.rs"]
mod world;
use measure::{Cpu, median};

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

/// Adds an endpoint posting to `url` (on loopback) to `business`; returns its id.
async fn add_endpoint(conn: &mut PgConnection, business: &str, url: String) -> String {
    endpoints::create(
        conn,
        business,
        NewEndpoint {
            url,
            ..NewEndpoint::default()
        },
        TargetPolicy {
            allow_private: true,
        },
    )
    .await
    .unwrap()
    .id
}

/// Two businesses of five endpoints each for one phase: endpoint `i` posts to `urls[i]`,
/// except that with `dead` the last one posts there. Returns the businesses and the
/// last endpoint's id.
async fn phase_endpoints(
    conn: &mut PgConnection,
    phase: &str,
    urls: &[String],
    dead: Option<&str>,
) -> ([String; 2], String) {
    let businesses = [format!("bus_{phase}_a"), format!("bus_{phase}_b")];
    let mut last = String::new();
    for (i, url) in urls.iter().enumerate() {
        let url = match dead {
            Some(dead) if i == urls.len() - 1 => dead.to_string(),
            _ => url.clone(),
        };
        last = add_endpoint(conn, &businesses[i / 5], url).await;
    }
    (businesses, last)
}

/// Runs one phase of `deliveries`: its time, and a line with its delivery outcomes and
/// CPU use.
/// (`run` is not started before it is awaited here.)
async fn phase(
    metrics: &Metrics,
    deliveries: u64,
    run: impl std::future::Future<Output = Duration>,
) -> (Duration, String) {
    let before = outcomes(metrics);
    let cpu_before = Cpu::now();
    let t = run.await;
    let note = format!(
        "  attempts: {}{}",
        outcomes_since(metrics, &before),
        cpu_per_k(cpu_before, deliveries)
    );
    (t, note)
}

/// ", CPU … ms per 1,000 deliveries (this process …)" since `before`, or nothing.
fn cpu_per_k(before: Option<Cpu>, deliveries: u64) -> String {
    match Cpu::ms_per_k_since(before, deliveries) {
        Some((machine, process)) => format!(
            "; CPU {machine:.0} ms per 1,000 deliveries, {process:.0} of them in this process"
        ),
        None => String::new(),
    }
}

/// Delivery attempts with each of `labels` as their outcome so far (the
/// `webhook_attempts` metric).
fn attempt_counts(m: &Metrics, labels: &[&'static str]) -> Vec<(&'static str, u64)> {
    labels
        .iter()
        .map(|&label| {
            let n = m
                .webhook_attempts
                .get_or_create(&vec![("outcome", label.to_string())])
                .get();
            (label, n)
        })
        .collect()
}

/// Delivery attempts by outcome so far.
fn outcomes(m: &Metrics) -> Vec<(&'static str, u64)> {
    attempt_counts(
        m,
        &[
            "delivered",
            "deferred",
            "parked",
            "pulled",
            "held",
            "unreachable",
            "rejected",
        ],
    )
}

/// The outcomes since `before`, for printing.
fn outcomes_since(m: &Metrics, before: &[(&'static str, u64)]) -> String {
    outcomes(m)
        .iter()
        .zip(before)
        .map(|((label, n), (_, b))| format!("{label} {}", n - b))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Publishes a grant event per (business, grant id), confirmed, in that order.
async fn publish_events(ch: &lapin::Channel, queue: &str, events: &[(&str, String)]) {
    publish_events_paced(ch, queue, events, None).await
}

/// Publishes grant events, all at once or, with `pace`, that many per second, evenly
/// spaced; returns once the broker has confirmed them all.
async fn publish_events_paced(
    ch: &lapin::Channel,
    queue: &str,
    events: &[(&str, String)],
    pace: Option<f64>,
) {
    let started = tokio::time::Instant::now();
    for (c, chunk) in events.chunks(500).enumerate() {
        let mut confirms = Vec::new();
        for (i, (business, grant)) in chunk.iter().enumerate() {
            if let Some(rate) = pace {
                let at = (c * 500 + i) as f64 / rate;
                tokio::time::sleep_until(started + Duration::from_secs_f64(at)).await;
            }
            let body = grant_event(business, grant);
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
}

/// Publishes `n` grant events (alternating businesses) and waits until `done` says the
/// receivers have everything; returns the elapsed time.
async fn run(
    publisher: &Connection,
    queue: &str,
    businesses: &[String; 2],
    run: &str,
    n: usize,
    delivered: impl Fn() -> u64,
    want: u64,
) -> Duration {
    let ch = publisher.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    let started = Instant::now();
    let events: Vec<(&str, String)> = (0..n)
        .map(|i| (businesses[i % 2].as_str(), format!("grant_{run}_{i}")))
        .collect();
    publish_events(&ch, queue, &events).await;
    let deadline = Instant::now() + Duration::from_secs(300);
    while delivered() < want {
        assert!(Instant::now() < deadline, "deliveries did not complete");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let _ = ch.close(200, "done".into()).await;
    started.elapsed()
}

#[tokio::main]
async fn main() {
    world::help(
        "bench_webhooks [healthy | slow]\n\
         Webhook delivery: healthy endpoints and one dead one (healthy), endpoints of 50 ms,\n\
         200 ms and 1 s and a mixed phase (slow), or both. GUILDGATE_BENCH_EVENTS (4000) and\n\
         GUILDGATE_BENCH_ROUNDS (3) size it; GUILDGATE_WEBHOOKS__* tune guildgate.",
    );
    let _ = rustls::crypto::ring::default_provider().install_default();
    // guildgate's own logs (to stderr), only when asked for: they cost time in a phase.
    if std::env::var_os("RUST_LOG").is_some() {
        guildgate::telemetry::init(guildgate::config::LogFormat::Text);
    }
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
    // `healthy`: only the rounds of healthy and dead-endpoint phases; `slow`: only the
    // slow-endpoint phases; neither: both.
    let only = std::env::args().nth(1);
    let (healthy_phases, slow_phases) = match only.as_deref() {
        Some("healthy") => (true, false),
        Some("slow") => (false, true),
        None => (true, true),
        Some(other) => panic!("unknown argument {other:?}: healthy, slow or none"),
    };
    let rounds: usize = env_or("GUILDGATE_BENCH_ROUNDS", "3").parse().unwrap();
    let db = world::Database::new(&db_base, &format!("ggbench_{tag}")).await;
    let prefix = format!("ggbench-{tag}");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let env: HashMap<String, String> = world::bench_env(db.url.clone(), &amqp_url, &prefix, port)
        .into_iter()
        .chain([("GUILDGATE_WEBHOOKS__ALLOW_PRIVATE_TARGETS", "true".into())])
        .map(|(k, v)| (k.to_string(), v))
        // Tuning knobs can be tried from the environment, e.g. GUILDGATE_WEBHOOKS__WORKERS=128.
        .chain(std::env::vars().filter(|(k, _)| {
            k.starts_with("GUILDGATE_WEBHOOKS__") || k.starts_with("GUILDGATE_OUTBOX__")
        }))
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
    let metrics = app.metrics.clone();
    let handle = tokio::spawn(app.run_until_stopped(shutdown.clone()));
    let pool = PgPool::connect(&db.url).await.unwrap();

    let counters: Vec<Arc<AtomicU64>> = (0..10).map(|_| Arc::default()).collect();
    let mut urls = Vec::new();
    for c in &counters {
        urls.push(receiver(c.clone()).await);
    }
    let dead_url = black_hole().await;
    let mut conn = pool.acquire().await.unwrap();
    let publisher = Connection::connect(&amqp_url, ConnectionProperties::default())
        .await
        .unwrap();
    let total = |cs: &[Arc<AtomicU64>]| cs.iter().map(|c| c.load(Ordering::Relaxed)).sum::<u64>();
    let reset = || counters.iter().for_each(|c| c.store(0, Ordering::Relaxed));

    // Warm-up: connections, plans, pools.
    let warm = 200;
    let (businesses, _) = phase_endpoints(&mut conn, "warm", &urls, None).await;
    run(
        &publisher,
        &names.grant_events(),
        &businesses,
        "warm",
        warm,
        || total(&counters),
        (warm * 5) as u64,
    )
    .await;

    // Rounds of a healthy phase and a phase with one endpoint that never answers, each
    // on endpoints of their own (a black-holed endpoint keeps its hanging requests and
    // open circuit): alternating them spreads drift (a growing database, other load on
    // the machine) over both.
    let mut healthy_rates = Vec::new();
    let mut dead_rates = Vec::new();
    for round in (1..=rounds).filter(|_| healthy_phases) {
        reset();
        let expected = (n * 5) as u64;
        let (businesses, _) = phase_endpoints(&mut conn, &format!("h{round}"), &urls, None).await;
        let (t, note) = phase(
            &metrics,
            expected,
            run(
                &publisher,
                &names.grant_events(),
                &businesses,
                &format!("healthy{round}"),
                n,
                || total(&counters),
                expected,
            ),
        )
        .await;
        let rate = expected as f64 / t.as_secs_f64();
        healthy_rates.push(rate);
        println!(
            "round {round}, 10 endpoints: {expected} deliveries in {:.2} s = {rate:.0}/s\n{note}",
            t.as_secs_f64()
        );

        reset();
        let healthy = &counters[..9];
        let expected = (n.div_ceil(2) * 5 + (n / 2) * 4) as u64;
        let (businesses, dead_endpoint) =
            phase_endpoints(&mut conn, &format!("d{round}"), &urls, Some(&dead_url)).await;
        let (t, note) = phase(
            &metrics,
            expected,
            run(
                &publisher,
                &names.grant_events(),
                &businesses,
                &format!("dead{round}"),
                n,
                || total(healthy),
                expected,
            ),
        )
        .await;
        let rate = expected as f64 / t.as_secs_f64();
        dead_rates.push(rate);
        println!(
            "round {round}, 9 endpoints + 1 never answering: {expected} deliveries to the healthy ones in {:.2} s = {rate:.0}/s\n{note}",
            t.as_secs_f64()
        );
        // The merchant removes the dead endpoint (its messages go with it), so its
        // backlog does not come back during the rounds that follow.
        sqlx::query("DELETE FROM webhook_endpoints WHERE id = $1")
            .bind(&dead_endpoint)
            .execute(&mut *conn)
            .await
            .unwrap();
    }
    let slow_figures = if slow_phases {
        Some(
            slow::run(
                slow::Bench {
                    conn: &mut conn,
                    publisher: &publisher,
                    queue: names.grant_events(),
                    metrics: metrics.clone(),
                    cap: settings.webhooks.max_in_flight_per_endpoint,
                    tag: 0,
                    // Measured before each phase that uses it.
                    idle_cpu: 0.0,
                },
                n,
                rounds,
            )
            .await,
        )
    } else {
        None
    };
    drop(conn);
    // Each round's ratio compares two runs close in time, so it is steadier than the
    // ratio of the medians when the machine's speed drifts.
    let mut ratios: Vec<f64> = dead_rates
        .iter()
        .zip(&healthy_rates)
        .map(|(d, h)| d / h)
        .collect();
    let round_ratio = median(&mut ratios);
    let healthy_rate = median(&mut healthy_rates);
    let dead_rate = median(&mut dead_rates);
    if healthy_phases {
        println!(
            "median of {rounds} rounds: {healthy_rate:.0}/s healthy, {dead_rate:.0}/s to the healthy endpoints beside a dead one ({:.2} of the healthy figure); median of the rounds' ratios {round_ratio:.2}",
            dead_rate / healthy_rate
        );
    }

    // Clean up without waiting for the requests held by the dead endpoint.
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(20), handle).await;
    if let Ok(ch) = publisher.create_channel().await {
        world::delete_topology(&ch, &settings).await;
    }
    pool.close().await;
    db.drop_db().await;
    println!(
        "{}",
        json!({
            "deliveries_per_s": healthy_rate.round(),
            "deliveries_per_s_with_dead_endpoint": dead_rate.round(),
            "dead_endpoint_ratio": (round_ratio * 100.0).round() / 100.0,
            "rounds": rounds,
            "slow_endpoints": slow_figures,
        })
    );
}
