//! Ingest benchmark: `cargo run --release --example bench_ingest -- --events 50000`.
//!
//! Publishes a realistic mix of payment events to a fresh exchange while guildgate
//! (in-process, real RabbitMQ and PostgreSQL, durable commits) consumes them, and reports
//! end-to-end throughput (first publish → last commit) and latency percentiles
//! (publish → commit of each applied event). In the same round it measures the raw
//! baseline: the same publisher and messages through the same exchange into the same
//! kind of queue, consumed with the same prefetch, consumer count and batched acks,
//! doing no database work; once before guildgate's phase and once after it, and the
//! round's baseline is the mean of the two (this machine's speed drifts within
//! minutes, and two runs that bracket guildgate's phase cancel most of that). Both
//! phases also report the CPU the whole machine spent per 1,000 events, which varies
//! less between runs than throughput on a shared 2-core machine.
//!
//! Each round (`--rounds`, 5) has its own database, exchange and queues; the summary and
//! the last line (JSON) give medians, and the ratio is the median of the rounds' own
//! ratios. A round's database is a copy of one seeded once per run with `--history`
//! (100,000) earlier events' rows and an ANALYZE, as a deployment that has run for a
//! while has, so rounds are short and start alike; `--history 0` measures a cold start on
//! empty tables instead.
//!
//! Uses `GUILDGATE_TEST_DATABASE_URL` / `GUILDGATE_TEST_AMQP_URL` like the tests and
//! deletes its database, queues and exchanges at the end of each round. `--no-relay`
//! leaves the outbox unrelayed, to show what relaying its rows costs.

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
use lapin::{Connection, ConnectionProperties};
use rand::Rng;
use serde_json::json;
use tokio_util::sync::CancellationToken;

#[path = "common/measure.rs"]
mod measure;
#[path = "common/workload.rs"]
mod workload;
#[path = "common/world.rs"]
mod world;
use measure::{Cpu, Wal, median, metric_value};
use workload::{Msg, publish_all};

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// What the command line asks for.
struct Args {
    events: usize,
    rounds: usize,
    history: usize,
    /// Businesses the events (and the history) are spread over.
    businesses: usize,
    relay: bool,
    plain_baseline: bool,
    /// SQL run on the seeded database before its copies are made.
    seed_sql: Option<String>,
}

impl Args {
    fn parse() -> Args {
        let args: Vec<String> = std::env::args().collect();
        let num = |flag: &str, default: usize| -> usize {
            args.iter()
                .position(|a| a == flag)
                .and_then(|i| args.get(i + 1))
                .map(|s| {
                    s.parse()
                        .unwrap_or_else(|_| panic!("{flag} takes a number, not {s:?}"))
                })
                .unwrap_or(default)
        };
        world::help(
            "bench_ingest [--events N (50000)] [--rounds N (5)] [--history N (100000)] [--businesses N (1)] [--no-relay] [--plain-baseline] [--seed-sql FILE]\n\
             Tuning from the environment: GUILDGATE_AMQP__*, GUILDGATE_OUTBOX__*, GUILDGATE_DATABASE__MAX_CONNECTIONS.\n\
             --businesses spreads the events and the history over N businesses, taken in turn (a batch then holds many).\n\
             --seed-sql runs FILE's statements on the seeded database (then ANALYZE) before the rounds copy it:\n\
             a schema change measured without a migration.",
        );
        Args {
            events: num("--events", 50_000),
            rounds: num("--rounds", 5).max(1),
            history: num("--history", 100_000),
            businesses: num("--businesses", 1).max(1),
            relay: !args.iter().any(|a| a == "--no-relay"),
            plain_baseline: args.iter().any(|a| a == "--plain-baseline"),
            seed_sql: args.iter().position(|a| a == "--seed-sql").map(|i| {
                let path = args.get(i + 1).expect("--seed-sql takes a file");
                std::fs::read_to_string(path).unwrap_or_else(|e| panic!("--seed-sql {path}: {e}"))
            }),
        }
    }
}

