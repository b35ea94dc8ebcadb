//! The Discord syncer: consumes `<prefix>.discord-sync` (single active consumer, so one
//! process owns the rate limit and another replica takes over if it dies) and makes
//! Discord match one grant per job.
//!
//! - [`worker`]: handle one job ([`worker::SyncWorker::handle`]) and the consume loop.
//! - [`keys`]: re-encryption of stored tokens with the current key.

pub mod keys;
pub mod lanes;
pub mod stops;
pub mod worker;

use std::time::Duration;

pub use worker::SyncWorker;

/// What the loop does with a job once it was handled. Only the loop acks.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// Done (the label is the metrics outcome).
    Ack(&'static str),
    /// Republish to the delay tier `delay` with attempt header `attempt`, then ack.
    Retry {
        attempt: u32,
        delay: Duration,
        reason: String,
    },
    /// Park in `<prefix>.discord-sync.dead`, then ack.
    DeadLetter { code: &'static str, reason: String },
}
