//! Delivery workers: competing consumers of `<prefix>.webhooks`, each job one message
//! for one endpoint. Up to `webhooks.workers` jobs run at once per process; a job whose
//! request has taken longer than [`STALLED_AFTER`] stops counting (its endpoint's
//! in-flight cap bounds those), so a slow or hanging endpoint does not take workers
//! from the others, and so does one whose business's requests hold its share of the
//! workers already ([`Shares`]: a quarter), so one business's endpoints do not take
//! them from other businesses. The prefetch is twice the workers, to hold such jobs
//! too.
//!
//! Per job: read the message and its endpoint (grouped with other workers' reads into
//! one query, [`super::reader`]), take a turn of the endpoint's `rate_limit` if it has
//! one ([`Pacing`]: waiting briefly, or holding the message until a later turn), wait
//! until the endpoint's jobs that arrived before it have decided ([`Line`]), ask
//! [`Isolation`] for a slot of the endpoint (waiting briefly only for a fast endpoint;
//! a busy one's message is parked in the database and sent by the endpoint's puller as
//! its slots free, [`parking`]; a hanging one's is held), POST the exact stored body
//! signed per attempt (redirects not followed, `webhooks.timeout`), record the attempt
//! and the message's new state (grouped with other workers' records into one
//! statement, [`super::recorder`]), and only then settle the job: ack, publish it to the
//! retry tier of the next delay (confirmed) and ack, or park it in
//! `<prefix>.webhooks.dead` and ack.
//! A crash before the record leaves the job unacked, so the broker redelivers it and the
//! same `webhook-id` is sent again: receivers deduplicate on it.
//!
//! A database outage holds the job and retries it (possibly sending again once the
//! database is back): it never fails or dead-letters a message.

use std::num::NonZeroU32;
use std::sync::Arc;

use std::time::{Duration, Instant};

use std::borrow::Cow;

use chrono::{DateTime, Utc};
use serde::Deserialize;
use sqlx::PgPool;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::holds;
use super::isolation::{Admission, GoneNote, HoldNote, Isolation, IsolationSettings, STALL_FACTOR};
use super::pacing::{Pace, Pacing};
use super::parking::{self, Line, Look, ParkWrite, Parking, Place};
use super::reader::{ReadError, Reader};
use super::recorder::{RecordError, Recorder};
use super::schedule::{self, AttemptResult, GiveUpReason, Next};
use super::signing::{Secret, signature_header};
use super::ssrf::{self, GuardedResolver, TargetPolicy};
use crate::amqp::{Broker, Names};
use crate::config::WebhookSettings;
use crate::metrics::Metrics;
use crate::queue::{self, Outcome};
use crate::shares::Shares;
use crate::store::messages::{
    self, AttemptRecord, DeliveryTarget, Held, NewStatus, Parked, Recorded,
};

/// Consecutive failures after which an endpoint is short-circuited.
pub const BREAKER_THRESHOLD: u32 = 5;
/// How long a short-circuited endpoint is left alone.
pub const BREAKER_COOL_DOWN: Duration = Duration::from_secs(30);
/// An endpoint at its cap with no request finished for this long at most is taken to
/// hang (sooner or later as its requests usually answer: [`Isolation::stall_after`]): its
/// other messages are held in the database until the requests in flight have ended
/// ([`schedule::hold_for`]), instead of cycling through the broker. A request running
/// this long gives its worker slot back.
pub const STALLED_AFTER: Duration = Duration::from_secs(1);
/// How long a job waits in the process for its turn of its endpoint's `rate_limit`
/// before its message is held until that turn.
pub const BUSY_WAIT: Duration = Duration::from_secs(1);
/// An endpoint at its cap whose requests typically answer faster than this (or none of
/// whose requests has answered yet) is waited for, this long at most; a slower one's
/// jobs are parked at once ([`parking`]).
pub const FAST: Duration = Duration::from_millis(25);
/// How much of an answer is kept with its attempt.
const RESPONSE_BYTES: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum DeliverError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("reading: {0}")]
    Read(#[from] ReadError),
    #[error("recording: {0}")]
    Record(#[from] RecordError),
    #[error("stopped between sending and recording (fault injection)")]
    Injected,
}

/// One delivery job: a message id, its endpoint (so a busy or paused endpoint is
/// recognised before any database work) and how many attempts this round has made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Job {
    pub message_id: String,
    pub endpoint_id: Option<String>,
    pub attempt: u32,
    /// How often its message was held since its last attempt.
    pub holds: u32,
}

impl Job {
    /// Reads a job from its body (`{"webhook_message_id": …}`; a job of a released
    /// message also carries `attempt` and `holds`), falling back to the AMQP
    /// `message_id`, and the attempt header (absent: the body's, else a first attempt).
    pub fn from_parts(body: &[u8], message_id: Option<&str>, attempt: Option<i64>) -> Option<Self> {
        #[derive(Deserialize)]
        struct Raw {
            webhook_message_id: String,
            endpoint_id: Option<String>,
            attempt: Option<i64>,
            holds: Option<i64>,
        }
        let raw = serde_json::from_slice::<Raw>(body).ok();
        let endpoint_id = raw.as_ref().and_then(|r| r.endpoint_id.clone());
        let attempt = attempt.or(raw.as_ref().and_then(|r| r.attempt));
        let holds = raw.as_ref().and_then(|r| r.holds).unwrap_or(0);
        let id = raw
            .map(|r| r.webhook_message_id)
            .or_else(|| message_id.map(str::to_string))
            .filter(|id| id.starts_with("msg_") && id.len() <= 64)?;
        Some(Self {
            message_id: id,
            endpoint_id: endpoint_id.filter(|e| e.len() <= 64),
            attempt: attempt.unwrap_or(0).clamp(0, 1000) as u32,
            holds: holds.clamp(0, 1000) as u32,
        })
    }

