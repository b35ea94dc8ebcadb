//! guildgate: sells access to Discord servers. Payment events come in from RabbitMQ,
//! become grants, and reach Discord and the merchant's webhooks through an outbox.
//! See docs/architecture.md for the architecture; each module's doc says what it owns.

pub mod amqp;
pub mod app;
pub mod config;
pub mod crypto;
pub mod discord;
pub mod domain;
pub mod email;
pub mod events;
pub mod faults;
pub mod grants;
pub mod i18n;
pub mod metrics;
pub mod nul;
pub mod outbox;
pub mod queue;
pub mod reconcile;
pub mod store;
pub mod sync;
pub mod telemetry;
pub mod web;
pub mod webhooks;
