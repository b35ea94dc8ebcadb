//! Batches: many jobs in one call of the handler, settled together.

use std::time::Duration;

use futures_util::StreamExt;
use lapin::Consumer;
use lapin::message::Delivery;
use tokio_util::sync::CancellationToken;

use super::{Batched, Job, Outcome, Shape, Subscription, settle};
use crate::amqp::{self, BrokerError, Names};

pub(super) async fn consume<H: Batched>(
    handler: &H,
    shape: Shape,
    names: &Names,
    queue: &str,
    subscription: Subscription,
    shutdown: &CancellationToken,
) -> Result<(), BrokerError> {
    let Subscription {
        mut consumer,
        publisher,
        lost,
    } = subscription;
    // Deliveries deferred by earlier batches, with their jobs. A batch keeps its
    // deliveries (to settle) and their jobs (for the handler) side by side.
    let mut carry: (Vec<Delivery>, Vec<Job>) = Default::default();
    loop {
        if lost.is_cancelled() {
            // Deferred deliveries cannot be settled on a channel that stopped
            // answering: the broker gives them back once it closes.
            return Err(BrokerError::ConsumerEnded);
        }
        let (mut deliveries, mut jobs) = std::mem::take(&mut carry);
        if deliveries.is_empty() {
            let first = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Ok(()),
                // The channel stopped answering: nothing more will arrive on it.
                _ = lost.cancelled() => return Err(BrokerError::ConsumerEnded),
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
            let more = more_deliveries_until(&mut consumer, 1, deadline, shutdown).await;
            let Some(d) = more.into_iter().next() else {
                break;
            };
            let job = Job::of(&d);
            size += handler.size(&job);
            jobs.push(job);
            deliveries.push(d);
        }
        let outcomes = handled(handler, queue, &jobs, shutdown).await?;
        settle::batch(
            handler,
            names,
            queue,
            &deliveries,
            &jobs,
            &outcomes,
            &publisher,
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
async fn handled<H: Batched>(
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

/// Takes up to `max` more deliveries from `consumer`, waiting at most until `linger`
/// from now for them (what has already arrived is taken without waiting), and none once
/// `shutdown` is cancelled. Batching consumers use it: every batch costs a durable
/// commit (an fsync), so under load a few milliseconds of waiting buy many messages per
/// commit, and when idle a message waits at most `linger`. An error ends the batch; the
/// stream reports it again on the next read.
pub async fn more_deliveries(
    consumer: &mut Consumer,
    max: usize,
    linger: Duration,
    shutdown: &CancellationToken,
) -> Vec<Delivery> {
    let deadline = tokio::time::Instant::now() + linger;
    more_deliveries_until(consumer, max, deadline, shutdown).await
}

/// [`more_deliveries`] waiting at most until `deadline`: for a caller that fills a batch
/// in several steps within one linger.
pub async fn more_deliveries_until(
    consumer: &mut Consumer,
    max: usize,
    deadline: tokio::time::Instant,
    shutdown: &CancellationToken,
) -> Vec<Delivery> {
    use futures_util::FutureExt;
    let mut out = Vec::new();
    while out.len() < max && !shutdown.is_cancelled() {
        let next = match consumer.next().now_or_never() {
            Some(next) => next,
            None => match tokio::time::timeout_at(deadline, consumer.next()).await {
                Ok(next) => next,
                Err(_) => break,
            },
        };
        match next {
            Some(Ok(d)) => out.push(d),
            _ => break,
        }
    }
    out
}