    /// Reads a job from a queue job (a header count of zero or none: the body's).
    fn of(job: &queue::Job) -> Option<Self> {
        let header = (job.attempt > 0).then_some(i64::from(job.attempt));
        Self::from_parts(&job.body, job.message_id.as_deref(), header)
    }
}

/// What came back from one POST.
#[derive(Clone, Debug, Default)]
struct Sent {
    status: Option<u16>,
    retry_after: Option<Duration>,
    error: Option<String>,
    response: Option<String>,
    latency: Duration,
}

/// The delivery workers of one process.
#[derive(Clone)]
pub struct Deliverer {
    pub pool: PgPool,
    pub broker: Broker,
    pub client: reqwest::Client,
    pub policy: TargetPolicy,
    pub retry_delays: Vec<Duration>,
    pub timeout: Duration,
    pub workers: usize,
    pub isolation: Isolation,
    /// The endpoints' `rate_limit`s.
    pub pacing: Pacing,
    pub reader: Reader,
    pub recorder: Recorder<Recorded>,
    /// The group writer of holds: its own, so holds never slow the records' statements.
    pub holder: Recorder<Held>,
    /// The group writer of parks, and which endpoints have parked messages here.
    pub parker: Recorder<Parked>,
    pub parking: Parking,
    /// The pullers of parked messages and their deliveries, awaited on shutdown.
    pub pullers: TaskTracker,
    /// Cancelled when the process stops (by [`Deliverer::run`]'s `shutdown`), in every
    /// copy of the deliverer.
    pub stop: CancellationToken,
    /// Requests for pulled messages at once, over every endpoint (4 × the workers).
    pub(super) pulled_requests: Arc<Semaphore>,
    /// The jobs in hand per endpoint, in the order they decide.
    pub(super) line: Line,
    /// The worker slots each business's requests hold.
    pub shares: Shares,
    pub metrics: Arc<Metrics>,
    /// Where tests make a delivery stop after sending and before recording, as a crash
    /// would ([`crate::faults::Point::AfterSend`]), or the read of pulled messages fail
    /// ([`crate::faults::Point::PulledRead`]).
    pub(super) faults: crate::faults::SharedFaults,
    /// An endpoint whose requests typically answer faster than this has its next pull
    /// taken ahead ([`PULL_AHEAD_BELOW`] in service).
    pub(super) pull_ahead_below: Duration,
}

/// An endpoint whose requests typically answer within this has its next pull taken
/// while the last message of the one before is sent: well within [`BUSY_WAIT`], so the
/// targets read with it are still fresh when their slots free.
pub const PULL_AHEAD_BELOW: Duration = Duration::from_nanos(BUSY_WAIT.as_nanos() as u64 / 2);

/// The HTTP client every delivery uses: no redirects, no proxy (it would bypass the
/// SSRF guard), the guarded resolver, the configured timeout for the whole exchange.
pub fn http_client(
    timeout: Duration,
    policy: TargetPolicy,
) -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(10)))
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .dns_resolver(GuardedResolver { policy })
        .user_agent(concat!("guildgate-webhooks/", env!("CARGO_PKG_VERSION")))
        .pool_max_idle_per_host(64)
        .build()
}

impl Deliverer {
    pub fn new(
        pool: PgPool,
        broker: Broker,
        settings: &WebhookSettings,
        metrics: Arc<Metrics>,
    ) -> Result<Self, reqwest::Error> {
        let policy = TargetPolicy {
            allow_private: settings.allow_private_targets,
        };
        Ok(Self {
            pool: pool.clone(),
            broker,
            client: http_client(settings.timeout, policy)?,
            policy,
            retry_delays: settings.retry_delays.clone(),
            timeout: settings.timeout,
            workers: settings.workers.max(1),
            isolation: Isolation::new(IsolationSettings {
                max_in_flight: settings.max_in_flight_per_endpoint.max(1),
                threshold: BREAKER_THRESHOLD,
                cool_down: BREAKER_COOL_DOWN,
                stall_factor: STALL_FACTOR,
            }),
            // As many may wait for a turn as for a slot of a busy endpoint.
            pacing: Pacing::new(settings.max_in_flight_per_endpoint.max(1)),
            reader: Reader::spawn(pool.clone(), 256),
            recorder: Recorder::spawn_lingering(pool.clone(), 256, settings.record_linger),
            holder: Recorder::spawn(pool.clone(), 256),
            parker: Recorder::spawn(pool.clone(), 256),
            parking: Parking::default(),
            pullers: TaskTracker::new(),
            stop: CancellationToken::new(),
            pulled_requests: Arc::new(Semaphore::new(settings.workers.max(1).saturating_mul(4))),
            line: Line::default(),
            shares: Shares::of_workers(settings.workers.max(1)),
            metrics,
            faults: crate::faults::none(),
            pull_ahead_below: PULL_AHEAD_BELOW,
        })
    }

