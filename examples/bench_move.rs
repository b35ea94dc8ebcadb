//! An entitlement's role moved while many of its grants are delivered:
//! `cargo run --release --example bench_move -- --grants 20000`.
//!
//! The save (`PATCH /entitlements/{id}` naming another role) queues a Discord sync job
//! for the first 1,000 grants that hold the old role in its own transaction, and the
//! movers queue the rest, paced by `grants.moves_per_second`, so that the syncer moves
//! each member. Runs guildgate in process (the HTTP API, the relay and the mover; no
//! syncer) against the sandbox Discord and a database seeded with `--grants` delivered
//! grants of one entitlement, moves the role back and forth `--rounds` times and reports
//! each save's time from request to answer, and the time until every grant's job was
//! queued and relayed with the pace lifted (`GUILDGATE_GRANTS__MOVES_PER_SECOND` set
//! high): what queuing a move costs by itself. Every round must answer 200 and have the
//! relay publish exactly one sync job per grant; each round waits for the one before.
//! Uses `GUILDGATE_TEST_DATABASE_URL` / `GUILDGATE_TEST_AMQP_URL` like the tests and
//! deletes its database, queues and exchanges at the end.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use guildgate::app::{App, Options};
use guildgate::config::Settings;
use guildgate::domain::ids::BusinessId;
use guildgate::metrics::Metrics;
use lapin::{Connection, ConnectionProperties};
use sandbox_discord::{GuildSpec, Sandbox, SandboxConfig, permissions};
use secrecy::ExposeSecret;
use serde_json::json;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

#[path = "common/world.rs"]
mod world;
const BUSINESS: &str = "bus_bench";

struct Args {
    grants: u32,
    rounds: usize,
}

fn args() -> Args {
    world::help(
        "bench_move [--grants N (20000)] [--rounds N (5)]\n\
         Moves the role of an entitlement with N delivered grants, back and forth, and times each save.",
    );
    let mut a = Args {
        grants: 20_000,
        rounds: 5,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut it = argv.iter();
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--grants" => a.grants = value.parse().expect("--grants N"),
            "--rounds" => a.rounds = value.parse().expect("--rounds N"),
            other => panic!("unknown flag {other}"),
        }
    }
    a
}

fn relayed_syncs(metrics: &Metrics) -> u64 {
    metrics
        .outbox_relayed
        .get_or_create(&vec![("kind", "sync".to_string())])
        .get()
}

/// Waits until the move is done and the relay has published everything the outbox
/// holds.
async fn move_relayed(pool: &PgPool) {
    loop {
        let left: i64 = sqlx::query_scalar(
            "SELECT (SELECT count(*) FROM outbox) + (SELECT count(*) FROM entitlement_moves)",
        )
        .fetch_one(pool)
        .await
        .unwrap();
        if left == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
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
            .with_role("Patrons", 1)
            .with_role("VIP", 2),
    );
    let roles = [
        guild.role("Patrons").to_string(),
        guild.role("VIP").to_string(),
    ];
    let guild_id = guild.guild_id.to_string();

    let (db, amqp_url, prefix) = world::bench_run().await;
    let unpaced = [
        (
            "GUILDGATE_GRANTS__MOVES_PER_SECOND",
            "1000000000".to_string(),
        ),
        ("GUILDGATE_GRANTS__TIMER_INTERVAL", "5ms".to_string()),
    ];
    let env: HashMap<String, String> = world::bench_env(db.url.clone(), &amqp_url, &prefix, 0)
        .into_iter()
        .chain(unpaced)
        .chain(world::sandbox_env(&sandbox))
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    let settings = Settings::load_with_env(None, Some(env)).unwrap();
    let options = Options {
        consumers: false,
        sync: false,
        webhooks: false,
        email: false,
        ..Options::default()
    };
    let app = App::build(settings.clone(), options).await.unwrap();
    let addr = app.local_addr();
    let pool = app.pool.clone();
    let (key, entitlement) = {
        let mut c = pool.acquire().await.unwrap();
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
            .bind(&guild_id)
            .execute(&mut *c)
            .await
            .unwrap();
        let e = guildgate::store::entitlements::insert_entitlement(
            &mut c,
            BUSINESS,
            "Patrons",
            &guild_id,
            Some(&roles[0]),
        )
        .await
        .unwrap();
        (key.expose_secret().to_string(), e.id)
    };
    world::seed_delivered_grants(
        &pool,
        BUSINESS,
        &entitlement,
        (&guild_id, &roles[0]),
        args.grants as usize,
    )
    .await;
    let metrics = app.metrics.clone();
    let shutdown = CancellationToken::new();
    let handle = tokio::spawn(app.run_until_stopped(shutdown.clone()));

    let http = reqwest::Client::new();
    let url = format!("http://{addr}/entitlements/{entitlement}");
    let (mut times, mut whole) = (Vec::new(), Vec::new());
    for round in 0..args.rounds {
        let role = &roles[(round + 1) % 2];
        let before = relayed_syncs(&metrics);
        let started = Instant::now();
        let r = http
            .patch(&url)
            .bearer_auth(&key)
            .json(&json!({"integration_config": {"guild_id": guild_id, "role_id": role}}))
            .send()
            .await
            .unwrap();
        let elapsed = started.elapsed();
        let status = r.status().as_u16();
        let body = r.text().await.unwrap_or_default();
        assert_eq!(status, 200, "round {round}: {body}");
        move_relayed(&pool).await;
        let all = started.elapsed();
        let queued = relayed_syncs(&metrics) - before;
        assert_eq!(
            queued,
            u64::from(args.grants),
            "round {round}: one sync job per grant"
        );
        eprintln!(
            "round {round}: save {:.1} ms, all {queued} sync jobs relayed {:.1} ms",
            elapsed.as_secs_f64() * 1e3,
            all.as_secs_f64() * 1e3
        );
        times.push(elapsed.as_secs_f64() * 1e3);
        whole.push(all.as_secs_f64() * 1e3);
    }

    shutdown.cancel();
    let _ = handle.await;
    let conn = Connection::connect(&amqp_url, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    world::delete_topology(&ch, &settings).await;
    let _ = conn.close(200, "done".into()).await;
    db.drop_db().await;
    sandbox.shutdown().await;

    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (save, all) = (median(&times), median(&whole));
    let per_thousand = all * 1000.0 / f64::from(args.grants.max(1));
    println!(
        "moving the role of an entitlement with {} delivered grants, {} rounds",
        args.grants, args.rounds
    );
    for (i, (t, a)) in times.iter().zip(&whole).enumerate() {
        println!("  round {i}              save {t:>8.1} ms, all relayed {a:>9.1} ms");
    }
    println!(
        "  median               save {save:>8.1} ms, all relayed {all:>9.1} ms ({per_thousand:.1} ms per 1,000 grants, unpaced)"
    );
    println!(
        "{}",
        json!({
            "grants": args.grants, "rounds": args.rounds, "save_ms": times,
            "all_relayed_ms": whole, "median_save_ms": save, "median_all_relayed_ms": all,
            "ms_per_1000_grants": per_thousand,
        })
    );
}
