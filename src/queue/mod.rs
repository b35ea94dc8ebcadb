//! The one queue worker: everything about taking jobs off a RabbitMQ queue that is the
//! same for every consumer, so a consumer is only a [`Handler`] (decode, handle, say
//! what happens to each job).
//!
//! The loop subscribes (and subscribes again when the channel breaks or the consumer
//! stream ends: unacked deliveries come back), takes a batch of what has arrived (up to
//! the handler's batch size, waiting at most its linger for more), hands it to the
//! handler and, once the handler returns (after its transaction committed), settles each
//! job by its [`Outcome`]: a retry or a dead letter is published and confirmed by the
//! broker before the original is acked, so a crash in between leaves a copy in both
//! places, never in neither. A database outage is the handler's `Err`: the batch is kept
//! in hand, unacked, and tried again with backoff, never dead-lettered. On shutdown the
//! batch in hand is finished and settled, and nothing new is taken.
//!
//! Only this module touches lapin's deliveries; handlers see [`Job`]s.

use std::borrow::Cow;
use std::future::Future;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::BasicAckOptions;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Consumer};
use tokio_util::sync::CancellationToken;

use crate::amqp::{
    self, ATTEMPT_HEADER, Broker, BrokerError, Names, Outgoing, REASON_HEADER, dlq, header_int,
    header_str,
};

/// What happens to a job once its batch is handled. Only the loop acks.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// Done: acknowledged. The label is the metrics outcome.
    Ack(&'static str),
    /// Not now (another consumer's transaction holds what it needs): kept in hand,
    /// unacked, and handled again with the next batch.
    Defer,
    /// Published to the queue's retry tier of `delay` (the queue itself for no delay)
    /// carrying `attempt`, then acknowledged.
    Retry {
        attempt: u32,
        delay: Duration,
        reason: String,
    },
    /// Parked in the queue's dead-letter queue with why, then acknowledged.
    DeadLetter { code: &'static str, reason: String },
    /// Some elements of a message that carries several (a bundle) are parked, each on
    /// its own with the id `<message id>#<index>`; the others were handled. Then
    /// acknowledged.
    DeadLetterParts(Vec<DeadPart>),
}

/// An element of a bundle to park on its own.
#[derive(Clone, Debug, PartialEq)]
pub struct DeadPart {
    pub index: usize,
    pub body: Vec<u8>,
    pub code: &'static str,
    pub reason: String,
}

/// One delivery's bytes and metadata, detached from lapin so handlers (and tests) work
/// without a broker.
#[derive(Clone, Debug, Default)]
pub struct Job {
    pub message_id: Option<String>,
    /// The routing key it was published with; for a message replayed from a dead-letter
    /// queue (through the default exchange), the original one its header carries, or
    /// empty when unknown.
    pub routing_key: String,
    pub body: Vec<u8>,
    /// Retries it had (`x-guildgate-attempt`).
    pub attempt: u32,
    /// How many batches in a row deferred it.
    pub deferred: u32,
}

impl Job {
    fn of(d: &Delivery) -> Self {
        let headers = d.properties.headers().as_ref();
        let routing_key = if d.exchange.as_str().is_empty() {
            amqp::header_text(headers, dlq::ROUTING_KEY_HEADER).unwrap_or_default()
        } else {
            d.routing_key.to_string()
        };
        Self {
            message_id: amqp::message_id(&d.properties),
            routing_key,
            body: d.data.clone(),
            attempt: header_int(headers, ATTEMPT_HEADER)
                .and_then(|a| u32::try_from(a).ok())
                .unwrap_or(0),
            deferred: 0,
        }
    }
}

/// How a handler wants its jobs.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    /// Deliveries the broker sends ahead of acks.
    pub prefetch: u16,
    /// Jobs handled together at most (one transaction for a batch, one commit).
    pub batch: usize,
    /// How long to wait for a batch to fill once its first job is in hand.
    pub linger: Duration,
}

/// A consumer of one queue.
pub trait Handler: Send + Sync + 'static {
    /// The queue it consumes.
    fn queue(&self, names: &Names) -> String;

    /// Its consumer tag (empty: the broker names it).
    fn consumer_tag(&self) -> &'static str {
        ""
    }

    fn shape(&self) -> Shape;

    /// How much of a batch `job` fills: one by default; a message carrying several
    /// items may count as them. A batch is never split below a job.
    fn size(&self, _job: &Job) -> usize {
        1
    }

    /// Handles a batch: one outcome per job, in order, once what they changed has
    /// committed. `Err` is a database that does not answer: the batch is held and
    /// handed over again. `shutdown` tells a handler that the process is stopping
    /// (what is in hand still finishes).
    fn handle(
        &self,
        jobs: &[Job],
        shutdown: &CancellationToken,
    ) -> impl Future<Output = Result<Vec<Outcome>, sqlx::Error>> + Send;

    /// The id a parked copy of `job` carries: its message id by default.
    fn dead_letter_id(&self, job: &Job) -> String {
        job.message_id.clone().unwrap_or_default()
    }

    /// Whether a parked copy carries the job's routing key (`x-guildgate-routing-key`),
    /// for a queue whose jobs are told apart by it.
    fn dead_letter_keeps_routing_key(&self) -> bool {
        false
    }
}