    /// The same deliverer, failing where `faults` says (tests).
    pub fn with_faults(mut self, faults: crate::faults::SharedFaults) -> Self {
        self.faults = faults;
        self
    }

    /// The same deliverer, taking an endpoint at its cap for hanging only after `factor`
    /// times its typical latency without an answer (tests that hold requests up while
    /// they look, which takes longer on a busy machine). Its isolation starts afresh:
    /// call it before the deliverer runs and before anything shares that (the fan-out
    /// of the process's app does).
    pub fn with_stall_factor(mut self, factor: u32) -> Self {
        self.isolation = Isolation::new(IsolationSettings {
            stall_factor: factor,
            ..self.isolation.settings()
        });
        self
    }

    /// The same deliverer, taking an endpoint's next pull ahead while its requests
    /// typically answer within `below` (tests whose held requests count in that).
    pub fn with_pull_ahead_below(mut self, below: Duration) -> Self {
        self.pull_ahead_below = below;
        self
    }

    /// The time a job arrived: the wall clock, but later than every arrival before it in
    /// this process (by a microsecond at least, the database's resolution), so parked
    /// messages keep the order of their jobs.
    pub fn arrival(&self) -> DateTime<Utc> {
        DateTime::from_timestamp_micros(self.line.stamp()).unwrap_or_else(Utc::now)
    }

    /// The jobs of each endpoint in this process's hands that are still deciding
    /// whether to send, park or hold ([`Line`]). For tests: a place held in it holds
    /// up the endpoint's puller.
    #[doc(hidden)]
    pub fn line(&self) -> &Line {
        &self.line
    }

