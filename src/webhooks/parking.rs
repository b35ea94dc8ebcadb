//! Parking: where the jobs of an endpoint at its in-flight cap wait. A job that finds
//! its endpoint busy (every slot taken, requests still finishing) writes its message
//! as parked in PostgreSQL ([`messages::park_many`], grouped with other workers'
//! parks) and is acked; one puller per parked endpoint and process then takes the
//! endpoint's parked messages, oldest first, a slot at a time, as its requests finish
//! ([`messages::pull_parked`]), and delivers them without another trip through the
//! broker. Waiting costs a row, not a republish per second, however slow the endpoint.
//!
//! Order: the jobs of an endpoint in this process's hands decide (send, park or hold)
//! one after the other in the order they arrived ([`Line`]), and while an endpoint has
//! parked messages its new jobs are parked behind them, pulled in the order they
//! arrived: first attempts keep the order of the jobs (within a process; competing
//! processes each keep their own). Parks are written in whatever order their writes
//! reach the database, so a pull takes only what was parked before the first job of
//! the endpoint still deciding (`Deliverer::pull_looked`).
//!
//! Nothing is lost when a process stops: a pulled message is held in the database
//! until its attempt is recorded (and given a job again by the hold releaser if it
//! never is), and each pull renews the endpoint's lease; once the lease has run out,
//! the hold releaser gives the parked messages jobs again. A puller stops when the
//! endpoint has nothing parked any more, or when it hangs or its circuit opens (its
//! parked messages are then held, as its jobs would be: parked again at its next
//! success, or given jobs by the hold releaser when the hold ends). A hand-back that
//! fails on the database is tried again until it answers, while what it hands back is
//! still this puller's (its claims and lease run), and not while stopping.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use lapin::types::{AMQPValue, FieldTable};
use tokio::sync::OwnedSemaphorePermit;
use tokio::sync::futures::OwnedNotified;

use super::deliver::{BUSY_WAIT, Deliverer, Job, STALLED_AFTER};
use super::isolation::{Admission, HoldNote, Permit};
use super::{holds, schedule};
use crate::amqp::{self, ATTEMPT_HEADER, Outgoing};
use crate::queue::Outcome;
use crate::store::messages::{self, DeliveryTarget, Pulled};

/// How long an endpoint's parked messages are left to the process pulling them
/// without a pull before the hold releaser gives them jobs again.
pub const LEASE: Duration = Duration::from_secs(30);

/// How long the messages of one pull of a quick endpoint take to send at its
/// in-flight cap ([`Deliverer::pull_size`]).
const PULL_SPAN: Duration = Duration::from_millis(250);

/// At most this many in-flight caps of messages in one pull, and at most this many
/// messages (or one cap, if that is more): fewer than the hold releaser gives jobs to
/// per endpoint and round (unless the cap is larger), so a pull handed back on stop
/// goes first whole.
const PULL_CAPS: usize = 8;
const PULL_MOST: usize = 64;

/// How long the messages of a pull larger than a cap may wait in hand (twice what a
/// pull is sized for) before what is left of it is put back.
const PUT_BACK_AFTER: Duration = Duration::from_millis(500);

/// Until when a lease taken or renewed at `now` runs.
pub fn lease_until(now: DateTime<Utc>) -> DateTime<Utc> {
    now + chrono::Duration::from_std(LEASE).unwrap_or(chrono::Duration::MAX)
}

/// How long before a claim or lease runs out a puller stops trying to hand back what it
/// holds: the hold releaser acts on it then, and another puller may take it.
const HAND_BACK_MARGIN: Duration = Duration::from_secs(5);

/// A stopping puller tries to hand back at most this long.
const HAND_BACK_FOR: Duration = Duration::from_secs(15);

/// [`HAND_BACK_MARGIN`] before `end` (now if that is past).
fn short_of(end: Instant) -> Instant {
    end.checked_sub(HAND_BACK_MARGIN)
        .unwrap_or_else(Instant::now)
}

/// Until when a puller that stopped may keep trying to hand back what it holds: while
/// its lease (renewed by its last pull, at `last_pull`) and the claims of what it holds
/// (`pulled`) still run, less [`HAND_BACK_MARGIN`], and for [`HAND_BACK_FOR`] at most.
/// Later they may be another puller's, and a hand-back would act on a decision made
/// before they were.
fn hand_back_until(last_pull: Instant, pulled: &VecDeque<Ready>) -> Instant {
    let lease_end = last_pull + LEASE;
    let end = pulled
        .iter()
        .map(|r| holds::instant_of(r.claim))
        .fold(lease_end, Instant::min);
    short_of(end).min(Instant::now() + HAND_BACK_FOR)
}

/// The jobs of each endpoint that this process has in hand and that have not yet
/// decided whether to send, park or hold, by arrival: a job decides only once every
/// job of its endpoint that arrived before it has (they are reading their message,
/// milliseconds), so a later job never takes a free slot ahead of an earlier one.
#[derive(Clone, Default)]
pub struct Line {
    inner: Arc<Mutex<LineState>>,
}

