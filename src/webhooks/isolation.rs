//! Per-endpoint isolation, so one slow or dead endpoint cannot take the workers from the
//! others: at most `max_in_flight` requests per endpoint at once (per process), and a
//! circuit breaker that short-circuits an endpoint after `threshold` consecutive
//! failures for `cool_down`. After the cool-down, requests go out again (up to the cap);
//! one more failure re-opens the circuit at once, a success closes it.
//!
//! An endpoint at its cap that is making progress (a request of it finished recently) is
//! briefly waited for by a few callers ([`Isolation::admit_within`]): its next slot
//! frees within milliseconds, and sending then is far cheaper than parking the job in a
//! retry tier for seconds. A stalled endpoint (a hanging or dead one) is never waited
//! for, so it holds at most its cap of requests and its cap of short waits.
//!
//! One owner: a mutex around a small map, held only for a lookup. [`Isolation::admit`]
//! takes `now` from the caller, so it is tested without a clock; the waiting variant
//! reads Tokio's clock and is tested on paused time.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

#[derive(Clone, Copy, Debug)]
pub struct IsolationSettings {
    pub max_in_flight: usize,
    pub threshold: u32,
    pub cool_down: Duration,
    /// How many times its typical latency an endpoint at its cap may go without a
    /// request finishing before it counts as hanging ([`STALL_FACTOR`] in service).
    pub stall_factor: u32,
}

#[derive(Default)]
struct EndpointState {
    in_flight: usize,
    consecutive_failures: u32,
    open_until: Option<Instant>,
    /// When a request last finished, or the endpoint last went from idle to busy.
    last_progress: Option<Instant>,
    /// Callers in [`Isolation::admit_within`] waiting for a slot.
    waiting: usize,
    /// Woken once per finished request.
    freed: Arc<Notify>,
    /// Messages of the endpoint were held since its last success.
    held: bool,
    /// Its successful requests, counted: a hold being written compares them.
    successes: u64,
    /// Holds being written ([`HoldNote`]): the state is kept, and with it the count.
    hold_writes: usize,
}

impl EndpointState {
    /// How long the endpoint has been at its cap of `max_in_flight` with no request
    /// finished, if at least `stalled_after`.
    fn stalled_for(
        &self,
        now: Instant,
        max_in_flight: usize,
        stalled_after: Duration,
    ) -> Option<Duration> {
        if self.in_flight < max_in_flight {
            return None;
        }
        let stalled_for = now.saturating_duration_since(self.last_progress.unwrap_or(now));
        (stalled_for >= stalled_after).then_some(stalled_for)
    }

    /// Nothing worth remembering: no request out, no failures, nobody waiting, nothing
    /// held.
    fn forgettable(&self) -> bool {
        self.in_flight == 0
            && self.consecutive_failures == 0
            && self.waiting == 0
            && !self.held
            && self.hold_writes == 0
    }
}

/// The guards of every endpoint this process delivers to. Cheap to clone.
#[derive(Clone)]
pub struct Isolation {
    settings: IsolationSettings,
    state: Arc<Mutex<HashMap<String, EndpointState>>>,
    /// Per endpoint, a moving average of its successful requests' latency in
    /// microseconds: what "no answer for a while" means for it. Kept while the endpoint
    /// is idle (its state above is not); locked after `state` when both are.
    typical: Arc<Mutex<HashMap<String, u64>>>,
    /// The same over every endpoint of the process (0: none yet), for endpoints none of
    /// whose requests has succeeded yet.
    typical_all_us: Arc<AtomicU64>,
    /// The 410 Gone answers of endpoints, being recorded or recorded within
    /// [`GONE_KEPT`] ([`Isolation::gone`]).
    gone: Arc<Mutex<HashMap<String, Gone>>>,
}

/// An endpoint's 410 Gone answers: how many are being recorded (the record disables
/// the endpoint in the database), and when the last was recorded.
#[derive(Default)]
struct Gone {
    recording: usize,
    recorded_at: Option<Instant>,
    /// Woken when a record ends (written or not).
    ended: Arc<Notify>,
}

/// How long an endpoint's recorded 410 Gone is remembered: longer than a target is
/// kept between its read and its request (a pulled message's a second at most, a job's
/// as long as the jobs ahead of it in its endpoint's line wait for their turns).
pub const GONE_KEPT: Duration = Duration::from_secs(60);

