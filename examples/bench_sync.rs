//! Discord sync benchmark: `cargo run --release --example bench_sync`.
//!
//! 1,000 grants of customers who already linked their Discord account, across 10
//! guilds, synced by guildgate's syncer (real RabbitMQ and PostgreSQL) against the
//! sandbox Discord with a per-guild bucket of 10 `PUT /guilds/{g}/members/{u}` per
//! second and the global limit of 50 requests per second. Each grant needs one call
//! (add the member with the role: 201).
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

use chrono::Utc;
use guildgate::amqp::Names;
use guildgate::app::{App, Options};
use guildgate::config::Settings;
use guildgate::discord::permissions;
use guildgate::store;
use lapin::options::QueueDeclareOptions;
use lapin::{Connection, ConnectionProperties};
use sandbox_discord::{GuildSpec, RouteKind, Sandbox, SandboxConfig, UserSpec};
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

#[tokio::main]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let db_base = std::env::var("GUILDGATE_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into());
    let amqp_url = std::env::var("GUILDGATE_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let tag = guildgate::ids::mint("b").to_lowercase().replace('_', "");
    let db_name = format!("ggbench_{tag}");
    let mut admin = world::create_database(&db_base, &db_name).await;

    let sandbox = Sandbox::start(
        SandboxConfig::default()
            .with_route_limit(RouteKind::AddMember, BUCKET, Duration::from_secs(1))
            .with_global_limit(GLOBAL, Duration::from_secs(1)),
    )
    .await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let prefix = format!("ggbench-{tag}");
    let env: HashMap<String, String> =
        world::bench_env(format!("{db_base}/{db_name}"), &amqp_url, &prefix, port)
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
    let shutdown = CancellationToken::new();
    let app_task = tokio::spawn(app.run_until_stopped(shutdown.clone()));

    // The world: 10 guilds with a role each, 1,000 linked customers, one grant each.
    let cipher = settings.token_cipher().unwrap();
    let business = "bus_bench";
    let mut conn = pool.acquire().await.unwrap();
    store::setup::ensure_business(&mut conn, business)
        .await
        .unwrap();
    let mut ents = Vec::new();
    for i in 0..GUILDS {
        let ids = sandbox.add_guild(
            GuildSpec::new(format!("Guild {i}"))
                .with_bot_permissions(permissions::REQUIRED)
                .with_role("Patrons", 1),
        );
        let e = store::setup::insert_entitlement(
            &mut conn,
            business,
            "bench",
            &ids.guild_id.to_string(),
            Some(&ids.role("Patrons").to_string()),
        )
        .await
        .unwrap();
        ents.push(e.id);
    }
    let now = Utc::now();
    let mut tx = pool.begin().await.unwrap();
    for n in 0..GRANTS {
        let user = sandbox.add_user(UserSpec::new(format!("user{n}")));
        let t = sandbox.issue_token(user, &["identify", "guilds.join"]);
        let customer = format!("cus_{n}");
        guildgate::sync::store::upsert_link(
            &mut tx,
            &guildgate::sync::store::LinkRow::new(
                business,
                &customer,
                user.to_string(),
                guildgate::sync::store::SealedTokens::seal(
                    &cipher,
                    business,
                    &customer,
                    &t.access_token.clone().into(),
                    Some(&t.refresh_token.clone().into()),
                ),
                now + chrono::Duration::days(7),
                t.scope.clone(),
            ),
            None,
            now,
        )
        .await
        .unwrap();
        let g = store::grants::insert(
            &mut tx,
            store::grants::NewGrant {
                business_id: business,
                brand_id: business,
                entitlement_id: &ents[n % GUILDS],
                customer_id: &customer,
                payment_id: Some(&format!("pay_{n}")),
                subscription_id: None,
                oauth_nonce: "n_bench",
                oauth_expires_at: now + chrono::Duration::days(7),
                now,
            },
        )
        .await
        .unwrap();
        guildgate::outbox::queue_sync(&mut tx, &g.id).await.unwrap();
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
        if q.message_count() as usize >= GRANTS {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    sandbox.reset_stats();
    let started = Instant::now();
    let sync_stop = CancellationToken::new();
    let sync_task = tokio::spawn(worker.run(sync_stop.clone()));
    loop {
        let delivered: i64 =
            sqlx::query_scalar("SELECT count(*) FROM grants WHERE status = 'Delivered'")
                .fetch_one(&pool)
                .await
                .unwrap();
        if delivered as usize >= GRANTS {
            break;
        }
        if started.elapsed() > Duration::from_secs(300) {
            panic!("only {delivered} of {GRANTS} delivered after 300 s");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    let stats = sandbox.stats();
    let floor = floor_seconds(GRANTS, GLOBAL, 1.0).max(floor_seconds(GRANTS / GUILDS, BUCKET, 1.0));

    sync_stop.cancel();
    let _ = sync_task.await;
    shutdown.cancel();
    let _ = app_task.await;
    world::delete_topology(&ch, &settings).await;
    world::drop_database(&mut admin, &db_name).await;
    eprintln!(
        "{GRANTS} grants, {GUILDS} guilds, bucket {BUCKET}/s per guild, global {GLOBAL}/s: {} Discord requests, {} violations",
        stats.total_requests,
        stats.violations()
    );
    println!(
        "{}",
        serde_json::json!({
            "grants": GRANTS,
            "guilds": GUILDS,
            "discord_requests": stats.total_requests,
            "seconds": (seconds * 1000.0).round() / 1000.0,
            "floor_seconds": floor,
            "ratio": ((seconds / floor) * 1000.0).round() / 1000.0,
            "rate_limited_responses": stats.rate_limited,
            "bucket_violations": stats.violations(),
        })
    );
}
