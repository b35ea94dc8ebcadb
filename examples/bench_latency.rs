//! Latency at a steady rate, not at full load:
//! `cargo run --release --example bench_latency -- --rate 1000 --seconds 20 --links 1000 --link-rate 4`.
//!
//! A real guildgate (in-process; real RabbitMQ and PostgreSQL, durable commits, the
//! relay on) and the sandbox Discord.
//!
//! 1. **Ingest.** One-time `payment.succeeded` events, each for a new customer, are
//!    published at `--rate` events per second for `--seconds`. For each: publish →
//!    commit (the applied event's `processed_at`, taken within its transaction) and
//!    publish → relayed (its grant's `entitlement_grant.created` arriving on
//!    `<prefix>.grant-events`, which this benchmark consumes itself: the fan-out is off).
//! 2. **Authorization → role.** `--links` of those customers open their grant's link
//!    at `--link-rate` per second: the sandbox's consent (Authorize), guildgate's
//!    callback, until the sandbox Discord shows the member with the role. The callback
//!    asks Discord two things (the code exchange and the user) on the side budget,
//!    which is raised to 20 requests/s here (the syncer keeps 30); all callbacks come
//!    from one address, whose limit is lifted.
//!
//! Prints p50, p99 and max of each, and for the ingest part the machine's CPU per 1,000
//! events (PostgreSQL's, RabbitMQ's and this process's part of it) and the events per
//! ingest transaction and per relay drain; the last line is JSON. `GUILDGATE_OUTBOX__*`,
//! `GUILDGATE_AMQP__BATCH_LINGER` and `GUILDGATE_AMQP__BATCH_SIZE` pass through. Uses
//! `GUILDGATE_TEST_DATABASE_URL` / `GUILDGATE_TEST_AMQP_URL` like the tests, and deletes
//! its database, queues and exchanges at the end.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use guildgate::amqp::Names;
use guildgate::app::{App, Options};
use guildgate::config::Settings;
use guildgate::discord::permissions;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions,
};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use sandbox_discord::{Consent, GuildSpec, Sandbox, SandboxConfig, UserSpec};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

#[path = "common/measure.rs"]
mod measure;
#[path = "common/workload.rs"]
mod workload;
#[path = "common/world.rs"]
mod world;
const BUSINESS: &str = "bus_latency";
const PRODUCT: &str = "pdt_latency";

struct Args {
    rate: f64,
    seconds: f64,
    links: usize,
    link_rate: f64,
    history: usize,
}

impl Args {
    fn parse() -> Self {
        world::help(
            "bench_latency [--rate EVENTS_PER_S (1000)] [--seconds S (20)] [--links N (1000)] [--link-rate PER_S (4)] [--history N (100000)]",
        );
        let args: Vec<String> = std::env::args().collect();
        let num = |flag: &str, default: f64| -> f64 {
            args.iter()
                .position(|a| a == flag)
                .and_then(|i| args.get(i + 1))
                .map(|s| {
                    s.parse()
                        .unwrap_or_else(|_| panic!("{flag} takes a number, not {s:?}"))
                })
                .unwrap_or(default)
        };
        let a = Self {
            rate: num("--rate", 1000.0),
            seconds: num("--seconds", 20.0),
            links: num("--links", 1000.0) as usize,
            link_rate: num("--link-rate", 4.0),
            history: num("--history", 100_000.0) as usize,
        };
        assert!(a.rate > 0.0 && a.seconds > 0.0 && a.link_rate > 0.0);
        a
    }
}

