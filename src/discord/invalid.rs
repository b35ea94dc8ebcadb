//! Counts Discord's 401, 403 and (non-shared) 429 answers over a sliding 10 minutes.
//! Discord bans an IP that sends 10,000 of them in that time; guildgate stops calling
//! at a lower, configurable ceiling and resumes as old answers age out.
//!
//! With [`SharedLimits`] the count is the one every process keeps in PostgreSQL
//! (Discord counts per address, and replicas behind one address add up); the local
//! count stays as the floor, so a database that cannot be read never lowers it.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::shared::SharedLimits;

/// The window Discord counts invalid requests over.
pub const WINDOW: Duration = Duration::from_secs(600);

/// Shared by every Discord call of a process. Cheap to clone.
#[derive(Clone, Debug)]
pub struct InvalidRequests {
    ceiling: usize,
    seen: Arc<Mutex<VecDeque<Instant>>>,
    shared: Option<SharedLimits>,
}

impl InvalidRequests {
    pub fn new(ceiling: u32) -> Self {
        Self {
            ceiling: ceiling.max(1) as usize,
            seen: Arc::default(),
            shared: None,
        }
    }

    /// The same ceiling over the count every process shares.
    pub fn shared(mut self, shared: SharedLimits) -> Self {
        self.shared = Some(shared);
        self
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
    pub async fn record(&self) -> usize {
        let local = self.record_local();
        match &self.shared {
            None => local,
            Some(s) => match s.record_invalid().await {
                Ok(n) => local.max(usize::try_from(n).unwrap_or(usize::MAX)),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot count an invalid Discord answer in the database; counting it locally");
                    local
                }
            },
        }
    }

    /// `Err(wait)` while the ceiling is reached: how long until the oldest answer ages
    /// out of the window.
    pub async fn check(&self) -> Result<(), Duration> {
        self.check_local()?;
        let Some(s) = &self.shared else {
            return Ok(());
        };
        match s.invalid_count().await {
            Ok(n) if n < self.ceiling as i64 => Ok(()),
            Ok(_) => Err(s
                .until_oldest_ages_out()
                .await
                .unwrap_or(Duration::from_secs(10))),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the shared invalid-request count; using this process's");
                Ok(())
            }
        }
    }

    /// Invalid answers in the window now.
    pub async fn count(&self) -> usize {
        let local = self.count_local();
        match &self.shared {
            None => local,
            Some(s) => s.invalid_count().await.map_or(local, |n| {
                local.max(usize::try_from(n).unwrap_or(usize::MAX))
            }),
        }
    }

    fn record_local(&self) -> usize {
        let now = Instant::now();
        let mut seen = self.seen.lock().expect("invalid-request log");
        Self::prune(&mut seen, now);
        seen.push_back(now);
        seen.len()
    }

    fn check_local(&self) -> Result<(), Duration> {
        let now = Instant::now();
        let mut seen = self.seen.lock().expect("invalid-request log");
        Self::prune(&mut seen, now);
        if seen.len() < self.ceiling {
            return Ok(());
        }
        let oldest = *seen.front().expect("non-empty at the ceiling");
        Err(WINDOW.saturating_sub(now.duration_since(oldest)))
    }

    fn count_local(&self) -> usize {
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
        c.record().await;
        tokio::time::advance(Duration::from_secs(60)).await;
        c.record().await;
        assert!(c.check().await.is_ok());
        c.record().await;
        assert_eq!(c.check().await, Err(Duration::from_secs(540)));
        tokio::time::advance(Duration::from_secs(540)).await;
        assert!(c.check().await.is_ok());
        assert_eq!(c.count().await, 2);
    }
}