#[derive(Default)]
struct LineState {
    /// The last arrival stamp handed out (microseconds since the epoch), so stamps are
    /// unique and follow the order of [`Line::join`] calls.
    last: i64,
    endpoints: HashMap<String, Waiters>,
}

#[derive(Default)]
struct Waiters {
    places: BTreeSet<i64>,
    /// Woken when a place of this endpoint is left.
    moved: Arc<tokio::sync::Notify>,
}

/// A job's place in its endpoint's [`Line`]; leaving it (dropping) lets the next one on.
pub struct Place {
    line: Line,
    endpoint: String,
    at: i64,
    /// How many jobs of the endpoint were in line ahead of it when it joined.
    ahead: usize,
}

impl LineState {
    fn stamp(&mut self) -> i64 {
        self.last = Utc::now().timestamp_micros().max(self.last + 1);
        self.last
    }
}

impl Line {
    /// An arrival stamp: the wall clock in microseconds, later than every stamp before.
    pub fn stamp(&self) -> i64 {
        self.inner.lock().expect("line lock").stamp()
    }

    /// Joins the line of `endpoint` with a new arrival stamp ([`Place::at`]).
    pub fn join(&self, endpoint: &str) -> Place {
        let mut st = self.inner.lock().expect("line lock");
        let at = st.stamp();
        let line = st.endpoints.entry(endpoint.to_string()).or_default();
        let ahead = line.places.len();
        line.places.insert(at);
        Place {
            line: self.clone(),
            endpoint: endpoint.to_string(),
            at,
            ahead,
        }
    }

    /// Whether the first place of `endpoint` is at `at` or later (or there is none),
    /// and what wakes a change, registered under the same lock.
    fn look(&self, endpoint: &str, at: i64) -> Option<Arc<tokio::sync::Notify>> {
        let st = self.inner.lock().expect("line lock");
        let w = st.endpoints.get(endpoint)?;
        match w.places.first() {
            Some(first) if *first < at => Some(w.moved.clone()),
            _ => None,
        }
    }

    /// Waits until every job of `endpoint` stamped before `at` has decided.
    async fn wait_before(&self, endpoint: &str, at: i64) {
        loop {
            let Some(moved) = self.look(endpoint, at) else {
                return;
            };
            let notified = moved.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.look(endpoint, at).is_none() {
                return;
            }
            notified.await;
        }
    }

    /// The stamp of the first job of `endpoint` still deciding (or writing its park), if
    /// any: every job stamped before it has decided and its park, if it parked, is
    /// written. (A job whose park could not be written leaves its place with the error
    /// and parks again when it is tried again; while the database fails, order is kept
    /// as far as the writes that succeed allow.)
    fn first(&self, endpoint: &str) -> Option<i64> {
        let st = self.inner.lock().expect("line lock");
        st.endpoints.get(endpoint)?.places.first().copied()
    }

    /// Waits until no job of `endpoint` stamped before now is still deciding.
    pub async fn clear_before_now(&self, endpoint: &str) {
        let now = self.stamp();
        self.wait_before(endpoint, now).await
    }
}

impl Place {
    /// The job's arrival stamp.
    pub fn at(&self) -> i64 {
        self.at
    }

    /// How many jobs of the endpoint were in line ahead of this one when it joined.
    pub fn ahead(&self) -> usize {
        self.ahead
    }

    /// Waits until every job that arrived before this one has decided.
    pub async fn front(&self) {
        self.line.wait_before(&self.endpoint, self.at).await
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut st = self.line.inner.lock().expect("line lock");
        if let Some(w) = st.endpoints.get_mut(&self.endpoint) {
            w.places.remove(&self.at);
            w.moved.notify_waiters();
            if w.places.is_empty() {
                st.endpoints.remove(&self.endpoint);
            }
        }
    }
}

/// Which endpoints this process parks messages of, and whether it pulls them.
#[derive(Clone, Default)]
pub struct Parking {
    state: Arc<Mutex<HashMap<String, State>>>,
}

#[derive(Default)]
struct State {
    /// Parks being written.
    writing: usize,
    /// A puller runs.
    pulling: bool,
    /// Counts written parks: a puller that found nothing stops only if none was
    /// written since it looked.
    written: u64,
    /// The puller of a fast endpoint has caught up (its last pull took less than a
    /// cap): the job at the front of the endpoint's line waits for it to finish
    /// instead of parking ([`Parking::look`]), so the endpoint can leave parking while
    /// its jobs keep coming.
    closing: bool,
    /// Woken when the endpoint leaves parking.
    ended: Arc<tokio::sync::Notify>,
}

/// Where a job of an endpoint stands against its parked messages.
pub enum Look {
    /// Nothing parked: the job goes its way.
    Free,
    /// Behind parked messages: the job parks.
    Parked,
    /// The puller is finishing (`State::closing`): resolves when it has, for a job
    /// that may wait for that (its endpoint is fast) rather than park.
    Closing(Pin<Box<OwnedNotified>>),
}

/// A park being written; dropping it (written or not) ends it.
pub struct ParkWrite {
    parking: Parking,
    endpoint: String,
}

