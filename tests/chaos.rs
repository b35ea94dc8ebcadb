//! The reliability scenarios in CI: short versions of the scenarios that
//! `cargo run --release --example chaos` runs in full (see docs/reliability.md). Each fails on any loss, duplicate,
//! dead letter for a transient cause, or Discord request into an exhausted bucket.
//!
//! `GUILDGATE_CHAOS_SEED` replays a run (each test prints its seed).

use crate::common;
use crate::hostile_scenario as hostile;
use crate::scenarios;

use common::worker::WorkerCommand;
use scenarios::{Params, Report};

fn params() -> Params {
    let seed = std::env::var("GUILDGATE_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("GUILDGATE_CHAOS_SEED={seed}");
    Params::short(seed)
}

fn guildgate() -> WorkerCommand {
    WorkerCommand {
        program: env!("CARGO_BIN_EXE_guildgate").into(),
        args: vec!["serve".into()],
    }
}

fn check(r: Report) {
    eprintln!(
        "{}\n{}",
        scenarios::table(std::slice::from_ref(&r)),
        r.json()
    );
    // The problems go in the panic message too: a failing test's output is often read
    // only around its panic.
    assert!(
        r.passed(),
        "{} problem(s) in {}: {}",
        r.problems.len(),
        r.scenario,
        r.problems
            .iter()
            .take(10)
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join("; ")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashes_lose_and_duplicate_nothing() {
    let p = params();
    let r = scenarios::crashes(&p, &guildgate()).await;
    assert_eq!(r.kills, p.kills, "every planned kill happened");
    check(r);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outages_dead_letter_nothing_and_recover() {
    let r = scenarios::outages(&params(), &guildgate()).await;
    assert_eq!(r.recovery.len(), 3, "three outages");
    check(r);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discord_chaos_delivers_everything_within_the_rate_limits() {
    check(scenarios::discord_chaos(&params(), &guildgate()).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_is_dead_lettered_or_ignored_and_good_events_flow() {
    check(hostile::hostile().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dying_rabbitmq_node_loses_and_doubles_nothing() {
    let r = scenarios::cluster(&params(), &guildgate()).await;
    assert_eq!(
        r.kills, 2,
        "the leader's node and guildgate's node were killed"
    );
    assert_eq!(r.recovery.len(), 2, "two recoveries measured");
    check(r);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_failover_loses_and_doubles_nothing() {
    let r = scenarios::standby(&params(), &guildgate()).await;
    assert_eq!(r.kills, 1, "the primary was killed");
    assert_eq!(r.recovery.len(), 1, "the recovery was measured");
    check(r);
}