/// One round's figures.
struct Round {
    events_per_s: f64,
    /// The baseline's two runs, before and after guildgate's phase.
    baselines_per_s: (f64, f64),
    p50_ms: f64,
    p99_ms: f64,
    /// Machine CPU per 1,000 events (ms): guildgate's phase, the baseline's.
    cpu_ms_per_k: Option<f64>,
    baseline_cpu_ms_per_k: Option<f64>,
    /// This process's CPU per 1,000 events (ms): guildgate's phase (guildgate and the
    /// publisher), the baseline's (its consumer and the same publisher). Steadier than
    /// the machine's, and the difference is what guildgate itself costs.
    process_cpu_ms_per_k: Option<f64>,
    baseline_process_cpu_ms_per_k: Option<f64>,
    /// Events per consumer transaction (deferred events count again in a later one):
    /// the fixed costs of a transaction are shared by this many.
    events_per_batch: Option<f64>,
    /// Outbox rows not yet relayed when the last event committed.
    outbox_left: i64,
    /// Events per second and machine CPU per 1,000 events until the relay had also
    /// published every outbox row (with the relay on).
    relayed_per_s: Option<f64>,
    relayed_cpu_ms_per_k: Option<f64>,
    /// PostgreSQL's write-ahead log per event in guildgate's phase (the whole server's,
    /// relay and background work included): records, full-page images, bytes.
    wal_per_event: Wal,
}

impl Round {
    /// The round's baseline: the mean of its two runs.
    fn baseline_per_s(&self) -> f64 {
        (self.baselines_per_s.0 + self.baselines_per_s.1) / 2.0
    }
}

#[tokio::main]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = Args::parse();
    let businesses: Vec<String> = match args.businesses {
        1 => vec!["bus_bench".to_string()],
        n => (1..=n).map(|k| format!("bus_bench_{k}")).collect(),
    };
    let msgs = workload::workload_of(args.events, &businesses);
    let seeded = seed(&args, &businesses).await;
    let mut rounds = Vec::new();
    for r in 1..=args.rounds {
        let round = round(&args, &msgs, &seeded).await;
        let cpu = |c: Option<f64>| c.map_or("-".to_string(), |c| format!("{c:.0}"));
        println!(
            "round {r}: guildgate {:.0} events/s (CPU {} ms per 1,000 events, {} in this process), baseline {:.0} events/s (before {:.0}, after {:.0}; CPU {} ms, {} in this process), ratio {:.2}, p50 {:.0} ms, p99 {:.0} ms, {} events per transaction, outbox rows left {}, WAL per event {:.1} records ({:.2} full pages), {:.0} bytes{}",
            round.events_per_s,
            cpu(round.cpu_ms_per_k),
            cpu(round.process_cpu_ms_per_k),
            round.baseline_per_s(),
            round.baselines_per_s.0,
            round.baselines_per_s.1,
            cpu(round.baseline_cpu_ms_per_k),
            cpu(round.baseline_process_cpu_ms_per_k),
            round.events_per_s / round.baseline_per_s(),
            round.p50_ms,
            round.p99_ms,
            cpu(round.events_per_batch),
            round.outbox_left,
            round.wal_per_event.records,
            round.wal_per_event.fpi,
            round.wal_per_event.bytes,
            match (round.relayed_per_s, round.relayed_cpu_ms_per_k) {
                (Some(r), c) => format!(
                    "; all relayed: {r:.0} events/s (CPU {} ms), ratio {:.2}",
                    cpu(c),
                    r / round.baseline_per_s()
                ),
                _ => String::new(),
            },
        );
        rounds.push(round);
    }
    seeded.drop_db().await;
    let med = |f: &dyn Fn(&Round) -> f64| median(&mut rounds.iter().map(f).collect::<Vec<_>>());
    let med_opt = |f: &dyn Fn(&Round) -> Option<f64>| {
        let mut xs: Vec<f64> = rounds.iter().filter_map(f).collect();
        (!xs.is_empty()).then(|| median(&mut xs).round())
    };
    let events_per_s = med(&|r| r.events_per_s);
    let baseline_per_s = med(&|r| r.baseline_per_s());
    // The median of the rounds' own ratios: each pairs phases run minutes apart, which
    // is fairer than the ratio of medians when the machine's speed drifts.
    let ratio = med(&|r| r.events_per_s / r.baseline_per_s());
    let (p50, p99) = (med(&|r| r.p50_ms), med(&|r| r.p99_ms));
    let settings = Settings::load_with_env(None, Some(bench_env("-", "-"))).unwrap();
    println!(
        "median of {} rounds: guildgate {events_per_s:.0} events/s, baseline {baseline_per_s:.0} events/s, ratio {ratio:.2}, p50 {p50:.0} ms, p99 {p99:.0} ms",
        args.rounds
    );
    println!(
        "{}",
        json!({
            "events": args.events,
            "rounds": args.rounds,
            "history": args.history,
            "businesses": args.businesses,
            "events_per_s": events_per_s.round(),
            "baseline_events_per_s": baseline_per_s.round(),
            "ratio": (ratio * 100.0).round() / 100.0,
            "p50_ms": (p50 * 10.0).round() / 10.0,
            "p99_ms": (p99 * 10.0).round() / 10.0,
            "cpu_ms_per_1k_events": med_opt(&|r| r.cpu_ms_per_k),
            "relayed_events_per_s": med_opt(&|r| r.relayed_per_s),
            "relayed_ratio": med_opt(&|r| r.relayed_per_s.map(|x| x / r.baseline_per_s() * 100.0)).map(|x| x / 100.0),
            "relayed_cpu_ms_per_1k_events": med_opt(&|r| r.relayed_cpu_ms_per_k),
            "baseline_cpu_ms_per_1k_events": med_opt(&|r| r.baseline_cpu_ms_per_k),
            "process_cpu_ms_per_1k_events": med_opt(&|r| r.process_cpu_ms_per_k),
            "events_per_batch": med_opt(&|r| r.events_per_batch),
            "wal_records_per_event": med_opt(&|r| Some(r.wal_per_event.records * 10.0)).map(|x| x / 10.0),
            "wal_fpi_per_event": med_opt(&|r| Some(r.wal_per_event.fpi * 100.0)).map(|x| x / 100.0),
            "wal_bytes_per_event": med_opt(&|r| Some(r.wal_per_event.bytes)),
            "baseline_process_cpu_ms_per_1k_events": med_opt(&|r| r.baseline_process_cpu_ms_per_k),
            "consumers": settings.amqp.consumers,
            "prefetch": settings.amqp.prefetch,
            "batch_size": settings.amqp.batch_size,
            "relay": args.relay,
            "plain_baseline": args.plain_baseline,
        })
    );
}

