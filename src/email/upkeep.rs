//! The email upkeep every process runs: every `grants.timer_interval` it queues the
//! reminders that are due and the parked emails whose business's hour has room again
//! (when email is on); every `ingest.prune_interval` it deletes
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

/// Parked emails released per round at most: of one business (so a deep backlog
/// reaches the email queue every business shares in small steps, while the hour's
/// room allows 12,000 an hour at the default 30 s round), and in all.
const RELEASE_PER_BUSINESS: i64 = 100;
const RELEASE_PER_ROUND: i64 = 1000;

#[derive(Clone)]
pub struct Upkeep {
    pub pool: PgPool,
    /// Whether email is on: without it no reminder is queued.
    pub send: bool,
    /// How often addresses and old email rows are deleted (`ingest.prune_interval`).
    pub prune_every: Duration,
    /// `email.per_business_per_hour`: what a business's parked emails are released to.
    pub per_business_per_hour: u32,
}

impl Upkeep {
    pub async fn run_every(&self, every: Duration, stop: CancellationToken) {
        let mut pruned_at: Option<Instant> = None;
        loop {
            let prune = pruned_at.is_none_or(|t| t.elapsed() >= self.prune_every);
            let round = async {
                let reminders = self.remind().await?;
                let released = self.release().await?;
                let pruned = if prune { self.prune().await? } else { 0 };
                Ok::<_, sqlx::Error>((reminders, released, pruned))
            };
            match round.await {
                Ok((reminders, released, pruned)) => {
                    if prune {
                        pruned_at = Some(Instant::now());
                    }
                    if reminders > 0 || released > 0 || pruned > 0 {
                        tracing::info!(
                            reminders,
                            released,
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

    /// Queues again, oldest first, the parked emails that are due and that their
    /// business's hour has room for, up to `RELEASE_PER_BUSINESS` of each business;
    /// returns how many. An email released and still over
    /// a limit when handled (its recipient's, or its business's after newer emails took
    /// the room) is parked again; one process at a time releases.
    pub async fn release(&self) -> Result<usize, sqlx::Error> {
        if !self.send {
            return Ok(0);
        }
        let mut tx = self.pool.begin().await?;
        let released = db::release_parked(
            &mut tx,
            self.per_business_per_hour,
            Utc::now(),
            RELEASE_PER_BUSINESS,
            RELEASE_PER_ROUND,
        )
        .await?;
        for r in &released {
            let job = Job {
                email_id: r.id.clone(),
                grant_id: r.grant_id.clone(),
                to: None,
            };
            crate::outbox::produce::queue_email(&mut tx, &job.email_id, &job.payload()).await?;
        }
        tx.commit().await?;
        Ok(released.len())
    }

    /// Deletes what is no longer needed; returns how many addresses.
    pub async fn prune(&self) -> Result<u64, sqlx::Error> {
        let mut conn = self.pool.acquire().await?;
        let pruned = db::prune_contacts(&mut conn).await?;
        db::prune_settled(&mut conn).await?;
        Ok(pruned)
    }
}
