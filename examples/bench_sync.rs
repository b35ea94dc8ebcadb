//! Discord sync benchmark: `cargo run --release --example bench_sync [-- --bots N]`.
//!
//! 1,000 grants of customers who already linked their Discord account, across 10
//! guilds, synced by guildgate's syncer (real RabbitMQ and PostgreSQL) against the
//! sandbox Discord with a per-guild bucket of 10 `PUT /guilds/{g}/members/{u}` per
//! second and the global limit of 50 requests per second. Each grant needs one call
//! (add the member with the role: 201).
//!
//! With `--bots N` (1 to 9), N businesses side by side, each with 1,000 grants in its
//! own 10 guilds: the first on the shared bot, the others each with its own Discord
//! application (registered as `PUT /discord/application` stores it). Every bot has its
//! own global limit, so each is measured against the same floor, from the syncer's start
//! to its business's last delivery; its 429s and violations are its own bot's. One JSON
//! line per bot.
//!
//! `floor_seconds` is what the limits allow at best: Discord's windows are fixed and
//! start with their first request, so `n` requests under `limit` per `window` need at
//! least `(ceil(n / limit) - 1) * window`; the floor is the largest such bound over the
//! global limit and every guild's bucket. `seconds` runs from starting the syncer (1,000
//! jobs waiting in its queue) to the last grant recorded `Delivered`. The last line is
//! JSON. Uses `GUILDGATE_TEST_DATABASE_URL` / `GUILDGATE_TEST_AMQP_URL` like the tests,
//! and deletes its database, queues and exchanges at the end.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use guildgate::amqp::Names;
use guildgate::app::{App, Options};
use guildgate::config::Settings;
use guildgate::discord::permissions;
use guildgate::store;
use lapin::options::QueueDeclareOptions;
use lapin::{Connection, ConnectionProperties};
use sandbox_discord::{GuildSpec, RouteKind, Sandbox, SandboxConfig};
use tokio_util::sync::CancellationToken;

#[path = "common/world.rs"]
mod world;
const GRANTS: usize = 1000;
const GUILDS: usize = 10;
const BUCKET: u32 = 10;
const GLOBAL: u32 = 50;

fn floor_seconds(n: usize, limit: u32, window: f64) -> f64 {
    (n.div_ceil(limit as usize) as f64 - 1.0).max(0.0) * window
}

/// One business of the run, and its bot.
struct Tenant {
    business: String,
    /// Its own application; `None`: the shared bot.
    app: Option<sandbox_discord::AppCredentials>,
    seconds: Option<f64>,
}