/// How long an endpoint at its cap may go without a request finishing before it counts
/// as hanging: the stall factor ([`STALL_FACTOR`] in service) times the typical latency
/// of its own successful requests, within [`STALL_FLOOR`, [`STALL_CEILING`]]; until one
/// of its requests has succeeded, the factor times the typical latency over every
/// endpoint, within [`STALL_FLOOR`, the caller's ceiling]. A fast receiver that stops
/// answering is recognised in a fraction of a second, and one that always takes a
/// second is not mistaken for a hanging one once it has answered. Taking one for
/// hanging too early costs little: its messages are held, and its first success parks
/// them to be sent at its pace.
pub const STALL_FLOOR: Duration = Duration::from_millis(150);
pub const STALL_FACTOR: u32 = 8;
pub const STALL_CEILING: Duration = Duration::from_secs(10);
/// Endpoints whose typical latency is remembered at most (beyond it, one is forgotten
/// for each new one).
const TYPICAL_KEPT: usize = 10_000;

/// Whether a request to an endpoint may go out now.
#[derive(Debug)]
pub enum Admission {
    Go(Permit),
    /// The endpoint already has `max_in_flight` requests out, and none of them has
    /// finished for `stalled_for` (a long time means it hangs rather than is busy).
    /// `seen`: its successes so far, for a hold begun on this answer
    /// ([`Isolation::begin_hold_after`]).
    Busy {
        stalled_for: Duration,
        seen: u64,
    },
    /// The circuit is open (the endpoint failed too often in a row) until `until`.
    Open {
        failures: u32,
        until: Instant,
        seen: u64,
    },
}

/// One in-flight request. Finish it with the result; dropping it unfinished (a crash
/// of the task) frees the slot without judging the endpoint.
#[must_use = "a permit holds an in-flight slot until finished or dropped"]
#[derive(Debug)]
pub struct Permit {
    endpoint: String,
    isolation: Option<Isolation>,
    started: Instant,
}

impl std::fmt::Debug for Isolation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Isolation")
            .field("settings", &self.settings)
            .finish()
    }
}

impl Isolation {
    pub fn new(settings: IsolationSettings) -> Self {
        Self {
            settings,
            state: Arc::default(),
            typical: Arc::default(),
            typical_all_us: Arc::default(),
            gone: Arc::default(),
        }
    }

    /// The endpoint answered 410 Gone: until the returned note says it is recorded (or
    /// is dropped, the record failed), a request about to go to the endpoint waits in
    /// [`Isolation::gone`]. Begun before the answer's slot is given back.
    pub fn gone_begin(&self, endpoint: &str) -> GoneNote {
        let now = Instant::now();
        let mut gone = self.gone.lock().expect("isolation lock");
        gone.retain(|_, g| {
            g.recording > 0
                || g.recorded_at
                    .is_some_and(|at| now.saturating_duration_since(at) < GONE_KEPT)
        });
        gone.entry(endpoint.to_string()).or_default().recording += 1;
        GoneNote {
            isolation: self.clone(),
            endpoint: endpoint.to_string(),
            recorded_at: None,
        }
    }

    /// Whether a request to the endpoint must read its target again first: a 410 Gone of
    /// it was recorded within [`GONE_KEPT`] (the endpoint is disabled unless enabled again
    /// since). While one is being recorded, waits for that.
    pub async fn gone(&self, endpoint: &str) -> bool {
        loop {
            let ended = {
                let gone = self.gone.lock().expect("isolation lock");
                let Some(g) = gone.get(endpoint) else {
                    return false;
                };
                if g.recording == 0 {
                    return g.recorded_at.is_some_and(|at| at.elapsed() < GONE_KEPT);
                }
                // Registered under the lock, so an end in between still wakes it.
                let mut ended = Box::pin(g.ended.clone().notified_owned());
                ended.as_mut().enable();
                ended
            };
            ended.await;
        }
    }

    /// What this was built with.
    pub fn settings(&self) -> IsolationSettings {
        self.settings
    }

    /// The cap of requests in flight per endpoint.
    pub fn max_in_flight(&self) -> usize {
        self.settings.max_in_flight
    }

    /// How long the endpoint may go at its cap without a request finishing before it
    /// counts as hanging, at most `ceiling` while none of its requests has succeeded.
    /// See [`STALL_FLOOR`].
    pub fn stall_after(&self, endpoint: &str, ceiling: Duration) -> Duration {
        let typical = self.typical.lock().expect("isolation lock");
        match typical.get(endpoint) {
            Some(&us) => (Duration::from_micros(us) * self.settings.stall_factor)
                .clamp(STALL_FLOOR, STALL_CEILING),
            None => match self.typical_all_us.load(Ordering::Relaxed) {
                0 => ceiling,
                us => (Duration::from_micros(us) * self.settings.stall_factor)
                    .clamp(STALL_FLOOR, ceiling.max(STALL_FLOOR)),
            },
        }
    }

