//! Ingest beside slow entitlement saves:
//! `cargo run --release --example bench_isolation -- --events 20000 --saves 50`.
//!
//! Runs guildgate in process (ingest, the relay and the HTTP API; real RabbitMQ and
//! PostgreSQL, the default pools) against the sandbox Discord answering
//! every request `--latency-ms` (2,000) late. It measures ingest (published → settled)
//! three times: alone, with `--saves` merchants' saves (`PATCH /entitlements/{id}`, each
//! validated against the slow Discord, sent again as soon as one is answered) running
//! the whole time, and alone again. Ingest must keep at least 80 % of its rate alone (the
//! mean of the two phases that bracket the loaded one, as the machine's speed drifts):
//! saves waiting on Discord must hold no database connection.
//!
//! The API's per-business rate and in-flight limits are raised for the run, so that
//! every save reaches Discord; those the side budget cannot carry are refused after
//! `discord.side_queue_timeout` (503 `discord_busy`), having waited that long too.
//! Uses `GUILDGATE_TEST_DATABASE_URL` / `GUILDGATE_TEST_AMQP_URL` like the tests and
//! deletes its database, queues and exchanges at the end.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use guildgate::app::{App, Options};
use guildgate::config::Settings;
use guildgate::domain::ids::BusinessId;
use lapin::options::*;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use sandbox_discord::{GuildSpec, Latency, Sandbox, SandboxConfig, permissions};
use secrecy::ExposeSecret;
use serde_json::json;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

#[path = "common/world.rs"]
mod world;
const BUSINESS: &str = "bus_bench";

struct Args {
    events: usize,
    saves: usize,
    latency: Duration,
}

fn args() -> Args {
    world::help(
        "bench_isolation [--events N (20000)] [--saves N (50)] [--latency-ms MS (2000)]\n\
         Ingest alone, beside merchants' saves waiting on a slow sandbox Discord, and alone again.",
    );
    let mut a = Args {
        events: 20_000,
        saves: 50,
        latency: Duration::from_millis(2000),
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut it = argv.iter();
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--events" => a.events = value.parse().expect("--events N"),
            "--saves" => a.saves = value.parse().expect("--saves N"),
            "--latency-ms" => a.latency = Duration::from_millis(value.parse().expect("ms")),
            other => panic!("unknown flag {other}"),
        }
    }
    a
}

/// `n` one-time payments of the product that grants the entitlement, numbered from `from`.
async fn publish_payments(ch: &Channel, exchange: &str, from: usize, n: usize) {
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    for i in from..from + n {
        let pay = format!("pay_{i}");
        let body = json!({
            "business_id": BUSINESS, "type": "payment.succeeded",
            "timestamp": "2026-05-01T10:00:00Z",
            "data": {"payload_type": "Payment", "payment_id": pay, "business_id": BUSINESS,
                "brand_id": "brd_1", "subscription_id": null, "total_amount": 4900, "status": "succeeded",
                "customer": {"customer_id": format!("cus_{i}"), "email": "x@example.com", "name": "X", "metadata": {}, "phone_number": null},
                "product_cart": [{"product_id": "pdt_1", "quantity": 1}]},
        });
        drop(
            ch.basic_publish(
                exchange.into(),
                "payment.succeeded".into(),
                BasicPublishOptions::default(),
                &serde_json::to_vec(&body).unwrap(),
                BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_message_id(format!("evt_{i}").as_str().into()),
            )
            .await
            .unwrap(),
        );
        if (i + 1) % 500 == 0 {
            ch.wait_for_confirms().await.unwrap();
        }
    }
    ch.wait_for_confirms().await.unwrap();
}

