//! Ingest benchmark: `cargo run --release --example bench_ingest -- --events 50000`.
//!
//! Publishes a realistic mix of payment events to a fresh exchange while guildgate
//! (in-process, real RabbitMQ and PostgreSQL, durable commits) consumes them, and reports
//! end-to-end throughput (first publish → last commit) and latency percentiles
//! (publish → commit of each applied event). In the same run it measures the raw
//! baseline: the same publisher and messages into a quorum queue consumed with the same
//! prefetch, consumer count and ack mode, doing no database work. The last line is JSON.
//!
//! Uses `GUILDGATE_TEST_DATABASE_URL` / `GUILDGATE_TEST_AMQP_URL` like the tests and
//! deletes its database, queues and exchanges at the end. `--no-relay` leaves the
//! outbox unrelayed, to show what relaying its rows (about 2.4 per event) costs.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use guildgate::amqp::Names;
use guildgate::app::{App, Options};
use guildgate::config::Settings;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use sqlx::{Connection as _, PgConnection};
use tokio_util::sync::CancellationToken;

struct Msg {
    id: String,
    routing_key: String,
    body: Vec<u8>,
}

fn base(business: &str, kind: &str, at: DateTime<Utc>, data: Value) -> Value {
    json!({"business_id": business, "type": kind, "timestamp": at.to_rfc3339(), "data": data})
}

fn customer(c: &str) -> Value {
    json!({"customer_id": c, "email": "x@example.com", "name": "X", "metadata": {}, "phone_number": null})
}

/// A realistic mix: checkouts of one-time products, subscriptions starting, renewing,
/// changing plan, cancelling, refunds, lost disputes, events of products without
/// entitlements, and redelivered duplicates.
fn workload(n: usize, business: &str) -> Vec<Msg> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let t0: DateTime<Utc> = "2026-05-01T00:00:00Z".parse().unwrap();
    let mut out: Vec<Msg> = Vec::with_capacity(n);
    let mut subs: Vec<(String, String, &str)> = Vec::new();
    let mut payments: Vec<String> = Vec::new();
    let mut i = 0usize;
    while out.len() < n {
        i += 1;
        let at = t0 + chrono::Duration::seconds(i as i64);
        let roll: u32 = rng.random_range(0..100);
        let (kind, data) = match roll {
            0..=34 => {
                let pay = format!("pay_{i}");
                payments.push(pay.clone());
                let product = if rng.random_bool(0.5) {
                    "pdt_life"
                } else {
                    "pdt_bundle"
                };
                (
                    "payment.succeeded",
                    json!({"payload_type": "Payment", "payment_id": pay, "business_id": business,
                    "brand_id": "brd_1", "customer": customer(&format!("cus_{i}")), "subscription_id": null,
                    "product_cart": [{"product_id": product, "quantity": 1}], "total_amount": 4900, "status": "succeeded"}),
                )
            }
            35..=54 => {
                let sub = format!("sub_{i}");
                subs.push((sub.clone(), format!("cus_{i}"), "pdt_monthly"));
                (
                    "subscription.active",
                    sub_data(business, &sub, &format!("cus_{i}"), "pdt_monthly", "active"),
                )
            }
            55..=69 if !subs.is_empty() => {
                let (s, c, p) = subs[rng.random_range(0..subs.len())].clone();
                (
                    "subscription.renewed",
                    sub_data(business, &s, &c, p, "active"),
                )
            }
            70..=76 if !subs.is_empty() => {
                let k = rng.random_range(0..subs.len());
                subs[k].2 = "pdt_vip";
                let (s, c, p) = subs[k].clone();
                (
                    "subscription.plan_changed",
                    sub_data(business, &s, &c, p, "active"),
                )
            }
            77..=82 if !subs.is_empty() => {
                let (s, c, p) = subs.swap_remove(rng.random_range(0..subs.len()));
                (
                    "subscription.cancelled",
                    sub_data(business, &s, &c, p, "cancelled"),
                )
            }
            83..=86 if !payments.is_empty() => {
                let pay = payments.swap_remove(rng.random_range(0..payments.len()));
                (
                    "refund.succeeded",
                    json!({"payload_type": "Refund", "refund_id": format!("ref_{i}"), "payment_id": pay,
                    "business_id": business, "is_partial": false, "amount": 4900}),
                )
            }
            87..=88 if !payments.is_empty() => {
                let pay = payments.swap_remove(rng.random_range(0..payments.len()));
                (
                    "dispute.lost",
                    json!({"payload_type": "Dispute", "dispute_id": format!("dsp_{i}"), "payment_id": pay,
                    "business_id": business}),
                )
            }
            89..=95 => (
                "payment.succeeded",
                json!({"payload_type": "Payment", "payment_id": format!("pay_{i}"),
                "business_id": business, "customer": customer(&format!("cus_{i}")), "subscription_id": null,
                "product_cart": [{"product_id": "pdt_no_entitlements", "quantity": 1}]}),
            ),
            _ if !out.is_empty() => {
                // A redelivered duplicate of an earlier event.
                let k = rng.random_range(0..out.len());
                let dup = Msg {
                    id: out[k].id.clone(),
                    routing_key: out[k].routing_key.clone(),
                    body: out[k].body.clone(),
                };
                out.push(dup);
                continue;
            }
            _ => continue,
        };
        out.push(Msg {
            id: format!("evt_{i}"),
            routing_key: kind.to_string(),
            body: serde_json::to_vec(&base(business, kind, at, data)).unwrap(),
        });
    }
    out
}

