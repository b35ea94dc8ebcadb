//! Discord's rate limits, obeyed ahead of time rather than discovered through 429s.
//!
//! A [`Budget`] is a cloneable handle with two parts:
//!
//! - **Per-route buckets**: `twilight-http-ratelimiting`'s actor. It learns each
//!   bucket from the `X-RateLimit-*` headers of the answers, queues requests per
//!   bucket and major parameter (the guild), and holds a queue while its bucket is
//!   exhausted. Its reset time is computed when the answer arrives, so it is never
//!   earlier than Discord's.
//! - **Global limit**: our own [`GlobalGate`]: never more than `limit` requests in any
//!   `period`, a slot being free again a `period` after its request's answer. twilight's built-in global limit is
//!   switched off (`u16::MAX`) because it counts fixed one-second windows from its own
//!   first permit, while Discord's window starts when the first request *arrives*; a
//!   burst at the boundary then lands in Discord's previous window and earns a global
//!   429. Slots counted from the answers have no boundary to fall across.
//!
//! The syncer owns one budget with the bot's global limit minus the side budget; calls
//! made elsewhere (validation, role listing, the OAuth code exchange) share a small side
//! budget (`discord.side_requests_per_s`), so that together they stay under the bot's
//! global limit. Discord counts per bot, not per process: with [`SharedLimits`] every
//! request made with the bot token also takes a slot of the bot's budget shared by all
//! processes in PostgreSQL (see [`crate::discord::shared`]), and a global 429 pauses all
//! of them. Requests made with a customer's own token are not the bot's and take only
//! the process's slots. This module never sees an HTTP client: the caller completes
//! each [`Ticket`] with what it [`Observed`] in the answer.
//!
//! The side budget serves requests of customers and merchants, who can send more than it
//! can carry: its line is bounded in time (`discord.side_queue_timeout`), and a caller
//! that gets no slot within it is told [`QueueTimeout`] instead of waiting on. The
//! syncer's budget waits as long as it takes: its work is queued in RabbitMQ already.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use twilight_http_ratelimiting::{Endpoint, Method, Permit, RateLimitHeaders, RateLimiter};

use super::shared::{self, DROPPED_HOLD, SharedLimits, SharedSlot};

/// The longest a global 429 pauses every call.
const MAX_GLOBAL_BLOCK: Duration = Duration::from_secs(3600);

/// Discord's global limit per bot token, per second.
pub const DISCORD_GLOBAL_PER_S: u32 = 50;

/// At most `limit` requests in any `period`, first come first served, and nothing at
/// all while blocked by a global 429. A slot is held from its acquisition until its
/// request is answered ([`GateSlot::answered`]), and is free again a `period` after
/// that: the answer comes after the request reached Discord, so two requests of one
/// slot arrive there more than a `period` apart however long each took to get there
/// (a busy machine can hold a request between its slot and the wire for longer than
/// any fixed margin would cover).
#[derive(Clone, Debug)]
pub struct GlobalGate {
    limit: usize,
    period: Duration,
    state: Arc<Mutex<GateState>>,
    /// Held by the one waiter at the head of the line (tokio's mutex is fair, FIFO).
    turnstile: Arc<tokio::sync::Mutex<()>>,
    /// An answer came while every slot was in flight.
    answered: Arc<Notify>,
}

#[derive(Debug, Default)]
struct GateState {
    /// When the requests of the last `period` were answered, oldest first.
    answers: VecDeque<Instant>,
    in_flight: usize,
    blocked_until: Option<Instant>,
}

/// One slot of a [`GlobalGate`], held while its request is in flight.
#[derive(Debug)]
pub struct GateSlot {
    gate: GlobalGate,
    answered: bool,
}

impl GateSlot {
    /// The request was answered (or will not be sent): the slot is free a period from
    /// now.
    pub fn answered(mut self) {
        self.answered = true;
    }
}

