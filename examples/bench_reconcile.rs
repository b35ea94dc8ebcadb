//! Reconcile at scale: `cargo run --release --example bench_reconcile [-- --members N]`.
//!
//! A sandbox Discord guild of 100,000 members (every hundredth holding the gated role
//! without a grant) and 2,000 delivered grants of it, of which every tenth lost its
//! role by hand. A child process (this program started again, running what `guildgate
//! reconcile` runs: the side budget, the shared limits) compares them; this process
//! holds the sandbox and samples the child's peak memory (`VmHWM`). Then a second child
//! is killed after a third of the pages and a third one carries on: how many pages it
//! listed says it resumed. Prints a table and, last, a JSON line. Uses
//! `GUILDGATE_TEST_DATABASE_URL` like the tests and drops its database at the end.

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use guildgate::config::Settings;
use guildgate::discord::permissions;
use guildgate::domain::compare::DriftKind;
use guildgate::reconcile::{Reconciler, Scope};
use guildgate::store;
use sandbox_discord::{GuildSpec, Sandbox, SandboxConfig};

#[path = "common/measure.rs"]
mod measure;
#[path = "common/world.rs"]
mod world;

const GRANTS: usize = 2000;

fn main() {
    world::help(
        "bench_reconcile [--members N (100000)]\n\
         `guildgate reconcile` against a sandbox server of N members and 2,000 delivered grants.",
    );
    let mut args = std::env::args().skip(1);
    let first = args.next();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    if first.as_deref() == Some("child") {
        rt.block_on(child());
        return;
    }
    let members = match (first.as_deref(), args.next()) {
        (Some("--members"), Some(n)) => n.parse().expect("--members N"),
        (None, _) => 100_000,
        _ => panic!("usage: bench_reconcile [--members N]"),
    };
    rt.block_on(parent(members));
}

/// What `guildgate reconcile` runs, configured from the environment; prints the
/// report's counts as JSON.
async fn child() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let settings = Settings::load(None).expect("settings");
    let pool = store::pool(&settings.database).expect("pool");
    let r = Reconciler::standalone(&settings, pool)
        .await
        .expect("applications");
    let report = r.check(&Scope::default()).await.expect("reconcile");
    let count = |k: DriftKind| {
        report
            .findings
            .iter()
            .filter(|f| f.finding.kind == k)
            .count()
    };
    println!(
        "{}",
        serde_json::json!({
            "grants_checked": report.grants_checked,
            "ungranted": count(DriftKind::Ungranted),
            "missing_role": count(DriftKind::MissingRole),
            "findings": report.findings.len(),
            "errors": report.errors,
        })
    );
}

/// A child's run: its output, seconds, peak memory in KiB.
struct Run {
    out: serde_json::Value,
    seconds: f64,
    peak_kib: u64,
}

