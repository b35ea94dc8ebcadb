//! Grants with a due time: a grant whose `ends_at` has passed (the end of a grace
//! period, a comp grant's `expires_at`) is revoked with its `ends_reason`, its `entitlement_grant.revoked` webhook
//! and its Discord sync written in the same transaction, through the outbox.
//!
//! The due times live in PostgreSQL, so they survive restarts. Every process polls
//! every `grants.timer_interval`; each due grant is revoked by one of them (the update
//! is conditional, and the winner emits), and a grant is revoked late rather than
//! never. The revoke takes the ingest lock of the grant's subscription, so it never
//! interleaves with an event of that subscription: an `active` that ends the grace and
//! the timer that ends the grant are applied one after the other, whichever first.

use std::time::Duration;

use chrono::Utc;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::domain::{GrantEventType, RevocationReason};
use crate::grants::link::LinkBuilder;
use crate::outbox::emit;
use crate::store::history;
use crate::store::ingest::subscription_key;
use crate::store::{grants as grant_store, ingest};

/// How many due grants one pass revokes at most; the next pass takes the rest.
const BATCH: i64 = 200;

pub struct Timers {
    pub pool: PgPool,
    pub links: LinkBuilder,
    pub metrics: std::sync::Arc<crate::metrics::Metrics>,
}

impl Timers {
    /// Revokes what is due every `every`, until `stop`.
    pub async fn run_every(&self, every: Duration, stop: CancellationToken) {
        loop {
            match self.fire_due().await {
                Ok(n) if n > 0 => tracing::info!(revoked = n, "due grants revoked"),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "due grants: database error; trying again"),
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
        }
    }

    /// Revokes every grant due now (up to `BATCH`); returns how many this process
    /// revoked.
    pub async fn fire_due(&self) -> Result<usize, sqlx::Error> {
        let due = {
            let mut conn = self.pool.acquire().await?;
            grant_store::due(&mut conn, Utc::now(), BATCH).await?
        };
        let mut revoked = 0;
        for (id, subscription) in due {
            let now = Utc::now();
            let mut tx = self.pool.begin().await?;
            if let Some(s) = &subscription {
                ingest::lock_keys(&mut tx, &[subscription_key(s)]).await?;
            }
            // Still due under the lock: an event may have ended the grace, or revoked it.
            let Some(g) = grant_store::end_due(&mut tx, &id, now).await? else {
                continue;
            };
            emit(&mut tx, &self.links, &g, GrantEventType::Revoked, now).await?;
            // A comp grant's expiry is its `revoked` entry; a grace period ends too.
            if g.revocation_reason != Some(RevocationReason::Expired) {
                history::record(
                    &mut tx,
                    &g.id,
                    now,
                    "grace_ended",
                    serde_json::json!({"outcome": "revoked", "reason": g.revocation_reason.map(RevocationReason::as_str)}),
                )
                .await?;
            }
            tx.commit().await?;
            self.metrics
                .grant_timers
                .get_or_create(&vec![(
                    "reason",
                    g.revocation_reason
                        .map(RevocationReason::as_str)
                        .unwrap_or_default()
                        .to_string(),
                )])
                .inc();
            revoked += 1;
        }
        Ok(revoked)
    }
}