    /// The endpoint's typical successful latency, if one of its requests has succeeded.
    pub fn typical(&self, endpoint: &str) -> Option<Duration> {
        let typical = self.typical.lock().expect("isolation lock");
        typical.get(endpoint).map(|us| Duration::from_micros(*us))
    }

    fn observe_success(&self, endpoint: &str, latency: Duration) {
        let sample = u64::try_from(latency.as_micros())
            .unwrap_or(u64::MAX)
            .max(1);
        let _ = self
            .typical_all_us
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |old| {
                Some(if old == 0 {
                    sample
                } else {
                    (old * 15 + sample) / 16
                })
            });
        let mut typical = self.typical.lock().expect("isolation lock");
        if typical.len() >= TYPICAL_KEPT
            && !typical.contains_key(endpoint)
            && let Some(any) = typical.keys().next().cloned()
        {
            typical.remove(&any);
        }
        let avg = typical.entry(endpoint.to_string()).or_insert(sample);
        // An exponential moving average over about 16 requests.
        *avg = (*avg * 15 + sample) / 16;
    }

    pub fn admit(&self, endpoint: &str, now: Instant) -> Admission {
        let mut map = self.state.lock().expect("isolation lock");
        self.admit_locked(&mut map, endpoint, now, false)
    }

    /// How long the endpoint has been stalled — at its cap with no request finished for
    /// at least [`Isolation::stall_after`] (with `fallback`) — or `None` if it is not
    /// (also when its circuit is open: that is answered by [`Isolation::admit`]). Only a
    /// look; takes no slot.
    pub fn stalled(&self, endpoint: &str, now: Instant, fallback: Duration) -> Option<Duration> {
        let map = self.state.lock().expect("isolation lock");
        self.stalled_in(endpoint, map.get(endpoint)?, now, fallback)
    }

    /// [`Isolation::stalled`] of the endpoint whose state is `st` (locked).
    fn stalled_in(
        &self,
        endpoint: &str,
        st: &EndpointState,
        now: Instant,
        fallback: Duration,
    ) -> Option<Duration> {
        if st.open_until.is_some_and(|until| now < until) {
            return None;
        }
        st.stalled_for(
            now,
            self.settings.max_in_flight,
            self.stall_after(endpoint, fallback),
        )
    }

    /// [`Isolation::admit`] on the locked map; `behind_waiters`: a slot is not taken
    /// while others wait for one (they were first).
    fn admit_locked(
        &self,
        map: &mut HashMap<String, EndpointState>,
        endpoint: &str,
        now: Instant,
        behind_waiters: bool,
    ) -> Admission {
        let st = map.entry(endpoint.to_string()).or_default();
        if let Some(until) = st.open_until
            && now < until
        {
            return Admission::Open {
                failures: st.consecutive_failures,
                until,
                seen: st.successes,
            };
        }
        if st.in_flight >= self.settings.max_in_flight || (behind_waiters && st.waiting > 0) {
            let since = st.last_progress.unwrap_or(now);
            return Admission::Busy {
                stalled_for: now.saturating_duration_since(since),
                seen: st.successes,
            };
        }
        if st.in_flight == 0 {
            st.last_progress = Some(now);
        }
        st.in_flight += 1;
        Admission::Go(Permit {
            endpoint: endpoint.to_string(),
            isolation: Some(self.clone()),
            started: now,
        })
    }

    /// Like [`Isolation::admit`], but waits for a slot of an endpoint that is at its cap
    /// and not stalled (a request of it finished less than `stalled_after` ago), for up
    /// to `max_wait`, in turn with other waiters. At most `max_in_flight` callers wait
    /// per endpoint; the others get `Busy` at once, as does everyone once the endpoint
    /// has stalled or `max_wait` is over. Holding a job this long is cheaper than a trip
    /// through a retry tier, and the bounds keep a slow endpoint from holding more than
    /// twice its cap of workers.
    pub async fn admit_within(
        &self,
        endpoint: &str,
        max_wait: Duration,
        stalled_after: Duration,
    ) -> Admission {
        let started = tokio::time::Instant::now();
        // Declared before the lock guard below, so on every return it is dropped (and
        // takes the lock) after the guard.
        let mut queued: Option<Waiting> = None;
        loop {
            let now = tokio::time::Instant::now();
            let (wait, mut notified) = {
                let mut map = self.state.lock().expect("isolation lock");
                let admission =
                    self.admit_locked(&mut map, endpoint, now.into_std(), queued.is_none());
                let Admission::Busy { stalled_for, .. } = admission else {
                    return admission;
                };
                let waited = now.saturating_duration_since(started);
                if stalled_for >= stalled_after || waited >= max_wait {
                    return admission;
                }
                let st = map.get_mut(endpoint).expect("a busy endpoint has state");
                if queued.is_none() {
                    if st.waiting >= self.settings.max_in_flight {
                        return admission;
                    }
                    st.waiting += 1;
                    queued = Some(Waiting {
                        endpoint: endpoint.to_string(),
                        isolation: self.clone(),
                    });
                }
                // Registered before the lock is let go, so a request that finishes in
                // between still wakes a waiter.
                let mut notified = Box::pin(st.freed.clone().notified_owned());
                notified.as_mut().enable();
                (
                    (stalled_after - stalled_for).min(max_wait - waited),
                    notified,
                )
            };
            // Woken when a request of the endpoint finishes; otherwise when it would
            // count as stalled or the wait is over, and the look above answers `Busy`.
            let _ = tokio::time::timeout(wait, notified.as_mut()).await;
        }
    }

    /// The endpoints whose messages would be held now, with until when: those at their
    /// cap with no request finished for their [`Isolation::stall_after`] (with
    /// `fallback`; until `hold` from now), and
    /// those whose circuit is open (until it closes, and at least `hold` from now).
    /// Each with the note of its hold ([`HoldNote`]), begun with the look.
    pub fn holding(
        &self,
        now: Instant,
        fallback: Duration,
        hold: Duration,
    ) -> Vec<(String, Instant, HoldNote)> {
        let mut map = self.state.lock().expect("isolation lock");
        let mut out = Vec::new();
        for (endpoint, st) in map.iter_mut() {
            let open = st.open_until.filter(|until| now < *until);
            if open.is_some() || self.stalled_in(endpoint, st, now, fallback).is_some() {
                out.push((
                    endpoint.clone(),
                    super::schedule::hold_until(now, hold, open),
                    self.note(endpoint, st),
                ));
            }
        }
        out
    }

    /// Starts writing a hold of the endpoint's messages, decided on an [`Admission`]
    /// that saw `seen` successes. Once written, [`HoldNote::written`] notes it, so the
    /// endpoint's next success reports a recovery ([`Permit::finish`]) and releases it;
    /// or says that the endpoint succeeded while it was written (a success since that
    /// answer counts as one), when the success found nothing to release and none may
    /// follow.
    /// Begun only once the answer is in hand, a hold would miss the endpoint's last
    /// requests answering in between (its holds then waited out their time, with
    /// nothing left in flight to answer and release them).
    pub fn begin_hold_after(&self, endpoint: &str, seen: u64) -> HoldNote {
        let mut map = self.state.lock().expect("isolation lock");
        // Forgotten since: every request it had out ended, none failing.
        let ended = !map.contains_key(endpoint);
        let mut note = self.note(endpoint, map.entry(endpoint.to_string()).or_default());
        note.successes = if ended { None } else { Some(seen) };
        note
    }

    /// Begins a hold of the endpoint's messages ([`HoldNote`]) if it is stalled now
    /// ([`Isolation::stalled`]), under one look.
    pub fn hold_if_stalled(
        &self,
        endpoint: &str,
        now: Instant,
        fallback: Duration,
    ) -> Option<HoldNote> {
        let mut map = self.state.lock().expect("isolation lock");
        let st = map.get_mut(endpoint)?;
        self.stalled_in(endpoint, st, now, fallback)?;
        Some(self.note(endpoint, st))
    }

    /// A hold of the endpoint (whose state is `st`, locked) begins.
    fn note(&self, endpoint: &str, st: &mut EndpointState) -> HoldNote {
        st.hold_writes += 1;
        HoldNote {
            isolation: self.clone(),
            endpoint: endpoint.to_string(),
            successes: Some(st.successes),
        }
    }

    /// Changes the endpoint's state with `change` (`None` if it has none), and forgets
    /// it if that left it healthy and idle, so the map stays as small as the traffic.
    fn let_go<R>(&self, endpoint: &str, change: impl FnOnce(&mut EndpointState) -> R) -> Option<R> {
        let mut map = self.state.lock().expect("isolation lock");
        let st = map.get_mut(endpoint)?;
        let r = change(st);
        if st.forgettable() {
            map.remove(endpoint);
        }
        Some(r)
    }

    /// Frees a slot; returns whether a success ended a run of failures or holds.
    fn release(&self, endpoint: &str, result: Option<bool>, now: Instant) -> bool {
        self.let_go(endpoint, |st| self.finished(st, result, now))
            .unwrap_or(false)
    }

    /// A request of the endpoint whose state is `st` finished with `result`.
    fn finished(&self, st: &mut EndpointState, result: Option<bool>, now: Instant) -> bool {
        let recovered = result == Some(true) && (st.consecutive_failures > 0 || st.held);
        st.in_flight = st.in_flight.saturating_sub(1);
        st.last_progress = Some(now);
        st.freed.notify_one();
        match result {
            Some(true) => {
                st.consecutive_failures = 0;
                st.open_until = None;
                st.held = false;
                st.successes += 1;
            }
            Some(false) => {
                st.consecutive_failures += 1;
                if st.consecutive_failures >= self.settings.threshold {
                    st.open_until = Some(now + self.settings.cool_down);
                }
            }
            None => {}
        }
        recovered
    }
}

