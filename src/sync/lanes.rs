//! One lane per bot through the syncer, so a throttled bot holds up no other bot's jobs.
//!
//! The syncer's jobs mostly wait for their bot's budget. Left to the broker's prefetch,
//! the jobs of one bot with a deep backlog (a large backfill, a bot Discord slowed down)
//! would fill every unacked slot, and the jobs of every other bot would wait behind them
//! in the queue. So each bot may run [`PER_BOT`] jobs at once; a job of a bot whose lane
//! is full (or whose parked jobs wait) is *parked*: one row in `discord_sync_parked`,
//! written before the delivery is acked, and the delivery's slot is free for the next
//! job, whatever its bot.
//!
//! A drainer per bot runs the parked jobs as the lane frees up, oldest first. It holds
//! the bot's lease (`discord_sync_draining`, renewed as it goes), so one process at a
//! time drains a bot; a new holder gives back what a previous one took and never
//! finished (it died). A job arriving for a grant whose row is being run marks it to run
//! once more: jobs name a grant, so one row per grant is all a backlog needs. Every
//! syncer process looks for bots whose parked jobs nobody drains every [`WATCH_EVERY`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::types::PgInterval;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Jobs of one bot run at once by one process. The broker's prefetch is twice this, so
/// a full lane leaves room for other bots' deliveries.
pub const PER_BOT: usize = 64;
/// How long a drainer's lease lasts without renewal (its process died).
pub const LEASE: Duration = Duration::from_secs(30);
/// How often each syncer looks for parked jobs nobody drains.
pub const WATCH_EVERY: Duration = Duration::from_secs(5);

/// One bot's lane.
#[derive(Debug)]
pub struct Lane {
    pub bot: String,
    seats: Arc<Semaphore>,
    /// Parked jobs of the bot may wait: new ones park behind them.
    backlog: AtomicBool,
    /// A drainer of this process runs for the bot.
    draining: AtomicBool,
}

impl Lane {
    /// A seat, waiting for one.
    pub async fn seat(&self) -> OwnedSemaphorePermit {
        self.seats
            .clone()
            .acquire_owned()
            .await
            .expect("lanes are never closed")
    }

    /// Parked jobs wait (or just did): new jobs park behind them.
    pub fn set_backlog(&self, on: bool) {
        self.backlog.store(on, Ordering::SeqCst);
    }

    /// Claims the bot's drainer for the caller; `false` if one runs already.
    pub fn start_draining(&self) -> bool {
        !self.draining.swap(true, Ordering::SeqCst)
    }

    pub fn stop_draining(&self) {
        self.draining.store(false, Ordering::SeqCst);
    }
}

/// The lanes of one process. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Lanes {
    lanes: Arc<Mutex<HashMap<String, Arc<Lane>>>>,
    /// This process, as the holder of drainers' leases and of the rows it runs.
    pub holder: Arc<str>,
}

impl Default for Lanes {
    fn default() -> Self {
        Self {
            lanes: Arc::default(),
            holder: crate::domain::ids::mint("syncer").into(),
        }
    }
}

impl Lanes {
    /// The lane of `bot`.
    pub fn lane(&self, bot: &str) -> Arc<Lane> {
        let mut lanes = self.lanes.lock().expect("lanes lock");
        lanes
            .entry(bot.to_string())
            .or_insert_with(|| {
                Arc::new(Lane {
                    bot: bot.to_string(),
                    seats: Arc::new(Semaphore::new(PER_BOT)),
                    backlog: AtomicBool::new(false),
                    draining: AtomicBool::new(false),
                })
            })
            .clone()
    }

    /// A seat in `lane` now, unless its jobs fill it or parked ones wait: then the job
    /// parks.
    pub fn seat_now(lane: &Lane) -> Option<OwnedSemaphorePermit> {
        if lane.backlog.load(Ordering::SeqCst) {
            return None;
        }
        lane.seats.clone().try_acquire_owned().ok()
    }
}

fn interval(d: Duration) -> PgInterval {
    PgInterval {
        months: 0,
        days: 0,
        microseconds: i64::try_from(d.as_micros()).unwrap_or(i64::MAX),
    }
}

/// Parks a job of `grant_id` for `bot`. A grant parked already keeps its row (its
/// lowest attempt); one being run is marked to run once more.
pub async fn park(
    pool: &PgPool,
    grant_id: &str,
    bot: &str,
    attempt: u32,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO discord_sync_parked (grant_id, bot, attempt) VALUES ($1, $2, $3)
         ON CONFLICT (grant_id) DO UPDATE SET
             again = discord_sync_parked.again OR discord_sync_parked.taken_by IS NOT NULL,
             attempt = least(discord_sync_parked.attempt, excluded.attempt)",
    )
    .bind(grant_id)
    .bind(bot)
    .bind(i32::try_from(attempt).unwrap_or(i32::MAX))
    .execute(pool)
    .await?;
    Ok(())
}

