//! The email upkeep every process runs every `grants.timer_interval`: queue the
//! reminders that are due (when email is on), delete the addresses of customers who no
//! longer have a live grant with the business (always: an address is kept only while it
//! can be needed), and delete the rows of emails settled more than 90 days ago.

use std::time::Duration;

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
}

impl Upkeep {
    pub async fn run_every(&self, every: Duration, stop: CancellationToken) {
        loop {
            match self.once().await {
                Ok((0, 0)) => {}
                Ok((queued, pruned)) => {
                    tracing::info!(
                        reminders = queued,
                        addresses_deleted = pruned,
                        "email upkeep"
                    )
                }
                Err(e) => tracing::warn!(error = %e, "email upkeep: database error; trying again"),
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
        }
    }

    /// One round: the reminders it queued and the addresses it deleted. Two processes
    /// at once queue each reminder once (its email row is the claim).
    pub async fn once(&self) -> Result<(usize, u64), sqlx::Error> {
        let mut queued = 0;
        if self.send {
            let mut tx = self.pool.begin().await?;
            for r in db::due_reminders(&mut tx, Utc::now(), BATCH).await? {
                let job = Job::reminder(&r.grant_id, r.days);
                if db::queue(&mut tx, &job, &r.business_id).await? {
                    queued += 1;
                }
            }
            tx.commit().await?;
        }
        let mut conn = self.pool.acquire().await?;
        let pruned = db::prune_contacts(&mut conn).await?;
        db::prune_settled(&mut conn).await?;
        Ok((queued, pruned))
    }
}
