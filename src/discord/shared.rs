//! The bot's limits shared by every process through PostgreSQL: the global request
//! budget, a global 429's pause, and the invalid-request count.
//!
//! Discord counts per bot (the global 50 requests/s) and per address (10,000 invalid
//! answers in 10 minutes earn a ban), never per process: replicas and CLI runs that each
//! kept their own budget would together exceed it. See `docs/architecture.md`
//! ("One bot, one budget") for the design: rings of slots, one per kind of caller,
//! taken in one round trip under the database's clock.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use tokio::sync::OnceCell;
use tokio::time::Instant;

use super::invalid::WINDOW;
use crate::store::budget::{self, Lease};

/// How long a read of the shared invalid-request count is reused. Invalid answers are
/// rare next to requests, and a check per request would double the database's work;
/// the ceiling sits far enough under Discord's ban to absorb a second of staleness.
const COUNT_TTL: Duration = Duration::from_secs(1);

/// The longest a taker sleeps before asking for a slot again (a global block's pause is
/// capped the same).
const MAX_WAIT: Duration = Duration::from_secs(3600);

/// The width of the buckets the invalid answers are counted in (the migration's).
const BUCKET: Duration = Duration::from_secs(10);

/// The shared limits of one bot. Cheap to clone.
#[derive(Clone, Debug)]
pub struct SharedLimits {
    pool: PgPool,
    /// The bot's application id: several bots may share one database.
    bot: Arc<str>,
    rings: Arc<[(&'static str, OnceCell<()>); 2]>,
    count: Arc<Mutex<Option<(Instant, i64)>>>,
    /// Each business's count, read as the whole count is (and only when the whole count
    /// could hold a business's ceiling).
    counts_of: Arc<Mutex<HashMap<Arc<str>, Read>>>,
}

/// A count read from the database, and when.
type Read = (Instant, i64);

/// A slot of the bot's shared budget, taken for one request and held until released
/// (or dropped), which says the request was answered (or will not be sent): the slot is
/// free again a window after that. A window counted from the answer, which comes after
/// the request reached Discord, keeps two requests of one slot apart at Discord by a
/// window however long each took to get there.
#[derive(Debug)]
pub struct SharedSlot {
    limits: SharedLimits,
    take: Take,
    /// The slot and the end of its lease; `None` once released.
    lease: Option<(i32, DateTime<Utc>)>,
}

/// What a slot was taken as: enough to take another like it.
#[derive(Clone, Copy, Debug)]
struct Take {
    budget: &'static str,
    kind: &'static str,
    size: u32,
    window: Duration,
    lease: Duration,
}

/// How long a slot dropped without being released (its caller was cancelled, perhaps
/// with the request on its way) stays taken before it is released.
pub const DROPPED_HOLD: Duration = Duration::from_secs(1);

impl SharedSlot {
    /// The limits the slot is of.
    pub fn limits(&self) -> &SharedLimits {
        &self.limits
    }

    /// Frees the slot a window from now. If the database cannot be told, the slot stays
    /// taken until its lease ends: fewer requests, never more.
    pub async fn release(mut self) {
        if let Some((slot, until)) = self.lease.take() {
            self.limits.release(self.take.kind, slot, until).await;
        }
    }

    /// Leases the slot again from now (its request waited out a global block, which may
    /// outlast a lease); if the lease ran out and another process took the slot since,
    /// takes a new one, waiting for it as long as it takes.
    pub async fn renew(&mut self) {
        let Some((slot, until)) = self.lease else {
            return;
        };
        let t = self.take;
        let renewed = budget::renew_slot(
            &self.limits.pool,
            &self.limits.bot,
            t.kind,
            slot,
            until,
            t.lease,
        )
        .await;
        match renewed {
            Ok(Some(until)) => self.lease = Some((slot, until)),
            // Taken by another, or not known: a new slot. The old lease is kept until the
            // new one is taken (a renewal cancelled meanwhile leaves the ticket a lease),
            // then let go: its release frees the slot only if it is still this lease's.
            Ok(None) | Err(_) => {
                let fresh = self
                    .limits
                    .take_waiting(t.budget, t.kind, t.size, t.window, t.lease)
                    .await;
                *self = fresh;
            }
        }
    }
}

impl Drop for SharedSlot {
    fn drop(&mut self) {
        // Dropped unreleased (its caller was cancelled, perhaps mid-request): released
        // a little later, off the caller's path. Outside a runtime the lease ends it.
        let Some((slot, until)) = self.lease.take() else {
            return;
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (limits, kind) = (self.limits.clone(), self.take.kind);
        rt.spawn(async move {
            tokio::time::sleep(DROPPED_HOLD).await;
            limits.release(kind, slot, until).await;
        });
    }
}

/// Kinds of callers, each with its own ring.
pub const SYNCER: &str = "syncer";
pub const SIDE: &str = "side";

impl SharedLimits {
    pub fn new(pool: PgPool, bot: &str) -> Self {
        Self {
            pool,
            bot: bot.into(),
            rings: Arc::new([(SYNCER, OnceCell::new()), (SIDE, OnceCell::new())]),
            count: Arc::default(),
            counts_of: Arc::default(),
        }
    }

    /// Takes one request slot of `kind`'s ring of `size` slots for a request that takes
    /// at most `lease`: `Ok(Ok(slot))` when taken (held until the slot is released or
    /// dropped, a window after which it is free again), `Ok(Err(wait))` when none is
    /// free for `wait`.
    pub async fn take(
        &self,
        kind: &'static str,
        size: u32,
        window: Duration,
        lease: Duration,
    ) -> Result<Result<SharedSlot, Duration>, sqlx::Error> {
        let mut contended = 0;
        loop {
            match budget::lease_slot(&self.pool, &self.bot, kind, window, lease).await? {
                Lease::Taken { slot, until } => {
                    return Ok(Ok(SharedSlot {
                        limits: self.clone(),
                        take: Take {
                            budget: "",
                            kind,
                            size,
                            window,
                            lease,
                        },
                        lease: Some((slot, until)),
                    }));
                }
                // Free slots, all being taken by others right then: there may be one
                // left for this taker.
                Lease::Wait(w) if w < 0.001 && contended < 100 => contended += 1,
                Lease::Wait(w) => {
                    return Ok(Err(
                        Duration::try_from_secs_f64(w).unwrap_or(Duration::from_secs(1))
                    ));
                }
                Lease::NoRing => self.prepare(kind, size).await?,
            }
        }
    }

    /// Takes a slot of `kind`'s ring for a request of `budget`, waiting for one as long
    /// as it takes. A database that cannot be asked holds the request (never sends it
    /// unaccounted): Discord's limit is not ours to guess. Each attempt runs as a task
    /// of its own, so a caller cancelled while the database answers leaves no slot
    /// taken until its lease ends: the slot taken then is released.
    pub async fn take_waiting(
        &self,
        budget: &'static str,
        kind: &'static str,
        size: u32,
        window: Duration,
        lease: Duration,
    ) -> SharedSlot {
        let mut failures = 0u32;
        loop {
            let limits = self.clone();
            // A take that panicked is a failure like the database's.
            let taken = tokio::spawn(async move { limits.take(kind, size, window, lease).await })
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r.map_err(|e| e.to_string()));
            match taken {
                Ok(Ok(mut slot)) => {
                    slot.take.budget = budget;
                    return slot;
                }
                Ok(Err(wait)) => tokio::time::sleep(wait.min(MAX_WAIT)).await,
                Err(e) => {
                    failures += 1;
                    let wait = Duration::from_millis(100 * u64::from(failures.min(20)));
                    tracing::warn!(error = %e, retry_in = ?wait, budget, "cannot take a slot of the shared Discord budget");
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    async fn release(&self, kind: &'static str, slot: i32, until: DateTime<Utc>) {
        if let Err(e) = budget::release_slot(&self.pool, &self.bot, kind, slot, until).await {
            tracing::warn!(error = %e, kind, "cannot free a slot of the shared Discord budget");
        }
    }

    /// Makes `kind`'s ring `size` slots long (once per process): slots are added, and
    /// slots beyond `size` (a lowered setting) are removed. Every process must be
    /// configured alike; the last to start decides.
    async fn prepare(&self, kind: &'static str, size: u32) -> Result<(), sqlx::Error> {
        let cell = &self
            .rings
            .iter()
            .find(|(k, _)| *k == kind)
            .expect("a known kind")
            .1;
        cell.get_or_try_init(|| budget::size_ring(&self.pool, &self.bot, kind, size))
            .await
            .map(|_| ())
    }

    /// A global 429: every process waits `d` (Discord's `retry_after`).
    pub async fn block_for(&self, d: Duration) -> Result<(), sqlx::Error> {
        budget::block_for(&self.pool, &self.bot, d).await
    }

    /// Counts one invalid answer (of a call made for `business`, if one); returns the
    /// count of the last 10 minutes.
    pub async fn record_invalid(&self, business: Option<&Arc<str>>) -> Result<i64, sqlx::Error> {
        budget::record_invalid(
            &self.pool,
            BUCKET,
            WINDOW + BUCKET * 2,
            business.map(|b| &**b),
        )
        .await?;
        if let Some(b) = business {
            // Read afresh at the business's next check.
            self.counts_of.lock().expect("count cache").remove(b);
        }
        let n = self.read_count().await?;
        Ok(n)
    }

    /// `business`'s invalid answers of the last 10 minutes, counted by every process,
    /// reused for a second as the whole count is.
    pub async fn invalid_count_of(&self, business: &Arc<str>) -> Result<i64, sqlx::Error> {
        if let Some((at, n)) = self.counts_of.lock().expect("count cache").get(business)
            && at.elapsed() < COUNT_TTL
        {
            return Ok(*n);
        }
        let n = budget::invalid_count_of(&self.pool, business, WINDOW + BUCKET).await?;
        let mut counts = self.counts_of.lock().expect("count cache");
        counts.retain(|_, (at, _)| at.elapsed() < COUNT_TTL);
        counts.insert(business.clone(), (Instant::now(), n));
        Ok(n)
    }

    /// How long until `business`'s oldest counted bucket leaves the window.
    pub async fn until_oldest_of_ages_out(&self, business: &str) -> Result<Duration, sqlx::Error> {
        let secs = budget::oldest_of_leaves_in(&self.pool, business, WINDOW + BUCKET).await?;
        Ok(to_wait(secs))
    }

    /// Invalid answers of the last 10 minutes, counted by every process (a bucket that
    /// reaches into the window counts whole: the count errs high, never low).
    pub async fn invalid_count(&self) -> Result<i64, sqlx::Error> {
        if let Some((at, n)) = *self.count.lock().expect("count cache")
            && at.elapsed() < COUNT_TTL
        {
            return Ok(n);
        }
        self.read_count().await
    }

    async fn read_count(&self) -> Result<i64, sqlx::Error> {
        let n = budget::invalid_count(&self.pool, WINDOW + BUCKET).await?;
        *self.count.lock().expect("count cache") = Some((Instant::now(), n));
        Ok(n)
    }

    /// How long until the oldest counted bucket leaves the window.
    pub async fn until_oldest_ages_out(&self) -> Result<Duration, sqlx::Error> {
        let secs = budget::oldest_leaves_in(&self.pool, WINDOW + BUCKET).await?;
        Ok(to_wait(secs))
    }
}

/// Seconds until a bucket leaves the window as a wait (a bucket's width when there is
/// none, or the answer makes no sense).
fn to_wait(secs: Option<f64>) -> Duration {
    secs.filter(|s| s.is_finite() && *s > 0.0)
        .and_then(|s| Duration::try_from_secs_f64(s).ok())
        .unwrap_or(BUCKET)
}