impl Drop for GateSlot {
    fn drop(&mut self) {
        // Dropped without an answer (its caller was cancelled, perhaps with the request
        // on its way): held a little longer, as the bot's shared slot is.
        if !self.answered
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            let gate = self.gate.clone();
            rt.spawn(async move {
                tokio::time::sleep(DROPPED_HOLD).await;
                gate.free_one();
            });
            return;
        }
        self.gate.free_one();
    }
}

impl GlobalGate {
    /// `limit` per `period` (a limit of 0 is treated as 1: a budget never closes).
    pub fn new(limit: u32, period: Duration) -> Self {
        Self {
            limit: limit.max(1) as usize,
            period,
            state: Arc::default(),
            turnstile: Arc::default(),
            answered: Arc::default(),
        }
    }

    /// One slot in flight was answered now.
    fn free_one(&self) {
        let mut st = self.state.lock().expect("gate state");
        st.in_flight -= 1;
        st.answers.push_back(Instant::now());
        drop(st);
        self.answered.notify_one();
    }

    /// Waits for a slot and takes it until the returned [`GateSlot`] is answered (or
    /// dropped).
    pub async fn acquire(&self) -> GateSlot {
        let _head = self.turnstile.lock().await;
        loop {
            let wait = {
                let mut st = self.state.lock().expect("gate state");
                let now = Instant::now();
                match st.blocked_until {
                    Some(b) if now < b => Some(Some(b)),
                    _ => {
                        while st
                            .answers
                            .front()
                            .is_some_and(|t| now.duration_since(*t) >= self.period)
                        {
                            st.answers.pop_front();
                        }
                        if st.answers.len() + st.in_flight < self.limit {
                            st.in_flight += 1;
                            None
                        } else {
                            // The oldest answer frees the first slot; an answer still to
                            // come frees one no sooner than a period after it.
                            Some(st.answers.front().map(|t| *t + self.period))
                        }
                    }
                }
            };
            match wait {
                None => {
                    return GateSlot {
                        gate: self.clone(),
                        answered: false,
                    };
                }
                Some(Some(t)) => tokio::time::sleep_until(t).await,
                // Every slot in flight. `notify_one` keeps a wake-up given before this
                // waits, so an answer between the look and the wait is not missed.
                Some(None) => self.answered.notified().await,
            }
        }
    }

    /// Waits out a global block that began after this caller's slot was taken (a 429
    /// answered while it waited on the shared budget): a slot taken is not a licence
    /// to send into a block Discord just announced.
    /// Whether there was a block to wait out.
    pub async fn wait_unblocked(&self) -> bool {
        let mut waited = false;
        loop {
            let until = {
                let st = self.state.lock().expect("gate state");
                st.blocked_until.filter(|b| *b > Instant::now())
            };
            match until {
                Some(b) => {
                    waited = true;
                    tokio::time::sleep_until(b).await
                }
                None => return waited,
            }
        }
    }

    /// Stops every acquisition for `d` (a global 429's `retry_after`).
    pub fn block_for(&self, d: Duration) {
        // A `retry_after` is Discord's word, but not an unbounded one: an absurd value
        // (a bug or a hostile proxy) would overflow the clock, and an hour-long pause is
        // already an incident for a human.
        let until = Instant::now() + d.min(MAX_GLOBAL_BLOCK);
        let mut st = self.state.lock().expect("gate state");
        st.blocked_until = Some(st.blocked_until.map_or(until, |b| b.max(until)));
    }
}

/// Rate-limit facts read from one answer.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Observed {
    pub status: u16,
    pub bucket: Option<String>,
    pub limit: Option<u32>,
    pub remaining: Option<u32>,
    pub reset_after: Option<Duration>,
    /// From a 429: the body's float `retry_after` (or the header's whole seconds).
    pub retry_after: Option<Duration>,
    pub global: bool,
    /// `X-RateLimit-Scope`: `user`, `global` or `shared`.
    pub scope: Option<String>,
}