/// A hold of an endpoint's messages being written (from [`Isolation::begin_hold_after`],
/// [`Isolation::hold_if_stalled`] or [`Isolation::holding`]);
/// dropped unwritten (the write failed), it notes nothing.
pub struct HoldNote {
    isolation: Isolation,
    endpoint: String,
    /// The endpoint's successes when the hold was decided; `None`: its requests have
    /// all ended since (its state was forgotten), so no answer may come to release it.
    successes: Option<u64>,
}

impl HoldNote {
    /// The hold is written. Returns whether the endpoint succeeded meanwhile: its
    /// success released the holds written before this one, and if it was the last of
    /// its requests, nothing else will; the caller releases the endpoint's holds then.
    /// Otherwise the endpoint's next success does.
    #[must_use = "a recovery while the hold was written must release it"]
    pub fn written(self) -> bool {
        // The lock is let go before `self` is dropped, which takes it again.
        let mut map = self.isolation.state.lock().expect("isolation lock");
        let st = map.entry(self.endpoint.clone()).or_default();
        let recovered = self.successes != Some(st.successes);
        if !recovered {
            st.held = true;
        }
        drop(map);
        recovered
    }
}

impl Drop for HoldNote {
    fn drop(&mut self) {
        self.isolation.let_go(&self.endpoint, |st| {
            st.hold_writes = st.hold_writes.saturating_sub(1);
        });
    }
}

