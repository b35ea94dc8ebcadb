//! Consumes `<prefix>.payment-events`.
//!
//! Deliveries are taken in batches (whatever has arrived, up to `amqp.batch_size`) and
//! applied in one database transaction; only after it commits are they acked, so a crash
//! in between redelivers instead of losing, and the processed-event ids make the
//! redelivery a no-op. Messages that can never succeed are dead-lettered with their
//! reason (confirmed by the broker before the original is acked) and never block the
//! messages behind them. A database outage holds the batch and retries it with backoff:
//! nothing is dead-lettered for a transient cause.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use chrono::Utc;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::apply::{Applied, Applier, lock_keys_of};
use super::decode::{DecodeError, DecodeLimits, Decoded, decode};
use crate::amqp::{Broker, Names};
use crate::domain::event::Event;
use crate::metrics::Metrics;
use crate::queue::{self, Job, Outcome};
use crate::store;

/// The event consumer's settings and handles.
#[derive(Clone)]
pub struct EventConsumer {
    pub pool: PgPool,
    pub broker: Broker,
    pub applier: Applier,
    pub limits: DecodeLimits,
    pub prefetch: u16,
    pub batch_size: usize,
    /// How long to wait for a batch to fill.
    pub batch_linger: std::time::Duration,
    pub metrics: Arc<Metrics>,
}

impl EventConsumer {
    /// Decides and applies one batch. Returns one outcome per message, in order, once
    /// the batch's transaction has committed; a transient database error is returned
    /// as such and the caller retries the whole batch.
    ///
    /// Unless `wait_for_locks`, events whose subscription or payment is locked by another
    /// consumer's transaction are not waited for but deferred ([`Outcome::Defer`]):
    /// batches of competing consumers overlap often (renewals of the same popular
    /// subscriptions, duplicates), and waiting would serialise them.
    pub async fn handle_batch(
        &self,
        batch: &[Job],
        wait_for_locks: bool,
    ) -> Result<Vec<Outcome>, sqlx::Error> {
        let span = tracing::info_span!(
            "event_batch",
            size = batch.len(),
            event_ids = tracing::field::Empty
        );
        if !span.is_disabled() {
            let ids: Vec<&str> = batch
                .iter()
                .map(|m| m.message_id.as_deref().unwrap_or("-"))
                .collect();
            span.record("event_ids", ids.join(",").as_str());
        }
        self.handle_batch_inner(batch, wait_for_locks)
            .instrument(span)
            .await
    }

    async fn handle_batch_inner(
        &self,
        batch: &[Job],
        wait_for_locks: bool,
    ) -> Result<Vec<Outcome>, sqlx::Error> {
        let now = Utc::now();
        let mut outcomes: Vec<Option<Outcome>> = vec![None; batch.len()];
        let mut events: Vec<(usize, Event)> = Vec::new();
        for (i, m) in batch.iter().enumerate() {
            match decode(
                m.message_id.as_deref(),
                &m.routing_key,
                &m.body,
                self.limits,
                now,
            ) {
                Ok(Decoded::Event(e)) => events.push((i, e)),
                Ok(Decoded::Ignored { event_type }) => {
                    tracing::debug!(%event_type, "ignoring event type guildgate does not act on");
                    self.metrics.event(&event_type, "ignored");
                    outcomes[i] = Some(Outcome::Ack("ignored"));
                }
                Err(e) => outcomes[i] = Some(dead_letter(&e)),
            }
        }
        if !events.is_empty() {
            match self.apply_all(&events, now, wait_for_locks).await {
                Ok(applied) => {
                    for ((i, e), a) in events.iter().zip(applied) {
                        outcomes[*i] = Some(match a {
                            Some(a) => {
                                tracing::debug!(event_id = %e.id, event_type = e.type_name(), outcome = a.as_str(), "event applied");
                                self.metrics.event(e.type_name(), a.as_str());
                                Outcome::Ack(a.as_str())
                            }
                            None => Outcome::Defer,
                        });
                    }
                }
                // A unique violation is transient only if a concurrent insert won a
                // race; one event that always collides must not hold the batch forever.
                Err(e) if store::is_transient(&e) && !store::is_unique_violation(&e) => {
                    return Err(e);
                }
                Err(e) => {
                    // Something in the batch is refused by the database: for what it is,
                    // or by a unique violation. Apply the events one by one to find it;
                    // the rest still apply.
                    tracing::warn!(error = %e, "batch refused by the database; applying one by one");
                    for (i, ev) in &events {
                        let pair = (*i, ev.clone());
                        let one = std::slice::from_ref(&pair);
                        let mut result = self.apply_all(one, now, true).await;
                        if let Err(e) = &result
                            && store::is_unique_violation(e)
                        {
                            // The race is real (another consumer or the API inserting the
                            // same row): once more, alone, now that the winner committed.
                            tracing::info!(event_id = %ev.id, error = %e, "unique violation; retrying the event once");
                            result = self.apply_all(one, now, true).await;
                        }
                        match result {
                            Ok(a) => {
                                let a = a[0].expect("waited for its lock");
                                self.metrics.event(ev.type_name(), a.as_str());
                                outcomes[*i] = Some(Outcome::Ack(a.as_str()));
                            }
                            Err(e) if store::is_unique_violation(&e) => {
                                tracing::error!(event_id = %ev.id, error = %e, "event hit a unique violation again; parking it");
                                outcomes[*i] = Some(Outcome::DeadLetter {
                                    code: "database_rejected",
                                    reason: format!(
                                        "the database refused this event with a unique violation, also when retried alone: {e}"
                                    ),
                                });
                            }
                            Err(e) if store::is_transient(&e) => return Err(e),
                            Err(e) => {
                                tracing::error!(event_id = %ev.id, error = %e, "event refused by the database");
                                outcomes[*i] = Some(Outcome::DeadLetter {
                                    code: "database_rejected",
                                    reason: format!("the database refused this event: {e}"),
                                });
                            }
                        }
                    }
                }
            }
        }
        Ok(outcomes
            .into_iter()
            .map(|o| o.expect("every message has an outcome"))
            .collect())
    }

