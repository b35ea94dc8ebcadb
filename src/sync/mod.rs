//! The Discord syncer: consumes `<prefix>.discord-sync` (single active consumer, so one
//! process owns the rate limit and another replica takes over if it dies) and makes
//! Discord match one grant per job.
//!
//! - [`worker`]: handle one job ([`worker::SyncWorker::handle`]) and the consume loop.
//! - [`store`]: the SQL of linked accounts and the syncer's grant updates.
//! - [`keys`]: re-encryption of stored tokens with the current key.
//! - here: the pure retry decision, `(attempt, wait, tiers) -> tier | exhausted`.

pub mod keys;
pub mod lanes;
pub mod stops;
pub mod store;
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

/// Where a job that failed for a transient reason goes next.
///
/// `attempt` is how many retries the job had; the next tier is the one at that index,
/// or a later one if Discord asked to wait longer than it (a wait longer than every tier
/// takes the last). `None` once every tier was used.
pub fn next_retry(attempt: u32, wait: Duration, delays: &[Duration]) -> Option<(u32, Duration)> {
    let from = attempt as usize;
    if from >= delays.len() {
        return None;
    }
    let idx = (from..delays.len())
        .find(|&j| delays[j] >= wait)
        .unwrap_or(delays.len() - 1);
    Some((idx as u32 + 1, delays[idx]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_tiers() {
        let s = Duration::from_secs;
        let tiers = [s(5), s(30), s(300)];
        let cases = [
            (0, s(0), Some((1, s(5)))),
            (1, s(0), Some((2, s(30)))),
            (2, s(0), Some((3, s(300)))),
            (3, s(0), None),
            (0, s(6), Some((2, s(30)))),
            (0, s(30), Some((2, s(30)))),
            (1, s(1000), Some((3, s(300)))),
            (0, s(1000), Some((3, s(300)))),
        ];
        for (attempt, wait, want) in cases {
            assert_eq!(
                next_retry(attempt, wait, &tiers),
                want,
                "{attempt} {wait:?}"
            );
        }
        assert_eq!(next_retry(0, s(1), &[]), None);
    }
}