impl Parking {
    /// Whether the endpoint has parked messages here (or is getting some) and its
    /// puller is not finishing: its new jobs go behind them.
    pub fn is_parked(&self, endpoint: &str) -> bool {
        matches!(self.look(endpoint), Look::Parked)
    }

    /// Where a new job of the endpoint stands ([`Look`]).
    pub fn look(&self, endpoint: &str) -> Look {
        let map = self.state.lock().expect("parking lock");
        match map.get(endpoint) {
            None => Look::Free,
            Some(st) if st.closing => {
                // Registered under the lock, so an end in between still wakes it.
                let mut ended = Box::pin(st.ended.clone().notified_owned());
                ended.as_mut().enable();
                Look::Closing(ended)
            }
            Some(_) => Look::Parked,
        }
    }

    /// The puller says whether it is finishing ([`State::closing`]).
    fn closing(&self, endpoint: &str, closing: bool) {
        let mut map = self.state.lock().expect("parking lock");
        if let Some(st) = map.get_mut(endpoint) {
            st.closing = closing;
        }
    }

    /// Forgets the endpoint's parking, waking the jobs waiting for its end.
    fn end(map: &mut HashMap<String, State>, endpoint: &str) {
        if let Some(st) = map.remove(endpoint) {
            st.ended.notify_waiters();
        }
    }

    /// Starts parking a message of `endpoint`: from now on its new jobs park too.
    pub fn begin(&self, endpoint: &str) -> ParkWrite {
        let mut map = self.state.lock().expect("parking lock");
        map.entry(endpoint.to_string()).or_default().writing += 1;
        ParkWrite {
            parking: self.clone(),
            endpoint: endpoint.to_string(),
        }
    }

    fn writes(&self, endpoint: &str) -> u64 {
        let map = self.state.lock().expect("parking lock");
        map.get(endpoint).map_or(0, |s| s.written)
    }

    /// The puller found nothing parked: it stops (returns true) unless a park was
    /// written since it looked (`written` then).
    fn drained(&self, endpoint: &str, written: u64) -> bool {
        let mut map = self.state.lock().expect("parking lock");
        let Some(st) = map.get_mut(endpoint) else {
            return true;
        };
        if st.written != written {
            return false;
        }
        st.pulling = false;
        if st.writing == 0 {
            Self::end(&mut map, endpoint);
        }
        true
    }

    /// The puller stopped for another reason (the endpoint hangs, or shutting down).
    fn stopped(&self, endpoint: &str) {
        let mut map = self.state.lock().expect("parking lock");
        if let Some(st) = map.get_mut(endpoint) {
            st.pulling = false;
            if st.writing == 0 {
                Self::end(&mut map, endpoint);
            }
        }
    }
}

impl ParkWrite {
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The park is written: returns whether a puller must start (none runs).
    pub fn written(self) -> bool {
        let mut map = self.parking.state.lock().expect("parking lock");
        let st = map.entry(self.endpoint.clone()).or_default();
        st.written += 1;
        !std::mem::replace(&mut st.pulling, true)
    }
}

impl Drop for ParkWrite {
    fn drop(&mut self) {
        let mut map = self.parking.state.lock().expect("parking lock");
        if let Some(st) = map.get_mut(&self.endpoint) {
            st.writing = st.writing.saturating_sub(1);
            if st.writing == 0 && !st.pulling {
                Parking::end(&mut map, &self.endpoint);
            }
        }
    }
}

/// A pulled message and its target as read right after the pull: the messages of a
/// pull wait for their slots with what they need to go.
pub(super) struct Ready {
    pulled: Pulled,
    /// `None`: not read (the read failed; the message reads its own when it goes);
    /// `Some(None)`: the message is gone.
    target: Option<Option<DeliveryTarget>>,
    read_at: Instant,
    /// Until when the pull takes it (`webhook_parked.taken_until`).
    claim: DateTime<Utc>,
}

/// An endpoint's next pull, taken while the last message of the pull before waits for
/// its slot or is being sent. Without it, a freed slot waited for the pull's two round
/// trips to the database after every in-flight cap of messages: an endpoint answering
/// in 50 ms ran at 0.91 of its cap's rate alone, 0.95–0.96 with it.
struct Ahead(tokio::task::JoinHandle<Took>);

/// What a pull took: the count of parks written before it looked (for
/// [`Parking::drained`]), how many it asked for, and the messages.
struct Took {
    written: u64,
    limit: usize,
    rows: Result<Vec<Ready>, sqlx::Error>,
    /// It took nothing, but messages parked at or after its bound wait: the stamp of
    /// the job still deciding that bounded it.
    bounded_by: Option<i64>,
}

impl Took {
    /// A pull that did not run (stopped first, or its task failed), with `rows`: never
    /// full, and looked before any park was written, so nothing is taken for drained
    /// on it.
    fn nothing(rows: Result<Vec<Ready>, sqlx::Error>) -> Self {
        Took {
            written: 0,
            limit: usize::MAX,
            rows,
            bounded_by: None,
        }
    }
}

