//! Counts Discord's 401, 403 and (non-shared) 429 answers over a sliding 10 minutes.
//! Discord bans an IP that sends 10,000 of them in that time; guildgate stops calling
//! at a lower, configurable ceiling and resumes as old answers age out.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

/// The window Discord counts invalid requests over.
pub const WINDOW: Duration = Duration::from_secs(600);

/// Shared by every Discord call of a process. Cheap to clone.
#[derive(Clone, Debug)]
pub struct InvalidRequests {
    ceiling: usize,
    seen: Arc<Mutex<VecDeque<Instant>>>,
}

impl InvalidRequests {
    pub fn new(ceiling: u32) -> Self {
        Self {
            ceiling: ceiling.max(1) as usize,
            seen: Arc::default(),
        }
    }

    fn prune(seen: &mut VecDeque<Instant>, now: Instant) {
        while seen
            .front()
            .is_some_and(|t| now.duration_since(*t) >= WINDOW)
        {
            seen.pop_front();
        }
    }

    /// Records one invalid answer; returns the count in the window.
    pub fn record(&self) -> usize {
        let now = Instant::now();
        let mut seen = self.seen.lock().expect("invalid-request log");
        Self::prune(&mut seen, now);
        seen.push_back(now);
        seen.len()
    }

    /// `Err(wait)` while the ceiling is reached: how long until the oldest answer ages
    /// out of the window.
    pub fn check(&self) -> Result<(), Duration> {
        let now = Instant::now();
        let mut seen = self.seen.lock().expect("invalid-request log");
        Self::prune(&mut seen, now);
        if seen.len() < self.ceiling {
            return Ok(());
        }
        let oldest = *seen.front().expect("non-empty at the ceiling");
        Err(WINDOW.saturating_sub(now.duration_since(oldest)))
    }

    /// Invalid answers in the window now.
    pub fn count(&self) -> usize {
        let mut seen = self.seen.lock().expect("invalid-request log");
        Self::prune(&mut seen, Instant::now());
        seen.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn stops_at_the_ceiling_and_resumes_as_answers_age_out() {
        let c = InvalidRequests::new(3);
        c.record();
        tokio::time::advance(Duration::from_secs(60)).await;
        c.record();
        assert!(c.check().is_ok());
        c.record();
        assert_eq!(c.check(), Err(Duration::from_secs(540)));
        tokio::time::advance(Duration::from_secs(540)).await;
        assert!(c.check().is_ok());
        assert_eq!(c.count(), 2);
    }
}