/// Runs a child; kills it once `kill_after_pages` member pages were listed, if given.
async fn run_child(
    env: &HashMap<String, String>,
    sandbox: &Sandbox,
    kill_after_pages: Option<usize>,
) -> Run {
    let began = Instant::now();
    let pages_before = pages(sandbox);
    let mut child = Command::new(std::env::current_exe().expect("own path"))
        .arg("child")
        .envs(env)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .expect("child");
    let pid = child.id();
    let mut peak = 0;
    loop {
        if let Some((_, k)) = measure::memory_kib(pid) {
            peak = peak.max(k);
        }
        if kill_after_pages.is_some_and(|n| pages(sandbox) - pages_before >= n) {
            let _ = child.kill();
            let _ = child.wait();
            break;
        }
        if child.try_wait().expect("wait").is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let out = child
        .wait_with_output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    Run {
        out: serde_json::from_str(out.trim()).unwrap_or(serde_json::Value::Null),
        seconds: began.elapsed().as_secs_f64(),
        peak_kib: peak,
    }
}

/// Member pages the sandbox has served so far.
fn pages(sandbox: &Sandbox) -> usize {
    sandbox
        .requests()
        .iter()
        .filter(|r| r.method == "GET" && r.path.ends_with("/members"))
        .count()
}

async fn parent(members: usize) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let db_base = std::env::var("GUILDGATE_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into());
    let tag = guildgate::domain::ids::mint("b")
        .to_lowercase()
        .replace('_', "");
    let db = world::Database::new(&db_base, &format!("ggbench_{tag}")).await;
    let db_url = db.url.clone();
    let pool = sqlx::PgPool::connect(&db_url).await.unwrap();
    store::migrate(&pool).await.unwrap();

    let sandbox = Sandbox::start(SandboxConfig::default().with_members_intent(true)).await;
    let ids = sandbox.add_guild(
        GuildSpec::new("Large")
            .with_bot_permissions(permissions::REQUIRED)
            .with_role("Patrons", 1),
    );
    let (guild, role) = (ids.guild_id, ids.role("Patrons"));
    let crowd = sandbox.add_crowd(guild, members, |i| {
        // The granted members hold the role (every tenth lost it); every hundredth of
        // the rest holds it without a grant.
        if i < GRANTS {
            if i % 10 == 9 { vec![] } else { vec![role] }
        } else if i % 100 == 0 {
            vec![role]
        } else {
            vec![]
        }
    });
    let business = "bus_bench";
    let mut conn = pool.acquire().await.unwrap();
    store::businesses::ensure_business(&mut conn, business)
        .await
        .unwrap();
    let e = store::entitlements::insert_entitlement(
        &mut conn,
        business,
        "bench",
        &guild.to_string(),
        Some(&role.to_string()),
    )
    .await
    .unwrap();
    let users: Vec<String> = crowd[..GRANTS].iter().map(u64::to_string).collect();
    sqlx::query(
        "INSERT INTO grants (id, business_id, brand_id, entitlement_id, customer_id, payment_id,
             status, delivered_at, oauth_nonce, oauth_expires_at,
             applied_user_id, applied_guild_id, applied_role_id)
         SELECT 'grant_bench' || i, $1, $1, $2, 'cus_' || i, 'pay_' || i,
             'Delivered', now(), 'n', now() + interval '7 days', u, $3, $4
         FROM unnest($5::text[]) WITH ORDINALITY AS t(u, i)",
    )
    .bind(business)
    .bind(&e.id)
    .bind(guild.to_string())
    .bind(role.to_string())
    .bind(&users)
    .execute(&mut *conn)
    .await
    .unwrap();
    drop(conn);

    let env: HashMap<String, String> = [("GUILDGATE_DATABASE__URL", db_url.clone())]
        .into_iter()
        .chain(world::sandbox_env(&sandbox))
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    let want_pages = members / 1000 + 1;

    let full = run_child(&env, &sandbox, None).await;
    let requests = sandbox.requests();
    let rate_limited = requests.iter().filter(|r| r.status == 429).count();
    let total_pages = pages(&sandbox);
    let _killed = run_child(&env, &sandbox, Some(want_pages / 3)).await;
    let before = pages(&sandbox);
    let resumed = run_child(&env, &sandbox, None).await;
    let resumed_pages = pages(&sandbox) - before;

    println!("| members | pages | seconds | peak RSS of the reconcile process | findings | 429s |");
    println!("|---:|---:|---:|---:|---|---:|");
    println!(
        "| {members} | {total_pages} | {:.1} | {:.1} MiB | {} ungranted, {} missing role | {rate_limited} |",
        full.seconds,
        full.peak_kib as f64 / 1024.0,
        full.out["ungranted"],
        full.out["missing_role"],
    );
    println!(
        "\nkilled after {} pages; the next run listed {resumed_pages} of {want_pages} pages in {:.1} s (peak {:.1} MiB) and found {} ungranted, {} missing role",
        want_pages / 3,
        resumed.seconds,
        resumed.peak_kib as f64 / 1024.0,
        resumed.out["ungranted"],
        resumed.out["missing_role"],
    );
    println!(
        "{}",
        serde_json::json!({
            "members": members,
            "pages": total_pages,
            "seconds": (full.seconds * 10.0).round() / 10.0,
            "peak_rss_mib": (full.peak_kib as f64 / 102.4).round() / 10.0,
            "findings": full.out,
            "rate_limited": rate_limited,
            "resumed_pages": resumed_pages,
            "resumed_findings": resumed.out,
        })
    );
    pool.close().await;
    db.drop_db().await;
    sandbox.shutdown().await;
}
