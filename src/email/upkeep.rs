//! The email upkeep every process runs: every `grants.timer_interval` it queues the
//! reminders that are due (when email is on); every `ingest.prune_interval` it deletes
//! the addresses of customers who no longer have a live grant with the business
//! (always: an address is kept only while it can be needed) and the rows of emails
//! settled more than 90 days ago. The deletes scan their tables, so they run on the
//! pruning schedule, not on every round of the timer.

use std::time::{Duration, Instant};

use chrono::Utc;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::Job;
use crate::store::email as db;

/// Reminders queued per round at most.
const BATCH: i64 = 500;

#[derive(Clone)]
pub struct Upkeep {
    pub pool: PgPool,
    /// Whether email is on: without it no reminder is queued.
    pub send: bool,
    /// How often addresses and old email rows are deleted (`ingest.prune_interval`).
    pub prune_every: Duration,
}

impl Upkeep {
    pub async fn run_every(&self, every: Duration, stop: CancellationToken) {
        let mut pruned_at: Option<Instant> = None;
        loop {
            let prune = pruned_at.is_none_or(|t| t.elapsed() >= self.prune_every);
            let round = async {
                let queued = self.remind().await?;
                let pruned = if prune { self.prune().await? } else { 0 };
                Ok::<_, sqlx::Error>((queued, pruned))
            };
            match round.await {
                Ok((queued, pruned)) => {
                    if prune {
                        pruned_at = Some(Instant::now());
                    }
                    if queued > 0 || pruned > 0 {
                        tracing::info!(
                            reminders = queued,
                            addresses_deleted = pruned,
                            "email upkeep"
                        )
                    }
                }
                Err(e) => tracing::warn!(error = %e, "email upkeep: database error; trying again"),
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
        }
    }

    /// Both at once: the reminders queued and the addresses deleted.
    pub async fn once(&self) -> Result<(usize, u64), sqlx::Error> {
        Ok((self.remind().await?, self.prune().await?))
    }

    /// Queues the reminders that are due; returns how many. Two processes at once queue
    /// each reminder once (its email row is the claim).
    pub async fn remind(&self) -> Result<usize, sqlx::Error> {
        let mut queued = 0;
        if self.send {
            let mut tx = self.pool.begin().await?;
            for r in db::due_reminders(&mut tx, Utc::now(), BATCH).await? {
                let job = Job::reminder(&r.grant_id, r.days);
                if super::queue(&mut tx, &job, &r.business_id).await? {
                    queued += 1;
                }
            }
            tx.commit().await?;
        }
        Ok(queued)
    }

    /// Deletes what is no longer needed; returns how many addresses.
    pub async fn prune(&self) -> Result<u64, sqlx::Error> {
        let mut conn = self.pool.acquire().await?;
        let pruned = db::prune_contacts(&mut conn).await?;
        db::prune_settled(&mut conn).await?;
        Ok(pruned)
    }
}