impl Observed {
    /// Reads the headers through `header(name)` (lowercase names).
    pub fn parse(status: u16, header: impl Fn(&str) -> Option<String>) -> Self {
        let secs = |v: Option<String>| {
            v.and_then(|s| s.trim().parse::<f64>().ok())
                .filter(|f| f.is_finite() && *f >= 0.0)
                // `try_`: a value too large for a Duration (e.g. "1e300") is ignored, not a panic.
                .and_then(|f| Duration::try_from_secs_f64(f).ok())
        };
        Self {
            status,
            bucket: header(RateLimitHeaders::BUCKET),
            limit: header(RateLimitHeaders::LIMIT).and_then(|v| v.trim().parse().ok()),
            remaining: header(RateLimitHeaders::REMAINING).and_then(|v| v.trim().parse().ok()),
            reset_after: secs(header(RateLimitHeaders::RESET_AFTER)),
            retry_after: if status == 429 {
                secs(header("retry-after"))
            } else {
                None
            },
            global: header("x-ratelimit-global").is_some_and(|v| v.eq_ignore_ascii_case("true")),
            scope: header(RateLimitHeaders::SCOPE),
        }
    }

    /// A 429 body's `retry_after` is more precise than the header's whole seconds.
    pub fn with_body_retry_after(mut self, retry_after: Option<f64>, global: Option<bool>) -> Self {
        if let Some(r) = retry_after
            .filter(|f| f.is_finite() && *f >= 0.0)
            .and_then(|f| Duration::try_from_secs_f64(f).ok())
        {
            self.retry_after = Some(r);
        }
        if global == Some(true) {
            self.global = true;
        }
        self
    }

    /// A 429 for the whole bot rather than one bucket.
    pub fn is_global_limit(&self) -> bool {
        self.status == 429 && (self.global || self.scope.as_deref() == Some("global"))
    }

    /// A 429 Discord counts against us (shared-scope ones are not).
    pub fn counts_as_invalid(&self) -> bool {
        match self.status {
            401 | 403 => true,
            429 => self.scope.as_deref() != Some("shared"),
            _ => false,
        }
    }
}

/// HTTP method of a rate-limited call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verb {
    Get,
    Put,
    Post,
    Delete,
}

impl Verb {
    fn twilight(self) -> Method {
        match self {
            Verb::Get => Method::Get,
            Verb::Put => Method::Put,
            Verb::Post => Method::Post,
            Verb::Delete => Method::Delete,
        }
    }
}

/// One owner of a set of buckets and a global gate. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Budget {
    name: &'static str,
    buckets: RateLimiter,
    gate: GlobalGate,
    /// The longest [`Budget::acquire`] waits; `None`: as long as it takes.
    max_wait: Option<Duration>,
    /// The bot's budget shared by every process, this budget's ring in it, and how long
    /// a slot of it is leased (longer than any request takes).
    shared: Option<(SharedLimits, &'static str, Duration)>,
    limit: u32,
}

/// No slot of a bounded budget came free within its `max_wait`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("no slot of the {budget} budget came free within {waited:?}")]
pub struct QueueTimeout {
    pub budget: &'static str,
    pub waited: Duration,
}

/// Permission to send one request; complete it with what the answer said, or drop it
/// if no answer came (the bucket queue then moves on). Its global slots (this process's
/// and the bot's shared one) are held until then.
#[must_use = "complete the ticket with the answer's headers"]
#[derive(Debug)]
pub struct Ticket {
    permit: Permit,
    slot: GateSlot,
    shared: Option<SharedSlot>,
}

impl Budget {
    /// A budget allowing `global_per_s` requests per second over all buckets. Spawns
    /// the bucket actor, so call it inside a tokio runtime.
    pub fn new(name: &'static str, global_per_s: u32) -> Self {
        Self {
            name,
            // The global limit is ours (see the module doc); twilight's is disabled.
            buckets: RateLimiter::new(u16::MAX),
            gate: GlobalGate::new(global_per_s, Duration::from_secs(1)),
            max_wait: None,
            shared: None,
            limit: global_per_s,
        }
    }