    /// Handles one job up to the point of settling it.
    #[tracing::instrument(
        name = "webhook_delivery",
        skip_all,
        fields(webhook_message_id = %job.message_id, attempt = job.attempt)
    )]
    pub async fn handle(&self, job: &Job) -> Result<Outcome, DeliverError> {
        self.handle_in(job, self.arrival(), &mut None, &mut None)
            .await
    }

    /// [`Deliverer::handle`] for a job that holds a worker slot: a request that takes
    /// longer than [`STALLED_AFTER`] gives the slot back, so requests to a slow or
    /// hanging endpoint (at most its in-flight cap of them) do not keep workers from
    /// the other endpoints.
    ///
    /// `place`: the job's place in its endpoint's [`Line`], left once it has decided.
    async fn handle_in(
        &self,
        job: &Job,
        arrived: DateTime<Utc>,
        place: &mut Option<Place>,
        slot: &mut Option<OwnedSemaphorePermit>,
    ) -> Result<Outcome, DeliverError> {
        // Look first when the job names its endpoint: holding a job of a hanging
        // endpoint then costs no read. Only a look: a slot is taken after the read, so it
        // is held for the request alone, not while the read waits for the database.
        if let Some(ep) = job.endpoint_id.as_deref()
            && let Some(note) = self
                .isolation
                .hold_if_stalled(ep, Instant::now(), STALLED_AFTER)
        {
            place.take();
            return self.hold(job, ep, None, note).await;
        }
        // Behind the endpoint's parked messages, so first attempts keep their order; and
        // parked at once when an in-flight cap of its jobs is ahead of this one here
        // already, unless it is known to be fast (those decide first: they would park
        // too, or take the slots; a fast endpoint's free in milliseconds, and waiting in
        // line for one that has not answered yet could hold many workers).
        if let Some(ep) = job.endpoint_id.as_deref()
            && (self.parking.is_parked(ep)
                || (place
                    .as_ref()
                    .is_some_and(|p| p.ahead() >= self.isolation.max_in_flight())
                    && !self.known_fast(ep)))
        {
            // The place is left once the park is written (by the caller): a puller
            // waits for the parks of the jobs before its time, so it pulls them in order.
            let write = self.parking.begin(ep);
            return self.park_begun(job, write, arrived).await;
        }
        let target = match self.target(job).await? {
            Ok(target) => target,
            Err(outcome) => {
                place.take();
                return Ok(outcome);
            }
        };
        // A job of a rate-limited endpoint may wait for its turn up to `BUSY_WAIT`, and
        // the jobs behind it in line for it, each holding its worker: those waits count
        // against the business's share of the workers as its requests do. With the share
        // full, a job waits for nothing: behind others in line it is held until a time
        // booked after the turns they may take (a hold releaser's round apart, so these
        // come back one at a time and each finds the front of its line), at the front it
        // goes if its turn is free now and is held until a booked time otherwise.
        let rate = paced(&target);
        let share = match (&slot, rate) {
            (Some(_), Some(_)) => Some(self.shares.take(&target.business_id)),
            _ => None,
        };
        let over_share = matches!(share, Some(None));
        if over_share
            && place.as_ref().is_some_and(|p| p.ahead() > 0)
            && let Some(per_second) = rate
        {
            let at = self
                .pacing
                .book(&target.endpoint_id, per_second, BUSY_WAIT, holds::INTERVAL);
            place.take();
            return self.hold_until(job, at).await;
        }
        if let Some(p) = place.as_ref() {
            p.front().await;
        }
        let pace_wait = if over_share {
            Duration::ZERO
        } else {
            BUSY_WAIT
        };
        let turn = self.pace(job, &target, pace_wait).await?;
        drop(share);
        if let Some(outcome) = turn {
            place.take();
            return Ok(outcome);
        }
        let ep = target.endpoint_id.clone();
        // What "hanging" means for this endpoint, from its typical latency now.
        let stall_after = self.isolation.stall_after(&ep, STALLED_AFTER);
        // Behind parked messages; else a slot if one is free. The slot of an endpoint
        // not known to be slow is waited for briefly (a fast one's frees within
        // milliseconds, and waiting costs less than parking); a slow one's never (a
        // waiting job would hold a worker, and the jobs behind it in line): the message
        // of a busy endpoint is parked, that of a hanging one held.
        let admission = if self.behind_parked(&ep).await {
            None
        } else if self.waits_for_slots(&ep) {
            Some(self.isolation.admit_within(&ep, FAST, stall_after).await)
        } else {
            Some(self.isolation.admit(&ep, Instant::now()))
        };
        match admission {
            Some(Admission::Go(permit)) => {
                place.take();
                self.attempt(job, target, permit, slot, None).await
            }
            Some(Admission::Open {
                failures,
                until,
                seen,
            }) => {
                place.take();
                tracing::debug!(failures, "circuit open; holding the message");
                let note = self.isolation.begin_hold_after(&ep, seen);
                self.hold(job, &ep, Some(until), note).await
            }
            Some(Admission::Busy { stalled_for, seen }) if stalled_for >= stall_after => {
                place.take();
                let note = self.isolation.begin_hold_after(&ep, seen);
                self.hold(job, &ep, None, note).await
            }
            // At its cap and answering, or behind parked messages. Marked parked at
            // once, so the jobs behind it park too; the place is left once the park is
            // written (by the caller), so a puller pulls the parks in order.
            _ => {
                let write = self.parking.begin(&ep);
                self.park_begun(job, write, arrived).await
            }
        }
    }

    /// Whether a job at the front of its endpoint's line goes behind parked messages. If
    /// the endpoint's puller is finishing (it has caught up with a fast endpoint), the
    /// job waits for it, up to [`FAST`], rather than park and keep the endpoint parked.
    async fn behind_parked(&self, endpoint: &str) -> bool {
        match self.parking.look(endpoint) {
            Look::Free => false,
            Look::Parked => true,
            Look::Closing(ended) => {
                let _ = tokio::time::timeout(FAST, ended).await;
                !matches!(self.parking.look(endpoint), Look::Free)
            }
        }
    }

    /// Whether a job waits (up to [`FAST`]) for a slot of the endpoint at its cap: unless
    /// its requests typically take [`FAST`] or longer.
    fn waits_for_slots(&self, endpoint: &str) -> bool {
        self.isolation.typical(endpoint).is_none_or(|t| t < FAST)
    }

    /// Whether the endpoint's requests typically answer within [`FAST`].
    pub(super) fn known_fast(&self, endpoint: &str) -> bool {
        self.isolation.typical(endpoint).is_some_and(|t| t < FAST)
    }

    /// Checks the job's message and its endpoint, as read (`read`) or read now, and takes
    /// a turn of the endpoint's rate limit: the target to send to, or what to do with a
    /// job that needs no attempt.
    ///
    /// `pace_wait`: how long to wait for a turn of the rate limit before holding.
    pub(super) async fn prepare(
        &self,
        job: &Job,
        read: Option<Option<DeliveryTarget>>,
        pace_wait: Duration,
    ) -> Result<Result<DeliveryTarget, Outcome>, DeliverError> {
        let checked = match read {
            Some(read) => self.checked(read).await?,
            None => self.target(job).await?,
        };
        let target = match checked {
            Ok(target) => target,
            Err(outcome) => return Ok(Err(outcome)),
        };
        Ok(match self.pace(job, &target, pace_wait).await? {
            Some(outcome) => Err(outcome),
            None => Ok(target),
        })
    }

    /// Reads the job's message and its endpoint: the target to send to, or what to do
    /// with a job that needs no attempt.
    async fn target(&self, job: &Job) -> Result<Result<DeliveryTarget, Outcome>, DeliverError> {
        let read = self.reader.target(&job.message_id).await?;
        self.checked(read).await
    }

    /// What a message and its endpoint as read (`None`: the message is gone) mean: the
    /// target to send to, or what to do with a job that needs no attempt.
    async fn checked(
        &self,
        read: Option<DeliveryTarget>,
    ) -> Result<Result<DeliveryTarget, Outcome>, DeliverError> {
        let Some(target) = read else {
            // Its endpoint was deleted, with its messages.
            return Ok(Err(Outcome::Ack("unknown_message")));
        };
        if target.status != "pending" {
            // A duplicate job of a message already settled.
            return Ok(Err(Outcome::Ack("not_pending")));
        }
        if target.disabled {
            let mut conn = self.pool.acquire().await?;
            messages::fail_unattempted(&mut conn, &target.id, "the endpoint is disabled").await?;
            return Ok(Err(Outcome::Ack("endpoint_disabled")));
        }
        Ok(Ok(target))
    }

    /// Takes a turn of the target endpoint's rate limit, if it has one: `None` to send
    /// now, or the outcome of holding the message until its turn.
    ///
    /// The rate limit before the slot: a job waiting for its turn must not hold one of
    /// the endpoint's in-flight slots, or a paced endpoint would look hung. A turn taken
    /// by a job that then finds no slot goes unused: the rate only gets lower. A job in
    /// the endpoint's line takes its turn once it is at the front, so turns are used in
    /// the order of the line: a turn taken early by a job that then waited behind others
    /// would let it go out together with them.
    async fn pace(
        &self,
        job: &Job,
        target: &DeliveryTarget,
        pace_wait: Duration,
    ) -> Result<Option<Outcome>, DeliverError> {
        if let Some(per_second) = paced(target)
            && let Pace::HoldUntil(at) = self
                .pacing
                .turn(&target.endpoint_id, per_second, pace_wait)
                .await
        {
            return self.hold_until(job, at).await.map(Some);
        }
        Ok(None)
    }

    /// One attempt with a slot of the endpoint: send, record, and what to do with the
    /// job. `pulled`: the message came out of parking and has no job in the broker, so
    /// a retry is held in the database with the attempt's record, and its record may
    /// wait for company ([`Recorder::record_patient`]); it carries the process's request
    /// for it ([`Deliverer::pulled_requests`]), given back once answered.
    pub(super) async fn attempt(
        &self,
        job: &Job,
        target: DeliveryTarget,
        permit: super::isolation::Permit,
        slot: &mut Option<OwnedSemaphorePermit>,
        pulled: Option<OwnedSemaphorePermit>,
    ) -> Result<Outcome, DeliverError> {
        // The endpoint answered 410 Gone lately (waited for while it is recorded), and
        // this target may have been read before: read it again, so that nothing more goes
        // to an endpoint that asked for nothing more (it is disabled now, unless enabled
        // again since).
        let target = if self.isolation.gone(&target.endpoint_id).await {
            match self.target(job).await? {
                Ok(target) => target,
                Err(outcome) => return Ok(outcome),
            }
        } else {
            target
        };
        let attempt = job.attempt + 1;
        let at = Utc::now();
        let sent = self.send_in_slot(&target, slot).await;
        // A pulled message's request is answered: the next may go while it is recorded.
        // What waits for its record is bounded by what the pulls took, as pulls and
        // records go to the same database.
        let pulled = match pulled {
            Some(request) => {
                drop(request);
                true
            }
            None => false,
        };
        let (result, gone) = self.judge(&target, &sent, permit);
        if self.faults.fails(crate::faults::Point::AfterSend) {
            return Err(DeliverError::Injected);
        }
        let next = schedule::next(attempt, &result, &self.retry_delays);
        let why = match next {
            Next::Delivered => String::new(),
            _ => failure(&sent),
        };
        self.record(&target, attempt, at, sent, &next, pulled)
            .await?;
        if let Some(gone) = gone {
            gone.recorded(Instant::now());
        }
        Ok(outcome(next, attempt, &why))
    }

    /// Sends, giving the worker slot back once the request has taken
    /// [`STALLED_AFTER`], or at once if the endpoint's business holds its share of the
    /// workers already ([`Shares`]).
    async fn send_in_slot(
        &self,
        target: &DeliveryTarget,
        slot: &mut Option<OwnedSemaphorePermit>,
    ) -> Sent {
        let mut share = slot
            .as_ref()
            .and_then(|_| self.shares.take(&target.business_id));
        if share.is_none() {
            slot.take();
        }
        let send = self.send(target);
        tokio::pin!(send);
        tokio::select! {
            biased;
            sent = &mut send => sent,
            _ = tokio::time::sleep(STALLED_AFTER), if slot.is_some() => {
                slot.take();
                share.take();
                send.await
            }
        }
    }

    /// What an answer means, told to the endpoint's circuit (releasing its held
    /// messages once it answers again) and counted. A 410 Gone is noted before its slot
    /// is given back, so that no request of the endpoint goes out until it is recorded
    /// (the note says when).
    fn judge(
        &self,
        target: &DeliveryTarget,
        sent: &Sent,
        permit: super::isolation::Permit,
    ) -> (AttemptResult, Option<GoneNote>) {
        let result = match sent.status {
            Some(code) => schedule::classify(code, sent.retry_after),
            None => AttemptResult::Failed { retry_after: None },
        };
        let gone =
            (result == AttemptResult::Gone).then(|| self.isolation.gone_begin(&target.endpoint_id));
        if permit.finish(result == AttemptResult::Delivered, Instant::now()) {
            self.release_held(&target.endpoint_id);
        }
        if sent.status.is_some() {
            self.metrics
                .webhook_latency
                .observe(sent.latency.as_secs_f64());
        }
        let label = match (&result, sent.status) {
            (AttemptResult::Delivered, _) => "delivered",
            (AttemptResult::Gone, _) => "gone",
            (_, Some(_)) => "rejected",
            (_, None) => "unreachable",
        };
        tracing::debug!(outcome = label, status = ?sent.status, "webhook attempt");
        self.metrics
            .webhook_attempts
            .get_or_create(&vec![("outcome", label.to_string())])
            .inc();
        (result, gone)
    }

    /// Records the attempt and the message's new state (a pulled message's retry held
    /// in the database with it).
    async fn record(
        &self,
        target: &DeliveryTarget,
        attempt: u32,
        at: DateTime<Utc>,
        sent: Sent,
        next: &Next,
        pulled: bool,
    ) -> Result<(), DeliverError> {
        let (status, disable) = match next {
            Next::Delivered => (NewStatus::Delivered, None),
            Next::RetryIn(d) => (
                NewStatus::Pending {
                    next_attempt_at: at
                        + chrono::Duration::from_std(*d).unwrap_or(chrono::Duration::zero()),
                },
                None,
            ),
            Next::GiveUp(GiveUpReason::Gone) => {
                (NewStatus::Failed, Some("the endpoint answered 410 Gone"))
            }
            Next::GiveUp(GiveUpReason::Exhausted) => (NewStatus::Failed, None),
        };
        let hold_retry = match status {
            NewStatus::Pending { next_attempt_at } if pulled => Some((next_attempt_at, attempt)),
            _ => None,
        };
        let record = AttemptRecord {
            at,
            status_code: sent.status.map(i32::from),
            latency_ms: sent.latency.as_millis().min(i32::MAX as u128) as i32,
            error: sent.error,
            response: sent.response,
        };
        let recorded = Recorded {
            message_id: target.id.clone(),
            attempt: record,
            status,
            disable: disable.map(str::to_string),
            hold_retry,
        };
        // A pulled message has no job to settle, so its record may wait a moment for
        // others to share its commit; not one that disables the endpoint, whose next
        // requests wait for it.
        if pulled && recorded.disable.is_none() {
            self.recorder.record_patient(recorded).await?;
        } else {
            self.recorder.record(recorded).await?;
        }
        Ok(())
    }

    /// The endpoint is at its cap and still answering (or has parked messages): park the
    /// message in the database and ack the job, without counting an attempt; this
    /// process's puller of the endpoint sends it when its turn and a slot come
    /// ([`parking`]). `write`: from [`Parking::begin`], taken before the job left its
    /// place in line, so the jobs behind it park too.
    async fn park_begun(
        &self,
        job: &Job,
        write: ParkWrite,
        arrived: DateTime<Utc>,
    ) -> Result<Outcome, DeliverError> {
        self.parker
            .record(Parked {
                message_id: job.message_id.clone(),
                at: arrived,
                lease_until: parking::lease_until(Utc::now()),
                attempt: job.attempt,
                hold_count: job.holds,
            })
            .await?;
        self.parked(write);
        self.metrics
            .webhook_attempts
            .get_or_create(&vec![("outcome", "parked".to_string())])
            .inc();
        Ok(Outcome::Ack("parked"))
    }

    /// A park is written: the endpoint's puller starts unless one runs.
    fn parked(&self, write: ParkWrite) {
        let endpoint = write.endpoint().to_string();
        if write.written() {
            self.pullers.spawn(self.clone().pull(endpoint));
        }
    }

    /// The endpoint hangs, or its circuit is open until `open_until`: hold the message
    /// in the database ([`schedule::hold_for`], at least until the circuit closes) and
    /// ack the job, without counting an attempt. Sending its job back through a retry
    /// tier instead would cost the broker a write per job, over and over, for as long as
    /// the endpoint is down: with one dead endpoint of ten, most of what slowed the
    /// others.
    ///
    /// `note` was begun when the endpoint was seen hanging or open, before the write: a
    /// success of the endpoint since parks the holds written so far, its next success
    /// this one; and when none follows (that success was its last request's), this one
    /// is parked at once.
    async fn hold(
        &self,
        job: &Job,
        endpoint_id: &str,
        open_until: Option<Instant>,
        note: HoldNote,
    ) -> Result<Outcome, DeliverError> {
        let until = schedule::hold_until(
            Instant::now(),
            schedule::hold_for(job.holds, self.timeout),
            open_until,
        );
        self.holder
            .record(Held {
                message_id: job.message_id.clone(),
                until: holds::wall_clock(until),
                attempt: job.attempt,
                hold_count: job.holds.saturating_add(1),
            })
            .await?;
        if note.written() {
            self.release_held(endpoint_id);
        }
        self.metrics
            .webhook_attempts
            .get_or_create(&vec![("outcome", "held".to_string())])
            .inc();
        Ok(Outcome::Ack("held"))
    }

    /// The endpoint's rate limit has no turn for the job soon: hold its message in the
    /// database until the turn booked for it, and ack the job, without counting an
    /// attempt or a hold (the endpoint is fine; a later hang must not wait longer for
    /// it). The hold releaser gives it a job again then, in the order of its turn.
    async fn hold_until(&self, job: &Job, at: Instant) -> Result<Outcome, DeliverError> {
        self.holder
            .record(Held {
                message_id: job.message_id.clone(),
                until: holds::wall_clock(at),
                attempt: job.attempt,
                hold_count: job.holds,
            })
            .await?;
        self.metrics
            .webhook_attempts
            .get_or_create(&vec![("outcome", "paced".to_string())])
            .inc();
        Ok(Outcome::Ack("paced"))
    }

    /// The endpoint answered again after failing or being held: its held messages need
    /// not wait out their hold. They are parked, and this process's puller sends them
    /// at the endpoint's pace. Best effort, off the delivery's path: if it fails, they
    /// go at their held time.
    pub(super) fn release_held(&self, endpoint_id: &str) {
        let (this, endpoint_id) = (self.clone(), endpoint_id.to_string());
        tokio::spawn(async move {
            let lease = parking::lease_until(Utc::now());
            let parked = match this.pool.acquire().await {
                Ok(mut conn) => messages::park_held(&mut conn, &endpoint_id, lease).await,
                Err(e) => Err(e),
            };
            match parked {
                Ok(0) => {}
                Ok(n) => {
                    tracing::info!(
                        endpoint_id,
                        messages = n,
                        "endpoint answers again; sending its held messages"
                    );
                    this.parked(this.parking.begin(&endpoint_id));
                }
                Err(e) => {
                    tracing::warn!(endpoint_id, error = %e, "cannot release held messages; they go at their held time")
                }
            }
        });
    }

    /// One signed POST. Never fails: what went wrong is in `error`.
    async fn send(&self, t: &DeliveryTarget) -> Sent {
        let url = match url::Url::parse(&t.url) {
            Ok(u) => u,
            Err(_) => return refused("the stored URL does not parse"),
        };
        // Names are vetted by the resolver at connect time; literals are vetted here.
        if let Err(e) = ssrf::check_target(&url, self.policy) {
            return refused(&format!("refused target: {e}"));
        }
        let mut secrets = Vec::with_capacity(1 + t.previous_secrets.len());
        for s in std::iter::once(&t.secret).chain(&t.previous_secrets) {
            match Secret::parse(s) {
                Ok(s) => secrets.push(s),
                Err(e) => return refused(&format!("the endpoint's secret is unusable: {e}")),
            }
        }
        // The merchant's custom headers, checked on save; the Standard Webhooks headers
        // and those of the body and connection cannot be among them, so nothing below
        // is overridden.
        let mut custom = reqwest::header::HeaderMap::with_capacity(t.headers.len());
        for (name, value) in t.headers.iter() {
            match (
                reqwest::header::HeaderName::from_bytes(name.as_bytes()),
                reqwest::header::HeaderValue::from_str(value),
            ) {
                (Ok(n), Ok(v)) => {
                    custom.append(n, v);
                }
                _ => return refused(&format!("the custom header {name:?} is unusable")),
            }
        }
        // A fresh timestamp per attempt, so receivers can refuse replays of old ones.
        let ts = Utc::now().timestamp();
        let signature = signature_header(&secrets, &t.id, ts, t.body.as_bytes());
        let started = Instant::now();
        let r = self
            .client
            .post(url)
            .headers(custom)
            .header("webhook-id", &t.id)
            .header("webhook-timestamp", ts.to_string())
            .header("webhook-signature", signature)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(t.body.clone())
            .send()
            .await;
        let mut resp = match r {
            Ok(resp) => resp,
            Err(e) => {
                return Sent {
                    error: Some(describe(e)),
                    latency: started.elapsed(),
                    ..Sent::default()
                };
            }
        };
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| schedule::parse_retry_after(v, Utc::now()));
        // Keep the first bytes of the answer; don't wait for (or store) the rest.
        let mut head = Vec::new();
        let mut error = None;
        while head.len() < RESPONSE_BYTES {
            match resp.chunk().await {
                Ok(Some(c)) => head.extend_from_slice(&c),
                Ok(None) => break,
                Err(e) => {
                    error = Some(describe(e));
                    break;
                }
            }
        }
        head.truncate(RESPONSE_BYTES);
        Sent {
            status: Some(status),
            retry_after,
            error: error.filter(|_| !(200..300).contains(&status)),
            // Stored as text: an answer holding U+0000 would fail the record (and every
            // other attempt recorded with it) for as long as it was sent again.
            response: Some(crate::nul::storable(
                String::from_utf8_lossy(&head).into_owned(),
            )),
            latency: started.elapsed(),
        }
    }

    /// Consumes until `shutdown`, then lets the jobs in hand finish and settle. Jobs
    /// run concurrently on the queue worker ([`queue::run_concurrent`]). `shutdown`
    /// cancels [`Deliverer::stop`], which every copy of this deliverer shares: the
    /// fan-out's copy, made before this runs, starts pullers too (when an endpoint
    /// answers while its hold is written), and they stop with the others.
    pub async fn run(self, shutdown: CancellationToken) {
        let broker = self.broker.clone();
        let stop = self.stop.clone();
        let consume = queue::run_concurrent(self.clone(), &broker, shutdown.clone());
        let stopping = async {
            shutdown.cancelled().await;
            stop.cancel();
        };
        tokio::join!(consume, stopping);
        // The pullers stop with `shutdown`; their requests in flight finish and record.
        self.pullers.close();
        self.pullers.wait().await;
    }
}

