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

pub use worker::SyncWorker;