    /// The same budget, whose requests made with the bot token also take a slot of the
    /// bot's budget shared by every process (its ring is named after this budget).
    /// A slot of it is leased for `lease`, longer than any request may take: a process
    /// that dies with requests in flight leaves their slots taken that long.
    pub fn shared(mut self, limits: SharedLimits, lease: Duration) -> Self {
        let kind = if self.name == "syncer" {
            shared::SYNCER
        } else {
            shared::SIDE
        };
        self.shared = Some((limits, kind, lease));
        self
    }

    /// The same budget, whose callers wait at most `max_wait` for a slot.
    pub fn with_max_wait(mut self, max_wait: Duration) -> Self {
        self.max_wait = Some(max_wait);
        self
    }

    /// The longest [`Budget::acquire`] waits; `None`: as long as it takes.
    pub fn max_wait(&self) -> Option<Duration> {
        self.max_wait
    }

    /// The syncer's budget: Discord's global limit minus what the side budget may use.
    pub fn syncer(side_requests_per_s: u32) -> Self {
        Self::new(
            "syncer",
            DISCORD_GLOBAL_PER_S.saturating_sub(side_requests_per_s),
        )
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Waits until `route` may be called: first its bucket, then a global slot, so a
    /// request queued behind an exhausted bucket does not hold a global slot meanwhile.
    ///
    /// `route` is the path with only the major parameter (the guild) kept and minor ids
    /// replaced by a placeholder (`guilds/1/members/:user`): twilight remembers buckets
    /// per route, and a route per user id would never learn that it shares a bucket.
    ///
    /// Adding and removing a member's role share one bucket at Discord. twilight learns
    /// shared buckets from answers, per method and path, so until both had an answer
    /// a 429 on one would not hold back the other: both are queued as one endpoint.
    ///
    /// A bounded budget gives up after its `max_wait`; the place in the line is left
    /// (twilight skips a waiter that went away), and no slot is taken.
    ///
    /// `bot`: the request is made with the bot token, so it also takes a slot of the
    /// shared budget, if there is one.
    pub async fn acquire(
        &self,
        verb: Verb,
        route: &str,
        bot: bool,
    ) -> Result<Ticket, QueueTimeout> {
        self.acquire_after(verb, route, bot, Duration::ZERO).await
    }

    /// [`Budget::acquire`] for a caller that has waited `spent` already on this call's
    /// way here (for a seat of its business): a bounded budget waits only what is left
    /// of its `max_wait`, so the call is told busy after `max_wait` in all.
    pub async fn acquire_after(
        &self,
        verb: Verb,
        route: &str,
        bot: bool,
        spent: Duration,
    ) -> Result<Ticket, QueueTimeout> {
        match self.max_wait {
            None => Ok(self.acquire_unbounded(verb, route, bot).await),
            Some(waited) => tokio::time::timeout(
                waited.saturating_sub(spent),
                self.acquire_unbounded(verb, route, bot),
            )
            .await
            .map_err(|_| QueueTimeout {
                budget: self.name,
                waited,
            }),
        }
    }

    async fn acquire_unbounded(&self, verb: Verb, route: &str, bot: bool) -> Ticket {
        let method = match verb {
            Verb::Delete if route.ends_with("/roles/:role") => Verb::Put.twilight(),
            _ => verb.twilight(),
        };
        let permit = self
            .buckets
            .acquire(Endpoint {
                method,
                path: route.to_string(),
            })
            .await;
        let slot = self.gate.acquire().await;
        let shared = match &self.shared {
            Some((limits, kind, lease)) if bot => {
                // A block is waited out before the shared slot's lease begins, not
                // during it; one announced after is seen by the ticket's own look.
                self.gate.wait_unblocked().await;
                Some(
                    limits
                        .take_waiting(self.name, kind, self.limit, Duration::from_secs(1), *lease)
                        .await,
                )
            }
            _ => None,
        };
        Ticket {
            permit,
            slot,
            shared,
        }
    }
}

impl Ticket {
    /// Waits out a global block announced since the slot was taken: a request built
    /// while another one's global 429 arrived is not sent into it.
    ///
    /// A shared slot whose lease may have run out meanwhile (a block can outlast it) is
    /// renewed, or, taken by another since, replaced by a new one.
    pub async fn wait_unblocked(&mut self) {
        if self.slot.gate.wait_unblocked().await
            && let Some(shared) = &mut self.shared
        {
            shared.renew().await;
        }
    }

