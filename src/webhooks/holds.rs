//! The hold releaser: gives held messages ([`crate::store::messages::Held`]) a delivery job again
//! once their time has come (and parked ones once nobody pulls them any more,
//! [`super::parking`]), a bounded number per endpoint and round so that a large
//! backlog reaches the workers in steps rather than all at once. Runs in every process;
//! [`messages::release_due`] lets each message go to one of them.

use std::time::{Duration, Instant};

use chrono::{DateTime, TimeDelta, Utc};

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::store::messages;

/// How often due messages are looked for.
pub const INTERVAL: Duration = Duration::from_secs(1);
/// At most this many messages of one endpoint per round.
pub const PER_ENDPOINT: i64 = 250;
/// At most this many messages per round (a full round is followed by another at once).
pub const PER_ROUND: i64 = 1000;

/// The wall-clock time of `at`, an instant of this process (what `held_until` stores).
pub fn wall_clock(at: Instant) -> DateTime<Utc> {
    let wait =
        TimeDelta::from_std(at.saturating_duration_since(Instant::now())).unwrap_or(TimeDelta::MAX);
    Utc::now()
        .checked_add_signed(wait)
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// The instant of this process of the wall-clock time `at` (now if it is past): the
/// other way round from [`wall_clock`], for a claim or lease read from the database.
pub fn instant_of(at: DateTime<Utc>) -> Instant {
    Instant::now() + (at - Utc::now()).to_std().unwrap_or(Duration::ZERO)
}

pub async fn run(pool: PgPool, shutdown: CancellationToken) {
    loop {
        let released = match pool.acquire().await {
            Ok(mut conn) => {
                let released = messages::release_due(&mut conn, PER_ENDPOINT, PER_ROUND).await;
                if let Err(e) = messages::drop_idle_leases(&mut conn).await {
                    tracing::warn!(error = %e, "cannot drop idle parking leases");
                }
                released
            }
            Err(e) => Err(e),
        };
        let full = match released {
            Ok(n) => {
                if n > 0 {
                    tracing::debug!(messages = n, "released webhook messages");
                }
                n >= PER_ROUND as u64
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot release webhook messages; trying again");
                false
            }
        };
        if full && !shutdown.is_cancelled() {
            continue;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(INTERVAL) => {}
        }
    }
}
