//! Test harness: a real guildgate on a fresh database, fresh queue prefix and fresh
//! platform exchange, so tests run in parallel against the shared PostgreSQL and
//! RabbitMQ. [`TestApp::stop`] shuts it down gracefully and deletes what it created.
//!
//! `GUILDGATE_TEST_DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432`) and
//! `GUILDGATE_TEST_AMQP_URL` (default `amqp://guest:guest@127.0.0.1:5672/%2f`) point the
//! tests elsewhere.
#![allow(dead_code)]

pub mod events;
pub mod pg_standby;
pub mod proxy;
pub mod rabbit_cluster;
pub mod worker;
#[path = "../../examples/common/world.rs"]
pub mod world;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use guildgate::amqp::Names;
use guildgate::app::{App, Options};
use guildgate::config::Settings;
use guildgate::domain::Grant;
use guildgate::faults::{Faults, Point};
use guildgate::metrics::Metrics;
use guildgate::outbox::Relay;
use guildgate::store;
use lapin::options::{BasicAckOptions, BasicPublishOptions};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use rand::Rng;
use rand::distr::Alphanumeric;
use serde_json::Value;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

pub fn database_base_url() -> String {
    std::env::var("GUILDGATE_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

pub fn amqp_url() -> String {
    std::env::var("GUILDGATE_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// A short random lowercase tag for names.
pub fn tag() -> String {
    rand::rng()
        .sample_iter(&Alphanumeric)
        .take(10)
        .map(char::from)
        .collect::<String>()
        .to_lowercase()
}

/// Polls `f` every 20 ms until it returns `Some`, for up to 30 s.
pub async fn wait_for<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A database of its own for one test, dropped with it (see [`world::Database`]).
pub type TestDb = world::Database;

impl TestDb {
    pub async fn create() -> Self {
        Self::create_on(&database_base_url()).await
    }

    /// A fresh database on the server at `base` (a URL without a database).
    pub async fn create_on(base: &str) -> Self {
        Self::new(base, &format!("ggtest_{}", tag())).await
    }
}

/// Faults a test injects into guildgate ([`guildgate::faults`]): a point fails while it
/// is set, or once.
#[derive(Debug, Default)]
pub struct Injected {
    always: std::sync::Mutex<std::collections::HashSet<Point>>,
    once: std::sync::Mutex<std::collections::HashSet<Point>>,
}

impl Injected {
    /// `point` fails every time until [`Injected::clear`].
    pub fn set(&self, point: Point) {
        self.always.lock().unwrap().insert(point);
    }

    pub fn clear(&self, point: Point) {
        self.always.lock().unwrap().remove(&point);
    }

    /// `point` fails the next time only.
    pub fn once(&self, point: Point) {
        self.once.lock().unwrap().insert(point);
    }

    /// A fault asked for [`once`](Injected::once) has not fired yet.
    pub fn pending(&self, point: Point) -> bool {
        self.once.lock().unwrap().contains(&point)
    }
}

impl Faults for Injected {
    fn fails(&self, point: Point) -> bool {
        self.always.lock().unwrap().contains(&point) || self.once.lock().unwrap().remove(&point)
    }
}

/// How to build a [`TestApp`].
#[derive(Default)]
pub struct TestConfig {
    /// Extra `GUILDGATE_*` variables.
    pub env: Vec<(String, String)>,
    /// Route the app's database connections through this address (a [`proxy::Proxy`]).
    pub db_via: Option<SocketAddr>,
    /// Route the app's broker connection through this address.
    pub amqp_via: Option<SocketAddr>,
    pub options: Option<Options>,
}

impl TestConfig {
    /// See [`TestApp::spawn_ingest`].
    pub fn ingest_only() -> Self {
        Self {
            options: Some(Options {
                sync: false,
                webhooks: false,
                ..Options::default()
            }),
            ..Self::default()
        }
    }

    /// The same, with the relay and the syncer failing where `faults` says.
    pub fn faults(mut self, faults: Arc<Injected>) -> Self {
        self.options.get_or_insert_with(Options::default).faults = faults;
        self
    }

    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.env.push((k.to_string(), v.to_string()));
        self
    }

    pub fn options(mut self, options: Options) -> Self {
        self.options = Some(options);
        self
    }
}

/// A running guildgate with its own database, prefix and exchange.
pub struct TestApp {
    pub settings: Settings,
    pub names: Names,
    /// A pool straight to the test database (not through any proxy).
    pub pool: PgPool,
    pub addr: SocketAddr,
    pub metrics: Arc<Metrics>,
    pub relay: Relay,
    /// The app's bots (the shared one, and businesses' own).
    pub bots: guildgate::discord::Bots,
    pub shutdown: CancellationToken,
    pub db: TestDb,
    publisher: Connection,
    handle: Option<tokio::task::JoinHandle<Result<(), String>>>,
    cleaned: bool,
}

pub fn replace_host(url: &str, via: SocketAddr) -> String {
    let mut u = url::Url::parse(url).unwrap();
    u.set_host(Some(&via.ip().to_string())).unwrap();
    u.set_port(Some(via.port())).unwrap();
    u.to_string()
}

impl TestApp {
    pub async fn spawn() -> Self {
        Self::spawn_with(TestConfig::default()).await
    }

    /// Ingest only: no Discord syncer and no webhook workers, so a test can read what
    /// the relay publishes to `<prefix>.discord-sync` and `<prefix>.grant-events`.
    pub async fn spawn_ingest() -> Self {
        Self::spawn_with(TestConfig::ingest_only()).await
    }

    /// Settings for a test: fresh names, fast sweeps, short retry tiers.
    pub fn settings_for(db: &TestDb, cfg: &TestConfig, port: u16) -> Settings {
        let prefix = format!("ggtest-{}", tag());
        let mut env: HashMap<String, String> = [
            ("GUILDGATE_DATABASE__URL", db.url.clone()),
            ("GUILDGATE_DATABASE__MAX_CONNECTIONS", "8".into()),
            ("GUILDGATE_AMQP__URL", amqp_url()),
            ("GUILDGATE_AMQP__QUEUE_PREFIX", prefix.clone()),
            ("GUILDGATE_AMQP__EXCHANGE", format!("{prefix}.payments")),
            ("GUILDGATE_AMQP__CONSUMERS", "2".into()),
            ("GUILDGATE_HTTP__ADDR", format!("127.0.0.1:{port}")),
            (
                "GUILDGATE_HTTP__PUBLIC_URL",
                format!("http://127.0.0.1:{port}"),
            ),
            ("GUILDGATE_OUTBOX__SWEEP_INTERVAL", "200ms".into()),
            ("GUILDGATE_SYNC__RETRY_DELAYS", "100ms,200ms".into()),
            ("GUILDGATE_WEBHOOKS__RETRY_DELAYS", "0s,100ms,200ms".into()),
            ("GUILDGATE_WEBHOOKS__ALLOW_PRIVATE_TARGETS", "true".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        if let Some(via) = cfg.db_via {
            env.insert("GUILDGATE_DATABASE__URL".into(), replace_host(&db.url, via));
        }
        if let Some(via) = cfg.amqp_via {
            env.insert("GUILDGATE_AMQP__URL".into(), replace_host(&amqp_url(), via));
        }
        for (k, v) in &cfg.env {
            env.insert(k.clone(), v.clone());
        }
        Settings::load_with_env(None, Some(env)).expect("test settings")
    }

    pub async fn spawn_with(cfg: TestConfig) -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        guildgate::telemetry::init_for_tests();
        let db = TestDb::create().await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let settings = Self::settings_for(&db, &cfg, addr.port());
        // Migrate directly (not through a proxy that a test may cut).
        let pool = PgPool::connect(&db.url).await.unwrap();
        store::migrate(&pool).await.unwrap();
        let options = cfg.options.clone().unwrap_or_default();
        let app = App::build_with_listener(settings.clone(), options, listener)
            .await
            .expect("app builds");
        let metrics = app.metrics.clone();
        let relay = app.relay.clone();
        let bots = app.bots.clone();
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(app.run_until_stopped(shutdown.clone()));
        let publisher = Connection::connect(&amqp_url(), ConnectionProperties::default())
            .await
            .unwrap();
        Self {
            names: Names::from_settings(&settings),
            settings,
            pool,
            addr,
            metrics,
            relay,
            bots,
            shutdown,
            db,
            publisher,
            handle: Some(handle),
            cleaned: false,
        }
    }

    pub fn business(&self) -> String {
        // Business ids are per database, so one fixed id per test is isolated already.
        "bus_H4ekzPSlcg".to_string()
    }

    /// Publishes to the platform's exchange as the platform does (routing key = type,
    /// `message_id` = event id), waiting for the broker's confirm.
    /// Publishes with a publisher confirm; a broker that does not answer within 30 s
    /// fails the test instead of hanging it.
    pub async fn publish_raw(&self, routing_key: &str, body: &[u8], message_id: Option<&str>) {
        let exchange = self.settings.amqp.exchange.clone();
        tokio::time::timeout(
            Duration::from_secs(30),
            self.publish_raw_unbounded(&exchange, routing_key, body, message_id),
        )
        .await
        .expect("the broker confirms a publish within 30 s");
    }

    /// Publishes straight to one of guildgate's own queues (a job delivered again).
    pub async fn publish_to_queue(&self, queue: &str, message_id: &str, body: &[u8]) {
        tokio::time::timeout(
            Duration::from_secs(30),
            self.publish_raw_unbounded("", queue, body, Some(message_id)),
        )
        .await
        .expect("the broker confirms a publish within 30 s");
    }

    async fn publish_raw_unbounded(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        message_id: Option<&str>,
    ) {
        let ch = self.publisher.create_channel().await.unwrap();
        ch.confirm_select(Default::default()).await.unwrap();
        let mut props = BasicProperties::default().with_delivery_mode(2);
        if let Some(id) = message_id {
            props = props.with_message_id(id.into());
        }
        let confirm = ch
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                body,
                props,
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(confirm.is_ack());
        let _ = ch.close(200, "done".into()).await;
    }

    /// Publishes a JSON event with its `type` as routing key.
    pub async fn publish(&self, event: &Value, message_id: &str) {
        let rk = event["type"].as_str().unwrap().to_string();
        self.publish_raw(&rk, &serde_json::to_vec(event).unwrap(), Some(message_id))
            .await;
    }

    /// Creates the business (if new), an entitlement and attaches it to `product_id`.
    /// Publishes one-time payments `pay_<i>` of customers `cus_<i>` for `pdt_life`, as
    /// events `evt_<i>` a second apart.
    pub async fn publish_payments(&self, range: std::ops::Range<usize>) {
        let b = self.business();
        for i in range {
            let at = format!("2026-05-01T10:{:02}:{:02}Z", (i / 60) % 60, i % 60);
            let event = events::payment(
                &b,
                &format!("pay_{i}"),
                &format!("cus_{i}"),
                &["pdt_life"],
                &at,
            );
            self.publish(&event, &format!("evt_{i}")).await;
        }
    }

    pub async fn entitlement_for(
        &self,
        product_id: &str,
        guild_id: &str,
        role_id: Option<&str>,
    ) -> String {
        let mut conn = self.pool.acquire().await.unwrap();
        store::businesses::ensure_business(&mut conn, &self.business())
            .await
            .unwrap();
        let e = store::entitlements::insert_entitlement(
            &mut conn,
            &self.business(),
            "Patrons Discord Role",
            guild_id,
            role_id,
        )
        .await
        .unwrap();
        let mut ids: Vec<String> = sqlx::query_scalar(
            "SELECT entitlement_id FROM product_entitlements WHERE business_id = $1 AND product_id = $2 ORDER BY position",
        )
        .bind(self.business())
        .bind(product_id)
        .fetch_all(&mut *conn)
        .await
        .unwrap();
        ids.push(e.id.clone());
        store::entitlements::set_product_entitlements(
            &mut conn,
            &self.business(),
            product_id,
            &ids,
        )
        .await
        .unwrap();
        e.id
    }

    /// Attaches an existing entitlement to another product too.
    pub async fn attach(&self, product_id: &str, entitlement_ids: &[&str]) {
        let mut conn = self.pool.acquire().await.unwrap();
        let ids: Vec<String> = entitlement_ids.iter().map(|s| s.to_string()).collect();
        store::entitlements::set_product_entitlements(
            &mut conn,
            &self.business(),
            product_id,
            &ids,
        )
        .await
        .unwrap();
    }

    /// Marks a customer as having linked a Discord account (a bare row: enough for
    /// ingest, which only asks whether a link exists).
    pub async fn mark_linked(&self, customer_id: &str) {
        let mut conn = self.pool.acquire().await.unwrap();
        store::businesses::ensure_business(&mut conn, &self.business())
            .await
            .unwrap();
        sqlx::query(
            "INSERT INTO discord_links (business_id, customer_id, discord_user_id, access_token_enc, expires_at, scopes)
             VALUES ($1, $2, '1', '\\x00', now() + interval '1 day', 'identify guilds.join')",
        )
        .bind(self.business())
        .bind(customer_id)
        .execute(&mut *conn)
        .await
        .unwrap();
    }

    /// Every grant of a customer, newest first.
    pub async fn grants_of(&self, customer_id: &str) -> Vec<Grant> {
        let mut conn = self.pool.acquire().await.unwrap();
        store::grants::of_customer(&mut conn, &self.business(), customer_id)
            .await
            .unwrap()
    }

    /// How many events were recorded as processed.
    pub async fn processed_count(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM processed_events")
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    /// Waits until `n` events have been processed (or counted as irrelevant/ignored).
    pub async fn wait_processed(&self, n: i64) {
        wait_for(&format!("{n} processed events"), || async {
            (self.processed_count().await >= n).then_some(())
        })
        .await
    }

    /// Waits until `n` deliveries have been settled (acked or dead-lettered), recorded or
    /// not.
    pub async fn wait_settled(&self, n: u64) {
        wait_for(&format!("{n} settled deliveries"), || async {
            let settled = self
                .metrics
                .events_settled
                .load(std::sync::atomic::Ordering::Relaxed);
            (settled == n).then_some(())
        })
        .await
    }

    /// Waits until `n` `payment.succeeded` deliveries were applied or recognised as
    /// duplicates.
    pub async fn wait_payments_decided(&self, n: u64) {
        wait_for(&format!("{n} payments decided"), || async {
            let m = &self.metrics;
            let got = m.event_count("payment.succeeded", "applied")
                + m.event_count("payment.succeeded", "duplicate");
            (got == n).then_some(())
        })
        .await
    }

    /// Waits until the outbox is empty (everything relayed).
    pub async fn wait_outbox_empty(&self) {
        wait_for("outbox to drain", || async {
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
                .fetch_one(&self.pool)
                .await
                .unwrap();
            (n == 0).then_some(())
        })
        .await
    }

    /// Takes every message currently ready in `queue` (acking them), as (message_id,
    /// headers, body). Uses a consumer, since quorum queues with a single active
    /// consumer refuse `basic.get`.
    pub async fn drain_queue(&self, queue: &str) -> Vec<Taken> {
        use futures_util::StreamExt;
        let n = self.queue_len(queue).await as usize;
        let mut out = Vec::new();
        if n == 0 {
            return out;
        }
        let ch = self.publisher.create_channel().await.unwrap();
        let mut consumer = ch
            .basic_consume(
                queue.into(),
                "".into(),
                lapin::options::BasicConsumeOptions::default(),
                Default::default(),
            )
            .await
            .unwrap();
        while out.len() < n {
            let d = tokio::time::timeout(Duration::from_secs(10), consumer.next())
                .await
                .expect("a ready message arrives")
                .unwrap()
                .unwrap();
            out.push(Taken {
                message_id: d
                    .properties
                    .message_id()
                    .as_ref()
                    .map(|s| s.to_string())
                    .unwrap_or_default(),
                headers: d.properties.headers().clone(),
                body: d.data.clone(),
            });
            d.ack(BasicAckOptions::default()).await.unwrap();
        }
        let _ = ch.close(200, "done".into()).await;
        out
    }

    /// Drains `<prefix>.grant-events` and returns the grant events it held, one each: a
    /// bundle (what an ingest batch emits) is opened into its elements, each named
    /// `<grant>:<type>` like a single grant event.
    pub async fn drain_grant_events(&self) -> Vec<Taken> {
        let mut out = Vec::new();
        for m in self.drain_queue(&self.names.grant_events()).await {
            let carried = guildgate::webhooks::fanout::Carried::of(&m.body)
                .expect("guildgate publishes well-formed grant events");
            if !carried.bundle {
                out.push(m);
                continue;
            }
            for range in carried.events {
                let body = m.body[range].to_vec();
                let event: Value = serde_json::from_slice(&body).unwrap();
                out.push(Taken {
                    message_id: format!(
                        "{}:{}",
                        event["data"]["id"].as_str().unwrap(),
                        event["type"].as_str().unwrap()
                    ),
                    headers: m.headers.clone(),
                    body,
                });
            }
        }
        out
    }

    /// Messages ready in a queue.
    pub async fn queue_len(&self, queue: &str) -> u32 {
        let ch = self.publisher.create_channel().await.unwrap();
        let q = ch
            .queue_declare(
                queue.into(),
                lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                Default::default(),
            )
            .await
            .unwrap();
        let _ = ch.close(200, "done".into()).await;
        q.message_count()
    }

    /// Graceful shutdown (as on SIGTERM); returns how the app ended.
    pub async fn shutdown(&mut self) -> Result<(), String> {
        self.end_app()
            .await
            .expect("app stops within 30 s")
            .expect("app task does not panic")
    }

    /// Cancels the app and waits for its task, 30 s at most: `None` if it has not ended
    /// by then (a task awaited before counts as ended well).
    async fn end_app(&mut self) -> Option<Result<Result<(), String>, tokio::task::JoinError>> {
        self.shutdown.cancel();
        match self.handle.take() {
            Some(h) => tokio::time::timeout(Duration::from_secs(30), h).await.ok(),
            None => Some(Ok(Ok(()))),
        }
    }

    /// Shuts down and deletes the queues, exchanges and database of this test.
    pub async fn stop(mut self) {
        let _ = self.shutdown().await;
        self.cleanup().await;
    }

    /// Stops the app if it still runs, then deletes the queues, exchanges and database
    /// of this test. Removing them under a running app would have it resubscribe and
    /// reconnect meanwhile; so the app goes first, and must stop within 30 s like
    /// [`TestApp::shutdown`] (the test fails otherwise, once the removals are done).
    /// Each removal after it is best effort and bounded: one that does not finish is
    /// reported and left to the next CI run's sweep, rather than holding the test (and
    /// the suite) forever.
    pub async fn cleanup(&mut self) {
        self.cleaned = true;
        let stopped = self.end_app().await.is_some();
        bounded("deleting the queues and exchanges", async {
            delete_broker_objects(&self.settings).await
        })
        .await;
        bounded("closing the publishing connection", async {
            let _ = self.publisher.close(200, "done".into()).await;
        })
        .await;
        bounded("closing the pool", self.pool.close()).await;
        bounded("dropping the database", self.db.drop_db()).await;
        // Said once its queues and database are gone: a failed test leaves nothing.
        assert!(stopped, "app stops within 30 s");
    }
}

/// Runs one step of a test's cleanup for at most 30 s; one that takes longer is named on
/// stderr and abandoned.
async fn bounded(step: &str, work: impl Future<Output = ()>) {
    if tokio::time::timeout(Duration::from_secs(30), work)
        .await
        .is_err()
    {
        eprintln!("cleanup: {step} did not finish within 30 s; left behind");
    }
}

/// Deletes a test's queues and exchanges (quorum queues are never auto-deleted, and each
/// holds broker file handles).
pub async fn delete_broker_objects(settings: &Settings) {
    let Ok(conn) = Connection::connect(&amqp_url(), ConnectionProperties::default()).await else {
        return;
    };
    if let Ok(ch) = conn.create_channel().await {
        world::delete_topology(&ch, settings).await;
    }
    let _ = conn.close(200, "done".into()).await;
}

impl Drop for TestApp {
    /// A test that panicked never reached `stop`: clean up anyway.
    fn drop(&mut self) {
        if self.cleaned {
            return;
        }
        self.shutdown.cancel();
        // The database goes with `self.db`.
        cleanup_blocking(&self.settings, None);
    }
}

/// Deletes a test's queues, exchanges and database from a `Drop`.
pub fn cleanup_blocking(settings: &Settings, db: Option<TestDb>) {
    let settings = settings.clone();
    world::block_on_aside(async move {
        delete_broker_objects(&settings).await;
        if let Some(db) = db {
            db.drop_db().await;
        }
    });
}

/// Links `customer` of `business` to the sandbox user `user` (as the OAuth callback
/// would), with a fresh token pair encrypted with the settings' key.
pub async fn link_sandbox_user(
    pool: &PgPool,
    settings: &Settings,
    sandbox: &sandbox_discord::Sandbox,
    business: &str,
    customer: &str,
    user: u64,
) {
    let cipher = settings.token_cipher().unwrap();
    let mut conn = pool.acquire().await.unwrap();
    store::businesses::ensure_business(&mut conn, business)
        .await
        .unwrap();
    let now = chrono::Utc::now();
    world::link_user(
        &mut conn, sandbox, &cipher, business, None, customer, user, now,
    )
    .await;
}

/// A webhook endpoint of `business` at `url` with `secret` (private targets allowed).
pub async fn add_webhook_endpoint(pool: &PgPool, business: &str, url: String, secret: &str) {
    let mut conn = pool.acquire().await.unwrap();
    guildgate::webhooks::endpoints::create(
        &mut conn,
        business,
        guildgate::webhooks::endpoints::NewEndpoint {
            url,
            description: None,
            filter_types: None,
            secret: Some(secret.into()),
            ..Default::default()
        },
        guildgate::webhooks::ssrf::TargetPolicy {
            allow_private: true,
        },
    )
    .await
    .unwrap();
}

/// A message taken from a queue.
#[derive(Debug, Clone)]
pub struct Taken {
    pub message_id: String,
    pub headers: Option<lapin::types::FieldTable>,
    pub body: Vec<u8>,
}

impl Taken {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }
    pub fn header(&self, key: &str) -> Option<String> {
        guildgate::amqp::header_text(self.headers.as_ref(), key)
    }
}
