//! The one queue worker: everything about taking jobs off a RabbitMQ queue that is the
//! same for every consumer, so a consumer is only a handler (decode, handle, say what
//! happens to each job with an [`Outcome`]).
//!
//! The loop subscribes (and subscribes again when the channel breaks or the consumer
//! stream ends: unacked deliveries come back), hands jobs to the handler and, once the
//! handler returns (after what the job changed committed), settles each job by its
//! [`Outcome`]: a retry or a dead letter is published and confirmed by the broker before
//! the original is acked, so a crash in between leaves a copy in both places, never in
//! neither. A database outage is the handler's `Err`: the job is kept in hand, unacked,
//! and tried again with backoff, never dead-lettered. On shutdown what is in hand is
//! finished and settled, and nothing new is taken.
//!
//! Two ways to take jobs, one per kind of work:
//!
//! - [`run`] for a [`Batched`] handler: a batch of what has arrived (up to the
//!   handler's batch size, waiting at most its linger for more) in one call, one
//!   transaction, one commit and one ack for the batch (ingest, webhook fan-out, email).
//! - [`run_concurrent`] for a [`Concurrent`] handler: each job on its own task, up to the
//!   handler's worker count at once, each settled on its own as it finishes (the Discord
//!   syncer and webhook delivery, whose jobs mostly wait on somebody else).
//!
//! Only this module touches lapin's deliveries; handlers see [`Job`]s.

mod batches;
mod concurrent;
pub mod dlq;
mod settle;

pub use batches::{more_deliveries, more_deliveries_until};

use std::borrow::Cow;
use std::future::Future;
use std::time::Duration;

use lapin::message::Delivery;
use lapin::{Channel, Consumer};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;

use crate::amqp::{
    self, ATTEMPT_HEADER, Broker, BrokerError, Names, ROUTING_KEY_HEADER, header_int,
};

/// What happens to a job once its batch is handled. Only the loop acks.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// Done: acknowledged. The label is the metrics outcome.
    Ack(&'static str),
    /// Not now (another consumer's transaction holds what it needs, or a test stops
    /// the job as a crash would): not acked. In a batch it is kept in hand and handled
    /// again with the next batch; a job handled on its own goes back to the queue
    /// (rejected with requeue) and comes again.
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
            amqp::header_text(headers, ROUTING_KEY_HEADER).unwrap_or_default()
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

/// A consumer of one queue: what every kind of handler says about its jobs.
pub trait Handler: Send + Sync + 'static {
    /// The queue it consumes.
    fn queue(&self, names: &Names) -> String;

    /// Its consumer tag (empty: the broker names it).
    fn consumer_tag(&self) -> &'static str {
        ""
    }

    /// The id a parked copy of `job` carries: its message id by default.
    fn dead_letter_id(&self, job: &Job) -> String {
        job.message_id.clone().unwrap_or_default()
    }

    /// Whether a parked copy carries the job's routing key (`x-guildgate-routing-key`),
    /// for a queue whose jobs are told apart by it.
    fn dead_letter_keeps_routing_key(&self) -> bool {
        false
    }

    /// The body a retry of `job` carries: the job's own by default.
    fn retry_body<'a>(&self, job: &'a Job) -> Cow<'a, [u8]> {
        Cow::Borrowed(&job.body)
    }
}

/// A handler of batches: many jobs in one call, one transaction for them all.
pub trait Batched: Handler {
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
}

/// A handler of one job at a time, many of them at once, each on its own task.
pub trait Concurrent: Handler + Clone {
    /// What a job takes when it arrives, in the order the broker hands jobs over and
    /// before any job is started (a place in a line); `()` for nothing.
    type Arrival: Send + 'static;
    /// What makes a job wait instead of fail: a database that does not answer.
    type Error: std::fmt::Display + Send;

    /// Deliveries the broker sends ahead of acks.
    fn prefetch(&self) -> u16;

    /// Jobs handled at once at most.
    fn workers(&self) -> usize;

    /// Called for each job as it arrives, in order.
    fn arrive(&self, job: &Job) -> Self::Arrival;

    /// Handles one job: its outcome, once what it changed has committed. `slot` is
    /// the job's worker slot: a handler that waits long for something outside (a slow
    /// request) may give it back (`slot.take()`) so the loop takes another job
    /// meanwhile. `Err` is a database that does not answer: the job is held and handed
    /// over again (with what `arrival` became), until `shutdown`, when it is left
    /// unacked for the broker to redeliver.
    fn handle_one(
        &self,
        job: &Job,
        arrival: &mut Self::Arrival,
        slot: &mut Option<OwnedSemaphorePermit>,
        shutdown: &CancellationToken,
    ) -> impl Future<Output = Result<Outcome, Self::Error>> + Send;
}

/// Consumes `handler`'s queue in batches until `shutdown`, subscribing again whenever
/// the channel breaks or the consumer stream ends.
pub async fn run<H: Batched>(handler: &H, broker: &Broker, shutdown: CancellationToken) {
    let names = broker.names();
    let queue = handler.queue(names);
    let shape = handler.shape();
    subscribed(
        handler,
        broker,
        &queue,
        shape.prefetch,
        &shutdown,
        |subscription| batches::consume(handler, shape, names, &queue, subscription, &shutdown),
    )
    .await;
}

