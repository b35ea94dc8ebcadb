//! The reliability scenarios: crashes, outages, Discord chaos and hostile input, each returning
//! a [`Report`] whose problems are losses, duplicates or misbehaviour. `tests/chaos.rs`
//! runs short versions in CI and fails on any problem; `examples/chaos.rs` runs the full
//! ones and prints the figures table of docs/reliability.md.
//!
//! Every scenario but the hostile one runs `guildgate serve` (or the same code in an
//! example's child process) as a separate process against its own database, queue
//! prefix, exchange and sandbox Discord, with a webhook receiver that checks every
//! signature with the `standardwebhooks` crate. What must result is computed by
//! [`crate::model`], never by guildgate's own code.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use chrono::Utc;
use guildgate::amqp::Names;
use guildgate::config::Settings;
use guildgate::store;
use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sandbox_discord::{
    ForcedRateLimit, GuildSpec, Latency, RateLimitConfig, RouteKind, Sandbox, SandboxConfig, Stats,
    UserSpec, permissions,
};
use serde_json::{Value, json};
use sqlx::PgPool;

use crate::common::pg_standby::PgStandbyPair;
use crate::common::proxy::Proxy;
use crate::common::rabbit_cluster::RabbitCluster;
use crate::common::worker::{Worker, WorkerCommand};
use crate::common::{self, TestDb, amqp_url, tag};
use crate::model::{self, ENTITLEMENTS, Model, Plan, Source};

/// Sizes and durations of one run of the scenarios.
#[derive(Clone, Debug)]
pub struct Params {
    /// Events of the crash scenario.
    pub events: usize,
    /// SIGKILLs during the crash scenario.
    pub kills: usize,
    pub seed: u64,
    /// Share of customers who linked Discord before buying.
    pub linked_share: f64,
    /// Events of the outage scenario.
    pub outage_events: usize,
    pub broker_outage: Duration,
    pub db_outage: Duration,
    pub receiver_outage: Duration,
    /// Events of the Discord chaos scenario (every customer linked).
    pub discord_events: usize,
    /// Events of the RabbitMQ cluster scenario.
    pub cluster_events: usize,
    /// Events of the PostgreSQL failover scenario.
    pub standby_events: usize,
    /// Give up waiting for the expected state after this long without progress.
    pub stall: Duration,
}

impl Params {
    /// The figures of docs/reliability.md (examples/chaos.rs).
    #[allow(dead_code)]
    pub fn full(seed: u64) -> Self {
        Self {
            events: 20_000,
            kills: 5,
            seed,
            linked_share: 0.2,
            outage_events: 2_000,
            broker_outage: Duration::from_secs(10),
            db_outage: Duration::from_secs(30),
            receiver_outage: Duration::from_secs(15),
            discord_events: 600,
            cluster_events: 6_000,
            standby_events: 6_000,
            stall: Duration::from_secs(90),
        }
    }

    /// What CI runs.
    pub fn short(seed: u64) -> Self {
        Self {
            events: 1_500,
            kills: 3,
            seed,
            linked_share: 0.25,
            outage_events: 300,
            broker_outage: Duration::from_secs(2),
            db_outage: Duration::from_secs(4),
            receiver_outage: Duration::from_secs(3),
            discord_events: 160,
            cluster_events: 800,
            standby_events: 800,
            stall: Duration::from_secs(60),
        }
    }
}

/// What one scenario found.
#[derive(Debug, Default)]
pub struct Report {
    pub scenario: &'static str,
    pub events_sent: usize,
    pub kills: usize,
    pub grants: Option<GrantCounts>,
    pub webhooks: Option<WebhookCounts>,
    /// Dead-lettered messages by reason code.
    pub dead_lettered: BTreeMap<String, u64>,
    /// Discord requests sent into an exhausted bucket (beyond the forced 429s).
    pub discord_exhausted: Option<u64>,
    /// Time from the end of each outage until everything was applied.
    pub recovery: Vec<(&'static str, Duration)>,
    pub notes: Vec<String>,
    pub problems: Vec<String>,
    pub elapsed: Duration,
}

#[derive(Debug, Default, Clone, PartialEq)]
pub struct GrantCounts {
    pub expected: usize,
    pub found: usize,
    pub duplicated: usize,
    pub missing: usize,
}

#[derive(Debug, Default, Clone, PartialEq)]
pub struct WebhookCounts {
    pub expected: usize,
    pub delivered: usize,
    pub missing: usize,
    /// (grant, type) pairs received under more than one `webhook-id`.
    pub duplicated: usize,
    /// Received webhooks no grant explains.
    pub unexpected: usize,
}

impl Report {
    pub fn passed(&self) -> bool {
        self.problems.is_empty()
    }

    pub fn json(&self) -> Value {
        json!({
            "scenario": self.scenario,
            "events_sent": self.events_sent,
            "kills": self.kills,
            "grants": self.grants.as_ref().map(|g| json!({
                "expected": g.expected, "found": g.found,
                "duplicated": g.duplicated, "missing": g.missing,
            })),
            "webhooks": self.webhooks.as_ref().map(|w| json!({
                "expected": w.expected, "delivered": w.delivered, "missing": w.missing,
                "duplicated": w.duplicated, "unexpected": w.unexpected,
            })),
            "dead_lettered": self.dead_lettered,
            "discord_requests_into_exhausted_buckets": self.discord_exhausted,
            "recovery_s": self.recovery.iter()
                .map(|(k, d)| (k.to_string(), json!((d.as_secs_f64() * 10.0).round() / 10.0)))
                .collect::<serde_json::Map<String, Value>>(),
            "elapsed_s": self.elapsed.as_secs(),
            "problems": self.problems.len(),
        })
    }
}

/// The figures table (Markdown) for `reports`, then their notes and problems.
pub fn table(reports: &[Report]) -> String {
    let mut out = String::from(
        "| scenario | events sent | kills | grants expected / found / duplicated / missing | webhooks expected / delivered / missing | dead-lettered (by reason) | Discord requests into exhausted buckets | recovery after the fault |\n|---|---:|---:|---|---|---|---:|---|\n",
    );
    for r in reports {
        let grants = r.grants.as_ref().map_or("n/a".into(), |g| {
            format!(
                "{} / {} / {} / {}",
                n(g.expected),
                n(g.found),
                g.duplicated,
                g.missing
            )
        });
        let webhooks = r.webhooks.as_ref().map_or("n/a".into(), |w| {
            let mut s = format!("{} / {} / {}", n(w.expected), n(w.delivered), w.missing);
            if w.duplicated + w.unexpected > 0 {
                s.push_str(&format!(
                    " ({} under two ids, {} unexpected)",
                    w.duplicated, w.unexpected
                ));
            }
            s
        });
        let dead = if r.dead_lettered.is_empty() {
            "0".to_string()
        } else {
            let total: u64 = r.dead_lettered.values().sum();
            let parts: Vec<String> = r
                .dead_lettered
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect();
            format!("{total}: {}", parts.join(", "))
        };
        let recovery = if r.recovery.is_empty() {
            "n/a".to_string()
        } else {
            r.recovery
                .iter()
                .map(|(k, d)| format!("{k} {:.1} s", d.as_secs_f64()))
                .collect::<Vec<_>>()
                .join(", ")
        };
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r.scenario,
            n(r.events_sent),
            r.kills,
            grants,
            webhooks,
            dead,
            r.discord_exhausted.map_or("n/a".into(), |v| v.to_string()),
            recovery,
        ));
    }
    for r in reports {
        for note in &r.notes {
            out.push_str(&format!("\n- {}: {note}", r.scenario));
        }
        out.push_str(&format!(
            "\n- {}: {} in {:.0} s",
            r.scenario,
            if r.passed() {
                "passed".to_string()
            } else {
                format!("{} PROBLEMS", r.problems.len())
            },
            r.elapsed.as_secs_f64()
        ));
        for p in r.problems.iter().take(30) {
            out.push_str(&format!("\n    {p}"));
        }
    }
    out.push('\n');
    out
}