    /// Applies `events` in one transaction; `None` for an event deferred because its
    /// aggregate is locked elsewhere (only when not `wait_for_locks`).
    async fn apply_all(
        &self,
        events: &[(usize, Event)],
        now: chrono::DateTime<Utc>,
        wait_for_locks: bool,
    ) -> Result<Vec<Option<Applied>>, sqlx::Error> {
        let mut tx = store::ingest::begin(&self.pool).await?;
        let keys: Vec<Vec<String>> = events.iter().map(|(_, e)| lock_keys_of(e)).collect();
        let all: Vec<String> = keys.iter().flatten().cloned().collect();
        let held: HashSet<String> = if wait_for_locks {
            store::ingest::lock_keys(&mut tx, &all).await?;
            all.into_iter().collect()
        } else {
            store::ingest::try_lock_keys(&mut tx, &all)
                .await?
                .into_iter()
                .collect()
        };
        // An event is applied only with all of its locks; one it does not have all of
        // is deferred (a lock it did get is held until the commit, harmlessly).
        let holds_all = |ks: &[String]| ks.iter().all(|k| held.contains(k));
        let batch: Vec<&Event> = events
            .iter()
            .zip(&keys)
            .filter(|(_, ks)| holds_all(ks))
            .map(|((_, e), _)| e)
            .collect();
        let mut applied = if batch.is_empty() {
            Vec::new()
        } else {
            self.applier.apply_batch(&mut tx, &batch, now).await?
        }
        .into_iter();
        tx.commit().await?;
        Ok(keys
            .iter()
            .map(|ks| if holds_all(ks) { applied.next() } else { None })
            .collect())
    }

    /// Consumes until `shutdown`: stops taking messages, finishes and acks the batch in
    /// hand, and returns. Broker and database outages are waited out.
    pub async fn run(self, shutdown: CancellationToken) {
        let broker = self.broker.clone();
        queue::run(&self, &broker, shutdown).await;
    }
}

impl queue::Handler for EventConsumer {
    fn queue(&self, names: &Names) -> String {
        names.payment_events()
    }

    /// The message's own id, else the body's hash (the event id decoding would have
    /// used).
    fn dead_letter_id(&self, job: &Job) -> String {
        job.message_id.clone().unwrap_or_else(|| {
            super::decode::event_id(None, &job.body)
                .map(|id| id.to_string())
                .unwrap_or_default()
        })
    }

    /// A replay of a parked event needs its original routing key (its event type).
    fn dead_letter_keeps_routing_key(&self) -> bool {
        true
    }
}

impl queue::Batched for EventConsumer {
    fn shape(&self) -> queue::Shape {
        queue::Shape {
            prefetch: self.prefetch,
            batch: self.batch_size,
            linger: self.batch_linger,
        }
    }

    async fn handle(
        &self,
        jobs: &[Job],
        shutdown: &CancellationToken,
    ) -> Result<Vec<Outcome>, sqlx::Error> {
        // A delivery deferred a few times in a row (or any, once shutting down) is
        // applied by waiting for its lock, so none is deferred forever.
        let wait_for_locks = shutdown.is_cancelled() || jobs.iter().any(|j| j.deferred >= 3);
        let started = Instant::now();
        let outcomes = self.handle_batch(jobs, wait_for_locks).await?;
        self.metrics
            .event_latency
            .observe(started.elapsed().as_secs_f64());
        for (job, outcome) in jobs.iter().zip(&outcomes) {
            if matches!(outcome, Outcome::DeadLetter { .. }) {
                self.metrics.event(&job.routing_key, "dead_lettered");
            }
        }
        Ok(outcomes)
    }
}

fn dead_letter(e: &DecodeError) -> Outcome {
    Outcome::DeadLetter {
        code: e.code(),
        reason: e.to_string(),
    }
}