#[tokio::main]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    world::help(
        "bench_sync [--bots N (1, at most 9)]\n\
         Syncs 1,000 linked grants across 10 sandbox servers within Discord's limits.",
    );
    let args: Vec<String> = std::env::args().collect();
    let bots: usize = match args.iter().position(|a| a == "--bots") {
        Some(i) => args
            .get(i + 1)
            .and_then(|n| n.parse().ok())
            .filter(|n| (1..=9).contains(n))
            .expect("--bots takes a number from 1 to 9"),
        None => 1,
    };
    let db_base = std::env::var("GUILDGATE_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into());
    let amqp_url = std::env::var("GUILDGATE_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let tag = guildgate::domain::ids::mint("b")
        .to_lowercase()
        .replace('_', "");
    let db = world::Database::new(&db_base, &format!("ggbench_{tag}")).await;

    let sandbox = Sandbox::start(
        SandboxConfig::default()
            .with_route_limit(RouteKind::AddMember, BUCKET, Duration::from_secs(1))
            .with_global_limit(GLOBAL, Duration::from_secs(1)),
    )
    .await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let prefix = format!("ggbench-{tag}");
    let env: HashMap<String, String> = world::bench_env(db.url.clone(), &amqp_url, &prefix, port)
        .into_iter()
        .chain([
            ("GUILDGATE_OUTBOX__SWEEP_INTERVAL", "200ms".into()),
            // Nothing else calls Discord here: the syncer gets the whole global limit.
            ("GUILDGATE_DISCORD__SIDE_REQUESTS_PER_S", "0".into()),
        ])
        .chain(world::sandbox_env(&sandbox))
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    let settings = Settings::load_with_env(None, Some(env)).expect("settings");
    let app = App::build_with_listener(
        settings.clone(),
        Options {
            sync: false,
            ..Options::default()
        },
        listener,
    )
    .await
    .expect("app builds");
    let worker = app.sync_worker();
    let pool = app.pool.clone();
    let registry = app.bots.clone();
    let shutdown = CancellationToken::new();
    let app_task = tokio::spawn(app.run_until_stopped(shutdown.clone()));

    // The world: per business, 10 guilds with a role each, 1,000 linked customers,
    // one grant each.
    let cipher = settings.token_cipher().unwrap();
    let mut tenants: Vec<Tenant> = (0..bots)
        .map(|b| Tenant {
            business: format!("bus_bench{b}"),
            app: (b > 0).then(|| sandbox.add_application(&format!("Bench Bot {b}"))),
            seconds: None,
        })
        .collect();
    let mut conn = pool.acquire().await.unwrap();
    for t in &tenants {
        store::businesses::ensure_business(&mut conn, &t.business)
            .await
            .unwrap();
        if let Some(app) = &t.app {
            // What `PUT /discord/application` stores, once Discord confirmed it.
            let seal = |v: &str, column: &str| {
                guildgate::discord::bots::seal(
                    &cipher,
                    &t.business,
                    &secrecy::SecretString::from(v.to_string()),
                    column,
                )
            };
            let client_id = app.client_id.to_string();
            guildgate::store::applications::save(
                &mut pool.acquire().await.unwrap(),
                guildgate::store::applications::NewApp {
                    business_id: &t.business,
                    client_id: &client_id,
                    client_secret_enc: seal(&app.client_secret, "client_secret_enc"),
                    bot_token_enc: seal(&app.bot_token, "bot_token_enc"),
                    key_id: cipher.key_id(),
                    bot_username: &app.bot_username,
                    now: chrono::Utc::now(),
                },
            )
            .await
            .unwrap();
        }
    }
    registry.refresh().await.unwrap();
    let mut tx = pool.begin().await.unwrap();
    for t in &tenants {
        let business = t.business.as_str();
        let mut ents = Vec::new();
        for i in 0..GUILDS {
            let spec = GuildSpec::new(format!("{business} guild {i}")).with_role("Patrons", 1);
            let ids = match &t.app {
                None => sandbox.add_guild(spec.with_bot_permissions(permissions::REQUIRED)),
                Some(app) => {
                    let ids = sandbox.add_guild(spec.without_bot());
                    sandbox.install_app_bot(ids.guild_id, app.client_id, permissions::REQUIRED);
                    ids
                }
            };
            let e = store::entitlements::insert_entitlement(
                &mut tx,
                business,
                "bench",
                &ids.guild_id.to_string(),
                Some(&ids.role("Patrons").to_string()),
            )
            .await
            .unwrap();
            ents.push(e.id);
        }
        for n in 0..GRANTS {
            world::linked_grant(
                &mut tx,
                &sandbox,
                &cipher,
                business,
                t.app.as_ref(),
                &format!("cus_{n}"),
                &ents[n % GUILDS],
                &format!("pay_{n}"),
            )
            .await;
        }
    }
    tx.commit().await.unwrap();
    drop(conn);

    // Wait until the relay has put every job into the queue, then start the syncer.
    let names = Names::from_settings(&settings);
    let amqp = Connection::connect(&amqp_url, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = amqp.create_channel().await.unwrap();
    loop {
        let q = ch
            .queue_declare(
                names.discord_sync().as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                Default::default(),
            )
            .await
            .unwrap();
        if q.message_count() as usize >= GRANTS * bots {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    sandbox.reset_stats();
    let started = Instant::now();
    let sync_stop = CancellationToken::new();
    let sync_task = tokio::spawn(worker.run(sync_stop.clone()));
    loop {
        let delivered: Vec<(String, i64)> = sqlx::query_as(
            "SELECT business_id, count(*) FROM grants WHERE status = 'Delivered' GROUP BY business_id",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        for t in tenants.iter_mut().filter(|t| t.seconds.is_none()) {
            if delivered
                .iter()
                .any(|(b, n)| *b == t.business && *n as usize >= GRANTS)
            {
                t.seconds = Some(started.elapsed().as_secs_f64());
            }
        }
        if tenants.iter().all(|t| t.seconds.is_some()) {
            break;
        }
        if started.elapsed() > Duration::from_secs(300) {
            panic!("not every grant delivered after 300 s: {delivered:?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let floor = floor_seconds(GRANTS, GLOBAL, 1.0).max(floor_seconds(GRANTS / GUILDS, BUCKET, 1.0));
    let shared_id = sandbox.client_id();
    let results: Vec<(String, sandbox_discord::Stats, f64)> = tenants
        .iter()
        .map(|t| {
            let id = t.app.as_ref().map_or(shared_id, |a| a.client_id);
            (
                t.app
                    .as_ref()
                    .map_or_else(|| "shared".to_string(), |a| a.bot_username.clone()),
                sandbox.app_stats(id),
                t.seconds.expect("measured"),
            )
        })
        .collect();
    sync_stop.cancel();
    let _ = sync_task.await;
    shutdown.cancel();
    let _ = app_task.await;
    world::delete_topology(&ch, &settings).await;
    db.drop_db().await;
    for (bot, stats, seconds) in results {
        eprintln!(
            "{bot}: {GRANTS} grants, {GUILDS} guilds, bucket {BUCKET}/s per guild, global {GLOBAL}/s: {} Discord requests, {} violations",
            stats.total_requests,
            stats.violations()
        );
        println!(
            "{}",
            serde_json::json!({
                "bot": bot,
                "bots": bots,
                "grants": GRANTS,
                "guilds": GUILDS,
                "discord_requests": stats.total_requests,
                "seconds": (seconds * 1000.0).round() / 1000.0,
                "floor_seconds": floor,
                "ratio": ((seconds / floor) * 1000.0).round() / 1000.0,
                "rate_limited_responses": stats.rate_limited,
                "global_rate_limited": stats.global_rate_limited,
                "bucket_violations": stats.violations(),
            })
        );
    }
}