    /// Feeds the answer back: bucket headers update the bucket; a 429 exhausts the
    /// bucket (or, if global, the gate) for its `retry_after`. This process's global
    /// slot is free a period from now; the bot's shared slot once the returned
    /// [`Released`] is awaited.
    pub fn complete(self, o: &Observed) -> Released {
        let Ticket {
            permit,
            slot,
            shared,
        } = self;
        let now = std::time::Instant::now();
        let headers = if o.status == 429 {
            let wait = o.retry_after.unwrap_or(Duration::from_secs(1));
            if o.is_global_limit() {
                slot.gate.block_for(wait);
                if let Some(limits) = shared.as_ref().map(|s| s.limits().clone()) {
                    // Every process must pause, not only this one; the local gate
                    // already holds this one meanwhile.
                    tokio::spawn(async move {
                        if let Err(e) = limits.block_for(wait.min(MAX_GLOBAL_BLOCK)).await {
                            tracing::warn!(error = %e, "cannot share a global Discord 429 with the other processes");
                        }
                    });
                }
                None
            } else {
                o.bucket.as_ref().map(|bucket| RateLimitHeaders {
                    bucket: bucket.as_bytes().to_vec(),
                    limit: 0,
                    remaining: 0,
                    reset_at: now + wait,
                })
            }
        } else {
            match (&o.bucket, o.limit, o.remaining, o.reset_after) {
                (Some(bucket), Some(limit), Some(remaining), Some(reset_after)) => {
                    Some(RateLimitHeaders {
                        bucket: bucket.as_bytes().to_vec(),
                        limit: u16::try_from(limit).unwrap_or(u16::MAX),
                        remaining: u16::try_from(remaining).unwrap_or(u16::MAX),
                        reset_at: now + reset_after,
                    })
                }
                _ => None,
            }
        };
        permit.complete(headers);
        slot.answered();
        Released(shared)
    }