fn sub_data(business: &str, sub: &str, cus: &str, product: &str, status: &str) -> Value {
    json!({"payload_type": "Subscription", "subscription_id": sub, "product_id": product, "status": status,
        "customer": customer(cus), "brand_id": "brd_1", "business_id": business, "quantity": 1})
}

async fn publish_all(
    ch: &Channel,
    exchange: &str,
    msgs: &[Msg],
    sent_at: &mut HashMap<String, Instant>,
) {
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    for chunk in msgs.chunks(500) {
        for m in chunk {
            sent_at.entry(m.id.clone()).or_insert_with(Instant::now);
            // The confirm is awaited for the whole chunk by wait_for_confirms below.
            drop(
                ch.basic_publish(
                    exchange.into(),
                    m.routing_key.as_str().into(),
                    BasicPublishOptions::default(),
                    &m.body,
                    BasicProperties::default()
                        .with_delivery_mode(2)
                        .with_message_id(m.id.as_str().into()),
                )
                .await
                .unwrap(),
            );
        }
        ch.wait_for_confirms().await.unwrap();
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args: Vec<String> = std::env::args().collect();
    let n: usize = args
        .iter()
        .position(|a| a == "--events")
        .and_then(|i| args.get(i + 1))
        .map(|s| s.parse().unwrap())
        .unwrap_or(50_000);
    let db_base = std::env::var("GUILDGATE_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into());
    let amqp_url = std::env::var("GUILDGATE_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let tag: String = rand::rng()
        .sample_iter(&rand::distr::Alphanumeric)
        .take(8)
        .map(char::from)
        .collect::<String>()
        .to_lowercase();
    let db_name = format!("ggbench_{tag}");
    let prefix = format!("ggbench-{tag}");
    let mut admin = PgConnection::connect(&format!("{db_base}/postgres"))
        .await
        .unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db_name}")))
        .execute(&mut admin)
        .await
        .unwrap();

    let env: HashMap<String, String> = [
        ("GUILDGATE_DATABASE__URL", format!("{db_base}/{db_name}")),
        ("GUILDGATE_AMQP__URL", amqp_url.clone()),
        ("GUILDGATE_AMQP__QUEUE_PREFIX", prefix.clone()),
        ("GUILDGATE_AMQP__EXCHANGE", format!("{prefix}.payments")),
        ("GUILDGATE_HTTP__ADDR", "127.0.0.1:0".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    // Tuning knobs can be tried from the environment, e.g. GUILDGATE_AMQP__CONSUMERS=2.
    .chain(std::env::vars().filter(|(k, _)| {
        k.starts_with("GUILDGATE_AMQP__")
            && k != "GUILDGATE_AMQP__QUEUE_PREFIX"
            && k != "GUILDGATE_AMQP__EXCHANGE"
            || k.starts_with("GUILDGATE_OUTBOX__")
            || k.starts_with("GUILDGATE_DATABASE__MAX")
    }))
    .collect();
    let settings = Settings::load_with_env(None, Some(env)).unwrap();
    let business = "bus_bench";
    let msgs = workload(n, business);
    let conn = Connection::connect(&amqp_url, ConnectionProperties::default())
        .await
        .unwrap();
    let consumers = settings.amqp.consumers;
    let prefetch = settings.amqp.prefetch;

    // --- Baseline: same messages, same queue type, prefetch, consumers and ack mode; no database.
    let baseline_q = format!("{prefix}.baseline");
    let ch = conn.create_channel().await.unwrap();
    let mut qargs = FieldTable::default();
    qargs.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    ch.queue_declare(
        baseline_q.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        qargs,
    )
    .await
    .unwrap();
    let acked = Arc::new(AtomicUsize::new(0));
    let stop = CancellationToken::new();
    let mut consumer_channels = Vec::new();
    for _ in 0..consumers {
        let c = conn.create_channel().await.unwrap();
        consumer_channels.push(c.clone());
        c.basic_qos(prefetch, BasicQosOptions::default())
            .await
            .unwrap();
        let mut consumer = c
            .basic_consume(
                baseline_q.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        let (acked, stop) = (acked.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    d = consumer.next() => match d {
                        Some(Ok(d)) => { d.ack(BasicAckOptions::default()).await.unwrap(); acked.fetch_add(1, Ordering::Relaxed); }
                        _ => return,
                    }
                }
            }
        });
    }
    let mut sent = HashMap::new();
    let started = Instant::now();
    publish_all(
        &ch,
        "",
        &msgs
            .iter()
            .map(|m| Msg {
                id: m.id.clone(),
                routing_key: baseline_q.clone(),
                body: m.body.clone(),
            })
            .collect::<Vec<_>>(),
        &mut sent,
    )
    .await;
    while acked.load(Ordering::Relaxed) < n {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let baseline_secs = started.elapsed().as_secs_f64();
    stop.cancel();
    for c in consumer_channels {
        let _ = c.close(200, "done".into()).await;
    }
    ch.queue_delete(baseline_q.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();

    // --- guildgate.
    // Ingest only: the relay still publishes every webhook and sync job, but nothing
    // consumes them (there is no Discord or merchant endpoint in this benchmark).
    // `--no-relay` also leaves the outbox unrelayed, to show what relaying costs.
    let options = Options {
        sync: false,
        webhooks: false,
        relay: !args.iter().any(|a| a == "--no-relay"),
        ..Options::default()
    };
    let relay_on = options.relay;
    let app = App::build(settings.clone(), options).await.unwrap();
    {
        let mut c = app.pool.acquire().await.unwrap();
        use guildgate::store::setup::*;
        ensure_business(&mut c, business).await.unwrap();
        let mut ents = Vec::new();
        for i in 0..4 {
            ents.push(
                insert_entitlement(
                    &mut c,
                    business,
                    &format!("Role {i}"),
                    "123456789012345678",
                    Some(&format!("{}", 1000 + i)),
                )
                .await
                .unwrap()
                .id,
            );
        }
        set_product_entitlements(&mut c, business, "pdt_life", &ents[0..1])
            .await
            .unwrap();
        set_product_entitlements(&mut c, business, "pdt_bundle", &ents[0..2])
            .await
            .unwrap();
        set_product_entitlements(&mut c, business, "pdt_monthly", &ents[1..3])
            .await
            .unwrap();
        set_product_entitlements(&mut c, business, "pdt_vip", &ents[2..4])
            .await
            .unwrap();
    }
    let pool = app.pool.clone();
    let metrics = app.metrics.clone();
    let shutdown = CancellationToken::new();
    let handle = tokio::spawn(app.run_until_stopped(shutdown.clone()));
    let ch = conn.create_channel().await.unwrap();
    let mut sent = HashMap::new();
    let started = Instant::now();
    publish_all(&ch, &settings.amqp.exchange, &msgs, &mut sent).await;
    let publish_secs = started.elapsed().as_secs_f64();
    while (metrics.events_settled.load(Ordering::Relaxed) as usize) < n {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    let wall_at_start = Utc::now() - chrono::Duration::from_std(started.elapsed()).unwrap();

    // Latency: publish → commit for every applied event (processed_at is the wall clock
    // at apply time, within its transaction).
    let rows: Vec<(String, DateTime<Utc>)> =
        sqlx::query_as("SELECT event_id, processed_at FROM processed_events")
            .fetch_all(&pool)
            .await
            .unwrap();
    let mut lat: Vec<f64> = rows
        .iter()
        .filter_map(|(id, at)| {
            let sent_at = sent.get(id)?;
            let sent_wall = wall_at_start
                + chrono::Duration::from_std(sent_at.duration_since(started)).unwrap();
            Some(((*at - sent_wall).num_microseconds()? as f64 / 1000.0).max(0.0))
        })
        .collect();
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let grants: i64 = sqlx::query_scalar("SELECT count(*) FROM grants")
        .fetch_one(&pool)
        .await
        .unwrap();
    shutdown.cancel();
    let _ = handle.await;

    // Clean up.
    let names = Names::from_settings(&settings);
    for q in guildgate::amqp::topology::all_queues(&names, &settings) {
        let _ = ch
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    for ex in [settings.amqp.exchange.clone(), names.dead_letter_exchange()] {
        let _ = ch
            .exchange_delete(ex.as_str().into(), ExchangeDeleteOptions::default())
            .await;
    }
    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE {db_name} WITH (FORCE)"
    )))
    .execute(&mut admin)
    .await;

    let events_per_s = n as f64 / secs;
    let baseline_per_s = n as f64 / baseline_secs;
    println!("events published            {n}");
    println!("grants created              {grants}");
    println!("publish time (s)            {publish_secs:.2}");
    println!("guildgate end-to-end (s)    {secs:.2}   {events_per_s:.0} events/s");
    println!("baseline, no database (s)   {baseline_secs:.2}   {baseline_per_s:.0} events/s");
    println!(
        "ratio to baseline           {:.2}",
        events_per_s / baseline_per_s
    );
    println!(
        "latency p50 / p99 (ms)      {:.1} / {:.1}",
        percentile(&lat, 0.5),
        percentile(&lat, 0.99)
    );
    println!(
        "{}",
        json!({
            "events": n,
            "events_per_s": events_per_s.round(),
            "baseline_events_per_s": baseline_per_s.round(),
            "ratio": (events_per_s / baseline_per_s * 100.0).round() / 100.0,
            "p50_ms": (percentile(&lat, 0.5) * 10.0).round() / 10.0,
            "p99_ms": (percentile(&lat, 0.99) * 10.0).round() / 10.0,
            "consumers": consumers,
            "prefetch": prefetch,
            "batch_size": settings.amqp.batch_size,
            "relay": relay_on,
        })
    );
}
