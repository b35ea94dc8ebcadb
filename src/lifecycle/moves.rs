//! Moves: a save of an entitlement hands its grants to the syncer again — every live
//! grant that applied something when its server or role changed, and the grants that
//! failed for a configuration cause the save may have fixed. Each gets a Discord sync
//! job through the outbox, which every business shares.
//!
//! A save with no move under way queues the first [`PAGE`] grants (newest first) in its
//! own transaction, which is all of them for most entitlements, and records an
//! `entitlement_moves` row when more are left. Every process's [`Mover`] works through
//! those rows, a page at a time in a transaction of its own, at most
//! `grants.moves_per_second` grants per second per process, one page per business in
//! turn, so a merchant moving an entitlement of 100,000 members never puts their sync
//! jobs in front of every other merchant's deliveries at once.
//!
//! A save during a move queues nothing itself. One that moves the entitlement again
//! starts the row over from the newest grant: jobs queued for the configuration before
//! read the new one when the syncer takes them, so a grant may be queued twice (which
//! changes nothing) but none is skipped, and moving a role back and forth costs the
//! shared queue no more than one move. Any other save leaves the row where it is and
//! asks for one more pass over the failed grants once the move is done, since it may
//! have fixed the cause of those the move already passed.

use std::sync::Arc;
use std::time::Duration;

use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;

use crate::discord::HumanCode;
use crate::metrics::Metrics;
use crate::outbox::queue_syncs;
use crate::store::{entitlements, moves as db};

/// Failed grants whose cause a re-save may have fixed (the merchant's configuration, not
/// the customer's account).
pub const CONFIG_CAUSES: [HumanCode; 4] = [
    HumanCode::MissingPermissions,
    HumanCode::RoleHierarchy,
    HumanCode::UnknownGuild,
    HumanCode::UnknownRole,
];

/// Grants a save queues itself, and a mover's turn queues, at most.
pub const PAGE: usize = 1_000;

fn causes() -> Vec<&'static str> {
    CONFIG_CAUSES.iter().map(|c| c.as_str()).collect()
}

/// Hands `entitlement`'s grants to the syncer again after a save, in the save's
/// transaction (which holds the entitlement's row): the first page now when no move is
/// under way, the rest by the movers. `moved`: its server or role changed. Returns how
/// many grants the save queued itself.
pub async fn start(
    tx: &mut PgConnection,
    business_id: &str,
    entitlement_id: &str,
    moved: bool,
) -> Result<usize, sqlx::Error> {
    match db::lock(tx, entitlement_id, false).await? {
        None => {
            let page = queue_page(tx, entitlement_id, moved, db::START).await?;
            if let Some(last) = page.last().filter(|_| page.len() == PAGE) {
                db::insert(tx, (business_id, entitlement_id), moved, last).await?;
            }
            Ok(page.len())
        }
        Some(_) if moved => db::start_over(tx, entitlement_id, true).await.map(|()| 0),
        Some(_) => db::retry_failed_after(tx, entitlement_id).await.map(|()| 0),
    }
}

/// Queues a sync job for each of the (at most [`PAGE`]) grants after `after`; returns
/// them.
async fn queue_page(
    tx: &mut PgConnection,
    entitlement_id: &str,
    moved: bool,
    after: (&str, &str),
) -> Result<Vec<db::Cursor>, sqlx::Error> {
    let limit = i64::try_from(PAGE).expect("a small page");
    let page = entitlements::grants_to_resync(tx, entitlement_id, &causes(), moved, (after, limit))
        .await?;
    let ids: Vec<String> = page.iter().map(|c| c.grant_id.clone()).collect();
    queue_syncs(tx, &ids).await?;
    Ok(page)
}

/// Works through the moves that saves left, on every process.
pub struct Mover {
    pub pool: PgPool,
    /// `guildgate_entitlement_moves`, set at the start of each round.
    pub metrics: Arc<Metrics>,
    /// At most this many grants queued per second (`grants.moves_per_second`).
    pub per_second: f64,
}

impl Mover {
    /// Works through the open moves every `every`, until `stop`.
    pub async fn run_every(&self, every: Duration, stop: CancellationToken) {
        let round = stop.clone();
        super::drain_every("entitlement moves", every, stop, || self.pass(&round)).await
    }

    /// One page of each business's least recently advanced move; returns how many
    /// grants this process queued.
    pub async fn pass(&self, stop: &CancellationToken) -> Result<usize, sqlx::Error> {
        let turns = {
            let mut conn = self.pool.acquire().await?;
            let under_way = db::count(&mut conn).await?;
            self.metrics.entitlement_moves.set(under_way);
            db::turns(&mut conn).await?
        };
        let mut queued = 0;
        for entitlement in turns {
            if stop.is_cancelled() {
                break;
            }
            let n = match self.turn(&entitlement).await {
                Ok(n) => n,
                // One move failing holds up its business's turn, not the others'.
                Err(e) => {
                    tracing::warn!(error = %e, entitlement_id = %entitlement, "entitlement moves: a page failed; trying again next round");
                    continue;
                }
            };
            queued += n;
            // Paced: each job waits on the sync queue every business shares.
            // (A pace too small to express waits an hour.)
            let pause = Duration::try_from_secs_f64(n as f64 / self.per_second)
                .unwrap_or(Duration::MAX)
                .min(Duration::from_secs(3600));
            tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep(pause) => {}
            }
        }
        Ok(queued)
    }

    /// One page of `entitlement`'s move, in a transaction of its own.
    async fn turn(&self, entitlement: &str) -> Result<usize, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        // Another process's turn, or a save, holds it: skipped this round.
        let Some(m) = db::lock(&mut tx, entitlement, true).await? else {
            return Ok(0);
        };
        let page = queue_page(&mut tx, entitlement, m.moved, m.after()).await?;
        match page.last() {
            Some(last) if page.len() == PAGE => db::advance(&mut tx, entitlement, last).await?,
            // Done; or its pass over the failed grants, when a save asked for one.
            _ if m.retry_failed => db::start_over(&mut tx, entitlement, false).await?,
            _ => db::finish(&mut tx, entitlement).await?,
        }
        tx.commit().await?;
        Ok(page.len())
    }
}
