//! Backfill: an entitlement attached to a product that already has live subscriptions
//! or paid one-time purchases is given to those customers, as if their purchase had
//! just happened: a grant per subscription or payment, `entitlement_grant.created`,
//! and a Discord sync for customers who connected Discord, all through the outbox, so
//! the syncer delivers within the same Discord budget as every other grant.
//!
//! Attaching records a `backfills` row. Every process works through open rows every
//! `grants.timer_interval`, a page of customers at a time, each grant in its own
//! transaction under the ingest lock of its subscription or payment (so an event of
//! the same purchase is applied before or after, never in between) and only if the
//! purchase still has no grant of the entitlement; a row is done when no customer is
//! left. Grants are given at most `grants.backfill_per_second` per process: each may
//! queue a Discord sync, and the sync queue is shared by every business, so a backfill
//! of a product with many buyers never holds up other merchants' deliveries for long.
//! What guildgate recorded is what it can reach: every subscription snapshot and
//! payment of a business since it got its first entitlement. Detaching revokes nothing.

use std::time::Duration;

use chrono::Utc;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::domain::GrantEventType;
use crate::grants::link::LinkBuilder;
use crate::outbox::emit;
use crate::store::history;
use crate::store::ingest::subscription_key;
use crate::store::{backfill as db, ingest};

/// Customers one pass gives grants to at most, per backfill.
const PAGE: i64 = 100;

pub struct Backfiller {
    pub pool: PgPool,
    pub links: LinkBuilder,
    /// At most this many grants per second (`grants.backfill_per_second`).
    pub per_second: f64,
    /// Whether email is on: a backfilled grant's customer is emailed when guildgate
    /// holds their address (they have another live grant with the business).
    pub email: bool,
}

impl Backfiller {
    /// Works through open backfills every `every`, until `stop`.
    pub async fn run_every(&self, every: Duration, stop: CancellationToken) {
        super::drain_every("backfill", every, stop, || self.pass()).await
    }

    /// One page of every open backfill; returns how many grants this process gave.
    pub async fn pass(&self) -> Result<usize, sqlx::Error> {
        let open = {
            let mut conn = self.pool.acquire().await?;
            db::open(&mut conn).await?
        };
        let mut given = 0;
        for b in open {
            let candidates = {
                let mut conn = self.pool.acquire().await?;
                db::candidates(&mut conn, &b, PAGE).await?
            };
            if candidates.is_empty() {
                let mut conn = self.pool.acquire().await?;
                db::finish(&mut conn, b.id, Utc::now()).await?;
                continue;
            }
            for c in candidates {
                let now = Utc::now();
                let mut tx = self.pool.begin().await?;
                let key = match &c.source {
                    db::Source::Subscription(s) => subscription_key(s),
                    db::Source::Payment(p) => crate::store::ingest::payment_key(p),
                };
                ingest::lock_keys(&mut tx, &[key]).await?;
                // Under the lock: still attached, and the purchase still has no grant.
                let (nonce, expires_at) = self.links.fresh(now);
                let Some(g) = db::give(&mut tx, &b, &c, (&nonce, expires_at), now).await? else {
                    continue;
                };
                emit(&mut tx, &self.links, &g, GrantEventType::Created, now).await?;
                if self.email
                    && crate::store::email::contact(&mut tx, &g.business_id, &g.customer_id)
                        .await?
                        .is_some()
                {
                    let job = crate::email::Job::join(&g.id, None);
                    crate::email::queue(&mut tx, &job, &g.business_id).await?;
                }
                history::record(
                    &mut tx,
                    &g.id,
                    now,
                    "backfilled",
                    serde_json::json!({"product_id": b.product_id}),
                )
                .await?;
                tx.commit().await?;
                given += 1;
                // Paced: each grant may queue a sync on the queue every business shares.
                tokio::time::sleep(Duration::from_secs_f64(1.0 / self.per_second)).await;
            }
        }
        Ok(given)
    }
}