/// p50, p99 and max of `xs` (milliseconds), sorted in place.
fn summary(xs: &mut [f64]) -> (f64, f64, f64) {
    if xs.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    xs.sort_by(f64::total_cmp);
    let at = |p: f64| xs[((xs.len() as f64 - 1.0) * p).round() as usize];
    (at(0.5), at(0.99), xs[xs.len() - 1])
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn payment(i: usize, at: DateTime<Utc>) -> (String, Vec<u8>) {
    let id = format!("pay_l{i}");
    let body = json!({
        "business_id": BUSINESS, "type": "payment.succeeded", "timestamp": at.to_rfc3339(),
        "data": {"payload_type": "Payment", "payment_id": id, "business_id": BUSINESS,
                 "brand_id": "brd_1", "subscription_id": null, "total_amount": 900, "currency": "USD",
                 "customer": {"customer_id": format!("cus_l{i}"), "email": "x@example.com",
                              "name": "X", "metadata": {}, "phone_number": null},
                 "product_cart": [{"product_id": PRODUCT, "quantity": 1}]}
    });
    (id, serde_json::to_vec(&body).unwrap())
}

#[tokio::main]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = Args::parse();
    let (db, amqp_url, prefix) = world::bench_run().await;

    let sandbox = Sandbox::start(SandboxConfig::default()).await;
    let guild = sandbox.add_guild(
        GuildSpec::new("Latency")
            .with_bot_permissions(permissions::REQUIRED)
            .with_role("Patrons", 1),
    );
    let role = guild.role("Patrons");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let env: HashMap<String, String> = world::bench_env(db.url.clone(), &amqp_url, &prefix, port)
        .into_iter()
        .chain([
            ("GUILDGATE_DISCORD__SIDE_REQUESTS_PER_S", "20".into()),
            ("GUILDGATE_OAUTH__ADDRESS_ATTEMPTS", "1000000".into()),
        ])
        .chain(world::sandbox_env(&sandbox))
        .map(|(k, v)| (k.to_string(), v))
        // Tuning knobs can be tried from the environment, e.g. GUILDGATE_OUTBOX__LINGER=10ms.
        .chain(std::env::vars().filter(|(k, _)| {
            k.starts_with("GUILDGATE_OUTBOX__")
                || k == "GUILDGATE_AMQP__BATCH_LINGER"
                || k == "GUILDGATE_AMQP__BATCH_SIZE"
        }))
        .collect();
    let settings = Settings::load_with_env(None, Some(env)).expect("settings");
    let names = Names::from_settings(&settings);
    let app = App::build_with_listener(
        settings.clone(),
        Options {
            webhooks: false,
            ..Options::default()
        },
        listener,
    )
    .await
    .expect("guildgate starts (PostgreSQL and RabbitMQ must be running)");
    {
        let mut c = app.pool.acquire().await.unwrap();
        use guildgate::store::{
            businesses::ensure_business,
            entitlements::{insert_entitlement, set_product_entitlements},
        };
        ensure_business(&mut c, BUSINESS).await.unwrap();
        // The merchant's bot install, as the API records it.
        guildgate::store::guilds::connect(
            &mut c,
            guildgate::store::guilds::Install {
                business_id: BUSINESS,
                guild_id: &guild.guild_id.to_string(),
                name: "Latency",
                permissions: None,
                installed_by: None,
                now: Utc::now(),
            },
        )
        .await
        .unwrap();
        let e = insert_entitlement(
            &mut c,
            BUSINESS,
            "Patrons",
            &guild.guild_id.to_string(),
            Some(&role.to_string()),
        )
        .await
        .unwrap();
        set_product_entitlements(&mut c, BUSINESS, PRODUCT, std::slice::from_ref(&e.id))
            .await
            .unwrap();
        // A deployment that has run for a while: earlier events' rows and statistics.
        // On empty tables the first cached plans scan them whole as they grow, until
        // autovacuum's first ANALYZE, about a minute in: a cold start, not a steady rate.
        drop(c);
        workload::seed_history(&app.pool, BUSINESS, &vec![e.id; 4], args.history).await;
    }
    let pool = app.pool.clone();
    let metrics = app.metrics.clone();
    let links = guildgate::grants::link::LinkBuilder::from_settings(&settings);
    let shutdown = CancellationToken::new();
    let app_task = tokio::spawn(app.run_until_stopped(shutdown.clone()));
    let amqp = Connection::connect(&amqp_url, ConnectionProperties::default())
        .await
        .unwrap();

    // --- 1. Ingest at a steady rate.
    // The grant webhooks the relay publishes, as they arrive: payment id → when.
    let relayed: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    {
        let ch = amqp.create_channel().await.unwrap();
        let mut consumer = ch
            .basic_consume(
                names.grant_events().as_str().into(),
                "bench".into(),
                BasicConsumeOptions::default(),
                Default::default(),
            )
            .await
            .unwrap();
        let relayed = relayed.clone();
        tokio::spawn(async move {
            while let Some(Ok(d)) = consumer.next().await {
                let at = Instant::now();
                let v: Value = serde_json::from_slice(&d.data).unwrap_or_default();
                let bodies = match v {
                    Value::Array(a) => a,
                    one => vec![one],
                };
                {
                    let mut r = relayed.lock().unwrap();
                    for b in bodies {
                        if let Some(p) = b["data"]["payment_id"].as_str() {
                            r.entry(p.to_string()).or_insert(at);
                        }
                    }
                }
                let _ = d.ack(BasicAckOptions::default()).await;
            }
        });
    }
    let n = (args.rate * args.seconds).round() as usize;
    let publisher = amqp.create_channel().await.unwrap();
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let (cpu_before, split_before) = (measure::Cpu::now(), measure::Split::now());
    let (started, wall_start) = (Instant::now(), Utc::now());
    let mut sent: HashMap<String, Instant> = HashMap::with_capacity(n);
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut i = 0;
    while i < n {
        tick.tick().await;
        // Publish what the rate allows by now.
        let due = ((started.elapsed().as_secs_f64() * args.rate) as usize).min(n);
        while i < due {
            let (id, body) = payment(i, Utc::now());
            sent.insert(id.clone(), Instant::now());
            drop(
                publisher
                    .basic_publish(
                        settings.amqp.exchange.as_str().into(),
                        "payment.succeeded".into(),
                        BasicPublishOptions::default(),
                        &body,
                        BasicProperties::default()
                            .with_delivery_mode(2)
                            .with_message_id(format!("evt_{id}").into()),
                    )
                    .await
                    .unwrap(),
            );
            i += 1;
        }
    }
    publisher.wait_for_confirms().await.unwrap();
    let published_in = started.elapsed().as_secs_f64();
    let deadline = Instant::now() + Duration::from_secs(120);
    while relayed.lock().unwrap().len() < n {
        assert!(
            Instant::now() < deadline,
            "only {} of {n} grant webhooks relayed",
            relayed.lock().unwrap().len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // What the steady rate costs: the machine's CPU (everything on it: guildgate, the
    // broker, PostgreSQL, this benchmark's publisher and consumer) and how many ingest
    // transactions and relay drains carried the events.
    let cpu = measure::Cpu::ms_per_k_since(cpu_before, n as u64).map(|(machine, _)| machine);
    let [pg, mq, process] =
        measure::Split::ms_per_k_since(split_before, n as u64).map_or([None; 3], |s| s.map(Some));
    let rendered = metrics.render();
    let per = |name: &str| {
        measure::metric_value(&rendered, name)
            .filter(|c| *c > 0.0)
            .map(|c| n as f64 / c)
    };
    let (per_batch, per_drain) = (
        per("guildgate_event_batch_seconds_count"),
        per("guildgate_outbox_drains_total"),
    );
    let wall = |t: Instant| wall_start + chrono::Duration::from_std(t - started).unwrap();
    let rows: Vec<(String, DateTime<Utc>)> =
        sqlx::query_as("SELECT event_id, processed_at FROM processed_events")
            .fetch_all(&pool)
            .await
            .unwrap();
    let mut commit: Vec<f64> = rows
        .iter()
        .filter_map(|(id, at)| {
            let s = sent.get(id.strip_prefix("evt_")?)?;
            Some(((*at - wall(*s)).num_microseconds()? as f64 / 1000.0).max(0.0))
        })
        .collect();
    let mut relay: Vec<f64> = relayed
        .lock()
        .unwrap()
        .iter()
        .filter_map(|(p, at)| Some(at.duration_since(*sent.get(p)?).as_secs_f64() * 1000.0))
        .collect();
    assert_eq!(commit.len(), n, "every event applied");
    let (c50, c99, cmax) = summary(&mut commit);
    let (r50, r99, rmax) = summary(&mut relay);
    let shown = |x: Option<f64>| x.map_or("?".to_string(), |x| format!("{x:.1}"));
    println!(
        "ingest at {:.0} events/s ({n} events in {published_in:.1} s): publish → commit p50 {c50:.1} ms, p99 {c99:.1} ms, max {cmax:.1} ms; publish → relayed p50 {r50:.1} ms, p99 {r99:.1} ms, max {rmax:.1} ms; machine CPU {} ms per 1,000 events (PostgreSQL {}, RabbitMQ {}, this process {}), {} events per ingest transaction, {} per relay drain",
        n as f64 / published_in,
        shown(cpu),
        shown(pg),
        shown(mq),
        shown(process),
        shown(per_batch),
        shown(per_drain),
    );

    // --- 2. Authorization → role, at a steady rate of links.
    let grants: Vec<(String, String, String, DateTime<Utc>)> = sqlx::query_as(
        "SELECT business_id, id, oauth_nonce, oauth_expires_at FROM grants
         WHERE NOT starts_with(id, 'old_') ORDER BY created_at, id LIMIT $1",
    )
    .bind(args.links as i64)
    .fetch_all(&pool)
    .await
    .unwrap();
    let sandbox = Arc::new(sandbox);
    let http = reqwest::Client::new();
    let mut tasks = tokio::task::JoinSet::new();
    let link_start = Instant::now();
    for (k, (business, id, nonce, expires)) in grants.into_iter().enumerate() {
        let at = link_start + Duration::from_secs_f64(k as f64 / args.link_rate);
        tokio::time::sleep_until(at.into()).await;
        let user = sandbox.add_user(UserSpec::new(format!("u{k}")));
        let url = links.url(&business, &id, &nonce, expires);
        let (sandbox, http) = (sandbox.clone(), http.clone());
        let guild_id = guild.guild_id;
        tasks.spawn(async move {
            let t0 = Instant::now();
            let callback = sandbox
                .consent(&url, user, Consent::Authorize)
                .await
                .expect("consent");
            let status = http.get(&callback).send().await.unwrap().status();
            assert!(status.is_success(), "callback answered {status}");
            let deadline = t0 + Duration::from_secs(60);
            while !sandbox
                .member(guild_id, user)
                .is_some_and(|m| m.roles.contains(&role))
            {
                assert!(Instant::now() < deadline, "no role after 60 s");
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            t0.elapsed().as_secs_f64() * 1000.0
        });
    }
    let mut to_role = Vec::new();
    while let Some(r) = tasks.join_next().await {
        to_role.push(r.unwrap());
    }
    let (a50, a99, amax) = summary(&mut to_role);
    println!(
        "authorization → role over {} links at {:.1}/s: p50 {a50:.1} ms, p99 {a99:.1} ms, max {amax:.1} ms",
        to_role.len(),
        args.link_rate
    );

    shutdown.cancel();
    let _ = app_task.await;
    if let Ok(ch) = amqp.create_channel().await {
        world::delete_topology(&ch, &settings).await;
    }
    pool.close().await;
    db.drop_db().await;
    println!(
        "{}",
        json!({
            "rate": args.rate,
            "events": n,
            "commit_p50_ms": round1(c50), "commit_p99_ms": round1(c99), "commit_max_ms": round1(cmax),
            "relayed_p50_ms": round1(r50), "relayed_p99_ms": round1(r99), "relayed_max_ms": round1(rmax),
            "cpu_ms_per_1k_events": cpu.map(round1),
            "postgres_cpu_ms_per_1k_events": pg.map(round1),
            "rabbitmq_cpu_ms_per_1k_events": mq.map(round1),
            "process_cpu_ms_per_1k_events": process.map(round1),
            "events_per_batch": per_batch.map(round1),
            "events_per_drain": per_drain.map(round1),
            "links": to_role.len(),
            "link_rate": args.link_rate,
            "authorization_to_role_p50_ms": round1(a50),
            "authorization_to_role_p99_ms": round1(a99),
            "authorization_to_role_max_ms": round1(amax),
        })
    );
}
