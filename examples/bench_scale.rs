//! Ingest with several replicas: `cargo run --release --example bench_scale [-- --events N
//! --replicas 1,2,3]`.
//!
//! For each replica count, a fresh database (with `bench_ingest`'s history of 100,000
//! earlier events), queues and exchange; that many guildgate processes (this program
//! started again, running what `guildgate serve` runs, ingest and the relay only: no
//! Discord or merchant endpoint here); the workload of `bench_ingest` published as fast
//! as the broker confirms. It reports events per second until every event is applied
//! and relayed, and the CPU each part of the machine spent per 1,000 events, read from
//! `/proc`: the guildgate processes, PostgreSQL (its processes, and the backends that
//! ended meanwhile), RabbitMQ (the broker's Erlang VM) and the publisher (this
//! process). With one replica it also samples that replica's peak memory (`VmHWM`)
//! and its resident memory five seconds after the load. Prints a table, then a JSON
//! line. Uses `GUILDGATE_TEST_DATABASE_URL` / `GUILDGATE_TEST_AMQP_URL` like the tests.

use std::collections::{HashMap, HashSet};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use serde_json::json;

#[path = "common/measure.rs"]
mod measure;
#[path = "common/workload.rs"]
mod workload;
#[path = "common/world.rs"]
mod world;

const BUSINESS: &str = "bus_bench";
const HISTORY: usize = 100_000;

fn main() {
    world::help(
        "bench_scale [--events N (50000)] [--replicas 1,2,3]\n\
         Ingest with one, two and three guildgate processes on one database and broker.",
    );
    let args: Vec<String> = std::env::args().collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    if args.get(1).map(String::as_str) == Some("replica") {
        let settings = guildgate::config::Settings::load(None).expect("settings");
        guildgate::telemetry::init(settings.log.format);
        let _ = rustls::crypto::ring::default_provider().install_default();
        let options = guildgate::app::Options {
            sync: false,
            webhooks: false,
            email: false,
            ..guildgate::app::Options::default()
        };
        if let Err(e) = rt.block_on(guildgate::app::serve(settings, options)) {
            eprintln!("replica: {e}");
            std::process::exit(1);
        }
        return;
    }
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let events: usize = value("--events").map_or(50_000, |v| v.parse().expect("--events N"));
    let replicas: Vec<usize> = value("--replicas")
        .unwrap_or_else(|| "1,2,3".into())
        .split(',')
        .map(|r| r.trim().parse().expect("--replicas 1,2,3"))
        .collect();
    rt.block_on(run(events, &replicas));
}

/// CPU seconds spent so far by each part of the machine.
#[derive(Clone, Copy, Default)]
struct Parts {
    guildgate: f64,
    postgres: f64,
    rabbitmq: f64,
    publisher: f64,
}

impl Parts {
    fn now(replicas: &HashSet<u32>) -> Parts {
        let mut p = Parts::default();
        for pid in measure::pids() {
            let Some((comm, own, children)) = measure::proc_stat(&pid) else {
                continue;
            };
            let pid_n: u32 = pid.parse().unwrap_or(0);
            if replicas.contains(&pid_n) {
                p.guildgate += own;
            } else if comm == "postgres" {
                // The postmaster's children's time holds backends that ended.
                p.postgres += own + children;
            } else if comm == "beam.smp" {
                p.rabbitmq += own;
            } else if pid_n == std::process::id() {
                p.publisher += own;
            }
        }
        p
    }

    /// Milliseconds per 1,000 events since `before`.
    fn per_k_since(&self, before: &Parts, events: usize) -> Parts {
        let k = events as f64 / 1000.0;
        let per = |a: f64, b: f64| (a - b) * 1000.0 / k;
        Parts {
            guildgate: per(self.guildgate, before.guildgate),
            postgres: per(self.postgres, before.postgres),
            rabbitmq: per(self.rabbitmq, before.rabbitmq),
            publisher: per(self.publisher, before.publisher),
        }
    }

    fn total(&self) -> f64 {
        self.guildgate + self.postgres + self.rabbitmq + self.publisher
    }
}

struct Outcome {
    replicas: usize,
    events_per_s: f64,
    cpu: Parts,
    /// One replica's peak and after-load resident memory, in MiB.
    memory: Option<(f64, f64)>,
}