/// Publishes `n` events and returns ingest's rate: events per second, first publish to
/// the last one settled.
async fn ingest_phase(
    ch: &Channel,
    settings: &Settings,
    metrics: &guildgate::metrics::Metrics,
    from: usize,
    n: usize,
) -> f64 {
    let target = metrics.events_settled.load(Ordering::Relaxed) as usize + n;
    let started = Instant::now();
    publish_payments(ch, &settings.amqp.exchange, from, n).await;
    while (metrics.events_settled.load(Ordering::Relaxed) as usize) < target {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    n as f64 / started.elapsed().as_secs_f64()
}

#[tokio::main]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = args();
    let sandbox = Sandbox::start(SandboxConfig::default()).await;
    let guild = sandbox.add_guild(
        GuildSpec::new("Bench")
            .with_bot_permissions(
                permissions::MANAGE_ROLES
                    | permissions::KICK_MEMBERS
                    | permissions::CREATE_INSTANT_INVITE,
            )
            .with_role("Patrons", 1),
    );

    let (db, amqp_url, prefix) = world::bench_run().await;
    let env: HashMap<String, String> = [
        ("GUILDGATE_DATABASE__URL", db.url.clone()),
        ("GUILDGATE_AMQP__URL", amqp_url.clone()),
        ("GUILDGATE_AMQP__QUEUE_PREFIX", prefix.clone()),
        ("GUILDGATE_AMQP__EXCHANGE", format!("{prefix}.payments")),
        ("GUILDGATE_HTTP__ADDR", "127.0.0.1:0".into()),
        ("GUILDGATE_API__REQUESTS_PER_SECOND", "100000".into()),
        ("GUILDGATE_API__BURST", "100000".into()),
        ("GUILDGATE_API__MAX_IN_FLIGHT_PER_BUSINESS", "100000".into()),
    ]
    .into_iter()
    .chain(world::sandbox_env(&sandbox))
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let settings = Settings::load_with_env(None, Some(env)).unwrap();
    let options = Options {
        sync: false,
        webhooks: false,
        ..Options::default()
    };
    let app = App::build(settings.clone(), options).await.unwrap();
    let addr = app.local_addr();
    let (key, entitlements) = {
        let mut c = app.pool.acquire().await.unwrap();
        use guildgate::store::entitlements::{insert_entitlement, set_product_entitlements};
        let (_, key) = guildgate::web::api::auth::create_api_key(
            &mut c,
            &BusinessId::parse(BUSINESS).unwrap(),
            Some("bench"),
        )
        .await
        .unwrap();
        // The server connected as a bot install records it.
        sqlx::query("INSERT INTO discord_guilds (business_id, guild_id) VALUES ($1, $2)")
            .bind(BUSINESS)
            .bind(guild.guild_id.to_string())
            .execute(&mut *c)
            .await
            .unwrap();
        let mut ents = Vec::new();
        for i in 0..args.saves.max(1) {
            let role = guild.role("Patrons").to_string();
            let e = insert_entitlement(
                &mut c,
                BUSINESS,
                &format!("Role {i}"),
                &guild.guild_id.to_string(),
                Some(&role),
            )
            .await
            .unwrap();
            ents.push(e.id);
        }
        set_product_entitlements(&mut c, BUSINESS, "pdt_1", &ents[..1])
            .await
            .unwrap();
        (key.expose_secret().to_string(), ents)
    };
    let metrics = app.metrics.clone();
    let shutdown = CancellationToken::new();
    let handle = tokio::spawn(app.run_until_stopped(shutdown.clone()));
    let conn = Connection::connect(&amqp_url, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    sandbox.set_latency(Latency::Fixed(args.latency));
    let n = args.events;

    // Warm-up (connections, plans, the bot's user id), not measured.
    let _ = ingest_phase(&ch, &settings, &metrics, 0, 2000).await;

    let alone_before = ingest_phase(&ch, &settings, &metrics, 2000, n).await;

    // The saves: each sent again as soon as it is answered, for the whole phase.
    let stop = Arc::new(AtomicBool::new(false));
    let outcomes: Arc<Mutex<BTreeMap<String, usize>>> = Arc::default();
    let http = reqwest::Client::new();
    let savers: Vec<_> = entitlements
        .iter()
        .take(args.saves)
        .enumerate()
        .map(|(i, id)| {
            let (stop, outcomes, http, key) =
                (stop.clone(), outcomes.clone(), http.clone(), key.clone());
            let url = format!("http://{addr}/entitlements/{id}");
            tokio::spawn(async move {
                let mut round = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    round += 1;
                    let r = http
                        .patch(&url)
                        .bearer_auth(&key)
                        .json(&json!({"name": format!("Role {i} ({round})")}))
                        .send()
                        .await;
                    let label = match r {
                        Ok(r) => {
                            let status = r.status().as_u16();
                            let code = r
                                .json::<serde_json::Value>()
                                .await
                                .ok()
                                .and_then(|v| v["code"].as_str().map(str::to_owned));
                            match code {
                                Some(c) => format!("{status} {c}"),
                                None => status.to_string(),
                            }
                        }
                        Err(e) => format!("error {e}"),
                    };
                    *outcomes.lock().await.entry(label).or_default() += 1;
                }
            })
        })
        .collect();
    // Every save is under way (the slowest answer takes at least one latency).
    tokio::time::sleep(args.latency / 2).await;
    let with_saves = ingest_phase(&ch, &settings, &metrics, 2000 + n, n).await;
    stop.store(true, Ordering::Relaxed);
    for s in savers {
        let _ = s.await;
    }

    let alone_after = ingest_phase(&ch, &settings, &metrics, 2000 + 2 * n, n).await;
    let alone = (alone_before + alone_after) / 2.0;
    let ratio = with_saves / alone;

    shutdown.cancel();
    let _ = handle.await;
    world::delete_topology(&ch, &settings).await;
    let _ = conn.close(200, "done".into()).await;
    db.drop_db().await;
    sandbox.shutdown().await;

    let outcomes = outcomes.lock().await.clone();
    println!(
        "ingest of {n} payments, Discord answering {} ms late, {} concurrent saves",
        args.latency.as_millis(),
        args.saves
    );
    println!("  alone (before)       {alone_before:>9.0} events/s");
    println!("  with saves           {with_saves:>9.0} events/s");
    println!("  alone (after)        {alone_after:>9.0} events/s");
    println!("  ratio                {ratio:>9.2} (target ≥ 0.80)");
    println!("  save answers         {outcomes:?}");
    println!(
        "{}",
        json!({
            "events": n, "saves": args.saves, "latency_ms": args.latency.as_millis() as u64,
            "alone_before_per_s": alone_before, "with_saves_per_s": with_saves,
            "alone_after_per_s": alone_after, "ratio": ratio, "save_answers": outcomes,
        })
    );
}
