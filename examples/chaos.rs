//! The reliability figures: runs the crash, outage, Discord chaos, hostile-input,
//! RabbitMQ cluster and PostgreSQL failover scenarios against the local PostgreSQL and
//! RabbitMQ (the last two start three RabbitMQ nodes, and a primary and standby, of
//! their own) with a sandbox Discord, and prints
//! one table (Markdown, as in docs/reliability.md), then one JSON line.
//!
//! ```text
//! cargo run --release --example chaos                 # 20,000 events, 5 kills, 30 s database outage
//! cargo run --release --example chaos -- --short      # what CI runs (tests/chaos.rs)
//! cargo run --release --example chaos -- --only crashes --events 5000 --kills 3
//! cargo run --release --example chaos -- --only cluster   # three RabbitMQ nodes, two killed
//! cargo run --release --example chaos -- --only standby   # PostgreSQL primary killed, standby promoted
//! ```
//!
//! The worker that is killed is this program started again as `chaos worker`, which
//! runs exactly what `guildgate serve` runs (`guildgate::app::serve`). Exits 1 when a
//! scenario found a loss, a duplicate or another problem.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/chaos/hostile.rs"]
mod hostile;
#[path = "../tests/chaos/model.rs"]
mod model;
#[path = "../tests/chaos/scenarios.rs"]
mod scenarios;

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use common::worker::WorkerCommand;
use scenarios::Params;

#[derive(Parser)]
#[command(
    about = "Crash, outage, Discord chaos and hostile-input scenarios; prints the figures table."
)]
struct Args {
    /// Run as the worker process (what `guildgate serve` runs); used by the scenarios.
    #[arg(hide = true)]
    worker: Option<String>,
    /// CI's short version instead of the full figures.
    #[arg(long)]
    short: bool,
    /// Events of the crash scenario (full: 20,000).
    #[arg(long)]
    events: Option<usize>,
    /// SIGKILLs during the crash scenario (full: 5).
    #[arg(long)]
    kills: Option<usize>,
    /// How long the database connection is cut, in seconds (full: 30).
    #[arg(long)]
    db_outage_s: Option<u64>,
    /// Replay a run.
    #[arg(long)]
    seed: Option<u64>,
    /// Only these scenarios: crashes, outages, discord, hostile, cluster, standby
    /// (repeatable).
    #[arg(long, value_parser = ["crashes", "outages", "discord", "hostile", "cluster", "standby"])]
    only: Vec<String>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    if args.worker.as_deref() == Some("worker") {
        return rt.block_on(worker());
    }
    // The hostile scenario runs a guildgate in this process: its logs go to stderr,
    // errors only unless RUST_LOG says otherwise, so stdout holds just the figures.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let seed = args.seed.unwrap_or_else(rand::random);
    let mut p = if args.short {
        Params::short(seed)
    } else {
        Params::full(seed)
    };
    if let Some(e) = args.events {
        p.events = e;
    }
    if let Some(k) = args.kills {
        p.kills = k;
    }
    if let Some(s) = args.db_outage_s {
        p.db_outage = Duration::from_secs(s);
    }
    let cmd = WorkerCommand {
        program: std::env::current_exe().expect("own path"),
        args: vec!["worker".into()],
    };
    let wanted = |s: &str| args.only.is_empty() || args.only.iter().any(|o| o == s);
    eprintln!("seed {seed} (replay with --seed {seed}); {p:?}");
    let reports = rt.block_on(async {
        let mut reports = Vec::new();
        if wanted("crashes") {
            reports.push(scenarios::crashes(&p, &cmd).await);
        }
        if wanted("outages") {
            reports.push(scenarios::outages(&p, &cmd).await);
        }
        if wanted("discord") {
            reports.push(scenarios::discord_chaos(&p, &cmd).await);
        }
        if wanted("hostile") {
            reports.push(hostile::hostile().await);
        }
        if wanted("cluster") {
            reports.push(scenarios::cluster(&p, &cmd).await);
        }
        if wanted("standby") {
            reports.push(scenarios::standby(&p, &cmd).await);
        }
        reports
    });
    println!("{}", scenarios::table(&reports));
    let passed = reports.iter().all(|r| r.passed());
    println!(
        "{}",
        serde_json::json!({
            "seed": seed,
            "passed": passed,
            "scenarios": reports.iter().map(|r| r.json()).collect::<Vec<_>>(),
        })
    );
    if passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// `guildgate serve`, configured from the environment the scenario gives it.
async fn worker() -> ExitCode {
    let settings = match guildgate::config::Settings::load(None) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("worker: {e}");
            return ExitCode::from(2);
        }
    };
    guildgate::telemetry::init(settings.log.format);
    let _ = rustls::crypto::ring::default_provider().install_default();
    match guildgate::app::serve(settings, guildgate::app::Options::default()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "worker failed");
            ExitCode::FAILURE
        }
    }
}