/// Consumes `handler`'s queue, many jobs at once, until `shutdown` (the jobs in hand
/// finish and settle first), subscribing again whenever the channel breaks or the
/// consumer stream ends.
pub async fn run_concurrent<H: Concurrent>(
    handler: H,
    broker: &Broker,
    shutdown: CancellationToken,
) {
    let names = broker.names();
    let queue = handler.queue(names);
    subscribed(
        &handler,
        broker,
        &queue,
        handler.prefetch(),
        &shutdown,
        |subscription| concurrent::consume(&handler, names, &queue, subscription, &shutdown),
    )
    .await;
}

/// Publishes what `outcome` asks for a job that came from somewhere other than the
/// broker (a job parked in the database and taken from there): a retry or a dead
/// letter, confirmed. Nothing to ack.
pub async fn publish<H: Handler>(
    handler: &H,
    names: &Names,
    job: &Job,
    outcome: &Outcome,
    publisher: &Channel,
) -> Result<(), BrokerError> {
    settle::publish(
        handler,
        names,
        &handler.queue(names),
        job,
        outcome,
        publisher,
    )
    .await
}

/// Subscribes to `queue` and runs `consume` on the subscription until it returns: for
/// good (`Ok`, shutting down) or to subscribe again. Meanwhile the subscription's
/// channels are watched ([`watch`]); when they stop answering, `consume` is told
/// through its `lost` token, finishes what it holds and returns, and the loop
/// subscribes again.
async fn subscribed<H, F, Fut>(
    handler: &H,
    broker: &Broker,
    queue: &str,
    prefetch: u16,
    shutdown: &CancellationToken,
    mut consume: F,
) where
    H: Handler,
    F: FnMut(Subscription) -> Fut,
    Fut: Future<Output = Result<(), BrokerError>>,
{
    loop {
        let Ok(subscribed) = broker
            .subscribe(queue, handler.consumer_tag(), prefetch, shutdown)
            .await
        else {
            return; // shutting down
        };
        let amqp::Subscribed {
            channel: ch,
            consumer,
            publisher,
            generation,
        } = subscribed;
        let lost = CancellationToken::new();
        let consuming = consume(Subscription {
            consumer,
            publisher: publisher.clone(),
            lost: lost.clone(),
        });
        tokio::pin!(consuming);
        let ended = tokio::select! {
            ended = &mut consuming => ended,
            why = watch(broker, &ch, &publisher, generation, queue) => {
                tracing::warn!(queue = %queue, error = %why, "the consumer's channel stopped answering; subscribing again");
                lost.cancel();
                consuming.await
            }
        };
        // Closing returns unacked prefetched deliveries to the queue. Bounded: a broker
        // that does not answer must not hold up the shutdown.
        let bye = async {
            let _ = ch.close(200, "bye".into()).await;
            let _ = publisher.close(200, "bye".into()).await;
        };
        let _ = tokio::time::timeout(Duration::from_secs(5), bye).await;
        match ended {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(queue = %queue, error = %e, "consumer interrupted; subscribing again");
            }
        }
    }
}

/// What a consume loop gets of one subscription.
struct Subscription {
    consumer: Consumer,
    /// A confirm channel for what the loop publishes (retries, dead letters).
    publisher: Channel,
    /// Cancelled by [`watch`] when the channels stopped answering: nothing more will
    /// arrive, and nothing can be settled; the loop finishes what it holds and returns.
    lost: CancellationToken,
}

/// How often [`watch`] looks at a subscription's channels, and every how many looks it
/// asks the broker ([`Broker::probe`]).
const WATCH_EVERY: Duration = Duration::from_secs(1);
const PROBE_EVERY_NTH: u32 = 5;

/// Returns (why) once the consumer's channel `ch` or its `publisher` is no longer open,
/// or `ch` no longer answers a probe. A broken connection normally ends the consumer's
/// stream on its own; this covers a connection that stopped carrying the broker's
/// answers without breaking, where the stream would wait for the missed heartbeats
/// (minutes) or forever.
async fn watch(
    broker: &Broker,
    ch: &Channel,
    publisher: &Channel,
    generation: amqp::Generation,
    queue: &str,
) -> BrokerError {
    let mut looks = 0u32;
    loop {
        tokio::time::sleep(WATCH_EVERY).await;
        if !ch.status().connected() || !publisher.status().connected() {
            return BrokerError::ConsumerEnded;
        }
        looks += 1;
        if looks.is_multiple_of(PROBE_EVERY_NTH)
            && let Err(e) = broker.probe(ch, generation, queue).await
        {
            return e.into();
        }
    }
}

#[cfg(test)]
mod tests {
    /// Only the queue worker takes deliveries and settles them: everybody else sees
    /// jobs and outcomes.
    #[test]
    fn only_the_queue_worker_touches_deliveries() {
        let files = crate::tests::sources_outside("queue");
        let names = [
            "lapin::message",
            "message::Delivery",
            "BasicAckOptions",
            "BasicNackOptions",
            "BasicRejectOptions",
            "basic_get",
            "basic_ack",
            "basic_nack",
            "basic_reject",
        ];
        for (path, text) in files {
            for line in text.lines().filter(|l| !l.trim_start().starts_with("//")) {
                for name in &names {
                    assert!(
                        !line.contains(name),
                        "src/{} names {name}: deliveries belong to src/queue",
                        path.display()
                    );
                }
            }
        }
    }
}
