//! Every integration test, in one binary: each file of `tests/` is a module here, and
//! the helpers they share are compiled once, at the root. One binary links the crate
//! once, where one binary per file linked it a dozen times over (`autotests = false` in
//! Cargo.toml). Run one file's tests with `cargo test --test it <file>::`, e.g.
//! `cargo test --test it reconcile::`.

// Shared helpers (`tests/common/`), and the chaos scenarios that `examples/chaos.rs`
// runs in full.
mod common;
#[path = "common/discord.rs"]
mod discord_world;
#[path = "chaos/hostile.rs"]
mod hostile_scenario;
#[path = "chaos/model.rs"]
mod model;
#[path = "common/python.rs"]
mod python;
#[path = "chaos/scenarios.rs"]
mod scenarios;
#[path = "common/seed.rs"]
mod seed;
#[path = "common/smtp.rs"]
mod smtp;
#[path = "common/browser.rs"]
mod webdriver;

// The tests, a module per file.
#[path = "api.rs"]
mod api;
#[path = "bot_budget.rs"]
mod bot_budget;
#[path = "browser.rs"]
mod browser;
#[path = "chaos.rs"]
mod chaos;
#[path = "discord.rs"]
mod discord;
#[path = "dlq.rs"]
mod dlq;
#[path = "hostile.rs"]
mod hostile;
#[path = "ingest.rs"]
mod ingest;
#[path = "ingest_faults.rs"]
mod ingest_faults;
#[path = "observability.rs"]
mod observability;
#[path = "own_bot.rs"]
mod own_bot;
#[path = "properties.rs"]
mod properties;
#[path = "reconcile.rs"]
mod reconcile;
#[path = "schema_fuzz.rs"]
mod schema_fuzz;
#[path = "sdk_suite.rs"]
mod sdk_suite;
#[path = "two_processes.rs"]
mod two_processes;
#[path = "webhooks.rs"]
mod webhooks;
