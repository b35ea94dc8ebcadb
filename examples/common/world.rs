//! What the examples and the tests share: guildgate's settings that point at a
//! sandbox Discord, and removing a run's queues and exchanges. The examples and
//! `tests/common` include it with `#[path]`.
#![allow(dead_code)]

use guildgate::amqp::Names;
use guildgate::config::Settings;
use lapin::Channel;
use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use sandbox_discord::Sandbox;

/// The `GUILDGATE_DISCORD__*` settings that point guildgate at `sandbox`.
pub fn sandbox_env(sandbox: &Sandbox) -> Vec<(&'static str, String)> {
    vec![
        ("GUILDGATE_DISCORD__API_BASE", sandbox.api_base()),
        ("GUILDGATE_DISCORD__AUTHORIZE_URL", sandbox.authorize_url()),
        (
            "GUILDGATE_DISCORD__CLIENT_ID",
            sandbox.client_id().to_string(),
        ),
        (
            "GUILDGATE_DISCORD__CLIENT_SECRET",
            sandbox.client_secret().to_string(),
        ),
        (
            "GUILDGATE_DISCORD__BOT_TOKEN",
            sandbox.bot_token().to_string(),
        ),
    ]
}

/// Deletes every queue and exchange of `settings`' topology (best effort).
pub async fn delete_topology(ch: &Channel, settings: &Settings) {
    let names = Names::from_settings(settings);
    for q in guildgate::amqp::topology::all_queues(&names, settings) {
        let _ = ch
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    for ex in [settings.amqp.exchange.clone(), names.dead_letter_exchange()] {
        let _ = ch
            .exchange_delete(ex.as_str().into(), ExchangeDeleteOptions::default())
            .await;
    }
}
