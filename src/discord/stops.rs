//! The syncer's memory of where the bot just lost access, checked right before each
//! request is sent.
//!
//! The authoritative stop is a row in `discord_stops`, which the syncer reads before it
//! starts a job. But jobs already past that check (up to the syncer's concurrency, most
//! of them waiting in the same bucket's line) would each still earn an invalid answer.
//! So the client that receives the first 403 or 404 remembers the server (or the role)
//! here, and the requests queued behind it fail without being sent. A memory entry is
//! short-lived: once the row is written, the check before each job takes over, and a
//! resume (which removes the row) is not held back for long.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::domain::Snowflake;

/// How long a remembered stop holds requests back.
pub const REMEMBERED: Duration = Duration::from_secs(10);

/// How old a remembered stop must be before a job that found no stop row may forget
/// it: younger, the row may not be written yet.
pub const SETTLED: Duration = Duration::from_secs(1);

/// What a stop covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StopKey {
    /// The whole server: the bot is not in it (50001 Missing Access, 10004 Unknown Guild).
    Server(Snowflake),
    /// Calls about one role in a server (or, `None`, membership calls): the bot lacks a
    /// permission or the role sits above it (50013 Missing Permissions).
    Role(Snowflake, Option<Snowflake>),
}

#[derive(Debug, Default)]
pub struct Remembered {
    keys: Mutex<HashMap<StopKey, Instant>>,
}

impl Remembered {
    pub fn remember(&self, key: StopKey) {
        self.keys
            .lock()
            .expect("remembered stops")
            .insert(key, Instant::now());
    }

    /// The stop a call to `guild` about `role` falls under, if one was remembered lately.
    pub fn covering(&self, guild: Snowflake, role: Option<Snowflake>) -> Option<StopKey> {
        let mut keys = self.keys.lock().expect("remembered stops");
        keys.retain(|_, at| at.elapsed() < REMEMBERED);
        [StopKey::Server(guild), StopKey::Role(guild, role)]
            .into_iter()
            .find(|k| keys.contains_key(k))
    }
}

impl Remembered {
    /// The database holds no stop for a call to `guild` about `role` (a resume removed
    /// it): forget what covers it, unless remembered less than `settled` ago.
    pub fn forget(&self, guild: Snowflake, role: Option<Snowflake>, settled: Duration) {
        let mut keys = self.keys.lock().expect("remembered stops");
        for k in [StopKey::Server(guild), StopKey::Role(guild, role)] {
            if keys.get(&k).is_some_and(|at| at.elapsed() >= settled) {
                keys.remove(&k);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_remembered_stop_covers_its_server_or_role_for_a_while() {
        let (g, h) = (Snowflake::new(1), Snowflake::new(2));
        let (r, s) = (Some(Snowflake::new(10)), Some(Snowflake::new(11)));
        let m = Remembered::default();
        m.remember(StopKey::Role(g, r));
        m.remember(StopKey::Server(h));
        assert_eq!(m.covering(g, r), Some(StopKey::Role(g, r)));
        assert_eq!(m.covering(g, s), None, "another role of the server");
        assert_eq!(m.covering(g, None), None);
        assert_eq!(m.covering(h, s), Some(StopKey::Server(h)));
        assert_eq!(m.covering(h, None), Some(StopKey::Server(h)));
        m.forget(h, None, SETTLED);
        assert_eq!(
            m.covering(h, None),
            Some(StopKey::Server(h)),
            "just remembered"
        );
        tokio::time::advance(SETTLED).await;
        m.forget(h, None, SETTLED);
        assert_eq!(m.covering(h, None), None, "a resume is not held back");
        m.remember(StopKey::Server(h));
        tokio::time::advance(REMEMBERED).await;
        assert_eq!(m.covering(g, r), None);
        assert_eq!(m.covering(h, None), None);
    }
}
