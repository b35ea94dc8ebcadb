//! Counts Discord's 401, 403 and (non-shared) 429 answers over a sliding 10 minutes.
//! Discord bans an IP that sends 10,000 of them in that time; guildgate stops calling
//! at a lower, configurable ceiling and resumes as old answers age out.
//!
//! With [`SharedLimits`] the count is the one every process keeps in PostgreSQL
//! (Discord counts per address, and replicas behind one address add up); the local
//! count stays as the floor, so a database that cannot be read never lowers it.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::shared::SharedLimits;

/// The window Discord counts invalid requests over.
pub const WINDOW: Duration = Duration::from_secs(600);

/// Shared by every Discord call of a client (a bot's side or syncer client in one
/// process). Cheap to clone; [`InvalidRequests::for_business`] makes a copy that also
/// counts, and stops at, one business's answers.
#[derive(Clone, Debug)]
pub struct InvalidRequests {
    ceiling: usize,
    /// What one business's calls may collect of it.
    business_ceiling: usize,
    /// The business this copy calls for.
    business: Option<Arc<str>>,
    seen: Arc<Mutex<Seen>>,
    shared: Option<SharedLimits>,
}

#[derive(Debug, Default)]
struct Seen {
    all: VecDeque<Instant>,
    by_business: HashMap<Arc<str>, VecDeque<Instant>>,
}

impl InvalidRequests {
    pub fn new(ceiling: u32, business_ceiling: u32) -> Self {
        let ceiling = ceiling.max(1) as usize;
        Self {
            ceiling,
            business_ceiling: (business_ceiling.max(1) as usize).min(ceiling),
            business: None,
            seen: Arc::default(),
            shared: None,
        }
    }

    /// The same ceiling over the count every process shares.
    pub fn shared(mut self, shared: SharedLimits) -> Self {
        self.shared = Some(shared);
        self
    }

    /// The same counter for calls made for `business`: its answers count in the whole
    /// and in the business's own count, and its calls stop when either is full.
    pub fn for_business(&self, business: &str) -> Self {
        Self {
            business: Some(business.into()),
            ..self.clone()
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

    /// Records one invalid answer; returns the whole count in the window.
    pub async fn record(&self) -> usize {
        let local = self.record_local();
        match &self.shared {
            None => local,
            Some(s) => match s.record_invalid(self.business.as_ref()).await {
                Ok(n) => local.max(usize::try_from(n).unwrap_or(usize::MAX)),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot count an invalid Discord answer in the database; counting it locally");
                    local
                }
            },
        }
    }

    /// `Err(wait)` while the ceiling, or this copy's business's, is reached: how long
    /// until the oldest answer ages out of the window.
    pub async fn check(&self) -> Result<(), Duration> {
        self.check_local()?;
        let Some(s) = &self.shared else {
            return Ok(());
        };
        let all = match s.invalid_count().await {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the shared invalid-request count; using this process's");
                return Ok(());
            }
        };
        if all >= self.ceiling as i64 {
            return Err(s
                .until_oldest_ages_out()
                .await
                .unwrap_or(Duration::from_secs(10)));
        }
        // A business's answers are part of the whole: while the whole is under the
        // business's ceiling, no business can be at it, and nothing more is read.
        let Some(business) = &self.business else {
            return Ok(());
        };
        if all < self.business_ceiling as i64 {
            return Ok(());
        }
        match s.invalid_count_of(business).await {
            Ok(n) if n < self.business_ceiling as i64 => Ok(()),
            Ok(n) => {
                tracing::warn!(business_id = %business, answers = n, "this business's Discord calls collected their share of invalid answers; its calls wait");
                Err(s
                    .until_oldest_of_ages_out(business)
                    .await
                    .unwrap_or(Duration::from_secs(10)))
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read a business's shared invalid-request count; using this process's");
                Ok(())
            }
        }
    }

    /// Invalid answers in the window now, of every business.
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
        Self::prune(&mut seen.all, now);
        seen.all.push_back(now);
        if let Some(b) = &self.business {
            let mine = seen.by_business.entry(b.clone()).or_default();
            Self::prune(mine, now);
            mine.push_back(now);
        }
        seen.all.len()
    }

    fn check_local(&self) -> Result<(), Duration> {
        let now = Instant::now();
        let mut seen = self.seen.lock().expect("invalid-request log");
        let Seen { all, by_business } = &mut *seen;
        Self::prune(all, now);
        let wait = |log: &VecDeque<Instant>| {
            let oldest = *log.front().expect("non-empty at a ceiling");
            WINDOW.saturating_sub(now.duration_since(oldest))
        };
        if all.len() >= self.ceiling {
            return Err(wait(all));
        }
        // Forget the businesses whose answers all aged out.
        by_business.retain(|_, log| {
            Self::prune(log, now);
            !log.is_empty()
        });
        match self.business.as_ref().and_then(|b| by_business.get(b)) {
            Some(mine) if mine.len() >= self.business_ceiling => Err(wait(mine)),
            _ => Ok(()),
        }
    }

    fn count_local(&self) -> usize {
        let mut seen = self.seen.lock().expect("invalid-request log");
        Self::prune(&mut seen.all, Instant::now());
        seen.all.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn stops_at_the_ceiling_and_resumes_as_answers_age_out() {
        let c = InvalidRequests::new(3, 3);
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

    #[tokio::test(start_paused = true)]
    async fn one_business_stops_at_its_share_and_the_others_go_on() {
        let c = InvalidRequests::new(5, 2);
        let (a, b) = (c.for_business("bus_a"), c.for_business("bus_b"));
        a.record().await;
        tokio::time::advance(Duration::from_secs(100)).await;
        a.record().await;
        assert_eq!(a.check().await, Err(Duration::from_secs(500)));
        assert!(b.check().await.is_ok());
        assert!(c.check().await.is_ok());
        // Another business reaches its share too; then an answer of no business fills
        // the whole ceiling, which stops everyone.
        for _ in 0..2 {
            b.record().await;
        }
        assert!(b.check().await.is_err());
        c.record().await;
        assert_eq!(c.check().await, Err(Duration::from_secs(500)));
        // As the first business's answers age out, it goes again.
        tokio::time::advance(Duration::from_secs(500)).await;
        assert!(a.check().await.is_ok());
        assert_eq!(c.count().await, 4);
    }
}