/// `12345` as `12,345`.
fn n(v: usize) -> String {
    let s = v.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

// ---------------------------------------------------------------------------------------
// The stack: a sandbox Discord, a database, a webhook receiver, one worker process.

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
/// Discord's invalid-request limit: 10,000 per 10 minutes bans the bot's IP.
const DISCORD_BAN_THRESHOLD: u64 = 10_000;

/// One received webhook.
#[derive(Clone, Debug)]
struct Received {
    webhook_id: String,
    kind: String,
    grant_id: String,
}

#[derive(Default)]
struct ReceiverState {
    received: Mutex<Vec<Received>>,
    /// Answer 503 to everything (the merchant's server is down).
    down: AtomicBool,
    bad_signatures: AtomicU64,
}

async fn receive(
    State(state): State<Arc<ReceiverState>>,
    Path(_business): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> StatusCode {
    if state.down.load(Ordering::SeqCst) {
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    // An implementation that is not ours; it also rejects stale timestamps.
    let verified = standardwebhooks::Webhook::new(SECRET)
        .unwrap()
        .verify(&body, &headers)
        .is_ok();
    if !verified {
        state.bad_signatures.fetch_add(1, Ordering::SeqCst);
        return StatusCode::UNAUTHORIZED;
    }
    let v: Value = serde_json::from_slice(&body).unwrap_or_default();
    state.received.lock().unwrap().push(Received {
        webhook_id: headers
            .get("webhook-id")
            .and_then(|h| h.to_str().ok())
            .unwrap_or_default()
            .to_string(),
        kind: v["type"].as_str().unwrap_or_default().to_string(),
        grant_id: v["data"]["id"].as_str().unwrap_or_default().to_string(),
    });
    StatusCode::NO_CONTENT
}

struct Ent {
    id: String,
    guild: u64,
    role: Option<u64>,
}

/// How a scenario wants its stack.
#[derive(Default)]
struct StackOptions {
    sandbox: SandboxConfig,
    /// Route the worker's database and broker connections through cuttable proxies.
    proxied: bool,
    /// The nodes of a RabbitMQ cluster to use instead of the machine's broker: guildgate
    /// gets them all (`amqp.urls`), the platform's publisher connects to the first that
    /// answers and moves on when it is lost.
    amqp_nodes: Vec<String>,
    /// The PostgreSQL server (a URL without a database) to use instead of the
    /// machine's.
    database_base: Option<String>,
    env: Vec<(&'static str, String)>,
}

struct Stack {
    name: &'static str,
    sandbox: Option<Sandbox>,
    db: Option<TestDb>,
    pool: PgPool,
    settings: Settings,
    names: Names,
    env: HashMap<String, String>,
    cmd: WorkerCommand,
    dir: PathBuf,
    worker: Option<Worker>,
    restarts: usize,
    ents: HashMap<&'static str, Ent>,
    /// Guild of each entitlement name's server, by server name.
    guilds: HashMap<&'static str, u64>,
    /// Linked customers' Discord users.
    users: HashMap<String, u64>,
    /// What some of those users had before buying anything: (guild, roles) they were
    /// in, long before the traffic. guildgate finds it there and never takes it away.
    before: HashMap<u64, Vec<(u64, Vec<u64>)>>,
    receiver: Arc<ReceiverState>,
    publisher: Connection,
    channel: Channel,
    /// Where the publisher may connect (the machine's broker, or a cluster's nodes).
    publisher_nodes: Vec<String>,
    db_proxy: Option<Proxy>,
    amqp_proxy: Option<Proxy>,
    passed: bool,
}

impl Stack {
    async fn start(
        name: &'static str,
        cmd: &WorkerCommand,
        plan: &Plan,
        opts: StackOptions,
    ) -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let sandbox = Sandbox::start(opts.sandbox).await;
        let db = match &opts.database_base {
            Some(base) => TestDb::create_on(base).await,
            None => TestDb::create().await,
        };
        let pool = PgPool::connect(&db.url).await.unwrap();
        store::migrate(&pool).await.unwrap();
        let prefix = format!("ggtest-{}", tag());
        let publisher_nodes = if opts.amqp_nodes.is_empty() {
            vec![amqp_url()]
        } else {
            opts.amqp_nodes.clone()
        };
        let (db_proxy, amqp_proxy) = if opts.proxied {
            let pg: std::net::SocketAddr = url::Url::parse(&db.url)
                .unwrap()
                .socket_addrs(|| Some(5432))
                .unwrap()[0];
            let mq: std::net::SocketAddr = url::Url::parse(&amqp_url())
                .unwrap()
                .socket_addrs(|| Some(5672))
                .unwrap()[0];
            (Some(Proxy::start(pg).await), Some(Proxy::start(mq).await))
        } else {
            (None, None)
        };
        let mut env: HashMap<String, String> = [
            (
                "GUILDGATE_DATABASE__URL",
                match &db_proxy {
                    Some(p) => common::replace_host(&db.url, p.addr),
                    None => db.url.clone(),
                },
            ),
            ("GUILDGATE_DATABASE__MAX_CONNECTIONS", "10".into()),
            (
                "GUILDGATE_AMQP__URL",
                match &amqp_proxy {
                    Some(p) => common::replace_host(&amqp_url(), p.addr),
                    None => amqp_url(),
                },
            ),
            ("GUILDGATE_AMQP__URLS", opts.amqp_nodes.join(",")),
            ("GUILDGATE_AMQP__QUEUE_PREFIX", prefix.clone()),
            ("GUILDGATE_AMQP__EXCHANGE", format!("{prefix}.payments")),
            ("GUILDGATE_AMQP__CONSUMERS", "2".into()),
            ("GUILDGATE_OUTBOX__SWEEP_INTERVAL", "500ms".into()),
            (
                "GUILDGATE_SYNC__RETRY_DELAYS",
                "200ms,500ms,1s,2s,5s,10s,10s,10s".into(),
            ),
            (
                "GUILDGATE_WEBHOOKS__RETRY_DELAYS",
                "0s,1s,2s,5s,10s,10s,10s,10s,10s".into(),
            ),
            ("GUILDGATE_WEBHOOKS__ALLOW_PRIVATE_TARGETS", "true".into()),
        ]
        .into_iter()
        .chain(common::world::sandbox_env(&sandbox))
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        for (k, v) in opts.env {
            env.insert(k.to_string(), v);
        }
        let settings = Settings::load_with_env(None, Some(env.clone())).expect("settings");
        let names = Names::from_settings(&settings);

        // Three servers, the bot installed with what it needs.
        let bot = permissions::MANAGE_ROLES
            | permissions::KICK_MEMBERS
            | permissions::CREATE_INSTANT_INVITE;
        let main = sandbox.add_guild(
            GuildSpec::new("Main")
                .with_bot_permissions(bot)
                .with_role("Gold", 1)
                .with_role("Silver", 1),
        );
        let club = sandbox.add_guild(GuildSpec::new("Club").with_bot_permissions(bot));
        let other = sandbox.add_guild(
            GuildSpec::new("Other")
                .with_bot_permissions(bot)
                .with_role("Member", 1),
        );
        let guilds: HashMap<&'static str, &sandbox_discord::GuildIds> =
            [("Main", &main), ("Club", &club), ("Other", &other)].into();

        // The merchants' catalog and webhook endpoints.
        let receiver = Arc::new(ReceiverState::default());
        let hook_base = {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let base = format!("http://{}", listener.local_addr().unwrap());
            let app = axum::Router::new()
                .route("/{business}", axum::routing::post(receive))
                .with_state(receiver.clone());
            tokio::spawn(async move { axum::serve(listener, app).await });
            base
        };
        let mut ents = HashMap::new();
        {
            let mut conn = pool.acquire().await.unwrap();
            for b in [model::MAIN, model::OTHER, model::NONE] {
                store::businesses::ensure_business(&mut conn, b)
                    .await
                    .unwrap();
            }
            for (ent, business, guild, role) in ENTITLEMENTS {
                let g = guilds[guild];
                let role_id = role.map(|r| g.role(r));
                let e = store::entitlements::insert_entitlement(
                    &mut conn,
                    business,
                    ent,
                    &g.guild_id.to_string(),
                    role_id.map(|r| r.to_string()).as_deref(),
                )
                .await
                .unwrap();
                ents.insert(
                    ent,
                    Ent {
                        id: e.id.to_string(),
                        guild: g.guild_id,
                        role: role_id,
                    },
                );
            }
            for (business, product, wanted) in model::PRODUCTS {
                let ids: Vec<String> = wanted.iter().map(|e| ents[e].id.clone()).collect();
                store::entitlements::set_product_entitlements(&mut conn, business, product, &ids)
                    .await
                    .unwrap();
            }
        }
        for business in [model::MAIN, model::OTHER] {
            common::add_webhook_endpoint(
                &pool,
                business,
                format!("{hook_base}/{business}"),
                SECRET,
            )
            .await;
        }
        // Customers who linked Discord before buying. Every fifth of them linked the
        // Discord account of the one before (one person, two checkouts under two
        // emails): what one's grants give, the other's must not take away.
        let mut users = HashMap::new();
        let mut previous: Option<u64> = None;
        for (i, c) in plan.linked().enumerate() {
            let user = match previous {
                Some(u) if i % 5 == 4 => u,
                _ => sandbox.add_user(UserSpec::new(c.id.clone())),
            };
            common::link_sandbox_user(&pool, &settings, &sandbox, c.business, &c.id, user).await;
            users.insert(c.id.clone(), user);
            previous = Some(user);
        }
        // Some of them were in a server before they bought: a member of the
        // membership-only server, a member of the main one with the gold role a
        // moderator gave, a member of the main one without a role.
        let long_ago = std::time::SystemTime::now() - Duration::from_secs(86_400);
        let mut before: HashMap<u64, Vec<(u64, Vec<u64>)>> = HashMap::new();
        let mut distinct: Vec<u64> = users.values().copied().collect();
        distinct.sort_unstable();
        distinct.dedup();
        for (i, user) in distinct.into_iter().enumerate() {
            let had = match i % 7 {
                1 => (club.guild_id, Vec::new()),
                3 => (main.guild_id, vec![main.role("Gold")]),
                5 => (main.guild_id, Vec::new()),
                _ => continue,
            };
            sandbox.add_member_since(had.0, user, &had.1, long_ago);
            before.entry(user).or_default().push(had);
        }

        let (publisher, channel) = connect_publisher(&publisher_nodes).await;
        let dir = std::env::temp_dir().join(format!("guildgate-chaos-{name}-{}", tag()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut stack = Self {
            name,
            sandbox: Some(sandbox),
            db: Some(db),
            pool,
            settings,
            names,
            env,
            cmd: cmd.clone(),
            dir,
            worker: None,
            restarts: 0,
            ents,
            guilds: [
                ("Main", main.guild_id),
                ("Club", club.guild_id),
                ("Other", other.guild_id),
            ]
            .into(),
            users,
            before,
            receiver,
            publisher,
            channel,
            publisher_nodes,
            db_proxy,
            amqp_proxy,
            passed: false,
        };
        stack.spawn_worker().await;
        stack
    }

    fn sandbox(&self) -> &Sandbox {
        self.sandbox.as_ref().unwrap()
    }

    async fn spawn_worker(&mut self) {
        let name = format!("{}-{}", self.name, self.restarts);
        let mut w = Worker::spawn(&name, &self.cmd, &self.env, &self.dir);
        w.wait_ready(Duration::from_secs(60)).await;
        self.worker = Some(w);
    }

    /// SIGKILL the worker and start a new one.
    async fn kill_and_restart(&mut self) {
        if let Some(mut w) = self.worker.take() {
            w.kill();
        }
        self.restarts += 1;
        self.spawn_worker().await;
    }

    /// Reads what guildgate wrote from `url` from now on (the database moved).
    async fn repoint_checks(&mut self, url: &str) {
        self.pool.close().await;
        self.pool = PgPool::connect(url).await.unwrap();
    }

    /// Connects the publisher again when its node was lost.
    async fn ensure_publisher(&mut self) {
        if !self.publisher.status().connected() || !self.channel.status().connected() {
            self.reconnect_publisher().await;
        }
    }

    /// Connects the publisher to `url` (one of its nodes) now, and to the others in
    /// turn when that one is lost.
    async fn move_publisher_to(&mut self, url: &str) {
        let k = self
            .publisher_nodes
            .iter()
            .position(|n| n == url)
            .expect("one of the publisher's nodes");
        self.publisher_nodes.rotate_left(k);
        self.reconnect_publisher().await;
    }

    async fn reconnect_publisher(&mut self) {
        let _ = self.publisher.close(200, "reconnecting".into()).await;
        (self.publisher, self.channel) = connect_publisher(&self.publisher_nodes).await;
    }

    /// Publishes `msgs` to the platform's exchange with publisher confirms, as the
    /// platform does: what the broker did not confirm (its node died under the publish)
    /// is published again, on another node if need be.
    async fn publish(&mut self, msgs: &[crate::model::Msg]) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut pending: Vec<&crate::model::Msg> = msgs.iter().collect();
        while !pending.is_empty() {
            self.ensure_publisher().await;
            let exchange = self.settings.amqp.exchange.clone();
            let mut sent = Vec::with_capacity(pending.len());
            for m in pending {
                let confirm = self
                    .channel
                    .basic_publish(
                        exchange.as_str().into(),
                        m.routing_key.as_str().into(),
                        BasicPublishOptions::default(),
                        &m.body,
                        BasicProperties::default()
                            .with_delivery_mode(2)
                            .with_content_type("application/json".into())
                            .with_message_id(m.message_id.as_str().into()),
                    )
                    .await;
                sent.push((m, confirm));
            }
            let mut unconfirmed = Vec::new();
            for (m, confirm) in sent {
                let acked = match confirm {
                    Ok(c) => c.await.is_ok_and(|c| c.is_ack()),
                    Err(_) => false,
                };
                if !acked {
                    unconfirmed.push(m);
                }
            }
            if !unconfirmed.is_empty() {
                assert!(
                    Instant::now() < deadline,
                    "the broker refused or lost {} message(s) for a minute",
                    unconfirmed.len()
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
                self.reconnect_publisher().await;
            }
            pending = unconfirmed;
        }
    }

    /// Publishes a round and waits until everything published so far (`recorded`
    /// events) is applied; a round not applied within `stall` is a problem.
    async fn publish_round(
        &mut self,
        round: &[crate::model::Msg],
        recorded: usize,
        stall: Duration,
        r: &mut Report,
    ) {
        self.publish(round).await;
        if let Err(e) = self.wait_processed(recorded, stall).await {
            r.problems.push(e);
        }
    }

    /// Publishes the first half of a round (after `before` events) and waits until some
    /// of it is applied; returns the other half, for after the fault.
    async fn publish_half<'a>(
        &mut self,
        round: &'a [crate::model::Msg],
        before: usize,
        stall: Duration,
    ) -> &'a [crate::model::Msg] {
        let (first, second) = round.split_at(round.len() / 2);
        self.publish(first).await;
        let _ = self
            .wait_processed(before + first.len().min(1), stall)
            .await;
        second
    }

    async fn processed(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM processed_events")
            .fetch_one(&self.pool)
            .await
            .unwrap_or(-1)
    }

    /// Waits until guildgate recorded `n` events.
    async fn wait_processed(&self, n: usize, limit: Duration) -> Result<(), String> {
        let deadline = Instant::now() + limit;
        loop {
            let got = self.processed().await;
            if got >= n as i64 {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("only {got} of {n} events recorded after {limit:?}"));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Compares what guildgate, the receiver and the sandbox hold with `model`.
    async fn compare(&self, model: &Model, plan: &Plan) -> Comparison {
        let mut c = Comparison::default();
        let linked: BTreeSet<&str> = plan.linked().map(|c| c.id.as_str()).collect();
        let ent_names: HashMap<&str, &'static str> =
            self.ents.iter().map(|(k, e)| (e.id.as_str(), *k)).collect();
        type Row = (
            String,
            String,
            String,
            Option<String>,
            Option<String>,
            String,
            Option<String>,
        );
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT id, entitlement_id, customer_id, payment_id, subscription_id, status, revocation_reason
             FROM grants ORDER BY created_at, id",
        )
        .fetch_all(&self.pool)
        .await
        .unwrap_or_default();
        let mut found: BTreeMap<model::GrantKey, Vec<(String, String, Option<String>)>> =
            BTreeMap::new();
        for (id, ent, customer, payment, sub, status, reason) in rows {
            let Some(name) = ent_names.get(ent.as_str()) else {
                c.problem(format!("grant {id} of an unknown entitlement {ent}"));
                c.grants.duplicated += 1;
                continue;
            };
            let src = match (payment, sub) {
                (_, Some(s)) => Source::Subscription(s),
                (Some(p), None) => Source::Payment(p),
                (None, None) => unreachable!("a CHECK forbids it"),
            };
            found
                .entry((name, customer, src))
                .or_default()
                .push((id, status, reason));
        }
        // Grants, position by position per key.
        let mut mapped: Vec<(&model::ModelGrant, String)> = Vec::new();
        let expected = model.by_key();
        for (key, want) in &expected {
            let got = found.remove(key).unwrap_or_default();
            let is_linked = linked.contains(key.1.as_str());
            for i in 0..want.len().max(got.len()) {
                match (want.get(i), got.get(i)) {
                    (Some(w), Some((id, status, reason))) => {
                        c.grants.expected += 1;
                        let want_status = match w.revoked {
                            Some(_) => "Revoked",
                            None if is_linked => "Delivered",
                            None => "Pending",
                        };
                        if status == want_status && reason.as_deref() == w.revoked {
                            c.grants.found += 1;
                        } else {
                            c.grants.missing += 1;
                            c.problem(format!(
                                "grant {id} {key:?}: {status} {reason:?}, expected {want_status} {:?}",
                                w.revoked
                            ));
                        }
                        mapped.push((w, id.clone()));
                    }
                    (Some(w), None) => {
                        c.grants.expected += 1;
                        c.grants.missing += 1;
                        c.problem(format!("missing grant {key:?} (#{i}, {:?})", w.revoked));
                    }
                    (None, Some((id, status, _))) => {
                        c.grants.duplicated += 1;
                        c.problem(format!("extra grant {id} {key:?} #{i} ({status})"));
                    }
                    (None, None) => unreachable!(),
                }
            }
        }
        for (key, extra) in found {
            c.grants.duplicated += extra.len();
            c.problem(format!(
                "{} grant(s) nobody asked for: {key:?}",
                extra.len()
            ));
        }

        // Webhooks: created for every grant, revoked for revoked ones, delivered for live
        // grants of linked customers (and allowed for revoked ones that were delivered
        // before their revocation).
        let received = self.receiver.received.lock().unwrap().clone();
        let mut ids: HashMap<(&str, &str), BTreeSet<&str>> = HashMap::new();
        for r in &received {
            ids.entry((r.grant_id.as_str(), r.kind.as_str()))
                .or_default()
                .insert(r.webhook_id.as_str());
        }
        let mut allowed: BTreeSet<(&str, &str)> = BTreeSet::new();
        for (w, id) in &mapped {
            let is_linked = linked.contains(w.key.1.as_str());
            let mut required = vec!["entitlement_grant.created"];
            if w.revoked.is_some() {
                required.push("entitlement_grant.revoked");
                if is_linked {
                    allowed.insert((id, "entitlement_grant.delivered"));
                }
            } else if is_linked {
                required.push("entitlement_grant.delivered");
            }
            for t in required {
                allowed.insert((id, t));
                c.webhooks.expected += 1;
                if ids.contains_key(&(id.as_str(), t)) {
                    c.webhooks.delivered += 1;
                } else {
                    c.webhooks.missing += 1;
                    c.problem(format!("webhook {t} of grant {id} never arrived"));
                }
            }
        }
        for ((grant, kind), set) in &ids {
            if set.len() > 1 {
                c.webhooks.duplicated += 1;
                c.problem(format!("{kind} of {grant} arrived under {} ids", set.len()));
            }
            if !allowed.contains(&(*grant, *kind)) {
                c.webhooks.unexpected += 1;
                c.problem(format!("unexpected webhook {kind} of {grant}"));
            }
        }

        // Discord: each linked Discord account holds exactly the roles of the live grants
        // of every customer linked to it and the roles it had before buying, is a member
        // wherever one of them puts it or it was before, and is not in the
        // membership-only server without either.
        let live = model.live_entitlements();
        let sandbox = self.sandbox();
        let mut accounts: BTreeMap<u64, Vec<&String>> = BTreeMap::new();
        for (customer, user) in &self.users {
            accounts.entry(*user).or_default().push(customer);
        }
        for (user, customers) in &accounts {
            let customer = customers.iter().min().expect("one at least");
            let holds: BTreeSet<&'static str> = customers
                .iter()
                .flat_map(|c| live.get(*c).cloned().unwrap_or_default())
                .collect();
            for (guild_name, guild) in &self.guilds {
                let here: Vec<&Ent> = holds
                    .iter()
                    .map(|e| &self.ents[e])
                    .filter(|e| e.guild == *guild)
                    .collect();
                let had = self
                    .before
                    .get(user)
                    .and_then(|b| b.iter().find(|(g, _)| g == guild));
                let want_roles: BTreeSet<u64> = here
                    .iter()
                    .filter_map(|e| e.role)
                    .chain(had.into_iter().flat_map(|(_, roles)| roles.iter().copied()))
                    .collect();
                let gated: BTreeSet<u64> = self
                    .ents
                    .values()
                    .filter(|e| e.guild == *guild)
                    .filter_map(|e| e.role)
                    .collect();
                let member = sandbox.member(*guild, *user);
                let has_roles: BTreeSet<u64> = member
                    .as_ref()
                    .map(|m| {
                        m.roles
                            .iter()
                            .copied()
                            .filter(|r| gated.contains(r))
                            .collect()
                    })
                    .unwrap_or_default();
                let membership_only = gated.is_empty();
                let ok = if !here.is_empty() || had.is_some() {
                    member.is_some() && has_roles == want_roles
                } else if membership_only {
                    member.is_none()
                } else {
                    has_roles.is_empty()
                };
                if !ok {
                    c.discord_mismatches += 1;
                    c.mismatched.push(((*customer).clone(), *user));
                    c.problem(format!(
                        "{customer} in {guild_name}: member={} roles={has_roles:?}, expected {} with {want_roles:?}",
                        member.is_some(),
                        if here.is_empty() { "no grant" } else { "member" },
                    ));
                }
            }
        }
        let bad = self.receiver.bad_signatures.load(Ordering::SeqCst);
        if bad > 0 {
            c.problem(format!("{bad} webhooks failed signature verification"));
        }
        c
    }

    /// Polls [`Stack::compare`] until everything matches and the outbox is empty, or
    /// until nothing improved for `stall`.
    async fn settle(&mut self, model: &Model, plan: &Plan, stall: Duration) -> Comparison {
        self.settle_until(model, plan, stall, |c| c.problems.is_empty())
            .await
    }

    /// [`Stack::settle`] until `done` says so (and the outbox is empty).
    async fn settle_until(
        &mut self,
        model: &Model,
        plan: &Plan,
        stall: Duration,
        done: impl Fn(&Comparison) -> bool,
    ) -> Comparison {
        let mut best = usize::MAX;
        let mut last_progress = Instant::now();
        loop {
            let c = self.compare(model, plan).await;
            let outbox: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
                .fetch_one(&self.pool)
                .await
                .unwrap_or(-1);
            if done(&c) && outbox == 0 {
                return c;
            }
            if c.problems.len() < best {
                best = c.problems.len();
                last_progress = Instant::now();
            }
            if last_progress.elapsed() > stall {
                return c;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// The history behind a Discord mismatch: the customer's grants and every request
    /// the sandbox saw about the user.
    async fn explain(&self, customer: &str, user: u64) -> String {
        let names: HashMap<&str, &str> =
            self.ents.iter().map(|(k, e)| (e.id.as_str(), *k)).collect();
        type Row = (
            String,
            String,
            String,
            Option<String>,
            Option<String>,
            chrono::DateTime<Utc>,
        );
        let grants: Vec<Row> = sqlx::query_as(
            "SELECT id, entitlement_id, status, revocation_reason, applied_role_id, updated_at
             FROM grants WHERE customer_id = $1 ORDER BY created_at",
        )
        .bind(customer)
        .fetch_all(&self.pool)
        .await
        .unwrap_or_default();
        let mut out = format!("history of {customer} (user {user}):");
        for (id, ent, status, reason, applied, at) in grants {
            out.push_str(&format!(
                "\n      grant {id} {} {status} {reason:?} applied_role={applied:?} updated {at}",
                names.get(ent.as_str()).unwrap_or(&"?")
            ));
        }
        let u = user.to_string();
        for r in self
            .sandbox()
            .requests()
            .iter()
            .filter(|r| r.path.contains(&u))
        {
            out.push_str(&format!(
                "\n      {} {} {} -> {}",
                chrono::DateTime::<Utc>::from(r.time),
                r.method,
                r.path,
                r.status
            ));
        }
        out
    }

    /// Dead-lettered messages by reason code, from every `.dead` queue.
    async fn dead_letters(&self) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        let ch = self.publisher.create_channel().await.unwrap();
        let depths = guildgate::queue::dlq::depths(&ch, &self.names)
            .await
            .unwrap_or_default();
        for d in depths.into_iter().filter(|d| d.messages > 0) {
            let ch = self.publisher.create_channel().await.unwrap();
            let parked = guildgate::queue::dlq::peek(&ch, &d.queue, d.messages as usize)
                .await
                .unwrap_or_default();
            for p in parked {
                let reason = p.reason_code.unwrap_or_else(|| "broker".into());
                *out.entry(format!("{}:{reason}", short_queue(&d.queue)))
                    .or_default() += 1;
            }
        }
        out
    }

    fn discord_stats(&self) -> Stats {
        self.sandbox().stats()
    }

    /// Kills the worker, deletes the queues, exchanges and database, stops the sandbox.
    async fn stop(mut self) {
        self.passed = true;
        if let Some(mut w) = self.worker.take() {
            w.kill();
        }
        common::delete_broker_objects(&self.settings).await;
        let _ = self.publisher.close(200, "done".into()).await;
        self.pool.close().await;
        if let Some(db) = self.db.take() {
            db.drop_db().await;
        }
        if let Some(s) = self.sandbox.take() {
            s.shutdown().await;
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for Stack {
    /// A scenario that panicked: show the worker's last lines and clean up anyway.
    fn drop(&mut self) {
        if self.passed {
            return;
        }
        if let Some(w) = &mut self.worker {
            w.kill();
            eprintln!("--- last lines of {} ---\n{}", w.name, w.log_tail(40));
        }
        common::cleanup_blocking(&self.settings, self.db.take());
    }
}

/// A confirming publisher on the first of `nodes` that answers.
async fn connect_publisher(nodes: &[String]) -> (Connection, Channel) {
    for url in nodes {
        if let Ok(conn) = Connection::connect(url, ConnectionProperties::default()).await {
            let channel = conn.create_channel().await.unwrap();
            channel.confirm_select(Default::default()).await.unwrap();
            return (conn, channel);
        }
    }
    panic!("no RabbitMQ node of {} answers", nodes.len());
}

fn short_queue(q: &str) -> &str {
    // `<prefix>.payment-events.dead` → `payment-events`
    let q = q.strip_suffix(".dead").unwrap_or(q);
    q.split_once('.').map_or(q, |(_, rest)| rest)
}

#[derive(Debug, Default)]
struct Comparison {
    grants: GrantCounts,
    webhooks: WebhookCounts,
    discord_mismatches: usize,
    /// (customer, Discord user) whose Discord state differs.
    mismatched: Vec<(String, u64)>,
    problems: Vec<String>,
}

impl Comparison {
    fn problem(&mut self, p: String) {
        self.problems.push(p);
    }

    fn into_report(self, r: &mut Report) {
        r.grants = Some(self.grants);
        r.webhooks = Some(self.webhooks);
        if self.discord_mismatches > 0 {
            r.notes.push(format!(
                "{} (customer, server) pairs differ in Discord",
                self.discord_mismatches
            ));
        }
        r.problems.extend(self.problems);
    }
}

/// Discord's global 50 requests/s and roomy per-server buckets, for the scenarios that
/// are not about rate limits.
fn roomy() -> SandboxConfig {
    SandboxConfig::default().with_rate_limits(
        RateLimitConfig::default().with_default_bucket(50, Duration::from_secs(1)),
    )
}

/// What the whole plan must lead to.
fn model_of(plan: &Plan) -> Model {
    let mut m = Model::default();
    for r in &plan.rounds {
        for msg in r {
            m.apply(msg);
        }
    }
    m
}

/// Scenario 1: the worker is SIGKILLed at random moments while it applies a realistic
/// mix of events, and started again each time.
pub async fn crashes(p: &Params, cmd: &WorkerCommand) -> Report {
    let began = Instant::now();
    let plan = model::generate(p.events, p.seed, p.linked_share);
    let model = model_of(&plan);
    let mut r = Report {
        scenario: "crashes",
        events_sent: plan.messages(),
        ..Report::default()
    };
    let mut stack = Stack::start(
        "crashes",
        cmd,
        &plan,
        StackOptions {
            sandbox: roomy(),
            ..StackOptions::default()
        },
    )
    .await;
    // Kill points: all but one while events are applied (by events recorded), the
    // last one while Discord calls and webhooks are in flight.
    let mut rng = StdRng::seed_from_u64(p.seed ^ 0x5eed);
    let settle_kills = usize::from(p.kills >= 2);
    let during_ingest = p.kills - settle_kills;
    let mut kill_at: Vec<usize> = (0..during_ingest)
        .map(|_| rng.random_range(model.recorded / 20..model.recorded * 19 / 20))
        .collect();
    kill_at.sort_unstable();
    let mut kill_at = kill_at.into_iter().peekable();
    let mut m = Model::default();
    for round in &plan.rounds {
        stack.publish(round).await;
        for msg in round {
            m.apply(msg);
        }
        let deadline = Instant::now() + p.stall;
        loop {
            let got = stack.processed().await;
            if let Some(&at) = kill_at.peek()
                && got >= at as i64
            {
                kill_at.next();
                stack.kill_and_restart().await;
                r.kills += 1;
                continue;
            }
            if got >= m.recorded as i64 {
                break;
            }
            if Instant::now() > deadline {
                r.problems.push(format!(
                    "a round was not applied: {got} of {} events recorded",
                    m.recorded
                ));
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    for _ in kill_at {
        // Thresholds beyond what was recorded: kill now instead.
        stack.kill_and_restart().await;
        r.kills += 1;
    }
    for _ in 0..settle_kills {
        tokio::time::sleep(Duration::from_millis(rng.random_range(200..1500))).await;
        stack.kill_and_restart().await;
        r.kills += 1;
    }
    end(stack, r, &model, &plan, began, p.stall, |_, _| {}).await
}

/// The common end of a scenario: waits for the expected state, explains what differs in
/// Discord, then [`finish`]es; the stack is removed unless something went wrong.
async fn end(
    mut stack: Stack,
    mut r: Report,
    model: &Model,
    plan: &Plan,
    began: Instant,
    stall: Duration,
    check: impl FnOnce(&Stats, &mut Report),
) -> Report {
    let c = stack.settle(model, plan, stall).await;
    for (customer, user) in c.mismatched.iter().take(5) {
        r.problems.push(stack.explain(customer, *user).await);
    }
    c.into_report(&mut r);
    check(&stack.discord_stats(), &mut r);
    finish(&mut r, &stack).await;
    r.elapsed = began.elapsed();
    if r.passed() {
        stack.stop().await;
    }
    r
}

/// Dead letters (none is expected) and Discord's view of the rate limits.
async fn finish(r: &mut Report, stack: &Stack) {
    r.dead_lettered = stack.dead_letters().await;
    for (reason, count) in &r.dead_lettered {
        r.problems
            .push(format!("{count} message(s) dead-lettered: {reason}"));
    }
    let s = stack.discord_stats();
    r.discord_exhausted = Some(s.violations());
    let log = stack.sandbox().requests();
    for (i, q) in log.iter().enumerate().filter(|(_, q)| q.violation) {
        // What the client had been told before: the last 429 of that bucket or global.
        let told = log[..i].iter().rev().find(|p| {
            p.status == 429
                && (p.bucket == q.bucket && p.major == q.major
                    || p.rate_limit_scope == Some(sandbox_discord::RateLimitScope::Global))
        });
        r.problems.push(format!(
            "Discord request into an exhausted bucket: {} {} -> {}; last 429 there {:?} earlier ({:?} {:?}, {:?}, forced: {:?})",
            q.method,
            q.path,
            q.status,
            told.map(|p| q.at - p.at),
            told.map(|p| &p.method),
            told.map(|p| &p.path),
            told.and_then(|p| p.rate_limit_scope),
            told.map(|p| p.forced),
        ));
    }
    // Every 429 that is not an injected one is a problem, restarts included: a syncer
    // that takes over waits a global window first (the killed one's requests of the
    // last second still count at Discord).
    for q in log.iter().filter(|q| q.status == 429 && !q.forced) {
        r.problems.push(format!(
            "429 earned from Discord: {} {} ({:?})",
            q.method, q.path, q.rate_limit_scope
        ));
    }
    r.notes.push(format!(
        "Discord: {} requests, {} 429s ({} forced), {} injected 5xx, {} invalid requests (ban threshold {})",
        s.total_requests,
        s.rate_limited,
        s.rate_limited_forced,
        s.injected_errors,
        s.invalid_requests,
        n(DISCORD_BAN_THRESHOLD as usize),
    ));
    if stack.restarts > 0 {
        r.notes
            .push(format!("worker started {} times", stack.restarts + 1));
    }
}

/// Scenario 2: the broker connection cut and restored, the database connection cut and
/// restored, the merchant's webhook receiver down for a while; each while events flow.
pub async fn outages(p: &Params, cmd: &WorkerCommand) -> Report {
    let began = Instant::now();
    let plan = model::generate(p.outage_events, p.seed ^ 0x0a7a, p.linked_share);
    let model = model_of(&plan);
    let mut r = Report {
        scenario: "outages",
        events_sent: plan.messages(),
        ..Report::default()
    };
    let mut stack = Stack::start(
        "outages",
        cmd,
        &plan,
        StackOptions {
            sandbox: roomy(),
            proxied: true,
            ..StackOptions::default()
        },
    )
    .await;
    let mut m = Model::default();
    let limit = p.stall + p.db_outage;
    for (i, round) in plan.rounds.iter().enumerate() {
        for msg in round {
            m.apply(msg);
        }
        let fault = match i {
            1 => Some(("broker", p.broker_outage)),
            2 => Some(("database", p.db_outage)),
            3 => Some(("webhook receiver", p.receiver_outage)),
            _ => None,
        };
        let Some((what, outage)) = fault else {
            stack.publish(round).await;
            if let Err(e) = stack.wait_processed(m.recorded, limit).await {
                r.problems.push(e);
            }
            continue;
        };
        match what {
            "broker" => stack.amqp_proxy.as_ref().unwrap().cut(),
            "database" => stack.db_proxy.as_ref().unwrap().cut(),
            _ => stack.receiver.down.store(true, Ordering::SeqCst),
        }
        // The platform keeps publishing while guildgate cannot work.
        stack.publish(round).await;
        tokio::time::sleep(outage).await;
        match what {
            "broker" => stack.amqp_proxy.as_ref().unwrap().restore(),
            "database" => stack.db_proxy.as_ref().unwrap().restore(),
            _ => stack.receiver.down.store(false, Ordering::SeqCst),
        }
        let restored = Instant::now();
        if what == "webhook receiver" {
            if let Err(e) = stack.wait_processed(m.recorded, limit).await {
                r.problems.push(e);
            }
            // Recovered when every webhook due so far has arrived.
            let c = stack
                .settle_until(&m, &plan, p.stall, |c| c.webhooks.missing == 0)
                .await;
            if c.webhooks.missing > 0 {
                r.problems.push(format!(
                    "{} webhooks still missing after the receiver came back",
                    c.webhooks.missing
                ));
            }
        } else if let Err(e) = stack.wait_processed(m.recorded, limit).await {
            r.problems.push(format!("after the {what} outage: {e}"));
        }
        r.recovery.push((
            match what {
                "broker" => "broker",
                "database" => "database",
                _ => "receiver",
            },
            restored.elapsed(),
        ));
    }
    end(stack, r, &model, &plan, began, p.stall, |_, _| {}).await
}

/// Scenario 3: every customer linked, and Discord answers 20 % of requests with a 5xx,
/// slowly, with forced 429s on the member routes and a global 429.
pub async fn discord_chaos(p: &Params, cmd: &WorkerCommand) -> Report {
    let began = Instant::now();
    let plan = model::generate(p.discord_events, p.seed ^ 0xd15c, 1.0);
    let model = model_of(&plan);
    let mut r = Report {
        scenario: "Discord chaos",
        events_sent: plan.messages(),
        ..Report::default()
    };
    let sandbox = SandboxConfig::default().with_rate_limits(
        RateLimitConfig::default()
            .with_default_bucket(10, Duration::from_secs(1))
            .with_global(50, Duration::from_secs(1)),
    );
    let mut stack = Stack::start(
        "discord",
        cmd,
        &plan,
        StackOptions {
            sandbox,
            ..StackOptions::default()
        },
    )
    .await;
    {
        let s = stack.sandbox();
        s.set_error_rate(0.2);
        s.set_latency(Latency::Range(
            Duration::from_millis(5),
            Duration::from_millis(400),
        ));
        s.force_rate_limit(ForcedRateLimit::shared(5).on_route(RouteKind::AddMember));
        s.force_rate_limit(ForcedRateLimit::shared(5).on_route(RouteKind::MemberRole));
        s.force_rate_limit(ForcedRateLimit::global(3).retry_after(Duration::from_secs(1)));
    }
    let mut m = Model::default();
    for round in &plan.rounds {
        for msg in round {
            m.apply(msg);
        }
        stack.publish(round).await;
        if let Err(e) = stack.wait_processed(m.recorded, p.stall).await {
            r.problems.push(e);
        }
    }
    end(stack, r, &model, &plan, began, p.stall, |s, r| {
        if s.rate_limited_forced == 0 || s.injected_errors == 0 {
            r.problems.push(format!("the chaos did not happen: {s:?}"));
        }
        if s.invalid_requests * 10 > DISCORD_BAN_THRESHOLD {
            r.problems.push(format!(
                "{} invalid requests: not far below Discord's threshold",
                s.invalid_requests
            ));
        }
    })
    .await
}

/// Scenario 5: guildgate on a three-node RabbitMQ cluster. While events flow, the node
/// leading the payment-events queue is SIGKILLed (and started again), then the node
/// guildgate is connected to. The platform keeps publishing, moving to a live node
/// when it loses its own.
pub async fn cluster(p: &Params, cmd: &WorkerCommand) -> Report {
    let began = Instant::now();
    let mut nodes = RabbitCluster::start(3).await;
    let plan = model::generate(p.cluster_events, p.seed ^ 0xc105, p.linked_share);
    let model = model_of(&plan);
    let mut r = Report {
        scenario: "cluster",
        events_sent: plan.messages(),
        ..Report::default()
    };
    r.notes.push(format!(
        "3 RabbitMQ nodes started and joined in {:.0} s",
        began.elapsed().as_secs_f64()
    ));
    let mut stack = Stack::start(
        "cluster",
        cmd,
        &plan,
        StackOptions {
            sandbox: roomy(),
            amqp_nodes: nodes.urls(),
            env: vec![
                ("GUILDGATE_AMQP__QUORUM_REPLICAS", "3".into()),
                ("GUILDGATE_AMQP__LEADER_LOCATOR", "balanced".into()),
            ],
            ..StackOptions::default()
        },
    )
    .await;
    let queue = stack.names.payment_events();
    let mut m = Model::default();
    for (i, round) in plan.rounds.iter().enumerate() {
        let before = m.recorded;
        for msg in round {
            m.apply(msg);
        }
        let fault = match i {
            1 => Some("leader node"),
            2 => Some("connected node"),
            _ => None,
        };
        let Some(fault) = fault else {
            stack
                .publish_round(round, m.recorded, p.stall, &mut r)
                .await;
            continue;
        };
        // A live node tells who leads the queue; guildgate's connection tells its node.
        let victim = if fault == "leader node" {
            nodes.leader_of(0, &queue).await
        } else {
            nodes
                .nodes_with_connection("guildgate")
                .await
                .first()
                .copied()
        };
        let Some(victim) = victim else {
            r.problems
                .push(format!("cannot tell which node is the {fault}"));
            stack.publish(round).await;
            continue;
        };
        // Half of the round, some of it applied, then the kill, then the other half:
        // events are in flight when the node dies, and more arrive while guildgate
        // moves to another node. The platform publishes through the dying node too.
        stack.move_publisher_to(&nodes.url(victim)).await;
        let second = stack.publish_half(round, before, p.stall).await;
        nodes.kill(victim);
        let killed = Instant::now();
        r.kills += 1;
        stack.publish(second).await;
        // Recovered when everything published up to and after the kill is applied.
        if let Err(e) = stack.wait_processed(m.recorded, p.stall).await {
            r.problems
                .push(format!("after the {fault} was killed: {e}"));
        }
        let recovered = killed.elapsed();
        r.recovery.push((fault, recovered));
        r.notes.push(format!(
            "{fault} (node {victim}) killed: every event published before and after it applied {:.1} s later",
            recovered.as_secs_f64()
        ));
        let restarting = Instant::now();
        nodes.restart(victim).await;
        r.notes.push(format!(
            "node {victim} back in the cluster {:.0} s after its restart",
            restarting.elapsed().as_secs_f64()
        ));
    }
    stack.ensure_publisher().await;
    let r = end(stack, r, &model, &plan, began, p.stall, |_, _| {}).await;
    drop(nodes);
    r
}

/// Scenario 6: guildgate's PostgreSQL is a primary with a synchronous standby, reached
/// through a TCP proxy (HAProxy's place in production). While events flow, the
/// standby's replication link is cut (the primary's commits now wait), the primary is
/// killed with SIGKILL, the standby promoted and the proxy pointed at it. The platform
/// keeps publishing throughout.
pub async fn standby(p: &Params, cmd: &WorkerCommand) -> Report {
    let began = Instant::now();
    let mut pair = PgStandbyPair::start().await;
    let plan = model::generate(p.standby_events, p.seed ^ 0x5eb1, p.linked_share);
    let model = model_of(&plan);
    let mut r = Report {
        scenario: "standby",
        events_sent: plan.messages(),
        ..Report::default()
    };
    r.notes.push(format!(
        "primary and synchronous standby made and started in {:.0} s",
        began.elapsed().as_secs_f64()
    ));
    let mut stack = Stack::start(
        "standby",
        cmd,
        &plan,
        StackOptions {
            sandbox: roomy(),
            proxied: true,
            database_base: Some(pair.primary_base()),
            ..StackOptions::default()
        },
    )
    .await;
    let db_name = stack.db.as_ref().expect("a database").name.clone();
    let mut m = Model::default();
    for (i, round) in plan.rounds.iter().enumerate() {
        let before = m.recorded;
        for msg in round {
            m.apply(msg);
        }
        if i != 2 {
            stack
                .publish_round(round, m.recorded, p.stall, &mut r)
                .await;
            continue;
        }
        let second = stack.publish_half(round, before, p.stall).await;
        // The standby stops hearing from the primary; what the primary commits after
        // this exists nowhere else, so nothing of it may have been acknowledged.
        pair.cut_replication();
        stack.publish(second).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        pair.kill_primary();
        let killed = Instant::now();
        r.kills += 1;
        pair.promote_standby().await;
        let promoted = killed.elapsed();
        stack
            .db_proxy
            .as_ref()
            .expect("proxied")
            .retarget(([127, 0, 0, 1], pair.standby_port).into());
        stack
            .repoint_checks(&pair.url_of(pair.standby_port, &db_name))
            .await;
        if let Err(e) = stack.wait_processed(m.recorded, p.stall).await {
            r.problems.push(format!(
                "after the primary was killed and the standby promoted: {e}"
            ));
        }
        let recovered = killed.elapsed();
        r.recovery.push(("failover", recovered));
        r.notes.push(format!(
            "primary killed: standby promoted {:.1} s later, every event published before and after applied {:.1} s after the kill",
            promoted.as_secs_f64(),
            recovered.as_secs_f64()
        ));
    }
    let r = end(stack, r, &model, &plan, began, p.stall, |_, _| {}).await;
    drop(pair);
    r
}