/// A job as it arrived: read from its delivery, its place in its endpoint's line and
/// when it arrived (taken in the order the broker hands jobs over: parked messages are
/// pulled in this order).
pub struct Arrival {
    job: Option<Job>,
    at: DateTime<Utc>,
    place: Option<Place>,
}

impl queue::Handler for Deliverer {
    fn queue(&self, names: &Names) -> String {
        names.webhooks()
    }

    fn dead_letter_id(&self, job: &queue::Job) -> String {
        match Job::of(job) {
            Some(j) => j.message_id,
            None => job.message_id.clone().unwrap_or_default(),
        }
    }

    /// After an attempt, a released job's hold count no longer applies.
    fn retry_body<'a>(&self, job: &'a queue::Job) -> Cow<'a, [u8]> {
        without_holds(&job.body)
    }
}

impl queue::Concurrent for Deliverer {
    type Arrival = Arrival;
    type Error = DeliverError;

    /// Jobs in hand are the workers' plus those whose long requests gave their worker
    /// slot back (at most an in-flight cap per slow endpoint): room for as many again.
    fn prefetch(&self) -> u16 {
        u16::try_from(self.workers.saturating_mul(2)).unwrap_or(u16::MAX)
    }

    fn workers(&self) -> usize {
        self.workers
    }

