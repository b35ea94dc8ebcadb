//! Per-endpoint delivery rate limits: an endpoint's `rate_limit` caps how many requests
//! per second this process sends it. A GCRA limiter (`governor`) per endpoint lets one
//! request through every `1 / rate_limit` seconds, with no burst, so any second holds at
//! most `rate_limit` requests (one more if it begins and ends with one). Like the
//! in-flight cap ([`super::isolation`]) it is per process.
//!
//! A job whose endpoint has no turn free now waits for one in the process, in order of
//! arrival, but only if its turn comes within `max_wait` and fewer than `max_waiting`
//! jobs of the endpoint wait already: the bounds of waiting for a busy endpoint, since a
//! waiting job holds a worker. Any other job's message is held in the database
//! ([`super::holds`]) until a time booked for it. Booked times follow the waiting jobs'
//! turns one interval apart, so a backlog comes back from the hold releaser at about the
//! endpoint's rate and in the order it was held, instead of cycling through the broker
//! and losing its order every round.
//!
//! One owner: a mutex around a small map, held only for a lookup; the limiter's clock is
//! Tokio's, so the waits are tested on paused time.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};

/// Governor's clock on Tokio's time (the system's, unless a test paused it).
#[derive(Clone, Copy, Debug, Default)]
pub struct TokioClock;

impl Clock for TokioClock {
    type Instant = Instant;

    fn now(&self) -> Instant {
        tokio::time::Instant::now().into_std()
    }
}

type Limiter = RateLimiter<NotKeyed, InMemoryState, TokioClock, NoOpMiddleware<Instant>>;

/// How often endpoints no longer paced are forgotten.
const PRUNE_EVERY: Duration = Duration::from_secs(10);

/// What a job of a rate-limited endpoint does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pace {
    /// Its turn: send now.
    Go,
    /// Not soon enough: hold its message until then.
    HoldUntil(Instant),
}

struct Paced {
    per_second: NonZeroU32,
    limiter: Arc<Limiter>,
    /// Taken in order of arrival (Tokio's mutex is fair) by the jobs waiting for a turn.
    line: Arc<tokio::sync::Mutex<()>>,
    waiting: usize,
    /// The last time booked for a held message.
    booked_until: Option<Instant>,
    last_used: Instant,
}

impl Paced {
    fn new(per_second: NonZeroU32, now: Instant) -> Self {
        Self {
            per_second,
            limiter: Arc::new(limiter(per_second)),
            line: Arc::default(),
            waiting: 0,
            booked_until: None,
            last_used: now,
        }
    }

    /// Books a time to hold a message until: `spacing` (an interval at least) after the
    /// last one booked, and after `after` (the turns until then are left to jobs waiting
    /// in the process).
    fn book(&mut self, after: Instant, spacing: Duration) -> Instant {
        let at = self.booked_until.filter(|b| *b > after).unwrap_or(after)
            + self.interval().max(spacing);
        self.booked_until = Some(at);
        at
    }

    fn interval(&self) -> Duration {
        Duration::from_secs(1) / self.per_second.get()
    }

    /// Nothing worth remembering: nobody waits, no booked time is ahead, and the limiter
    /// is full again (a turn is at most a second long).
    fn forgettable(&self, now: Instant) -> bool {
        self.waiting == 0
            && self.booked_until.is_none_or(|b| b <= now)
            && now.saturating_duration_since(self.last_used) >= Duration::from_secs(1)
    }
}

fn limiter(per_second: NonZeroU32) -> Limiter {
    RateLimiter::direct_with_clock(
        Quota::per_second(per_second).allow_burst(NonZeroU32::MIN),
        TokioClock,
    )
}

#[derive(Default)]
struct State {
    endpoints: HashMap<String, Paced>,
    pruned_at: Option<Instant>,
}

/// The rate limits of every endpoint this process delivers to. Cheap to clone.
#[derive(Clone)]
pub struct Pacing {
    max_waiting: usize,
    state: Arc<Mutex<State>>,
}

impl std::fmt::Debug for Pacing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pacing")
            .field("max_waiting", &self.max_waiting)
            .finish_non_exhaustive()
    }
}

impl Pacing {
    /// At most `max_waiting` jobs per endpoint wait in the process for a turn.
    pub fn new(max_waiting: usize) -> Self {
        Self {
            max_waiting: max_waiting.max(1),
            state: Arc::default(),
        }
    }

