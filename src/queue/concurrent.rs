//! Many jobs at once: each on its own task, settled on its own as it finishes.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::Channel;
use lapin::message::Delivery;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::{Concurrent, Job, Outcome, Subscription, settle};
use crate::amqp::{self, BrokerError, Names};

/// Takes jobs while a worker slot is free, each onto its own task; returns when
/// shutting down or when the channel broke, once the jobs in hand have finished.
pub(super) async fn consume<H: Concurrent>(
    handler: &H,
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
    let slots = Arc::new(Semaphore::new(handler.workers().max(1)));
    // Set by a job that could not settle, or by the watch when the channel stopped
    // answering (`lost`): the channel is unusable; the jobs in hand finish and the
    // loop subscribes again, so the broker redelivers what it held.
    let broken = lost;
    // What every job's task needs of the loop, shared: a job costs one reference.
    let shared = Arc::new(Task {
        handler: handler.clone(),
        names: names.clone(),
        queue: queue.to_string(),
        publisher,
        shutdown: shutdown.clone(),
        broken: broken.clone(),
    });
    let mut tasks = JoinSet::new();
    let ended = loop {
        while tasks.try_join_next().is_some() {}
        let slot = tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            _ = broken.cancelled() => break Err(BrokerError::ConsumerEnded),
            s = slots.clone().acquire_owned() => s.expect("the semaphore is never closed"),
        };
        let next = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break Ok(()),
            _ = broken.cancelled() => break Err(BrokerError::ConsumerEnded),
            n = consumer.next() => n,
        };
        let delivery = match next {
            Some(Ok(d)) => d,
            Some(Err(e)) => break Err(e.into()),
            None => break Err(BrokerError::ConsumerEnded),
        };
        let job = Job::of(&delivery);
        let arrival = handler.arrive(&job);
        tasks.spawn(shared.clone().run(delivery, job, arrival, slot));
    };
    while tasks.join_next().await.is_some() {}
    ended
}

/// What a job's task needs of the loop: one per subscription, shared by its jobs.
struct Task<H> {
    handler: H,
    names: Names,
    queue: String,
    publisher: Channel,
    shutdown: CancellationToken,
    broken: CancellationToken,
}

impl<H: Concurrent> Task<H> {
    async fn run(
        self: Arc<Self>,
        delivery: Delivery,
        job: Job,
        arrival: H::Arrival,
        slot: OwnedSemaphorePermit,
    ) {
        // Unacked when shutting down during a database outage: redelivered.
        let Some(outcome) = self.handled(&job, arrival, Some(slot)).await else {
            return;
        };
        let settled = settle::one(
            &self.handler,
            &self.names,
            &self.queue,
            &delivery,
            &job,
            &outcome,
            &self.publisher,
        )
        .await;
        if let Err(e) = settled {
            tracing::warn!(queue = %self.queue, error = %e, "cannot settle a job; the broker will redeliver it");
            self.broken.cancel();
        }
    }

    /// Hands the job to the handler until it answers, through database outages; `None`
    /// on shutdown during one.
    async fn handled(
        &self,
        job: &Job,
        mut arrival: H::Arrival,
        mut slot: Option<OwnedSemaphorePermit>,
    ) -> Option<Outcome> {
        let mut backoff = amqp::reconnect_backoff();
        loop {
            match self
                .handler
                .handle_one(job, &mut arrival, &mut slot, &self.shutdown)
                .await
            {
                Ok(outcome) => return Some(outcome),
                Err(e) => {
                    let wait = backoff.next().unwrap_or(Duration::from_secs(5));
                    tracing::warn!(queue = %self.queue, error = %e, retry_in = ?wait, "database unavailable; holding the job");
                    tokio::select! {
                        _ = self.shutdown.cancelled() => return None,
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
    }
}
