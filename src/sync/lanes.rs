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
//! A drainer per bot runs the parked jobs as the lane frees up, the businesses taking
//! turns (each business's oldest first; see [`crate::store::sync_parking::take`]) and
//! none holding more than [`PER_BUSINESS`] seats while another's jobs wait, so a deep
//! backlog of one business on the shared bot holds up another's job for a turn, not
//! for the whole backlog. It holds
//! the bot's lease (`discord_sync_draining`, renewed as it goes), so one process at a
//! time drains a bot; a new holder gives back what a previous one took and never
//! finished (it died). A job arriving for a grant whose row is being run marks it to run
//! once more: jobs name a grant, so one row per grant is all a backlog needs. Every
//! syncer process looks for bots whose parked jobs nobody drains every [`WATCH_EVERY`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Jobs of one bot run at once by one process. The broker's prefetch is twice this, so
/// a full lane leaves room for other bots' deliveries.
pub const PER_BOT: usize = 64;
/// Seats of a lane one business's parked jobs may hold while another business's wait:
/// half, so a business whose jobs wait long on Discord (a backfill into one server)
/// leaves the other half to the rest.
pub const PER_BUSINESS: usize = PER_BOT / 2;
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
    /// A seat now, unless the lane's jobs fill it or parked ones wait: then the job
    /// parks.
    pub fn seat_now(&self) -> Option<OwnedSemaphorePermit> {
        if self.backlog.load(Ordering::SeqCst) {
            return None;
        }
        self.seats.clone().try_acquire_owned().ok()
    }

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
}
