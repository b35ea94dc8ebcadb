//! The Discord syncer: consumes `<prefix>.discord-sync` (single active consumer, so one
//! process owns the rate limit and another replica takes over if it dies) and makes
//! Discord match one grant per job.
//!
//! - [`worker`]: handle one job ([`worker::SyncWorker::handle`]), its bot's lane, and the
//!   drainers of parked jobs; the queue worker runs the jobs ([`crate::queue::run_concurrent`]).
//! - [`keys`]: re-encryption of stored tokens with the current key.

pub mod keys;
pub mod lanes;
pub mod stops;
pub mod worker;

pub use worker::SyncWorker;