/// Consumes `handler`'s queue until `shutdown`, subscribing again whenever the channel
/// breaks or the consumer stream ends.
pub async fn run<H: Handler>(handler: &H, broker: &Broker, shutdown: CancellationToken) {
    let names = broker.names();
    let queue = handler.queue(names);
    let shape = handler.shape();
    loop {
        let Ok((ch, consumer, publisher)) = broker
            .subscribe(&queue, handler.consumer_tag(), shape.prefetch, &shutdown)
            .await
        else {
            return; // shutting down
        };
        let ended = consume(
            handler, shape, names, &queue, consumer, &publisher, &shutdown,
        )
        .await;
        // Closing returns unacked prefetched deliveries to the queue. Bounded: a broker
        // that does not answer must not hold up the shutdown.
        let _ = tokio::time::timeout(Duration::from_secs(5), ch.close(200, "bye".into())).await;
        match ended {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(queue = %queue, error = %e, "consumer interrupted; subscribing again");
            }
        }
    }
}

async fn consume<H: Handler>(
    handler: &H,
    shape: Shape,
    names: &Names,
    queue: &str,
    mut consumer: Consumer,
    publisher: &Channel,
    shutdown: &CancellationToken,
) -> Result<(), BrokerError> {
    // Deliveries deferred by earlier batches, with their jobs. A batch keeps its
    // deliveries (to settle) and their jobs (for the handler) side by side.
    let mut carry: (Vec<Delivery>, Vec<Job>) = Default::default();
    loop {
        let (mut deliveries, mut jobs) = std::mem::take(&mut carry);
        if deliveries.is_empty() {
            let first = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Ok(()),
                next = consumer.next() => next,
            };
            match first {
                Some(Ok(d)) => {
                    jobs.push(Job::of(&d));
                    deliveries.push(d);
                }
                Some(Err(e)) => return Err(e.into()),
                None => return Err(BrokerError::ConsumerEnded),
            }
        }
        // Every batch costs a durable commit: under load a few milliseconds of waiting
        // buy many jobs per commit; when idle a job waits at most the linger. After
        // shutdown only what is in hand is finished.
        let deadline = tokio::time::Instant::now() + shape.linger;
        let mut size: usize = jobs.iter().map(|j| handler.size(j)).sum();
        while size < shape.batch {
            let more = amqp::more_deliveries_until(&mut consumer, 1, deadline, shutdown).await;
            let Some(d) = more.into_iter().next() else {
                break;
            };
            let job = Job::of(&d);
            size += handler.size(&job);
            jobs.push(job);
            deliveries.push(d);
        }
        let outcomes = handled(handler, queue, &jobs, shutdown).await?;
        settle(
            handler,
            names,
            queue,
            &deliveries,
            &jobs,
            &outcomes,
            publisher,
        )
        .await?;
        carry = deliveries
            .into_iter()
            .zip(jobs)
            .zip(outcomes)
            .filter(|(_, o)| *o == Outcome::Defer)
            .map(|((d, mut job), _)| {
                job.deferred += 1;
                (d, job)
            })
            .unzip();
        if shutdown.is_cancelled() && carry.0.is_empty() {
            return Ok(());
        }
    }
}