/// A caller's place among an endpoint's waiters, given up when dropped (also when the
/// waiting future is dropped).
struct Waiting {
    endpoint: String,
    isolation: Isolation,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.isolation.let_go(&self.endpoint, |st| {
            st.waiting = st.waiting.saturating_sub(1);
        });
    }
}

impl Permit {
    /// Records whether the endpoint answered successfully. Returns whether this success
    /// ended a run of failures or holds (the endpoint recovered).
    pub fn finish(mut self, success: bool, now: Instant) -> bool {
        let Some(i) = self.isolation.take() else {
            return false;
        };
        if success {
            i.observe_success(&self.endpoint, now.saturating_duration_since(self.started));
        }
        i.release(&self.endpoint, Some(success), now)
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(i) = self.isolation.take() {
            i.release(&self.endpoint, None, Instant::now());
        }
    }
}

/// A 410 Gone being recorded (from [`Isolation::gone_begin`]).
pub struct GoneNote {
    isolation: Isolation,
    endpoint: String,
    recorded_at: Option<Instant>,
}

impl GoneNote {
    /// The 410 is recorded (the endpoint disabled) at `now`.
    pub fn recorded(mut self, now: Instant) {
        self.recorded_at = Some(now);
    }
}

impl Drop for GoneNote {
    fn drop(&mut self) {
        let mut gone = self.isolation.gone.lock().expect("isolation lock");
        if let Some(g) = gone.get_mut(&self.endpoint) {
            g.recording = g.recording.saturating_sub(1);
            if self.recorded_at.is_some() {
                g.recorded_at = self.recorded_at;
            }
            g.ended.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Isolation {
        /// A hold begun now, on what the endpoint's state says at this moment.
        fn begin_hold(&self, endpoint: &str) -> HoldNote {
            let mut map = self.state.lock().expect("isolation lock");
            self.note(endpoint, map.entry(endpoint.to_string()).or_default())
        }
    }

    fn iso() -> Isolation {
        Isolation::new(IsolationSettings {
            max_in_flight: 2,
            threshold: 3,
            cool_down: Duration::from_secs(10),
            stall_factor: STALL_FACTOR,
        })
    }

    #[tokio::test]
    async fn a_410_being_recorded_is_waited_for_then_remembered_for_a_while() {
        let i = iso();
        assert!(!i.gone("ep_a").await);
        // Recording: a request of the endpoint waits, another endpoint's does not.
        let note = i.gone_begin("ep_a");
        assert!(!i.gone("ep_b").await);
        let waiting = tokio::spawn({
            let i = i.clone();
            async move { i.gone("ep_a").await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished(), "waits while the 410 is recorded");
        note.recorded(Instant::now());
        assert!(waiting.await.unwrap(), "gone once recorded");
        // A record that failed leaves nothing to read again.
        drop(i.gone_begin("ep_c"));
        assert!(!i.gone("ep_c").await);
        // Forgotten after GONE_KEPT, when another 410 is noted.
        i.gone.lock().unwrap().get_mut("ep_a").unwrap().recorded_at =
            Instant::now().checked_sub(GONE_KEPT);
        assert!(!i.gone("ep_a").await);
        drop(i.gone_begin("ep_d"));
        let kept: Vec<String> = i.gone.lock().unwrap().keys().cloned().collect();
        assert!(!kept.contains(&"ep_a".to_string()), "{kept:?}");
    }

    fn go(a: Admission) -> Permit {
        match a {
            Admission::Go(p) => p,
            other => panic!("expected Go, got {other:?}"),
        }
    }

    #[test]
    fn caps_in_flight_per_endpoint() {
        let i = iso();
        let t = Instant::now();
        let a = go(i.admit("ep_a", t));
        let _b = go(i.admit("ep_a", t));
        assert!(matches!(
            i.admit("ep_a", t + Duration::from_secs(3)),
            Admission::Busy { stalled_for, .. } if stalled_for == Duration::from_secs(3)
        ));
        // Another endpoint is not affected.
        let _c = go(i.admit("ep_b", t));
        a.finish(true, t);
        let _d = go(i.admit("ep_a", t));
    }

    #[test]
    fn dropped_permits_free_their_slot() {
        let i = iso();
        let t = Instant::now();
        drop(go(i.admit("ep_a", t)));
        drop(go(i.admit("ep_a", t)));
        let _a = go(i.admit("ep_a", t));
        let _b = go(i.admit("ep_a", t));
    }

    #[test]
    fn opens_after_consecutive_failures_and_closes_on_success() {
        let i = iso();
        let t = Instant::now();
        for _ in 0..3 {
            go(i.admit("ep_a", t)).finish(false, t);
        }
        assert!(matches!(
            i.admit("ep_a", t + Duration::from_secs(9)),
            Admission::Open { failures: 3, until, .. } if until == t + Duration::from_secs(10)
        ));
        assert!(matches!(i.admit("ep_b", t), Admission::Go(_)));
        // Cool-down over: requests go again; one more failure re-opens at once.
        let later = t + Duration::from_secs(10);
        go(i.admit("ep_a", later)).finish(false, later);
        assert!(matches!(i.admit("ep_a", later), Admission::Open { .. }));
        let much_later = later + Duration::from_secs(10);
        assert!(
            go(i.admit("ep_a", much_later)).finish(true, much_later),
            "a success after failures is a recovery"
        );
        assert!(!go(i.admit("ep_a", much_later)).finish(true, much_later));
        assert!(!i.begin_hold("ep_a").written());
        assert!(
            go(i.admit("ep_a", much_later)).finish(true, much_later),
            "a success after hold is a recovery"
        );
        go(i.admit("ep_a", much_later)).finish(false, much_later);
        assert!(matches!(i.admit("ep_a", much_later), Admission::Go(_)));
    }

    const STALL: Duration = Duration::from_secs(1);

    #[tokio::test(start_paused = true)]
    async fn a_busy_endpoint_is_waited_for_until_a_request_finishes() {
        let i = iso();
        let a = go(i.admit("ep_a", tokio::time::Instant::now().into_std()));
        let _b = go(i.admit("ep_a", tokio::time::Instant::now().into_std()));
        let waiter = {
            let i = i.clone();
            tokio::spawn(async move {
                let started = tokio::time::Instant::now();
                let p = go(i.admit_within("ep_a", STALL, STALL).await);
                (p, started.elapsed())
            })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        a.finish(true, tokio::time::Instant::now().into_std());
        let (_p, waited) = waiter.await.unwrap();
        assert_eq!(waited, Duration::from_millis(300));
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_endpoint_is_not_waited_for() {
        let i = iso();
        let t = tokio::time::Instant::now();
        let _a = go(i.admit("ep_a", t.into_std()));
        let _b = go(i.admit("ep_a", t.into_std()));
        // Waited for until it counts as stalled (no request finished for STALL)…
        let a = i.admit_within("ep_a", Duration::from_secs(10), STALL).await;
        assert!(matches!(a, Admission::Busy { stalled_for, .. } if stalled_for == STALL));
        assert_eq!(t.elapsed(), STALL);
        // …and from then on not at all.
        let a = i.admit_within("ep_a", Duration::from_secs(10), STALL).await;
        assert!(matches!(a, Admission::Busy { .. }));
        assert_eq!(t.elapsed(), STALL);
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_is_bounded_in_time_and_in_callers() {
        let i = iso();
        let t = tokio::time::Instant::now();
        let _a = go(i.admit("ep_a", t.into_std()));
        let _b = go(i.admit("ep_a", t.into_std()));
        let max_wait = Duration::from_millis(200);
        // Two (the cap) may wait; a third is turned away at once.
        let waiters: Vec<_> = (0..2)
            .map(|_| {
                let i = i.clone();
                tokio::spawn(async move { i.admit_within("ep_a", max_wait, STALL).await })
            })
            .collect();
        tokio::task::yield_now().await;
        assert!(matches!(
            i.admit_within("ep_a", max_wait, STALL).await,
            Admission::Busy { .. }
        ));
        assert_eq!(t.elapsed(), Duration::ZERO);
        for w in waiters {
            assert!(matches!(w.await.unwrap(), Admission::Busy { .. }));
        }
        assert_eq!(t.elapsed(), max_wait);
        // Their places are given back.
        assert_eq!(i.state.lock().unwrap()["ep_a"].waiting, 0);
    }

    #[test]
    fn stalled_is_a_look_that_takes_no_slot() {
        let i = iso();
        let t = Instant::now();
        assert_eq!(i.stalled("ep_a", t, STALL), None);
        let _a = go(i.admit("ep_a", t));
        assert_eq!(i.stalled("ep_a", t + STALL, STALL), None, "below its cap");
        let b = go(i.admit("ep_a", t));
        assert_eq!(
            i.stalled("ep_a", t + STALL / 2, STALL),
            None,
            "not for long enough"
        );
        assert_eq!(i.stalled("ep_a", t + STALL * 2, STALL), Some(STALL * 2));
        b.finish(true, t + STALL * 2);
        let _b = go(i.admit("ep_a", t + STALL * 2));
        assert_eq!(
            i.stalled("ep_a", t + STALL * 2, STALL),
            None,
            "a request finished"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_open_circuit_is_not_waited_for() {
        let i = iso();
        let t = tokio::time::Instant::now().into_std();
        for _ in 0..3 {
            go(i.admit("ep_a", t)).finish(false, t);
        }
        assert!(matches!(
            i.admit_within("ep_a", STALL, STALL).await,
            Admission::Open { failures: 3, .. }
        ));
    }

    /// What [`Isolation::holding`] names, without the notes, sorted.
    fn held(i: &Isolation, now: Instant, hold: Duration) -> Vec<(String, Instant)> {
        let mut got: Vec<_> = i
            .holding(now, STALL, hold)
            .into_iter()
            .map(|(e, until, _)| (e, until))
            .collect();
        got.sort();
        got
    }

    #[test]
    fn holding_names_stalled_and_open_endpoints() {
        let i = iso();
        let t = Instant::now();
        let hold = Duration::from_secs(15);
        // ep_a hangs: at its cap, nothing finished.
        let _a = go(i.admit("ep_a", t));
        let _b = go(i.admit("ep_a", t));
        // ep_b is open until t + 10 s.
        for _ in 0..3 {
            go(i.admit("ep_b", t)).finish(false, t);
        }
        // ep_c is busy but answering.
        let _c = go(i.admit("ep_c", t));
        assert_eq!(
            held(&i, t, hold),
            [("ep_b".to_string(), t + hold)],
            "ep_a is not stalled yet"
        );
        let later = t + STALL;
        assert_eq!(
            held(&i, later, hold),
            [
                ("ep_a".to_string(), later + hold),
                ("ep_b".to_string(), later + hold)
            ]
        );
        // A cool-down longer than the hold wins.
        let got = held(&i, later, Duration::from_secs(1));
        assert!(got.contains(&("ep_b".to_string(), t + Duration::from_secs(10))));
    }

    #[test]
    fn a_success_while_a_hold_is_written_is_told_and_a_later_one_reports_a_recovery() {
        let i = iso();
        let t = Instant::now();
        // The last request in flight answers while the hold is written: nothing would
        // release the hold, so the writer is told.
        let last = go(i.admit("ep_a", t));
        let note = i.begin_hold("ep_a");
        assert!(!last.finish(true, t), "nothing was held yet");
        assert!(note.written(), "a success while the hold was written");
        // Written with no success meanwhile: the next success reports a recovery.
        let note = i.begin_hold("ep_a");
        assert!(!note.written());
        assert!(
            go(i.admit("ep_a", t)).finish(true, t),
            "a success after a hold"
        );
        // An idle endpoint's state is forgotten, but not while a hold is written: the
        // count the writer compares with stays.
        let note = i.begin_hold("ep_b");
        go(i.admit("ep_b", t)).finish(true, t);
        assert!(note.written());
        assert!(i.state.lock().unwrap().is_empty(), "forgotten once written");
        // A hold given up (its write failed) notes nothing.
        drop(i.begin_hold("ep_c"));
        assert!(!go(i.admit("ep_c", t)).finish(true, t));
    }

    #[test]
    fn a_hold_decided_before_the_last_answers_is_released_by_them() {
        let i = Isolation::new(IsolationSettings {
            max_in_flight: 1,
            threshold: 5,
            cool_down: Duration::from_secs(30),
            stall_factor: STALL_FACTOR,
        });
        let t = Instant::now();
        let request = go(i.admit("ep_a", t));
        // Seen hanging: its one request has been out for a while.
        let Admission::Busy { stalled_for, seen } = i.admit("ep_a", t + STALL) else {
            panic!("at its cap");
        };
        assert_eq!(stalled_for, STALL);
        // Its last request answers before the hold is begun: that success found nothing
        // to release, and no request is left to answer after the hold is written.
        assert!(!request.finish(true, t + STALL));
        let note = i.begin_hold_after("ep_a", seen);
        assert!(
            note.written(),
            "the answer since counts: the writer releases the hold"
        );
        // Looked at and begun under one look when stalled, not otherwise; with no
        // answer since, the hold waits for the next one.
        let _request = go(i.admit("ep_b", t));
        assert!(
            i.hold_if_stalled("ep_b", t, STALL).is_none(),
            "not stalled yet"
        );
        let note = i
            .hold_if_stalled("ep_b", t + STALL, STALL)
            .expect("stalled");
        assert!(!note.written(), "no answer since the look");
    }

    #[test]
    fn hanging_means_long_against_the_endpoints_own_typical_answer() {
        let i = iso();
        let fallback = Duration::from_secs(1);
        assert_eq!(
            i.stall_after("ep_a", fallback),
            fallback,
            "nothing known yet"
        );
        let t = Instant::now();
        for _ in 0..50 {
            go(i.admit("ep_a", t)).finish(true, t + Duration::from_millis(40));
        }
        assert_eq!(i.stall_after("ep_a", fallback), Duration::from_millis(320));
        // Another endpoint's answers say nothing about this one.
        for _ in 0..50 {
            go(i.admit("ep_b", t)).finish(true, t + Duration::from_secs(2));
        }
        assert_eq!(i.stall_after("ep_a", fallback), Duration::from_millis(320));
        assert_eq!(i.stall_after("ep_b", fallback), STALL_CEILING);
        // One never answered yet: from every endpoint's answers, at most the ceiling.
        assert_eq!(i.stall_after("ep_c", fallback), fallback);
        for _ in 0..100 {
            go(i.admit("ep_a", t)).finish(true, t + Duration::from_millis(2));
        }
        assert_eq!(i.stall_after("ep_a", fallback), STALL_FLOOR);
        assert_eq!(i.stall_after("ep_c", fallback), STALL_FLOOR);
        // Failures say nothing about how fast an answer comes; slow successes move it up
        // (a receiver that always takes a second is not taken to hang after one).
        go(i.admit("ep_a", t)).finish(false, t + Duration::from_secs(30));
        assert_eq!(i.stall_after("ep_a", fallback), STALL_FLOOR);
        for _ in 0..100 {
            go(i.admit("ep_a", t)).finish(true, t + Duration::from_millis(1000));
        }
        assert!(i.stall_after("ep_a", fallback) > Duration::from_secs(7));
    }

    #[test]
    fn a_success_resets_the_count() {
        let i = iso();
        let t = Instant::now();
        go(i.admit("ep_a", t)).finish(false, t);
        go(i.admit("ep_a", t)).finish(false, t);
        go(i.admit("ep_a", t)).finish(true, t);
        go(i.admit("ep_a", t)).finish(false, t);
        assert!(matches!(i.admit("ep_a", t), Admission::Go(_)));
    }
}