async fn run(events: usize, counts: &[usize]) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let msgs = workload::workload(events, BUSINESS);
    let distinct: HashSet<&str> = msgs.iter().map(|m| m.id.as_str()).collect();
    let mut outcomes = Vec::new();
    for &n in counts {
        let o = round(events, &msgs, distinct.len(), n).await;
        eprintln!(
            "{n} replica(s): {:.0} events/s; CPU per 1,000 events: guildgate {:.0} ms, PostgreSQL {:.0} ms, RabbitMQ {:.0} ms, publisher {:.0} ms",
            o.events_per_s, o.cpu.guildgate, o.cpu.postgres, o.cpu.rabbitmq, o.cpu.publisher
        );
        outcomes.push(o);
    }
    println!(
        "| replicas | events/s | guildgate | PostgreSQL | RabbitMQ | publisher | all (ms of CPU per 1,000 events) |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    for o in &outcomes {
        println!(
            "| {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} |",
            o.replicas,
            o.events_per_s,
            o.cpu.guildgate,
            o.cpu.postgres,
            o.cpu.rabbitmq,
            o.cpu.publisher,
            o.cpu.total()
        );
    }
    if let Some((peak, after)) = outcomes.iter().find_map(|o| o.memory) {
        println!(
            "\none replica: peak resident memory {peak:.1} MiB under the load, {after:.1} MiB five seconds after it"
        );
    }
    println!(
        "{}",
        json!({
            "events": events,
            "rounds": outcomes.iter().map(|o| json!({
                "replicas": o.replicas,
                "events_per_s": o.events_per_s.round(),
                "cpu_ms_per_1k": {
                    "guildgate": o.cpu.guildgate.round(),
                    "postgres": o.cpu.postgres.round(),
                    "rabbitmq": o.cpu.rabbitmq.round(),
                    "publisher": o.cpu.publisher.round(),
                },
                "peak_rss_mib": o.memory.map(|m| m.0),
                "rss_after_mib": o.memory.map(|m| m.1),
            })).collect::<Vec<_>>(),
        })
    );
}

async fn round(events: usize, msgs: &[workload::Msg], distinct: usize, n: usize) -> Outcome {
    let db_base = std::env::var("GUILDGATE_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into());
    let amqp_url = std::env::var("GUILDGATE_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let tag = guildgate::domain::ids::mint("s")
        .to_lowercase()
        .replace('_', "");
    let prefix = format!("ggbench-{tag}");
    let db = world::Database::new(&db_base, &format!("ggbench_{tag}")).await;
    let db_url = db.url.clone();
    let pool = sqlx::PgPool::connect(&db_url).await.unwrap();
    guildgate::store::migrate(&pool).await.unwrap();
    let ents = workload::setup(&pool, BUSINESS).await;
    workload::seed_history(&pool, BUSINESS, &ents, HISTORY).await;

    let env: HashMap<String, String> = world::bench_env(db_url, &amqp_url, &prefix, 0)
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .chain([("RUST_LOG".to_string(), "warn".to_string())])
        .collect();
    let settings =
        guildgate::config::Settings::load_with_env(None, Some(env.clone())).expect("settings");
    let mut children: Vec<Child> = (0..n)
        .map(|_| {
            Command::new(std::env::current_exe().expect("own path"))
                .arg("replica")
                .envs(&env)
                .stdin(Stdio::null())
                .spawn()
                .expect("replica")
        })
        .collect();
    let pids: HashSet<u32> = children.iter().map(Child::id).collect();

    // Ready when every replica's event consumers are subscribed.
    let conn = Connection::connect(&amqp_url, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let queue = guildgate::amqp::Names::from_settings(&settings).payment_events();
    let want = u32::try_from(n * settings.amqp.consumers).unwrap_or(u32::MAX);
    let ready_by = Instant::now() + Duration::from_secs(60);
    loop {
        let probe = conn.create_channel().await.unwrap();
        let q = probe
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await;
        if q.is_ok_and(|q| q.consumer_count() >= want) {
            break;
        }
        assert!(Instant::now() < ready_by, "the replicas did not subscribe");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let before = Parts::now(&pids);
    let started = Instant::now();
    let mut peak_kib = 0;
    let mut sent = HashMap::new();
    let publish = workload::publish_all(&ch, &settings.amqp.exchange, msgs, &mut sent);
    let first = *pids.iter().next().expect("a replica");
    tokio::pin!(publish);
    let mut published = false;
    loop {
        tokio::select! {
            _ = &mut publish, if !published => published = true,
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
        if n == 1
            && let Some((_, hwm)) = measure::memory_kib(first)
        {
            peak_kib = peak_kib.max(hwm);
        }
        if !published {
            continue;
        }
        let (applied, outbox): (i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM processed_events WHERE event_id NOT LIKE 'old\\_%'),
                    (SELECT count(*) FROM outbox)",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        if applied as usize >= distinct && outbox == 0 {
            break;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let cpu = Parts::now(&pids).per_k_since(&before, events);
    let memory = if n == 1 {
        tokio::time::sleep(Duration::from_secs(5)).await;
        measure::memory_kib(first)
            .map(|(rss, hwm)| (peak_kib.max(hwm) as f64 / 1024.0, rss as f64 / 1024.0))
    } else {
        None
    };

    for c in &mut children {
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
    }
    for c in &mut children {
        let _ = c.wait();
    }
    world::delete_topology(&ch, &settings).await;
    let _ = conn.close(200, "done".into()).await;
    pool.close().await;
    db.drop_db().await;
    Outcome {
        replicas: n,
        events_per_s: events as f64 / secs,
        cpu,
        memory,
    }
}
