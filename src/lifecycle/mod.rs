//! Grants that change without a payment event: a grace period that ends (the grant
//! timer) and a product that gains an entitlement after it was bought (backfill). Both
//! take ingest's advisory locks, so they and ingest never change the same purchase at
//! once, and write through the outbox like every other change.
//!
//! - [`timers`]: revokes grants whose grace period ran out.
//! - [`backfill`]: gives a newly attached entitlement to the product's earlier buyers.
//! - [`moves`]: hands the grants of an entitlement whose server or role changed to the
//!   syncer again, paced.

pub mod backfill;
pub mod moves;
pub mod timers;

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Runs `round` until it finds nothing to do (or fails), then again every `every`, until
/// `stop`: the loop of work that goes on at once while more is left (a backfill, a
/// move). `task` names it in the logs, with how much each round did.
async fn drain_every<F, Fut>(
    task: &'static str,
    every: Duration,
    stop: CancellationToken,
    mut round: F,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<usize, sqlx::Error>>,
{
    loop {
        loop {
            match round().await {
                // More may be left: go on at once, unless stopping.
                Ok(n) if n > 0 && !stop.is_cancelled() => {
                    tracing::info!(task, done = n, "{task}: a round done; going on");
                }
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(task, error = %e, "{task}: database error; trying again");
                    break;
                }
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
    }
}