    fn arrive(&self, job: &queue::Job) -> Arrival {
        let job = Job::of(job);
        let place = job
            .as_ref()
            .and_then(|j| j.endpoint_id.as_deref())
            .map(|ep| self.line.join(ep));
        let at = place
            .as_ref()
            .and_then(|p| DateTime::from_timestamp_micros(p.at()))
            .unwrap_or_else(|| self.arrival());
        Arrival { job, at, place }
    }

    /// A job that stops as a crash would (fault injection) goes back unacked.
    async fn handle_one(
        &self,
        _job: &queue::Job,
        arrival: &mut Arrival,
        slot: &mut Option<OwnedSemaphorePermit>,
        _shutdown: &CancellationToken,
    ) -> Result<Outcome, DeliverError> {
        let Some(job) = arrival.job.as_ref() else {
            return Ok(Outcome::DeadLetter {
                code: "bad_job",
                reason: "not a webhook job (no webhook_message_id)".into(),
            });
        };
        let handled = self
            .handle_in(job, arrival.at, &mut arrival.place, slot)
            .await;
        // Out of line once decided, and while it waits for the database: the jobs
        // behind it need not.
        arrival.place.take();
        match handled {
            Err(DeliverError::Injected) => Ok(Outcome::Defer),
            other => other,
        }
    }
}

