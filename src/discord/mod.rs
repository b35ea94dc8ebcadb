//! Discord: the HTTP client guildgate talks to Discord with, and the pure decisions
//! about what to ask of it.
//!
//! - [`bots`]: which bot speaks for a business (its own application, or the shared one).
//! - [`client`]: typed calls (reqwest), each through a rate-limit budget.
//! - [`ratelimit`]: per-bucket queues learned from headers (twilight's actor) behind a
//!   sliding-window gate for the global limit; the syncer's budget and a small side one.
//! - [`invalid`]: the 401/403/429 counter that stops calling before Discord bans the IP.
//! - [`error`]: what a failed call means for the caller (wait, retry, ask a human).
//! - [`validate`]: checks a guild/role configuration before it is saved.

pub mod bots;
pub mod client;
pub mod error;
pub mod invalid;
pub mod ratelimit;
pub mod shared;
pub mod stops;
pub mod validate;

pub use bots::{Bot, Bots};
pub use client::DiscordClient;
pub use error::{DiscordError, HumanCode};

/// Permission bits guildgate cares about.
pub mod permissions {
    pub const CREATE_INSTANT_INVITE: u64 = 1 << 0;
    pub const KICK_MEMBERS: u64 = 1 << 1;
    pub const ADMINISTRATOR: u64 = 1 << 3;
    pub const MANAGE_ROLES: u64 = 1 << 28;
    /// What the bot must hold: 268435459.
    pub const REQUIRED: u64 = CREATE_INSTANT_INVITE | KICK_MEMBERS | MANAGE_ROLES;
}