    /// No answer came (or the request was not sent): the bucket's line moves on and the
    /// slots are free a period from now.
    pub async fn abandon(self) {
        let Ticket {
            permit,
            slot,
            shared,
        } = self;
        drop(permit);
        slot.answered();
        Released(shared).wait().await;
    }
}

/// The bot's shared slot of a completed [`Ticket`]: free a window after it is awaited
/// (or, dropped, soon after).
#[must_use = "await the release of the shared slot"]
#[derive(Debug)]
pub struct Released(Option<SharedSlot>);

impl Released {
    /// Frees the shared slot (a window from now), so a caller that returns after this
    /// (a command about to exit) leaves no slot taken until its lease ends.
    pub async fn wait(self) {
        if let Some(slot) = self.0 {
            slot.release().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn an_absurd_global_retry_after_is_capped_not_a_panic() {
        let gate = GlobalGate::new(50, Duration::from_secs(1));
        gate.block_for(Duration::MAX);
        gate.block_for(Duration::from_secs(u64::MAX / 2));
    }

    #[tokio::test(start_paused = true)]
    async fn gate_never_exceeds_its_limit_in_any_window() {
        let gate = GlobalGate::new(5, Duration::from_secs(1));
        let start = Instant::now();
        let mut times = Vec::new();
        for _ in 0..12 {
            gate.acquire().await.answered();
            times.push(Instant::now() - start);
        }
        // 5 at once, 5 after one period, 2 after two.
        let period = Duration::from_secs(1);
        assert!(times[..5].iter().all(|t| *t == Duration::ZERO), "{times:?}");
        assert!(times[5..10].iter().all(|t| *t == period), "{times:?}");
        assert_eq!(times[10], period * 2);
        for (i, t) in times.iter().enumerate() {
            let in_window = times[i..].iter().filter(|u| **u - *t < period).count();
            assert!(in_window <= 5);
        }
    }

    /// A request that takes long to reach Discord must not share a window there with
    /// the next request of its slot: the slot is free a period after the answer, not
    /// after it was taken.
    #[tokio::test(start_paused = true)]
    async fn a_slot_is_free_a_period_after_its_answer() {
        let gate = GlobalGate::new(2, Duration::from_secs(1));
        let start = Instant::now();
        let slow = gate.acquire().await;
        gate.acquire().await.answered();
        let answered = tokio::spawn(async move {
            // In flight for 1.5 periods.
            tokio::time::sleep(Duration::from_millis(1500)).await;
            slow.answered();
        });
        // The quick one's slot comes back a period after its answer.
        gate.acquire().await.answered();
        assert_eq!(Instant::now() - start, Duration::from_secs(1));
        // The slow one's slot a period after its answer, not a period after it was taken.
        gate.acquire().await.answered();
        assert_eq!(Instant::now() - start, Duration::from_millis(2000));
        let _held = gate.acquire().await;
        assert_eq!(Instant::now() - start, Duration::from_millis(2500));
        answered.await.unwrap();
    }

    /// Every slot in flight: the first answer is waited for, then a period.
    #[tokio::test(start_paused = true)]
    async fn with_every_slot_in_flight_the_next_waits_for_an_answer() {
        let gate = GlobalGate::new(1, Duration::from_secs(1));
        let start = Instant::now();
        let held = gate.acquire().await;
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(3)).await;
            held.answered();
        });
        gate.acquire().await.answered();
        assert_eq!(Instant::now() - start, Duration::from_secs(4));
    }