    /// Takes a turn of `endpoint`, limited to `per_second` requests: at once, after a
    /// wait of at most about `max_wait`, or (the answer comes at once then) a time to
    /// hold the message until.
    pub async fn turn(&self, endpoint: &str, per_second: NonZeroU32, max_wait: Duration) -> Pace {
        let (limiter, line, _waiting) = {
            let now = TokioClock.now();
            let mut state = self.state.lock().expect("pacing lock");
            state.prune(now);
            let p = state.paced(endpoint, per_second, now);
            let interval = p.interval();
            // When this job's turn would come: the limiter says for the first in line;
            // behind others, each of them takes a turn first.
            let wait = if p.waiting == 0 {
                match p.limiter.check() {
                    Ok(()) => return Pace::Go,
                    Err(not_until) => not_until.wait_time_from(now),
                }
            } else {
                interval * u32::try_from(p.waiting + 1).unwrap_or(u32::MAX)
            };
            if wait > max_wait || p.waiting >= self.max_waiting {
                return Pace::HoldUntil(p.book(now + max_wait, Duration::ZERO));
            }
            p.waiting += 1;
            (
                p.limiter.clone(),
                p.line.clone(),
                Waiting {
                    endpoint: endpoint.to_string(),
                    pacing: self.clone(),
                },
            )
        };
        let _first_in_line = line.lock().await;
        loop {
            match limiter.check() {
                Ok(()) => {
                    // A turn taken now: the endpoint's limiter is not full again for an
                    // interval, so it must not be forgotten (and replaced by a full one)
                    // before then.
                    self.used(endpoint);
                    return Pace::Go;
                }
                Err(not_until) => {
                    tokio::time::sleep(not_until.wait_time_from(TokioClock.now())).await
                }
            }
        }
    }
}

impl Pacing {
    /// A time to hold a message of `endpoint` until, without taking or waiting for a
    /// turn: for a job that may not wait in the process, behind jobs that may (their
    /// turns within `horizon` are left to them). Booked `spacing` apart at least, so
    /// that such messages come back one at a time when the hold releaser's rounds are
    /// that far apart, and each finds the front of its line rather than being held
    /// again behind the others released with it.
    pub fn book(
        &self,
        endpoint: &str,
        per_second: NonZeroU32,
        horizon: Duration,
        spacing: Duration,
    ) -> Instant {
        let now = TokioClock.now();
        let mut state = self.state.lock().expect("pacing lock");
        state
            .paced(endpoint, per_second, now)
            .book(now + horizon, spacing)
    }

    /// `endpoint` took a turn now.
    fn used(&self, endpoint: &str) {
        let mut state = self.state.lock().expect("pacing lock");
        if let Some(p) = state.endpoints.get_mut(endpoint) {
            p.last_used = TokioClock.now();
        }
    }
}

impl State {
    /// `endpoint`'s pacing at `per_second`, used now. A changed limit applies from now;
    /// the jobs already waiting finish their turns on the old one.
    fn paced(&mut self, endpoint: &str, per_second: NonZeroU32, now: Instant) -> &mut Paced {
        let p = self
            .endpoints
            .entry(endpoint.to_string())
            .or_insert_with(|| Paced::new(per_second, now));
        if p.per_second != per_second {
            p.per_second = per_second;
            p.limiter = Arc::new(limiter(per_second));
            p.booked_until = None;
        }
        p.last_used = now;
        p
    }

    /// Forgets the endpoints no longer paced, now and then, so the map stays as small as
    /// the rate-limited traffic.
    fn prune(&mut self, now: Instant) {
        if self
            .pruned_at
            .is_some_and(|at| now.saturating_duration_since(at) < PRUNE_EVERY)
        {
            return;
        }
        self.pruned_at = Some(now);
        self.endpoints.retain(|_, p| !p.forgettable(now));
    }
}