/// Hands `jobs` to the handler until it answers, through database outages; on
/// shutdown during one, gives up without acking (the broker redelivers).
async fn handled<H: Handler>(
    handler: &H,
    queue: &str,
    jobs: &[Job],
    shutdown: &CancellationToken,
) -> Result<Vec<Outcome>, BrokerError> {
    let mut backoff = amqp::reconnect_backoff();
    loop {
        match handler.handle(jobs, shutdown).await {
            Ok(outcomes) => {
                assert_eq!(outcomes.len(), jobs.len(), "one outcome per job");
                return Ok(outcomes);
            }
            Err(e) => {
                let wait = backoff.next().unwrap_or(Duration::from_secs(5));
                tracing::warn!(queue, error = %e, retry_in = ?wait, "database unavailable; holding the jobs");
                tokio::select! {
                    _ = shutdown.cancelled() => return Err(BrokerError::ShuttingDown),
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}

/// Publishes what the outcomes ask for (confirmed), then acks every job not deferred.
async fn settle<H: Handler>(
    handler: &H,
    names: &Names,
    queue: &str,
    deliveries: &[Delivery],
    jobs: &[Job],
    outcomes: &[Outcome],
    publisher: &Channel,
) -> Result<(), BrokerError> {
    let ids: Vec<Ids> = jobs
        .iter()
        .zip(outcomes)
        .map(|(job, o)| Ids::of(handler, job, o))
        .collect();
    let mut out: Vec<Outgoing<'_>> = Vec::new();
    for (((d, job), outcome), ids) in deliveries.iter().zip(jobs).zip(outcomes).zip(&ids) {
        let headers = d.properties.headers().as_ref();
        out.extend(copies(handler, names, queue, ids, job, headers, outcome));
    }
    if !out.is_empty() {
        amqp::publish_confirmed(publisher, &out).await?;
    }
    // One ack for the whole batch when none of it stays in hand: every delivery this
    // channel gave before the batch's last one was either settled with an earlier batch
    // or deferred into this one (deferred deliveries open the next batch), so
    // `multiple` on the highest tag acks exactly this batch.
    if !outcomes.contains(&Outcome::Defer) {
        if let Some(last) = deliveries.iter().max_by_key(|d| d.delivery_tag) {
            last.ack(BasicAckOptions { multiple: true }).await?;
        }
        return Ok(());
    }
    for (d, o) in deliveries.iter().zip(outcomes) {
        if *o != Outcome::Defer {
            d.ack(BasicAckOptions::default()).await?;
        }
    }
    Ok(())
}

/// The ids of what an outcome publishes: the job's (a retry, a dead letter) and its
/// parked elements'.
struct Ids {
    job: String,
    parts: Vec<String>,
}

impl Ids {
    fn of<H: Handler>(handler: &H, job: &Job, outcome: &Outcome) -> Self {
        let id = match outcome {
            Outcome::Ack(_) | Outcome::Defer => String::new(),
            _ => handler.dead_letter_id(job),
        };
        let parts = match outcome {
            Outcome::DeadLetterParts(parts) => {
                parts.iter().map(|p| format!("{id}#{}", p.index)).collect()
            }
            _ => Vec::new(),
        };
        Self { job: id, parts }
    }
}

/// The messages `outcome` publishes for a job: a copy for its retry tier, or parked
/// copies for the dead-letter queue; none for an ack or a deferral.
fn copies<'a, H: Handler>(
    handler: &H,
    names: &Names,
    queue: &str,
    ids: &'a Ids,
    job: &'a Job,
    headers: Option<&FieldTable>,
    outcome: &'a Outcome,
) -> Vec<Outgoing<'a>> {
    let body = job.body.as_slice();
    match outcome {
        Outcome::Ack(_) | Outcome::Defer => Vec::new(),
        Outcome::Retry {
            attempt,
            delay,
            reason,
        } => {
            let target = if delay.is_zero() {
                queue.to_string()
            } else {
                Names::retry(queue, *delay)
            };
            let mut retry = Outgoing::to_queue("", &ids.job, body)
                .header(ATTEMPT_HEADER, AMQPValue::LongLongInt(i64::from(*attempt)))
                .header(REASON_HEADER, header_str(reason))
                .carrying_replays(headers);
            retry.routing_key = Cow::Owned(target);
            vec![retry]
        }
        Outcome::DeadLetter { code, reason } => {
            tracing::warn!(queue, message_id = %ids.job, code, %reason, "dead-lettering a job");
            vec![parked(
                handler, names, queue, &ids.job, body, job, headers, code, reason,
            )]
        }
        Outcome::DeadLetterParts(parts) => parts
            .iter()
            .zip(&ids.parts)
            .map(|(part, id)| {
                tracing::warn!(queue, message_id = %id, code = part.code, reason = %part.reason, "dead-lettering an element of a bundle");
                parked(
                    handler,
                    names,
                    queue,
                    id,
                    &part.body,
                    job,
                    headers,
                    part.code,
                    &part.reason,
                )
            })
            .collect(),
    }
}

/// A parked copy of a job (or of an element of it) for `queue`'s dead-letter queue: its
/// headers kept, with its attempt and, where the handler wants it, its routing key.
#[allow(clippy::too_many_arguments)]
fn parked<'a, H: Handler>(
    handler: &H,
    names: &Names,
    queue: &str,
    id: &'a str,
    body: &'a [u8],
    job: &Job,
    headers: Option<&FieldTable>,
    code: &str,
    reason: &str,
) -> Outgoing<'a> {
    let mut copy = Outgoing::parked(
        names,
        queue,
        id,
        body,
        headers.cloned().unwrap_or_default(),
        code,
        reason,
    );
    if job.attempt > 0 {
        copy = copy.header(
            ATTEMPT_HEADER,
            AMQPValue::LongLongInt(i64::from(job.attempt)),
        );
    }
    if handler.dead_letter_keeps_routing_key() && !job.routing_key.is_empty() {
        copy = copy.header(dlq::ROUTING_KEY_HEADER, header_str(&job.routing_key));
    }
    copy
}
