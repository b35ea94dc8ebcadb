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
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::BasicAckOptions;
use lapin::{Channel, Consumer};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::apply::{Applied, Applier, lock_keys_of};
use super::decode::{DecodeError, DecodeLimits, Decoded, decode};
use crate::amqp::dlq;
use crate::amqp::{self, Broker, BrokerError, Names, Outgoing, header_str};
use crate::domain::event::Event;
use crate::metrics::Metrics;
use crate::store;

/// What to do with one delivery once its batch is settled. Only the loop acks.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// Acknowledge; the label is the metrics outcome.
    Ack(&'static str),
    /// Park in the dead-letter queue with a reason, then acknowledge.
    DeadLetter { code: &'static str, reason: String },
    /// Another consumer's transaction holds this event's subscription or payment: keep
    /// the delivery in hand (unacked) and apply it with the next batch.
    Defer,
}

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

/// One delivery's bytes and metadata, detached from lapin so tests can build them.
#[derive(Clone, Debug)]
pub struct Incoming {
    pub message_id: Option<String>,
    pub routing_key: String,
    pub body: Vec<u8>,
}

impl Incoming {
    fn of(d: &Delivery) -> Self {
        // A replayed message arrives through the default exchange, its routing key the
        // queue's name; its original key travels in a header (or is unknown, and then
        // not checked).
        let routing_key = if d.exchange.as_str().is_empty() {
            amqp::header_text(d.properties.headers().as_ref(), dlq::ROUTING_KEY_HEADER)
                .unwrap_or_default()
        } else {
            d.routing_key.to_string()
        };
        Self {
            message_id: amqp::message_id(&d.properties),
            routing_key,
            body: d.data.clone(),
        }
    }
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
        batch: &[Incoming],
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
        batch: &[Incoming],
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
        let mut tx = self.pool.begin().await?;
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
        let queue = self.broker.names().payment_events();
        loop {
            let (ch, consumer, publisher) = match self
                .broker
                .subscribe(&queue, "", self.prefetch, &shutdown)
                .await
            {
                Ok(x) => x,
                Err(_) => return, // shutting down
            };
            match self.consume(consumer, &publisher, &shutdown).await {
                Ok(()) => {
                    // Closing returns unacked prefetched deliveries to the queue. Bounded:
                    // a broker that does not answer must not hold up the shutdown.
                    let _ = tokio::time::timeout(
                        std::time::Duration::from_secs(5),
                        ch.close(200, "shutdown".into()),
                    )
                    .await;
                    return;
                }
                Err(e) => {
                    // The stream ended or the channel broke: subscribe again. Deliveries
                    // we held unacked are redelivered by the broker.
                    tracing::warn!(error = %e, "payment-events consumer interrupted; resubscribing");
                    let _ = tokio::time::timeout(
                        std::time::Duration::from_secs(5),
                        ch.close(200, "resubscribe".into()),
                    )
                    .await;
                }
            }
        }
    }

    async fn consume(
        &self,
        mut consumer: Consumer,
        publisher: &Channel,
        shutdown: &CancellationToken,
    ) -> Result<(), BrokerError> {
        // Deliveries deferred by earlier batches, with how often each was deferred.
        let mut carry: Vec<(Delivery, u32)> = Vec::new();
        loop {
            let mut batch: Vec<(Delivery, u32)> = std::mem::take(&mut carry);
            if batch.is_empty() {
                let first = tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => return Ok(()),
                    next = consumer.next() => next,
                };
                match first {
                    Some(Ok(d)) => batch.push((d, 0)),
                    Some(Err(e)) => return Err(e.into()),
                    None => return Err(BrokerError::ConsumerEnded),
                }
            }
            // Fill the batch for up to `batch_linger`: every transaction costs a durable
            // commit (an fsync), so under load a few milliseconds of waiting buy many
            // events per commit; when idle, an event waits at most this long. After
            // shutdown only what is already in hand is finished.
            let more = self.batch_size.saturating_sub(batch.len());
            batch.extend(
                amqp::more_deliveries(&mut consumer, more, self.batch_linger, shutdown)
                    .await
                    .into_iter()
                    .map(|d| (d, 0)),
            );
            // A delivery deferred a few times in a row (or any, once shutting down) is
            // applied by waiting for its lock, so none is deferred forever.
            let wait_for_locks =
                shutdown.is_cancelled() || batch.iter().any(|(_, deferred)| *deferred >= 3);
            let started = Instant::now();
            let incoming: Vec<Incoming> = batch.iter().map(|(d, _)| Incoming::of(d)).collect();
            let outcomes = self
                .handle_until_committed(&incoming, wait_for_locks, shutdown)
                .await?;
            self.metrics
                .event_latency
                .observe(started.elapsed().as_secs_f64());
            self.settle(&batch, &incoming, &outcomes, publisher).await?;
            carry = batch
                .into_iter()
                .zip(&outcomes)
                .filter(|(_, o)| **o == Outcome::Defer)
                .map(|((d, n), _)| (d, n + 1))
                .collect();
            if shutdown.is_cancelled() && carry.is_empty() {
                return Ok(());
            }
        }
    }

    /// Retries a batch through database outages until it commits. On shutdown during an
    /// outage, gives up without acking (the broker redelivers).
    async fn handle_until_committed(
        &self,
        batch: &[Incoming],
        wait_for_locks: bool,
        shutdown: &CancellationToken,
    ) -> Result<Vec<Outcome>, BrokerError> {
        let mut backoff = amqp::reconnect_backoff();
        loop {
            match self.handle_batch(batch, wait_for_locks).await {
                Ok(o) => return Ok(o),
                Err(e) => {
                    let wait = backoff.next().unwrap_or(std::time::Duration::from_secs(5));
                    tracing::warn!(error = %e, retry_in = ?wait, "database unavailable; holding the batch");
                    tokio::select! {
                        _ = shutdown.cancelled() => return Err(BrokerError::ShuttingDown),
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
    }

    async fn settle(
        &self,
        batch: &[(Delivery, u32)],
        incoming: &[Incoming],
        outcomes: &[Outcome],
        publisher: &Channel,
    ) -> Result<(), BrokerError> {
        let names: &Names = self.broker.names();
        // The id a parked copy carries: the message's own, else the body's hash (the
        // event id decoding would have used). Computed only for what is parked.
        let dead_ids: Vec<(usize, String)> = outcomes
            .iter()
            .enumerate()
            .filter(|(_, o)| matches!(o, Outcome::DeadLetter { .. }))
            .map(|(i, _)| {
                let m = &incoming[i];
                let id = m.message_id.clone().unwrap_or_else(|| {
                    super::decode::event_id(None, &m.body)
                        .map(|id| id.to_string())
                        .unwrap_or_default()
                });
                (i, id)
            })
            .collect();
        let mut parked = Vec::with_capacity(dead_ids.len());
        for (i, id) in &dead_ids {
            let (i, m) = (*i, &incoming[*i]);
            let Outcome::DeadLetter { code, reason } = &outcomes[i] else {
                unreachable!("filtered above")
            };
            tracing::warn!(message_id = %id, routing_key = %m.routing_key, code, %reason, "dead-lettering payment event");
            let out = Outgoing::parked(
                names,
                &names.payment_events(),
                id,
                &m.body,
                batch[i].0.properties.headers().clone().unwrap_or_default(),
                code,
                reason,
            )
            .header(dlq::ROUTING_KEY_HEADER, header_str(&m.routing_key));
            parked.push(out);
            self.metrics.event(&m.routing_key, "dead_lettered");
        }
        if !parked.is_empty() {
            // Confirmed by the broker before the originals are acked: a crash in between
            // leaves a copy in both places, never in neither.
            amqp::publish_confirmed(publisher, &parked).await?;
        }
        // One ack for the whole batch when none of it stays in hand: every delivery this
        // channel gave us before the batch's last one was either acked with an earlier
        // batch or deferred into this one (deferred deliveries open the next batch), so
        // `multiple` on the highest tag acks exactly this batch. One frame instead of one
        // per message, for lapin and for the broker.
        if !outcomes.contains(&Outcome::Defer) {
            if let Some((last, _)) = batch.iter().max_by_key(|(d, _)| d.delivery_tag) {
                last.ack(BasicAckOptions { multiple: true }).await?;
            }
            return Ok(());
        }
        for ((d, _), o) in batch.iter().zip(outcomes) {
            if *o == Outcome::Defer {
                continue; // kept in hand for the next batch
            }
            d.ack(BasicAckOptions::default()).await?;
        }
        Ok(())
    }
}

fn dead_letter(e: &DecodeError) -> Outcome {
    Outcome::DeadLetter {
        code: e.code(),
        reason: e.to_string(),
    }
}