/// The settings' environment for a round's database and queue prefix, plus the tuning
/// knobs given in this process's environment (e.g. GUILDGATE_AMQP__CONSUMERS=2).
fn bench_env(db_url: &str, prefix: &str) -> HashMap<String, String> {
    let amqp_url = std::env::var("GUILDGATE_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    [
        ("GUILDGATE_DATABASE__URL", db_url.to_string()),
        ("GUILDGATE_AMQP__URL", amqp_url),
        ("GUILDGATE_AMQP__QUEUE_PREFIX", prefix.to_string()),
        ("GUILDGATE_AMQP__EXCHANGE", format!("{prefix}.payments")),
        ("GUILDGATE_HTTP__ADDR", "127.0.0.1:0".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .chain(std::env::vars().filter(|(k, _)| {
        k.starts_with("GUILDGATE_AMQP__")
            && k != "GUILDGATE_AMQP__QUEUE_PREFIX"
            && k != "GUILDGATE_AMQP__EXCHANGE"
            && k != "GUILDGATE_AMQP__URL"
            || k.starts_with("GUILDGATE_OUTBOX__")
            || k.starts_with("GUILDGATE_DATABASE__MAX")
    }))
    .collect()
}

/// The raw baseline: the same publisher and messages, through the same kind of exchange
/// into the same queue (guildgate's own topology, declared under a prefix of its own),
/// consumed with the same prefetch, consumer count and ack mode; no database.
/// `--plain-baseline`: a bare quorum queue on the default exchange instead. Returns
/// events per second and CPU per 1,000 events (the machine's, this process's).
async fn baseline(
    conn: &Connection,
    args: &Args,
    msgs: &[Msg],
    settings: &Settings,
    prefix: &str,
    label: &str,
) -> (f64, Option<(f64, f64)>) {
    let n = msgs.len();
    let consumers = settings.amqp.consumers;
    let prefetch = settings.amqp.prefetch;
    let ch = conn.create_channel().await.unwrap();
    let base_settings =
        Settings::load_with_env(None, Some(bench_env("-", &format!("{prefix}-{label}")))).unwrap();
    let base_names = Names::from_settings(&base_settings);
    let (baseline_q, baseline_exchange) = if args.plain_baseline {
        let q = format!("{prefix}.{label}");
        let mut qargs = FieldTable::default();
        qargs.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
        ch.queue_declare(
            q.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            qargs,
        )
        .await
        .unwrap();
        (q, String::new())
    } else {
        guildgate::amqp::topology::declare(&ch, &base_names, &base_settings)
            .await
            .unwrap();
        (
            base_names.payment_events(),
            base_names.platform_exchange.clone(),
        )
    };
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
        let (batch_size, linger) = (settings.amqp.batch_size, settings.amqp.batch_linger);
        // Acked as guildgate acks: in batches filled the same way (up to the batch size,
        // for up to the linger), with one `multiple` ack each.
        tokio::spawn(async move {
            loop {
                let first = tokio::select! {
                    _ = stop.cancelled() => return,
                    d = consumer.next() => match d {
                        Some(Ok(d)) => d,
                        _ => return,
                    }
                };
                let more =
                    guildgate::queue::more_deliveries(&mut consumer, batch_size - 1, linger, &stop)
                        .await;
                let n = 1 + more.len();
                let last = more.last().unwrap_or(&first);
                last.ack(BasicAckOptions { multiple: true }).await.unwrap();
                acked.fetch_add(n, Ordering::Relaxed);
            }
        });
    }
    // On the plain queue every message goes to it by name; through the topology each
    // keeps its routing key.
    let baseline_msgs: Vec<Msg> = msgs
        .iter()
        .map(|m| Msg {
            id: m.id.clone(),
            routing_key: if args.plain_baseline {
                baseline_q.clone()
            } else {
                m.routing_key.clone()
            },
            body: m.body.clone(),
        })
        .collect();
    let mut sent = HashMap::new();
    let cpu_before = Cpu::now();
    let started = Instant::now();
    eprintln!("{label}: publishing {n} events");
    publish_all(&ch, &baseline_exchange, &baseline_msgs, &mut sent).await;
    while acked.load(Ordering::Relaxed) < n {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    eprintln!("{label}: all acked");
    let secs = started.elapsed().as_secs_f64();
    let cpu = Cpu::ms_per_k_since(cpu_before, n as u64);
    stop.cancel();
    for c in consumer_channels {
        let _ = c.close(200, "done".into()).await;
    }
    world::delete_topology(&ch, &base_settings).await;
    let _ = ch
        .queue_delete(baseline_q.as_str().into(), QueueDeleteOptions::default())
        .await;

    (n as f64 / secs, cpu)
}

/// The server the rounds' databases are on (a URL without a database).
fn db_base() -> String {
    std::env::var("GUILDGATE_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

/// A short random name part, so that runs side by side do not meet.
fn tag() -> String {
    rand::rng()
        .sample_iter(&rand::distr::Alphanumeric)
        .take(8)
        .map(char::from)
        .collect::<String>()
        .to_lowercase()
}

/// The database every round starts from: guildgate's schema, the business and its
/// entitlements, `--history` earlier events' rows and their statistics. Seeded once
/// (most of a round's time otherwise) and copied for each round, so rounds are short
/// and start from the same state.
async fn seed(args: &Args, businesses: &[String]) -> world::Database {
    let db = world::Database::new(&db_base(), &format!("ggbench_{}_seed", tag())).await;
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    guildgate::store::migrate(&pool).await.unwrap();
    for business in businesses {
        let ents = workload::setup(&pool, business).await;
        workload::seed_history(&pool, business, &ents, args.history / businesses.len()).await;
    }
    if let Some(sql) = &args.seed_sql {
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("{sql};\nANALYZE")))
            .execute(&pool)
            .await
            .unwrap_or_else(|e| panic!("--seed-sql: {e}"));
    }
    // A template must have no connections when it is copied.
    pool.close().await;
    db
}

/// One round on its own database (a copy of the seeded one), exchange and queues: the
/// baseline, guildgate, the baseline again.
async fn round(args: &Args, msgs: &[Msg], seeded: &world::Database) -> Round {
    let n = args.events;
    let db_base = db_base();
    let tag = tag();
    let prefix = format!("ggbench-{tag}");
    let db = world::Database::copy(&db_base, &format!("ggbench_{tag}"), &seeded.name).await;
    let settings = Settings::load_with_env(None, Some(bench_env(&db.url, &prefix))).unwrap();
    let amqp_url = secrecy::ExposeSecret::expose_secret(&settings.amqp.url).to_string();
    let conn = Connection::connect(&amqp_url, ConnectionProperties::default())
        .await
        .unwrap();

    // --- The baseline, before guildgate's phase and again after it: this machine's
    // speed drifts within minutes, and the mean of the two brackets guildgate's phase.
    let before = baseline(&conn, args, msgs, &settings, &prefix, "baseline").await;

    // --- guildgate.
    // Ingest only: the relay still publishes every webhook and sync job, but nothing
    // consumes them (there is no Discord or merchant endpoint in this benchmark).
    // `--no-relay` also leaves the outbox unrelayed, to show what relaying costs.
    let options = Options {
        sync: false,
        webhooks: false,
        relay: args.relay,
        ..Options::default()
    };
    let app = App::build(settings.clone(), options).await.unwrap();
    let pool = app.pool.clone();
    let metrics = app.metrics.clone();
    let shutdown = CancellationToken::new();
    let handle = tokio::spawn(app.run_until_stopped(shutdown.clone()));
    let ch = conn.create_channel().await.unwrap();
    let mut sent = HashMap::new();
    let wal_before = Wal::read_after_quiet(&pool).await;
    let cpu_before = Cpu::now();
    let started = Instant::now();
    // On stderr, as the baseline's, for a profiler to start and stop on
    // (docs/benchmarks.md, "Where ingest's cost goes").
    eprintln!("guildgate phase: publishing {n} events");
    publish_all(&ch, &settings.amqp.exchange, msgs, &mut sent).await;
    while (metrics.events_settled.load(Ordering::Relaxed) as usize) < n {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    eprintln!("guildgate phase: all settled");
    let secs = started.elapsed().as_secs_f64();
    let cpu = Cpu::ms_per_k_since(cpu_before, n as u64);
    let events_per_batch = metric_value(&metrics.render(), "guildgate_event_batch_seconds_count")
        .filter(|b| *b > 0.0)
        .map(|b| n as f64 / b);
    // Every message of the workload is valid: one that was dead-lettered (a query the
    // database refused, say) was settled without being applied, and the figure above
    // would measure a failure. The consumer counts them as it settles, so none still on
    // its way to the dead-letter queue is missed.
    let kinds: std::collections::BTreeSet<&str> =
        msgs.iter().map(|m| m.routing_key.as_str()).collect();
    let dead: u64 = kinds
        .iter()
        .map(|k| metrics.event_count(k, "dead_lettered"))
        .sum();
    assert_eq!(dead, 0, "{dead} events were dead-lettered");
    // What the relay had yet to publish when the last event committed: a relay that
    // falls behind would flatter the figure above.
    let outbox_rows = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM outbox")
            .fetch_one(&pool)
            .await
            .unwrap()
    };
    let outbox_left = outbox_rows().await;
    // And once it has published everything: the rate guildgate sustains with the relay
    // keeping up, which is what a steady load needs.
    let drained_secs = if args.relay {
        let mut left = outbox_left;
        while left > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
            left = outbox_rows().await;
        }
        Some(started.elapsed().as_secs_f64())
    } else {
        None
    };
    let drained_cpu =
        drained_secs.and_then(|_| Cpu::ms_per_k_since(cpu_before, n as u64).map(|c| c.0));
    let wall_at_start = Utc::now() - chrono::Duration::from_std(started.elapsed()).unwrap();

    // Latency: publish → commit for every applied event (processed_at is the wall clock
    // at apply time, within its transaction).
    let rows: Vec<(String, DateTime<Utc>)> = sqlx::query_as(
        "SELECT event_id, processed_at FROM processed_events WHERE event_id NOT LIKE 'old\\_%'",
    )
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
    shutdown.cancel();
    let _ = handle.await;
    let wal_per_event = wal_once_gone(&db).await.per_unit_since(wal_before, n);
    // Clean up, then the second baseline: with the round's database dropped (which
    // waits for a checkpoint), PostgreSQL's after-work on guildgate's writes
    // (autovacuum, flushing dirty pages) does not slow it down.
    world::delete_topology(&ch, &settings).await;
    db.drop_db().await;
    let after = baseline(&conn, args, msgs, &settings, &prefix, "baseline-after").await;
    let _ = conn.close(200, "done".into()).await;

    Round {
        events_per_s: n as f64 / secs,
        baselines_per_s: (before.0, after.0),
        p50_ms: percentile(&lat, 0.5),
        p99_ms: percentile(&lat, 0.99),
        cpu_ms_per_k: cpu.map(|c| c.0),
        baseline_cpu_ms_per_k: mean_of(before.1.map(|c| c.0), after.1.map(|c| c.0)),
        process_cpu_ms_per_k: cpu.map(|c| c.1),
        events_per_batch,
        baseline_process_cpu_ms_per_k: mean_of(before.1.map(|c| c.1), after.1.map(|c| c.1)),
        outbox_left,
        relayed_per_s: drained_secs.map(|d| n as f64 / d),
        relayed_cpu_ms_per_k: drained_cpu,
        wal_per_event,
    }
}

/// The WAL counters once every backend of `db` has exited (a backend reports all it has
/// not yet on its way out, before it leaves `pg_stat_activity`): what a run wrote, to
/// its last record.
async fn wal_once_gone(db: &world::Database) -> Wal {
    let server = sqlx::PgPool::connect(&format!("{}/postgres", db_base()))
        .await
        .unwrap();
    loop {
        let left: i64 =
            sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE datname = $1")
                .bind(&db.name)
                .fetch_one(&server)
                .await
                .unwrap();
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let wal = Wal::read(&server).await;
    server.close().await;
    wal
}

/// The mean of the two where both are known, else the one that is.
fn mean_of(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) => Some((a + b) / 2.0),
        (a, b) => a.or(b),
    }
}
