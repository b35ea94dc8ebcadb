//! Discord: the HTTP client guildgate talks to Discord with, and the pure decisions
//! about what to ask of it.
//!
//! - [`bots`]: which bot speaks for a business (its own application, or the shared one).
//! - [`client`]: typed calls (reqwest), each through a rate-limit budget.
//! - [`ratelimit`]: per-bucket queues learned from headers (twilight's actor) behind a
//!   sliding-window gate for the global limit; the syncer's budget and a small side one.
//! - [`invalid`]: the 401/403/429 counter that stops calling before Discord bans the IP.
//! - [`error`]: what a failed call means for the caller (wait, retry, ask a human).
//! - [`plan`]: `(grant, entitlement, link, member, other grants) -> calls`, pure.
//! - [`validate`]: checks a guild/role configuration before it is saved.

pub mod bots;
pub mod client;
pub mod error;
pub mod invalid;
pub mod plan;
pub mod ratelimit;
pub mod shared;
pub mod stops;
pub mod validate;

pub use bots::{Bot, Bots};
pub use client::DiscordClient;
pub use error::{DiscordError, HumanCode};

use std::fmt;

/// A Discord id (snowflake): digits only, parsed once at the edge.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Snowflake(u64);

impl Snowflake {
    pub fn new(id: u64) -> Self {
        Self(id)
    }

    pub fn parse(s: &str) -> Option<Self> {
        if s.is_empty() || s.len() > 20 || !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        s.parse().ok().map(Self)
    }

    pub fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for Snowflake {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl<'de> serde::Deserialize<'de> for Snowflake {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Discord sends snowflakes as strings; accept numbers too.
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Raw {
            S(String),
            N(u64),
        }
        match Raw::deserialize(d)? {
            Raw::S(s) => {
                Snowflake::parse(&s).ok_or_else(|| serde::de::Error::custom("bad snowflake"))
            }
            Raw::N(n) => Ok(Snowflake(n)),
        }
    }
}

impl serde::Serialize for Snowflake {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0.to_string())
    }
}

/// Permission bits guildgate cares about.
pub mod permissions {
    pub const CREATE_INSTANT_INVITE: u64 = 1 << 0;
    pub const KICK_MEMBERS: u64 = 1 << 1;
    pub const ADMINISTRATOR: u64 = 1 << 3;
    pub const MANAGE_ROLES: u64 = 1 << 28;
    /// What the bot must hold: 268435459.
    pub const REQUIRED: u64 = CREATE_INSTANT_INVITE | KICK_MEMBERS | MANAGE_ROLES;
}
