//! Two `guildgate serve` processes (the real binary) on one broker and one database, with
//! the sandbox Discord: payment events and webhook deliveries are shared, exactly one
//! process talks to Discord (the single active consumer of `<prefix>.discord-sync`), and
//! when that process is killed (SIGKILL) the other takes over with nothing lost.

use crate::common;
use crate::discord_world;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use common::events::payment;
use common::worker::{Worker, WorkerCommand, sample};
use common::{TestDb, amqp_url, tag};
use discord_world::BOT_PERMISSIONS;
use guildgate::config::Settings;
use guildgate::store;
use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use sandbox_discord::{GuildSpec, Sandbox, SandboxConfig, UserSpec};
use sqlx::PgPool;

const T0: &str = "2026-05-01T10:31:00Z";
const BUSINESS: &str = "bus_H4ekzPSlcg";
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// Everything the test started; killed and deleted even when the test panics.
struct Cluster {
    procs: Vec<Worker>,
    db: Option<TestDb>,
    settings: Settings,
    dir: std::path::PathBuf,
    passed: bool,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for p in &mut self.procs {
            p.kill();
        }
        if !self.passed {
            for p in &self.procs {
                eprintln!("--- last lines of {} ---\n{}", p.name, p.log_tail(40));
            }
        }
        common::cleanup_blocking(&self.settings, self.db.take());
        if self.passed {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

async fn wait_until<F, Fut>(what: &str, limit: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn count(pool: &PgPool, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_share_the_work_and_the_discord_syncer_fails_over() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let sandbox = Sandbox::start(SandboxConfig::default()).await;
    let db = TestDb::create().await;
    let prefix = format!("ggtest-{}", tag());
    let env: HashMap<String, String> = [
        ("GUILDGATE_DATABASE__URL", db.url.clone()),
        ("GUILDGATE_DATABASE__MAX_CONNECTIONS", "8".into()),
        ("GUILDGATE_AMQP__URL", amqp_url()),
        ("GUILDGATE_AMQP__QUEUE_PREFIX", prefix.clone()),
        ("GUILDGATE_AMQP__EXCHANGE", format!("{prefix}.payments")),
        // One consumer taking one event at a time per process, so the broker
        // alternates events between the two processes.
        ("GUILDGATE_AMQP__CONSUMERS", "1".into()),
        ("GUILDGATE_AMQP__PREFETCH", "1".into()),
        ("GUILDGATE_AMQP__BATCH_SIZE", "1".into()),
        ("GUILDGATE_OUTBOX__SWEEP_INTERVAL", "200ms".into()),
        ("GUILDGATE_SYNC__RETRY_DELAYS", "100ms,200ms".into()),
        ("GUILDGATE_WEBHOOKS__RETRY_DELAYS", "0s,100ms,200ms".into()),
        ("GUILDGATE_WEBHOOKS__ALLOW_PRIVATE_TARGETS", "true".into()),
    ]
    .into_iter()
    .chain(common::world::sandbox_env(&sandbox))
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let settings = Settings::load_with_env(None, Some(env.clone())).expect("test settings");
    let dir = std::env::temp_dir().join(format!("guildgate-two-{}", tag()));
    std::fs::create_dir_all(&dir).unwrap();
    let pool = PgPool::connect(&db.url).await.unwrap();
    store::migrate(&pool).await.unwrap();
    let mut cluster = Cluster {
        procs: Vec::new(),
        db: Some(db),
        settings: settings.clone(),
        dir: dir.clone(),
        passed: false,
    };

    // The merchant: a guild with a role, an entitlement on a product, a webhook receiver.
    let g = sandbox.add_guild(
        GuildSpec::new("Acme")
            .with_bot_permissions(BOT_PERMISSIONS)
            .with_role("Patrons", 1),
    );
    let role = g.role("Patrons");
    let received = Arc::new(AtomicUsize::new(0));
    let url = {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let r = received.clone();
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move || {
                let r = r.clone();
                async move {
                    r.fetch_add(1, Ordering::SeqCst);
                    StatusCode::NO_CONTENT
                }
            }),
        );
        tokio::spawn(async move { axum::serve(listener, app).await });
        url
    };
    {
        let mut conn = pool.acquire().await.unwrap();
        store::businesses::ensure_business(&mut conn, BUSINESS)
            .await
            .unwrap();
        let e = store::entitlements::insert_entitlement(
            &mut conn,
            BUSINESS,
            "Patrons",
            &g.guild_id.to_string(),
            Some(&role.to_string()),
        )
        .await
        .unwrap();
        store::entitlements::set_product_entitlements(&mut conn, BUSINESS, "pdt_1", &[e.id])
            .await
            .unwrap();
    }
    common::add_webhook_endpoint(&pool, BUSINESS, url, SECRET).await;
    // Customers already linked to Discord: delivered without an OAuth.
    let n = 40usize;
    let mut users = Vec::new();
    for i in 0..n {
        let user = sandbox.add_user(UserSpec::new(format!("user{i}")));
        common::link_sandbox_user(
            &pool,
            &settings,
            &sandbox,
            BUSINESS,
            &format!("cus_{i}"),
            user,
        )
        .await;
        users.push(user);
    }

    let cmd = WorkerCommand {
        program: env!("CARGO_BIN_EXE_guildgate").into(),
        args: vec!["serve".into()],
    };
    cluster.procs.push(Worker::spawn("a", &cmd, &env, &dir));
    cluster.procs.push(Worker::spawn("b", &cmd, &env, &dir));
    for p in &mut cluster.procs {
        p.wait_ready(Duration::from_secs(60)).await;
    }

    let publisher = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .unwrap();
    let ch = publisher.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    let publish = |i: usize| {
        let ch = ch.clone();
        let exchange = settings.amqp.exchange.clone();
        async move {
            let body = serde_json::to_vec(&payment(
                BUSINESS,
                &format!("pay_{i}"),
                &format!("cus_{i}"),
                &["pdt_1"],
                T0,
            ))
            .unwrap();
            let confirm = ch
                .basic_publish(
                    exchange.as_str().into(),
                    "payment.succeeded".into(),
                    BasicPublishOptions::default(),
                    &body,
                    BasicProperties::default()
                        .with_delivery_mode(2)
                        .with_message_id(format!("evt_{i}").into()),
                )
                .await
                .unwrap()
                .await
                .unwrap();
            assert!(confirm.is_ack());
        }
    };

    // Phase 1: both processes up.
    let half = n / 2;
    for i in 0..half {
        publish(i).await;
    }
    wait_until(
        "the first half delivered, with their webhooks",
        Duration::from_secs(60),
        || async {
            count(
                &pool,
                "SELECT count(*) FROM grants WHERE status = 'Delivered'",
            )
            .await
                == half as i64
                && count(
                    &pool,
                    "SELECT count(*) FROM webhook_messages WHERE status = 'delivered'",
                )
                .await
                    == 2 * half as i64
        },
    )
    .await;
    let (ma, mb) = (
        cluster.procs[0].metrics().await,
        cluster.procs[1].metrics().await,
    );
    let events = |m: &str| sample(m, "guildgate_events_total", &[]);
    let webhooks = |m: &str| sample(m, "guildgate_webhook_attempts_total", &[]);
    let discord = |m: &str| {
        sample(
            m,
            "guildgate_discord_requests_total",
            &["route=\"PUT /guilds/:guild/members/:user\""],
        )
    };
    eprintln!(
        "phase 1: events a={} b={}, webhook attempts a={} b={}, member PUTs a={} b={}",
        events(&ma),
        events(&mb),
        webhooks(&ma),
        webhooks(&mb),
        discord(&ma),
        discord(&mb)
    );
    assert!(events(&ma) > 0.0 && events(&mb) > 0.0, "events are shared");
    assert_eq!(events(&ma) + events(&mb), half as f64);
    assert!(
        webhooks(&ma) > 0.0 && webhooks(&mb) > 0.0,
        "webhook deliveries are shared"
    );
    let all_discord = |m: &str| sample(m, "guildgate_discord_requests_total", &[]);
    let owner = match (all_discord(&ma) > 0.0, all_discord(&mb) > 0.0) {
        (true, false) => 0,
        (false, true) => 1,
        other => panic!("exactly one process must call Discord, got {other:?}"),
    };
    assert_eq!(discord(if owner == 0 { &ma } else { &mb }), half as f64);
    let survivor = 1 - owner;

    // Phase 2: the second half is published and the owner of the syncer is killed
    // (SIGKILL) while that work is in flight.
    for i in half..n {
        publish(i).await;
    }
    // Kill once the owner is busy syncing the second half.
    wait_until(
        "the second half being synced",
        Duration::from_secs(30),
        || async {
            count(
                &pool,
                "SELECT count(*) FROM grants WHERE status = 'Delivered'",
            )
            .await
                > half as i64 + 2
        },
    )
    .await;
    cluster.procs[owner].kill();
    let killed = Instant::now();
    let delivered_at_kill = count(
        &pool,
        "SELECT count(*) FROM grants WHERE status = 'Delivered'",
    )
    .await;
    let took_over = {
        let p = &cluster.procs[survivor];
        let first = std::cell::Cell::new(None);
        wait_until(
            "every grant delivered after the kill",
            Duration::from_secs(30),
            || async {
                if first.get().is_none() && discord(&p.metrics().await) > 0.0 {
                    first.set(Some(killed.elapsed()));
                }
                count(
                    &pool,
                    "SELECT count(*) FROM grants WHERE status = 'Delivered'",
                )
                .await
                    == n as i64
            },
        )
        .await;
        first.get()
    };
    let all_delivered = killed.elapsed();
    wait_until(
        "every webhook delivered",
        Duration::from_secs(30),
        || async {
            count(
                &pool,
                "SELECT count(*) FROM webhook_messages WHERE status = 'delivered'",
            )
            .await
                == 2 * n as i64
        },
    )
    .await;
    eprintln!(
        "phase 2: {delivered_at_kill} of {n} delivered at the kill; survivor's first Discord call {took_over:?} after it, every grant delivered after {all_delivered:?}"
    );
    assert!(
        delivered_at_kill < n as i64,
        "the kill happened with work in flight"
    );
    assert!(
        all_delivered < Duration::from_secs(15),
        "takeover took {all_delivered:?}"
    );

    // Nothing lost, nothing doubled.
    assert_eq!(
        count(&pool, "SELECT count(*) FROM processed_events").await,
        n as i64
    );
    assert_eq!(count(&pool, "SELECT count(*) FROM grants").await, n as i64);
    assert_eq!(count(&pool, "SELECT count(*) FROM outbox").await, 0);
    for (i, user) in users.iter().enumerate() {
        let m = sandbox
            .member(g.guild_id, *user)
            .unwrap_or_else(|| panic!("user{i} is a member"));
        assert!(m.roles.contains(&role), "user{i} has the role");
    }
    assert!(received.load(Ordering::SeqCst) >= 2 * n);
    let ms = cluster.procs[survivor].metrics().await;
    assert!(discord(&ms) > 0.0, "the survivor took over the syncer");
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM grants WHERE status <> 'Delivered'"
        )
        .await,
        0
    );

    pool.close().await;
    let _ = publisher.close(200, "done".into()).await;
    cluster.passed = true;
    drop(cluster);
    sandbox.shutdown().await;
}