/// A job's body without the `holds` a released job carries (unchanged if it has none or
/// is not JSON).
fn without_holds(body: &[u8]) -> Cow<'_, [u8]> {
    let Ok(mut job) = serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(body)
    else {
        return Cow::Borrowed(body);
    };
    match job.remove("holds") {
        Some(_) => serde_json::to_vec(&job).map_or(Cow::Borrowed(body), Cow::Owned),
        None => Cow::Borrowed(body),
    }
}

/// The endpoint's `rate_limit`, if it has one.
fn paced(target: &DeliveryTarget) -> Option<NonZeroU32> {
    target
        .rate_limit
        .and_then(|r| u32::try_from(r).ok())
        .and_then(NonZeroU32::new)
}

/// What the job's queue does after attempt `attempt`: done, a retry after the next
/// delay, or parked (`why`: what went wrong last).
fn outcome(next: Next, attempt: u32, why: &str) -> Outcome {
    match next {
        Next::Delivered => Outcome::Ack("delivered"),
        Next::RetryIn(delay) => Outcome::Retry {
            attempt,
            delay,
            reason: format!("attempt {attempt} failed: {why}"),
        },
        Next::GiveUp(reason) => Outcome::DeadLetter {
            code: reason.code(),
            reason: match reason {
                GiveUpReason::Gone => "the endpoint answered 410 Gone; it is disabled".into(),
                GiveUpReason::Exhausted => {
                    format!("no success after {attempt} attempts; last: {why}")
                }
            },
        },
    }
}

