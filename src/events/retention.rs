//! Pruning of what grows by a row per event forever: applied event ids and settled
//! webhook messages. `processed_events` is what makes a redelivered or duplicated event
//! change nothing; ids older than `ingest.processed_retention` are deleted. Delivered
//! and failed webhook messages (bodies and attempts, kept for the API and replay) older
//! than `webhooks.message_retention` are deleted; pending ones never. Both go a chunk per
//! transaction, so a first prune of a large backlog never holds many locks or one long
//! transaction.
//!
//! A duplicate of an event whose id was pruned is recognised by the state its first
//! application recorded (see [`crate::domain::decide`]'s `Repeat`): its payment, its
//! reversal, or its id among those its subscription applied at its last event time.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::store;

/// Ids deleted per transaction.
pub const PRUNE_CHUNK: i64 = 5_000;

/// The longest pause between two chunks of one prune.
const MAX_PAUSE: Duration = Duration::from_secs(1);

/// The oldest time whose applied ids are still kept under `retention`: ids recorded
/// before it may have been pruned. `None` when the retention reaches past the start of
/// time (nothing is pruned).
pub fn kept_since(retention: Duration, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    chrono::Duration::from_std(retention)
        .ok()
        .and_then(|r| now.checked_sub_signed(r))
}

/// What a [`Pruner`] deletes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// Applied event ids (`processed_events`).
    EventIds,
    /// Delivered and failed webhook messages, with their attempts.
    WebhookMessages,
}

impl Target {
    fn what(self) -> &'static str {
        match self {
            Target::EventIds => "applied event ids",
            Target::WebhookMessages => "settled webhook messages",
        }
    }
}

/// Deletes rows older than a retention, on a schedule.
#[derive(Clone)]
pub struct Pruner {
    pub pool: PgPool,
    pub retention: Duration,
    pub metrics: Arc<Metrics>,
    pub target: Target,
}

impl Pruner {
    /// Deletes every row recorded before `now - retention`, in chunks, and returns how
    /// many. After a full chunk it pauses as long as that chunk took (up to a second),
    /// so a large backlog (the first prune of a database that kept every id) is deleted
    /// at most half the time while chunks take under a second, and ingest's
    /// transactions are not queued behind it. Stops early (with what it deleted so far)
    /// on `shutdown`.
    pub async fn prune(
        &self,
        now: DateTime<Utc>,
        shutdown: &CancellationToken,
    ) -> Result<u64, sqlx::Error> {
        // A retention longer than time itself has nothing to prune.
        let Some(cutoff) = kept_since(self.retention, now) else {
            return Ok(0);
        };
        let mut total = 0;
        loop {
            let started = tokio::time::Instant::now();
            let mut conn = self.pool.acquire().await?;
            let n = match self.target {
                Target::EventIds => {
                    let n = store::ingest::prune_processed(&mut conn, cutoff, PRUNE_CHUNK).await?;
                    self.metrics.processed_pruned.inc_by(n);
                    n
                }
                Target::WebhookMessages => {
                    let n = crate::store::messages::prune_settled(&mut conn, cutoff, PRUNE_CHUNK)
                        .await?;
                    self.metrics.webhook_messages_pruned.inc_by(n);
                    n
                }
            };
            drop(conn);
            total += n;
            if n < PRUNE_CHUNK as u64 {
                return Ok(total);
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(total),
                _ = tokio::time::sleep(started.elapsed().min(MAX_PAUSE)) => {}
            }
        }
    }

    /// Prunes a minute after start and then every `every`, until `shutdown`. A failed
    /// pass (the database unavailable, say) is logged and tried again next time.
    pub async fn run_every(self, every: Duration, shutdown: CancellationToken) {
        let first = tokio::time::Instant::now() + every.min(Duration::from_secs(60));
        let mut tick = tokio::time::interval_at(first, every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let what = self.target.what();
            match self.prune(Utc::now(), &shutdown).await {
                Ok(0) => tracing::debug!(what, "nothing old enough to prune"),
                Ok(n) => tracing::info!(
                    what,
                    pruned = n,
                    retention = %humantime::format_duration(self.retention),
                    "pruned"
                ),
                Err(e) => {
                    tracing::warn!(what, error = %e, "pruning failed; trying again next interval")
                }
            }
        }
    }
}