/// A job's place in an endpoint's line, given up when dropped (also when the waiting
/// future is dropped).
struct Waiting {
    endpoint: String,
    pacing: Pacing,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        let mut state = self.pacing.state.lock().expect("pacing lock");
        if let Some(p) = state.endpoints.get_mut(&self.endpoint) {
            p.waiting = p.waiting.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX_WAIT: Duration = Duration::from_secs(1);

    fn per_second(n: u32) -> NonZeroU32 {
        NonZeroU32::new(n).unwrap()
    }

    /// A job that waited in line past the prune takes its turn, and the endpoint is not
    /// forgotten right after: the next job still waits an interval.
    #[tokio::test(start_paused = true)]
    async fn a_turn_taken_after_a_wait_keeps_the_endpoint_remembered() {
        let p = Pacing::new(8);
        let t = tokio::time::Instant::now();
        assert_eq!(p.turn("ep_a", per_second(1), MAX_WAIT).await, Pace::Go);
        tokio::time::sleep(Duration::from_millis(9_500)).await;
        assert_eq!(p.turn("ep_a", per_second(1), MAX_WAIT).await, Pace::Go);
        // Waits in line until 10.5 s, past the next prune (10 s after the first).
        assert_eq!(p.turn("ep_a", per_second(1), MAX_WAIT).await, Pace::Go);
        let waited = t.elapsed();
        assert_eq!(waited, Duration::from_millis(10_500));
        assert_eq!(p.turn("ep_a", per_second(1), MAX_WAIT).await, Pace::Go);
        assert_eq!(
            t.elapsed() - waited,
            Duration::from_secs(1),
            "one turn a second, also right after a prune"
        );
    }

    /// Times booked for jobs that may not wait come after the turns the waiting jobs
    /// may take, one interval apart, and after the holds booked before them.
    #[tokio::test(start_paused = true)]
    async fn booked_times_follow_the_waiting_jobs_turns_and_each_other() {
        let p = Pacing::new(8);
        let now = TokioClock.now();
        let first = p.book("ep_a", per_second(2), MAX_WAIT, Duration::ZERO);
        assert_eq!(first, now + MAX_WAIT + Duration::from_millis(500));
        let second = p.book("ep_a", per_second(2), MAX_WAIT, Duration::ZERO);
        assert_eq!(second, first + Duration::from_millis(500));
        // A job that would wait too long is held after them.
        assert_eq!(p.turn("ep_a", per_second(2), MAX_WAIT).await, Pace::Go);
        let third = second + Duration::from_millis(500);
        assert_eq!(
            p.turn("ep_a", per_second(2), Duration::ZERO).await,
            Pace::HoldUntil(third)
        );
        // Spaced wider than the interval when asked.
        let spaced = p.book("ep_a", per_second(2), MAX_WAIT, Duration::from_secs(1));
        assert_eq!(spaced, third + Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn turns_come_one_interval_apart() {
        let p = Pacing::new(8);
        let t = tokio::time::Instant::now();
        let mut at = Vec::new();
        for _ in 0..4 {
            assert_eq!(p.turn("ep_a", per_second(4), MAX_WAIT).await, Pace::Go);
            at.push(t.elapsed());
        }
        assert_eq!(
            at,
            [0, 250, 500, 750].map(Duration::from_millis),
            "one turn per 1/4 s, no burst"
        );
        // Another endpoint has turns of its own.
        assert_eq!(p.turn("ep_b", per_second(4), MAX_WAIT).await, Pace::Go);
        assert_eq!(t.elapsed(), Duration::from_millis(750));
    }

    #[tokio::test(start_paused = true)]
    async fn jobs_wait_in_line_then_are_held_at_booked_times() {
        let p = Pacing::new(8);
        let t = tokio::time::Instant::now();
        assert_eq!(p.turn("ep_a", per_second(2), MAX_WAIT).await, Pace::Go);
        // Two more turns come within a second: those jobs wait, in order.
        let waiters: Vec<_> = (0..2)
            .map(|_| {
                let p = p.clone();
                tokio::spawn(async move {
                    let pace = p.turn("ep_a", per_second(2), MAX_WAIT).await;
                    (pace, t.elapsed())
                })
            })
            .collect();
        tokio::task::yield_now().await;
        // The rest would wait longer: held, at times one interval apart after them.
        let now = t.into_std();
        for n in 0..3 {
            assert_eq!(
                p.turn("ep_a", per_second(2), MAX_WAIT).await,
                Pace::HoldUntil(now + MAX_WAIT + Duration::from_millis(500) * (n + 1))
            );
        }
        assert_eq!(t.elapsed(), Duration::ZERO, "holding takes no time");
        let mut done = Vec::new();
        for w in waiters {
            done.push(w.await.unwrap());
        }
        assert_eq!(
            done,
            [
                (Pace::Go, Duration::from_millis(500)),
                (Pace::Go, Duration::from_millis(1000))
            ]
        );
        assert_eq!(p.state.lock().unwrap().endpoints["ep_a"].waiting, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_is_bounded_in_jobs() {
        let p = Pacing::new(2);
        assert_eq!(p.turn("ep_a", per_second(100), MAX_WAIT).await, Pace::Go);
        let waiters: Vec<_> = (0..2)
            .map(|_| {
                let p = p.clone();
                tokio::spawn(async move { p.turn("ep_a", per_second(100), MAX_WAIT).await })
            })
            .collect();
        tokio::task::yield_now().await;
        // Its turn would come within the wait, but two jobs wait already.
        assert!(matches!(
            p.turn("ep_a", per_second(100), MAX_WAIT).await,
            Pace::HoldUntil(_)
        ));
        for w in waiters {
            assert_eq!(w.await.unwrap(), Pace::Go);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_changed_limit_applies_at_once_and_idle_endpoints_are_forgotten() {
        let p = Pacing::new(8);
        assert_eq!(p.turn("ep_a", per_second(1), MAX_WAIT).await, Pace::Go);
        assert_eq!(p.turn("ep_a", per_second(1), MAX_WAIT).await, Pace::Go);
        let t = tokio::time::Instant::now();
        assert_eq!(p.turn("ep_a", per_second(1000), MAX_WAIT).await, Pace::Go);
        assert_eq!(t.elapsed(), Duration::ZERO);
        tokio::time::advance(PRUNE_EVERY).await;
        assert_eq!(p.turn("ep_b", per_second(1), MAX_WAIT).await, Pace::Go);
        let state = p.state.lock().unwrap();
        assert!(!state.endpoints.contains_key("ep_a"));
        assert!(state.endpoints.contains_key("ep_b"));
    }
}