/// What went wrong with a request: its error, else its status.
fn failure(sent: &Sent) -> String {
    sent.error
        .clone()
        .or(sent.status.map(|s| format!("HTTP {s}")))
        .unwrap_or_default()
}

fn refused(why: &str) -> Sent {
    Sent {
        error: Some(why.to_string()),
        ..Sent::default()
    }
}

/// An error with its causes, without the URL (it may carry the merchant's tokens).
fn describe(e: reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "cannot connect"
    } else {
        "request failed"
    };
    let e = e.without_url();
    let mut out = format!("{kind}: {e}");
    let mut src = std::error::Error::source(&e);
    while let Some(s) = src {
        out.push_str(": ");
        out.push_str(&s.to_string());
        src = s.source();
    }
    crate::nul::storable(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_come_from_the_body_or_the_message_id() {
        let j = Job::from_parts(
            br#"{"webhook_message_id":"msg_1","endpoint_id":"ep_1"}"#,
            None,
            Some(2),
        )
        .unwrap();
        assert_eq!(
            j,
            Job {
                message_id: "msg_1".into(),
                endpoint_id: Some("ep_1".into()),
                attempt: 2,
                holds: 0,
            }
        );
        // A released job: the round's attempt count and its holds ride in the body; a
        // header's count wins.
        let released =
            br#"{"webhook_message_id":"msg_1","endpoint_id":"ep_1","attempt":3,"holds":2}"#;
        let j = Job::from_parts(released, None, None).unwrap();
        assert_eq!((j.attempt, j.holds), (3, 2));
        assert_eq!(Job::from_parts(released, None, Some(4)).unwrap().attempt, 4);
        assert_eq!(
            Job::from_parts(&without_holds(released), None, None)
                .unwrap()
                .holds,
            0
        );
        assert_eq!(&*without_holds(b"not json"), b"not json");
        let j = Job::from_parts(b"", Some("msg_2"), None).unwrap();
        assert_eq!(j.attempt, 0);
        assert_eq!(j.message_id, "msg_2");
        assert_eq!(Job::from_parts(b"{}", None, None), None);
        assert_eq!(Job::from_parts(b"{}", Some("grant_x:created"), None), None);
        assert_eq!(
            Job::from_parts(b"{}", Some("msg_3"), Some(-4))
                .unwrap()
                .attempt,
            0
        );
    }
}