    /// A slot dropped without an answer (its caller cancelled, the request perhaps on
    /// its way) is held a little longer before its period starts.
    #[tokio::test(start_paused = true)]
    async fn a_slot_dropped_without_an_answer_is_held_a_little_longer() {
        let gate = GlobalGate::new(1, Duration::from_secs(1));
        let start = Instant::now();
        drop(gate.acquire().await);
        gate.acquire().await.answered();
        assert_eq!(
            Instant::now() - start,
            DROPPED_HOLD + Duration::from_secs(1)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_block_after_the_slot_was_taken_is_waited_out() {
        let gate = GlobalGate::new(50, Duration::from_secs(1));
        let _slot = gate.acquire().await;
        gate.block_for(Duration::from_millis(700));
        let start = Instant::now();
        gate.wait_unblocked().await;
        assert_eq!(Instant::now() - start, Duration::from_millis(700));
        gate.wait_unblocked().await;
        assert_eq!(Instant::now() - start, Duration::from_millis(700));
    }

    #[tokio::test(start_paused = true)]
    async fn gate_honours_a_global_block() {
        let gate = GlobalGate::new(50, Duration::from_secs(1));
        gate.block_for(Duration::from_millis(1500));
        let start = Instant::now();
        let _slot = gate.acquire().await;
        assert_eq!(Instant::now() - start, Duration::from_millis(1500));
    }

    #[test]
    fn observed_reads_discord_headers() {
        let h = |name: &str| -> Option<String> {
            match name {
                "x-ratelimit-bucket" => Some("abc".into()),
                "x-ratelimit-limit" => Some("10".into()),
                "x-ratelimit-remaining" => Some("0".into()),
                "x-ratelimit-reset-after" => Some("0.250".into()),
                "retry-after" => Some("1".into()),
                "x-ratelimit-scope" => Some("shared".into()),
                _ => None,
            }
        };
        let o = Observed::parse(429, h).with_body_retry_after(Some(0.25), Some(false));
        assert_eq!(o.bucket.as_deref(), Some("abc"));
        assert_eq!(o.remaining, Some(0));
        assert_eq!(o.reset_after, Some(Duration::from_millis(250)));
        assert_eq!(o.retry_after, Some(Duration::from_millis(250)));
        assert!(!o.is_global_limit());
        assert!(
            !o.counts_as_invalid(),
            "shared 429s are not held against us"
        );
        assert!(Observed::parse(403, |_| None).counts_as_invalid());
    }

    #[tokio::test(start_paused = true)]
    async fn a_bounded_budget_gives_up_after_its_max_wait() {
        let budget = Budget::new("side", 1).with_max_wait(Duration::from_secs(5));
        let t = budget.acquire(Verb::Get, "guilds/1", true).await.unwrap();
        drop(t);
        // The one slot of this second is spent: the next caller would wait a second.
        let start = Instant::now();
        let err = Budget::acquire(
            &Budget {
                max_wait: Some(Duration::from_millis(500)),
                ..budget.clone()
            },
            Verb::Get,
            "guilds/2",
            true,
        )
        .await
        .unwrap_err();
        assert_eq!(err.waited, Duration::from_millis(500));
        assert_eq!(Instant::now() - start, Duration::from_millis(500));
        // Within the bound it waits, and gets the slot.
        assert!(budget.acquire(Verb::Get, "guilds/3", true).await.is_ok());
        // A caller that spent 4.5 s of the 5 on its way waits the half second left.
        let start = Instant::now();
        let err = budget
            .acquire_after(Verb::Get, "guilds/4", true, Duration::from_millis(4500))
            .await
            .unwrap_err();
        assert_eq!(
            err.waited,
            Duration::from_secs(5),
            "busy after the bound in all"
        );
        assert_eq!(Instant::now() - start, Duration::from_millis(500));
    }

    #[tokio::test]
    async fn an_exhausted_bucket_holds_its_queue_until_reset() {
        let budget = Budget::new("test", 50);
        let t = budget
            .acquire(Verb::Put, "guilds/1/members/:user", true)
            .await
            .unwrap();
        // The reset counts from inside `complete`, so a clock read before it can only
        // see a longer wait, however the thread is scheduled.
        let start = std::time::Instant::now();
        t.complete(&Observed {
            status: 201,
            bucket: Some("b".into()),
            limit: Some(1),
            remaining: Some(0),
            reset_after: Some(Duration::from_millis(200)),
            ..Observed::default()
        })
        .wait()
        .await;
        let t = budget
            .acquire(Verb::Put, "guilds/1/members/:user", true)
            .await
            .unwrap();
        assert!(
            start.elapsed() >= Duration::from_millis(195),
            "{:?}",
            start.elapsed()
        );
        drop(t);
        // Another guild is another bucket: not held.
        let start = std::time::Instant::now();
        let t = budget
            .acquire(Verb::Put, "guilds/9/members/:user", true)
            .await
            .unwrap();
        assert!(start.elapsed() < Duration::from_millis(100));
        drop(t);
    }

    #[tokio::test]
    async fn a_429_on_removing_a_role_holds_back_adding_one() {
        let budget = Budget::new("test", 50);
        let route = "guilds/1/members/:user/roles/:role";
        let t = budget.acquire(Verb::Delete, route, true).await.unwrap();
        let start = std::time::Instant::now();
        t.complete(&Observed {
            status: 429,
            bucket: Some("roles".into()),
            retry_after: Some(Duration::from_millis(200)),
            scope: Some("shared".into()),
            ..Observed::default()
        })
        .wait()
        .await;
        let t = budget.acquire(Verb::Put, route, true).await.unwrap();
        assert!(
            start.elapsed() >= Duration::from_millis(195),
            "{:?}",
            start.elapsed()
        );
        drop(t);
    }
}