/// Another process took the worker's port between [`common::worker::free_port`] picking
/// it and the worker binding it, and answers `/readyz` there: the worker is started again
/// on another port, and only its own answer counts as ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_port_was_taken_starts_on_another() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let db = TestDb::create().await;
    let prefix = format!("ggtest-{}", tag());
    let env: HashMap<String, String> = [
        ("GUILDGATE_DATABASE__URL", db.url.clone()),
        ("GUILDGATE_AMQP__URL", amqp_url()),
        ("GUILDGATE_AMQP__QUEUE_PREFIX", prefix.clone()),
        ("GUILDGATE_AMQP__EXCHANGE", format!("{prefix}.payments")),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let settings = Settings::load_with_env(None, Some(env.clone())).expect("test settings");
    let dir = std::env::temp_dir().join(format!("guildgate-port-{}", tag()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut cluster = Cluster {
        procs: Vec::new(),
        db: Some(db),
        settings,
        dir: dir.clone(),
        passed: false,
    };
    let taken = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = taken.local_addr().unwrap().port();
    let other = axum::Router::new().route("/readyz", axum::routing::get(|| async { "ok" }));
    tokio::spawn(async move { axum::serve(taken, other).await });

    let cmd = WorkerCommand {
        program: env!("CARGO_BIN_EXE_guildgate").into(),
        args: vec!["serve".into()],
    };
    cluster
        .procs
        .push(Worker::spawn_on(port, "w", &cmd, &env, &dir));
    cluster.procs[0].wait_ready(Duration::from_secs(60)).await;
    assert_ne!(cluster.procs[0].port, port, "started again on another port");
    let metrics = cluster.procs[0].metrics().await;
    assert!(
        metrics.contains("guildgate_"),
        "the worker itself answers: {metrics}"
    );
    cluster.passed = true;
}