impl Ahead {
    /// Starts the pull once the jobs of the endpoint that arrived before now have
    /// decided, as the puller's own pulls do; a stop before that takes nothing.
    fn start(deliverer: Deliverer, endpoint: String) -> Self {
        Self(tokio::spawn(async move {
            tokio::select! {
                _ = deliverer.stop.cancelled() => return Took::nothing(Ok(Vec::new())),
                _ = deliverer.line.clear_before_now(&endpoint) => {}
            }
            deliverer.pull_looked(&endpoint).await
        }))
    }

    /// What the pull took (waiting for it to finish).
    async fn taken(self) -> Took {
        self.0.await.unwrap_or_else(|e| {
            Took::nothing(Err(sqlx::Error::Protocol(format!(
                "a parked pull ended: {e}"
            ))))
        })
    }
}

impl Deliverer {
    /// Pulls the parked messages of `endpoint` as its slots free, until none is left,
    /// it hangs, its circuit opens or the process stops.
    pub(super) async fn pull(self, endpoint: String) {
        let mut pulled: VecDeque<Ready> = VecDeque::new();
        let mut closing = false;
        // The next pull, taken while the last of the one before is sent ([`Ahead`]).
        let mut ahead: Option<Ahead> = None;
        // The last pull took all it asked for: more is likely parked.
        let mut full = false;
        // The count of parks written before the last pull looked: if more were written
        // since, more is parked too.
        let mut looked = 0;
        let mut backoff = amqp::reconnect_backoff();
        // When the endpoint's lease was last taken or renewed (by a pull), about.
        let mut last_pull = Instant::now();
        // Set when the endpoint hangs (`None`) or its circuit is open (until when), with
        // the note of the hold, begun as soon as that is seen.
        let mut holding: Option<(Option<Instant>, HoldNote)> = None;
        // Messages whose put-back failed (it may have committed), with their claim.
        let mut unsure: Vec<(Vec<String>, DateTime<Utc>)> = Vec::new();
        loop {
            let stall_after = self.isolation.stall_after(&endpoint, STALLED_AFTER);
            let admission = tokio::select! {
                _ = self.stop.cancelled() => break,
                a = self.isolation.admit_within(&endpoint, STALLED_AFTER, stall_after) => a,
            };
            let permit = match admission {
                Admission::Go(permit) => permit,
                Admission::Busy { stalled_for, .. } if stalled_for < stall_after => {
                    // Behind the endpoint's other waiters: look again shortly.
                    tokio::select! {
                        _ = self.stop.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_millis(5)) => continue,
                    }
                }
                Admission::Busy { seen, .. } => {
                    holding = Some((None, self.isolation.begin_hold_after(&endpoint, seen)));
                    break;
                }
                Admission::Open { until, seen, .. } => {
                    let note = self.isolation.begin_hold_after(&endpoint, seen);
                    holding = Some((Some(until), note));
                    break;
                }
            };
            // Before a pull, jobs that arrived before now and are still deciding (or
            // writing their park) go first: they would take a slot, or park ahead of what
            // the pull takes. Not before sending a message in hand: a job still deciding
            // parks (the endpoint being parked) and is pulled later, so it goes after what
            // is in hand either way. Waiting for it only left the slot empty while a
            // stream of new jobs wrote their parks, tens of milliseconds per slot on a
            // busy machine.
            // Not while finishing: the job at the front of the line then waits for this
            // puller to end (one that gives up parks, in its order, and is pulled).
            if !closing && pulled.is_empty() && ahead.is_none() {
                tokio::select! {
                    _ = self.stop.cancelled() => break,
                    _ = self.line.clear_before_now(&endpoint) => {}
                }
            }
            // A larger pull's messages wait in hand only while they are fresh: once they
            // were read more than [`PUT_BACK_AFTER`] ago (the endpoint slowed down since,
            // or this process is busy), all but a cap of them go back to parking, in their
            // place, and are pulled again at the endpoint's size then. So, much as with a
            // pull of one cap, the next pull (which renews the lease) is at most half a
            // second and a round or two of slots away, and a message goes well before its
            // claim runs out. One whose put-back failed is never sent from here (the put-
            // back may have committed): it is put back again while its claim is this
            // pull's, and otherwise goes when its claim runs out, as after a crash.
            if let Some((ids, claim)) = unsure.last()
                && self.put_back(ids, *claim).await.is_ok()
            {
                unsure.pop();
            }
            let cap = self.isolation.max_in_flight();
            if pulled.len() > cap
                && pulled
                    .front()
                    .is_some_and(|r| r.read_at.elapsed() > PUT_BACK_AFTER)
            {
                let back = pulled.split_off(cap);
                let ids: Vec<String> = back.iter().map(|r| r.pulled.id.clone()).collect();
                if let Some(claim) = back.front().map(|r| r.claim)
                    && let Err(e) = self.put_back(&ids, claim).await
                {
                    tracing::warn!(endpoint, error = %e, "cannot put pulled webhook messages back in parking; trying again");
                    unsure.push((ids, claim));
                }
            }
            if pulled.is_empty() {
                let Took {
                    written,
                    limit,
                    rows,
                    bounded_by,
                } = match ahead.take() {
                    Some(ahead) => ahead.taken().await,
                    None => self.pull_looked(&endpoint).await,
                };
                match rows {
                    Ok(rows) => {
                        backoff = amqp::reconnect_backoff();
                        last_pull = Instant::now();
                        full = rows.len() >= limit;
                        looked = written;
                        // Caught up with a fast endpoint (less than a cap was left): its
                        // next job waits for the end rather than park, so parking can end
                        // while jobs keep coming. Not when messages wait behind a job still
                        // deciding (which then parks at once rather than wait for an end
                        // that cannot come first).
                        closing =
                            rows.len() < cap && bounded_by.is_none() && self.known_fast(&endpoint);
                        self.parking.closing(&endpoint, closing);
                        pulled.extend(rows);
                    }
                    Err(e) => {
                        drop(permit);
                        let wait = backoff.next().unwrap_or(Duration::from_secs(5));
                        tracing::warn!(endpoint, error = %e, retry_in = ?wait, "cannot pull parked webhook messages");
                        tokio::select! {
                            _ = self.stop.cancelled() => break,
                            _ = tokio::time::sleep(wait) => continue,
                        }
                    }
                }
                if pulled.is_empty() {
                    drop(permit);
                    // What is parked waits behind a job still deciding: pulled once it
                    // has (it may park ahead of them).
                    if let Some(first) = bounded_by {
                        tokio::select! {
                            _ = self.stop.cancelled() => break,
                            _ = self.line.wait_before(&endpoint, first.saturating_add(1)) => {}
                        }
                        continue;
                    }
                    if self.parking.drained(&endpoint, written) {
                        return;
                    }
                    continue;
                }
            }
            let Some(next) = pulled.pop_front() else {
                continue;
            };
            // One of the process's requests for pulled messages: however many endpoints
            // have parked backlogs, they share this many at once. Given back once the
            // request is answered, before its record (which may linger).
            let request = tokio::select! {
                _ = self.stop.cancelled() => {
                    pulled.push_front(next);
                    break;
                }
                r = self.pulled_requests.clone().acquire_owned() => r.expect("never closed"),
            };
            let this = self.clone();
            let ep = endpoint.clone();
            self.pullers
                .spawn(async move { this.deliver_pulled(next, ep, permit, request).await });
            let more = full || self.parking.writes(&endpoint) != looked;
            if pulled.is_empty() && more && !closing && self.pulls_ahead(&endpoint) {
                ahead = Some(Ahead::start(self.clone(), endpoint.clone()));
            }
        }
        // What a pull running ahead took is handed back or held with the rest; the
        // endpoint stays parked here until it has finished taking.
        if let Some(ahead) = ahead
            && let Ok(rows) = ahead.taken().await.rows
        {
            pulled.extend(rows);
        }
        self.parking.stopped(&endpoint);
        let give_up_at = hand_back_until(last_pull, &pulled);
        let ids: Vec<String> = pulled.into_iter().map(|r| r.pulled.id).collect();
        self.hand_back(&endpoint, &ids, holding, give_up_at).await;
    }

    /// Hands back what a puller that stops leaves parked and pulled (`ids`, taken and
    /// not attempted). If the endpoint hangs or its circuit is open (`holding`), they
    /// are held, as its jobs would be, until their time or the endpoint's next success.
    /// If the process is stopping, those pulled are due now and the endpoint's lease
    /// ends, so whichever process runs first gives them jobs.
    ///
    /// Tried again until the database answers, so that after a failover they go within
    /// seconds rather than when their claims and the lease run out (half a minute), but
    /// only until `give_up_at` ([`hand_back_until`]): later, what it would hand back may
    /// be another puller's. Not while stopping: the lease ends them then.
    async fn hand_back(
        &self,
        endpoint: &str,
        ids: &[String],
        holding: Option<(Option<Instant>, HoldNote)>,
        give_up_at: Instant,
    ) {
        let open_until = holding.as_ref().map(|(until, _)| *until);
        let done = self
            .until_answered(
                || self.try_hand_back(endpoint, ids, open_until),
                |e, wait| {
                    tracing::warn!(endpoint, error = %e, retry_in = ?wait, "cannot hand back parked webhook messages; trying again");
                },
                give_up_at,
            )
            .await;
        match (done, holding) {
            (Err(e), _) => {
                tracing::warn!(endpoint, error = %e, "cannot hand back parked webhook messages; they go when their lease or hold ends");
            }
            (Ok(n), Some((_, note))) => {
                // Noted once written, so the endpoint's next success parks them; parked
                // at once if it succeeded while they were written (its requests in
                // flight may all have answered then, and no success would follow).
                if note.written() {
                    self.release_held(endpoint);
                }
                tracing::info!(
                    endpoint,
                    messages = n,
                    "endpoint hangs or its circuit is open; holding its parked messages"
                );
            }
            (Ok(_), None) => {}
        }
    }

    /// One try of [`Self::hand_back`]: holds what waits for the endpoint if it is
    /// `open_until` (`Some`: hangs, or its circuit is open until then), else unclaims.
    async fn try_hand_back(
        &self,
        endpoint: &str,
        ids: &[String],
        open_until: Option<Option<Instant>>,
    ) -> Result<u64, sqlx::Error> {
        if self.faults.fails(crate::faults::Point::HandBack) {
            return Err(sqlx::Error::PoolTimedOut);
        }
        let mut conn = self.pool.acquire().await?;
        match open_until {
            Some(open_until) => {
                let until = schedule::hold_until(
                    Instant::now(),
                    schedule::hold_for(0, self.timeout),
                    open_until,
                );
                messages::hold_parked(&mut conn, endpoint, holds::wall_clock(until), ids).await
            }
            None => messages::unclaim(&mut conn, endpoint, ids).await,
        }
    }

    /// Runs `step` until the database answers it, waiting between tries as a broker
    /// reconnect does (`failed` is told each failure and the wait after it). Gives up,
    /// with the last error, when the process stops or a try would start after
    /// `give_up_at`.
    async fn until_answered<T, Fut>(
        &self,
        mut step: impl FnMut() -> Fut,
        failed: impl Fn(&sqlx::Error, Duration),
        give_up_at: Instant,
    ) -> Result<T, sqlx::Error>
    where
        Fut: Future<Output = Result<T, sqlx::Error>>,
    {
        let mut backoff = amqp::reconnect_backoff();
        loop {
            let e = match step().await {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            let wait = backoff.next().unwrap_or(Duration::from_secs(5));
            if self.stop.is_cancelled() || Instant::now() + wait > give_up_at {
                return Err(e);
            }
            failed(&e, wait);
            tokio::select! {
                _ = self.stop.cancelled() => return Err(e),
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Whether the endpoint's next pull may be taken ahead, while the last message of
    /// the one before is sent: its requests answer within
    /// [`super::deliver::PULL_AHEAD_BELOW`], so the targets read with it are still fresh
    /// when their slots free.
    fn pulls_ahead(&self, endpoint: &str) -> bool {
        self.isolation
            .typical(endpoint)
            .is_some_and(|t| t < self.pull_ahead_below)
    }

    /// [`Self::pull_some`] of [`Self::pull_size`] messages, with the count of parks
    /// written before it looked.
    ///
    /// Only messages parked before the first job of the endpoint still deciding here:
    /// that job may yet park, and a later job's park, written first, must not go ahead
    /// of it (a job behind parked messages parks without waiting for the jobs before
    /// it, so parks reach the database in whatever order their writes do). Every job
    /// stamped before it has decided and written its park, so what the pull takes is
    /// in order. (A pull normally waits for the jobs before its time first, but not
    /// while its puller is finishing, nor can it wait for those that arrive while it
    /// looks.)
    async fn pull_looked(&self, endpoint: &str) -> Took {
        let written = self.parking.writes(endpoint);
        let limit = self.pull_size(endpoint);
        let first = self.line.first(endpoint);
        let before = first
            .and_then(DateTime::from_timestamp_micros)
            .unwrap_or(DateTime::<Utc>::MAX_UTC);
        let rows = self.pull_some(endpoint, limit, before).await;
        let bounded_by = match (&rows, first) {
            (Ok(rows), Some(first)) if rows.is_empty() => {
                match self.parked_from(endpoint, before).await {
                    Ok(true) => Some(first),
                    Ok(false) => None,
                    // Unknown: looked at again once that job has decided, rather than
                    // taken for drained.
                    Err(e) => {
                        tracing::warn!(endpoint, error = %e, "cannot look for parked webhook messages");
                        Some(first)
                    }
                }
            }
            _ => None,
        };
        Took {
            written,
            limit,
            rows,
            bounded_by,
        }
    }

    /// Whether the endpoint has messages parked at or after `from`.
    async fn parked_from(&self, endpoint: &str, from: DateTime<Utc>) -> Result<bool, sqlx::Error> {
        let mut conn = self.pool.acquire().await?;
        messages::parked_from(&mut conn, endpoint, from).await
    }

    /// How many parked messages of the endpoint one pull takes: an in-flight cap, or
    /// for an endpoint that answers quickly as many caps as it typically answers in
    /// [`PULL_SPAN`] (at most [`PULL_CAPS`] and [`PULL_MOST`]). Each pull costs two
    /// statements, so pulling a cap at a time spent most of a quick endpoint's database
    /// work on the pulls; the targets read with a pull are then typically about
    /// `PULL_SPAN` old at most when sent, well within the [`BUSY_WAIT`] they are trusted
    /// for (should the endpoint slow down, what is left of the pull after that is put
    /// back).
    fn pull_size(&self, endpoint: &str) -> usize {
        let cap = self.isolation.max_in_flight();
        let caps = self
            .isolation
            .typical(endpoint)
            .map_or(1, |t| PULL_SPAN.as_nanos() / t.as_nanos().max(1));
        let caps = usize::try_from(caps)
            .unwrap_or(PULL_CAPS)
            .clamp(1, PULL_CAPS);
        cap.saturating_mul(caps).min(PULL_MOST).max(cap)
    }

    /// Takes up to `limit` of the endpoint's messages parked before `before`, and reads
    /// their targets.
    async fn pull_some(
        &self,
        endpoint: &str,
        limit: usize,
        before: DateTime<Utc>,
    ) -> Result<Vec<Ready>, sqlx::Error> {
        let now = Utc::now();
        // Long enough for a pulled message to wait for its slot and be sent: it must not
        // be released to the broker while its attempt runs. The messages of a larger pull
        // wait in hand about half a second at most beyond a cap's turn (the puller puts
        // back what is left of it then), so this holds for any pull size.
        let claim = lease_until(now)
            + chrono::Duration::from_std(self.timeout.saturating_mul(2) + BUSY_WAIT)
                .unwrap_or_default();
        let mut conn = self.pool.acquire().await?;
        let pulled = messages::pull_parked(
            &mut conn,
            endpoint,
            i64::try_from(limit).unwrap_or(i64::MAX),
            before,
            claim,
            lease_until(now),
        )
        .await?;
        if pulled.is_empty() {
            return Ok(Vec::new());
        }
        // The pull is committed: a failed read must not lose what it took, so each
        // message then reads its own when its slot frees.
        let ids: Vec<String> = pulled.iter().map(|p| p.id.clone()).collect();
        let mut targets: Option<HashMap<String, DeliveryTarget>> = match self
            .read_pulled(&mut conn, &ids)
            .await
        {
            Ok(read) => Some(read.into_iter().map(|t| (t.id.clone(), t)).collect()),
            Err(e) => {
                tracing::warn!(endpoint, error = %e, "cannot read pulled webhook messages; each reads its own");
                None
            }
        };
        let read_at = Instant::now();
        Ok(pulled
            .into_iter()
            .map(|p| Ready {
                claim,
                target: targets.as_mut().map(|t| t.remove(&p.id)),
                pulled: p,
                read_at,
            })
            .collect())
    }

    /// Puts messages pulled and not sent back in parking, where they were, while they are
    /// still held by the pull that took them (until `claim`).
    async fn put_back(&self, ids: &[String], claim: DateTime<Utc>) -> Result<(), sqlx::Error> {
        let mut conn = self.pool.acquire().await?;
        let n = messages::put_back(&mut conn, ids, claim).await?;
        self.metrics
            .webhook_attempts
            .get_or_create(&vec![("outcome", "put_back".to_string())])
            .inc_by(n);
        if self.faults.fails(crate::faults::Point::PutBackAnswer) {
            return Err(sqlx::Error::Protocol(
                "the put-back's answer was lost".into(),
            ));
        }
        Ok(())
    }

    /// The targets of messages just pulled.
    async fn read_pulled(
        &self,
        conn: &mut sqlx::PgConnection,
        ids: &[String],
    ) -> Result<Vec<DeliveryTarget>, sqlx::Error> {
        if self.faults.fails(crate::faults::Point::PulledRead) {
            return Err(sqlx::Error::PoolTimedOut);
        }
        messages::targets(conn, ids).await
    }

    /// Attempts one pulled message with the slot taken for it. A retry is held in the
    /// database with the attempt's record; a database failure before the record makes
    /// the message due again once the database answers (the hold releaser gives it a
    /// job), and if even that fails it stays held until its claim runs out.
    ///
    /// The target read with the pull is used if it is at most [`BUSY_WAIT`] old (as a
    /// job's may be after waiting for its rate limit's turn), so a change to the
    /// endpoint applies to its parked messages within that; else it is read again.
    async fn deliver_pulled(
        self,
        ready: Ready,
        endpoint: String,
        permit: Permit,
        request: OwnedSemaphorePermit,
    ) {
        let Ready {
            pulled: p,
            target,
            read_at,
            claim,
        } = ready;
        let read = target.filter(|_| read_at.elapsed() <= BUSY_WAIT);
        let job = Job {
            message_id: p.id,
            endpoint_id: Some(endpoint),
            attempt: u32::try_from(p.held_attempt).unwrap_or(0),
            holds: u32::try_from(p.hold_count).unwrap_or(0),
        };
        self.metrics
            .webhook_attempts
            .get_or_create(&vec![("outcome", "pulled".to_string())])
            .inc();
        // No wait for a rate limit's turn while holding a slot: held until the turn.
        let outcome = match self.prepare(&job, read, Duration::ZERO).await {
            Ok(Ok(target)) => {
                self.attempt(&job, target, permit, &mut None, Some(request))
                    .await
            }
            Ok(Err(outcome)) => Ok(outcome),
            Err(e) => Err(e),
        };
        match outcome {
            // Only an attempt gives up: the one after the job's.
            Ok(Outcome::DeadLetter { code, reason }) => {
                self.dead_letter(&job, code, &reason, job.attempt + 1).await
            }
            // Delivered, or held for its retry by its record.
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(webhook_message_id = job.message_id, error = %e, "a pulled webhook message failed before its record; it goes again once the database answers");
                self.due_again(&job.message_id, claim).await;
            }
        }
    }

    /// Makes a pulled message whose attempt failed on the database due at once, as
    /// soon as the database answers again, rather than when its claim runs out (a
    /// minute): after a database failover it goes within seconds. Gives up when the
    /// process stops, or shortly before its `claim` runs out (the hold releaser gives it
    /// a job then, and a late try could end another puller's claim).
    async fn due_again(&self, message_id: &str, claim: DateTime<Utc>) {
        let ids = [message_id.to_string()];
        let give_up_at = short_of(holds::instant_of(claim));
        let _ = self
            .until_answered(
                || async {
                    let mut conn = self.pool.acquire().await?;
                    messages::due_now(&mut conn, &ids).await
                },
                |e, wait| {
                    tracing::debug!(webhook_message_id = message_id, error = %e, retry_in = ?wait, "cannot make a pulled message due yet");
                },
                give_up_at,
            )
            .await;
    }

    /// Parks a pulled message that gave up in the dead queue, as its job would be. It is
    /// `failed` in the database already (and can be replayed from there); this only
    /// tells ops, so a broker that cannot take it is logged, not retried.
    async fn dead_letter(&self, job: &Job, code: &'static str, reason: &str, attempt: u32) {
        tracing::warn!(webhook_message_id = job.message_id, code, %reason, "webhook message failed; parking it");
        let names = self.broker.names();
        let work = names.webhooks();
        let body = serde_json::json!({
            "webhook_message_id": job.message_id,
            "endpoint_id": job.endpoint_id,
        })
        .to_string();
        let out = Outgoing::parked(
            names,
            &work,
            &job.message_id,
            body.as_bytes(),
            FieldTable::default(),
            code,
            reason,
        )
        .header(ATTEMPT_HEADER, AMQPValue::LongLongInt(attempt.into()));
        let published = match self.broker.confirm_channel(&self.stop).await {
            Ok(ch) => {
                let r = amqp::publish_confirmed(&ch, &[out]).await;
                let _ = ch.close(200, "bye".into()).await;
                r
            }
            Err(e) => Err(e),
        };
        if let Err(e) = published {
            tracing::warn!(webhook_message_id = job.message_id, error = %e, "cannot park a failed webhook message in the dead queue; it stays failed in the database");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_puller_starts_once_and_stops_only_when_nothing_was_parked_since_it_looked() {
        let p = Parking::default();
        assert!(!p.is_parked("ep_1"));
        let first = p.begin("ep_1");
        // New jobs go behind a park being written.
        assert!(p.is_parked("ep_1"));
        assert!(first.written(), "the first park starts a puller");
        assert!(!p.begin("ep_1").written(), "one puller per endpoint");
        let seen = p.writes("ep_1");
        let late = p.begin("ep_1");
        assert!(!late.written());
        assert!(!p.drained("ep_1", seen), "a park came in after the look");
        let seen = p.writes("ep_1");
        assert!(p.drained("ep_1", seen));
        assert!(!p.is_parked("ep_1"), "forgotten once drained");
        // A park written after the puller stopped starts another.
        assert!(p.begin("ep_1").written());
        p.stopped("ep_1");
        assert!(!p.is_parked("ep_1"));
    }

    #[tokio::test]
    async fn a_finishing_puller_lets_the_next_job_wait_for_the_end_of_parking() {
        let p = Parking::default();
        assert!(matches!(p.look("ep_1"), Look::Free));
        assert!(p.begin("ep_1").written());
        assert!(matches!(p.look("ep_1"), Look::Parked));
        p.closing("ep_1", true);
        assert!(
            !p.is_parked("ep_1"),
            "a new job may wait instead of parking"
        );
        let Look::Closing(ended) = p.look("ep_1") else {
            panic!("the puller is finishing");
        };
        let seen = p.writes("ep_1");
        assert!(p.drained("ep_1", seen));
        tokio::time::timeout(std::time::Duration::from_secs(1), ended)
            .await
            .expect("woken when parking ends");
        assert!(matches!(p.look("ep_1"), Look::Free));
        // A full pull again: new jobs park.
        assert!(p.begin("ep_1").written());
        p.closing("ep_1", true);
        p.closing("ep_1", false);
        assert!(p.is_parked("ep_1"));
    }

    #[tokio::test]
    async fn a_job_decides_after_those_of_its_endpoint_that_arrived_before_it() {
        let line = Line::default();
        let first = line.join("ep_1");
        let second = line.join("ep_1");
        assert_eq!((first.ahead(), second.ahead()), (0, 1));
        assert!(first.at() < second.at());
        let other = line.join("ep_2");
        // Another endpoint's jobs do not wait.
        tokio::time::timeout(std::time::Duration::from_secs(1), other.front())
            .await
            .expect("first of its own line");
        let waiting = tokio::spawn(async move {
            second.front().await;
            second
        });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!waiting.is_finished(), "the second waits for the first");
        first.front().await;
        drop(first);
        let second = tokio::time::timeout(std::time::Duration::from_secs(1), waiting)
            .await
            .expect("on once the first has decided")
            .unwrap();
        drop(second);
        assert!(!line.inner.lock().unwrap().endpoints.contains_key("ep_1"));
    }

    #[test]
    fn a_park_that_fails_to_be_written_is_forgotten() {
        let p = Parking::default();
        drop(p.begin("ep_1"));
        assert!(!p.is_parked("ep_1"));
        // While one is being written, a stopped puller keeps the endpoint parked.
        let writing = p.begin("ep_2");
        p.stopped("ep_2");
        assert!(p.is_parked("ep_2"));
        drop(writing);
        assert!(!p.is_parked("ep_2"));
    }
}