/// Takes or renews `bot`'s drainer lease for `holder`; `false` while another process
/// holds it. A `fresh` taker gives back the rows other holders took and never finished.
pub async fn lease(
    pool: &PgPool,
    bot: &str,
    holder: &str,
    fresh: bool,
) -> Result<bool, sqlx::Error> {
    let held: Option<String> = sqlx::query_scalar(
        "INSERT INTO discord_sync_draining (bot, holder, lease_until)
         VALUES ($1, $2, clock_timestamp() + $3)
         ON CONFLICT (bot) DO UPDATE SET holder = excluded.holder, lease_until = excluded.lease_until
         WHERE discord_sync_draining.lease_until < clock_timestamp()
            OR discord_sync_draining.holder = excluded.holder
         RETURNING bot",
    )
    .bind(bot)
    .bind(holder)
    .bind(interval(LEASE))
    .fetch_optional(pool)
    .await?;
    if held.is_some() && fresh {
        let given = sqlx::query(
            "UPDATE discord_sync_parked SET taken_by = NULL
             WHERE bot = $1 AND taken_by IS NOT NULL AND taken_by <> $2",
        )
        .bind(bot)
        .bind(holder)
        .execute(pool)
        .await?;
        if given.rows_affected() > 0 {
            tracing::info!(
                bot,
                jobs = given.rows_affected(),
                "took over parked sync jobs a stopped process had taken"
            );
        }
    }
    Ok(held.is_some())
}

/// Ends `holder`'s lease of `bot`.
pub async fn release(pool: &PgPool, bot: &str, holder: &str) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM discord_sync_draining WHERE bot = $1 AND holder = $2")
        .bind(bot)
        .bind(holder)
        .execute(pool)
        .await?;
    Ok(())
}

/// Takes `bot`'s oldest waiting parked job for `holder`: (grant id, attempt).
pub async fn take(
    pool: &PgPool,
    bot: &str,
    holder: &str,
) -> Result<Option<(String, u32)>, sqlx::Error> {
    let row: Option<(String, i32)> = sqlx::query_as(
        "UPDATE discord_sync_parked SET taken_by = $2
         WHERE grant_id = (
             SELECT grant_id FROM discord_sync_parked
             WHERE bot = $1 AND taken_by IS NULL
             ORDER BY parked_at LIMIT 1 FOR UPDATE SKIP LOCKED)
         RETURNING grant_id, attempt",
    )
    .bind(bot)
    .bind(holder)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|(g, a)| (g, u32::try_from(a).unwrap_or(0))))
}

/// Parked jobs of `bot`, waiting or being run.
pub async fn parked(pool: &PgPool, bot: &str) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT count(*) FROM discord_sync_parked WHERE bot = $1")
        .bind(bot)
        .fetch_one(pool)
        .await
}

/// A parked job `holder` ran is done: its row goes, unless a job for the grant came
/// meanwhile; then it waits again, at the back.
pub async fn finish(pool: &PgPool, grant_id: &str, holder: &str) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query(
        "DELETE FROM discord_sync_parked WHERE grant_id = $1 AND taken_by = $2 AND NOT again",
    )
    .bind(grant_id)
    .bind(holder)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "UPDATE discord_sync_parked SET taken_by = NULL, again = false, parked_at = clock_timestamp()
         WHERE grant_id = $1 AND taken_by = $2",
    )
    .bind(grant_id)
    .bind(holder)
    .execute(&mut *tx)
    .await?;
    tx.commit().await
}

/// Gives a taken job back to wait again (its outcome could not be published).
pub async fn give_back(pool: &PgPool, grant_id: &str, holder: &str) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE discord_sync_parked SET taken_by = NULL WHERE grant_id = $1 AND taken_by = $2",
    )
    .bind(grant_id)
    .bind(holder)
    .execute(pool)
    .await?;
    Ok(())
}

/// Bots with parked jobs and no live drainer.
pub async fn undrained(pool: &PgPool) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT DISTINCT p.bot FROM discord_sync_parked p
         WHERE NOT EXISTS (
             SELECT 1 FROM discord_sync_draining d
             WHERE d.bot = p.bot AND d.lease_until > clock_timestamp())",
    )
    .fetch_all(pool)
    .await
}
