//! Consumes `<prefix>.grant-events`: each grant event becomes one message per enabled
//! endpoint of its business whose filter accepts the event type, each with a delivery
//! job in the outbox. Grant events are taken in batches (whatever has arrived, up to
//! `amqp.batch_size`) and fanned out in one statement ([`messages::fan_out`]). They are
//! acked only after that commits, so a crash in between redelivers them, and the
//! deterministic message ids make the redelivery create nothing new. The outbox relay publishes the
//! jobs to `<prefix>.webhooks` with publisher confirms.
//!
//! A database outage holds the message and retries it; a body that can never be fanned
//! out (not a grant event) is dead-lettered with its reason.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::BasicAckOptions;
use lapin::{Channel, Consumer};
use serde::Deserialize;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::deliver::STALLED_AFTER;
use super::isolation::Isolation;
use super::{holds, messages, schedule};
use crate::amqp::{self, Broker, BrokerError, Names, Outgoing};
use crate::ids::{BusinessId, GrantId};
use crate::metrics::Metrics;
use crate::store;

/// Why a grant event cannot be fanned out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FanoutError {
    #[error("the body is not UTF-8")]
    NotUtf8,
    #[error("not a grant event: {0}")]
    Shape(String),
    #[error("{0:?} is not an entitlement_grant event type")]
    EventType(String),
}

impl FanoutError {
    fn code(&self) -> &'static str {
        match self {
            FanoutError::NotUtf8 => "not_utf8",
            FanoutError::Shape(_) => "bad_shape",
            FanoutError::EventType(_) => "bad_event_type",
        }
    }
}

/// What the fan-out reads of a grant event (the webhook body); the rest is sent as is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GrantEvent {
    pub business_id: BusinessId,
    pub grant_id: GrantId,
    pub event_type: String,
    /// Exactly the bytes that every endpoint receives.
    pub body: String,
}

impl GrantEvent {
    /// Parses at the edge: bytes to a checked grant event.
    pub fn decode(bytes: &[u8]) -> Result<Self, FanoutError> {
        #[derive(Deserialize)]
        struct Raw {
            business_id: BusinessId,
            #[serde(rename = "type")]
            event_type: String,
            data: RawData,
        }
        #[derive(Deserialize)]
        struct RawData {
            id: GrantId,
        }
        let body = std::str::from_utf8(bytes).map_err(|_| FanoutError::NotUtf8)?;
        let raw: Raw = serde_json::from_str(body).map_err(|e| FanoutError::Shape(e.to_string()))?;
        let ok_type = raw.event_type.len() <= 100
            && raw
                .event_type
                .strip_prefix("entitlement_grant.")
                .is_some_and(|t| {
                    !t.is_empty() && t.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
                });
        if !ok_type {
            return Err(FanoutError::EventType(raw.event_type));
        }
        Ok(Self {
            business_id: raw.business_id,
            grant_id: raw.data.id,
            event_type: raw.event_type,
            body: body.to_string(),
        })
    }
}

/// What to do with one grant event. Only the loop acks.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// Fanned out into this many new messages (0 for a redelivery or no endpoints).
    Ack(u64),
    DeadLetter {
        code: &'static str,
        reason: String,
    },
}

/// The fan-out consumer.
#[derive(Clone)]
pub struct Fanout {
    pub pool: PgPool,
    pub broker: Broker,
    pub prefetch: u16,
    /// Grant events fanned out in one statement at most.
    pub batch_size: usize,
    /// How long to wait for a batch to fill (`amqp.batch_linger`).
    pub batch_linger: Duration,
    pub metrics: Arc<Metrics>,
    /// The delivery workers' view of the endpoints in this process, with the request
    /// timeout: messages for an endpoint that hangs or whose circuit is open are created
    /// held ([`Isolation::holding`]), with no job. `None`: every message gets a job.
    pub holds: Option<(Isolation, Duration)>,
}

impl Fanout {
    /// Handles one grant event; a database error is returned for the caller to retry.
    pub async fn handle(&self, body: &[u8]) -> Result<Outcome, sqlx::Error> {
        let mut outcomes = self.handle_batch(&[body]).await?;
        Ok(outcomes.remove(0))
    }

    /// Handles a batch of grant events in one statement: one outcome per body, in
    /// order, once it has committed. A transient database error is returned for the
    /// caller to retry the whole batch.
    #[tracing::instrument(name = "webhook_fanout", skip_all, fields(size = bodies.len()))]
    pub async fn handle_batch(&self, bodies: &[&[u8]]) -> Result<Vec<Outcome>, sqlx::Error> {
        let mut outcomes: Vec<Option<Outcome>> = vec![None; bodies.len()];
        let mut events: Vec<(usize, GrantEvent)> = Vec::with_capacity(bodies.len());
        for (i, body) in bodies.iter().enumerate() {
            match GrantEvent::decode(body) {
                Ok(e) => events.push((i, e)),
                Err(e) => {
                    outcomes[i] = Some(Outcome::DeadLetter {
                        code: e.code(),
                        reason: e.to_string(),
                    })
                }
            }
        }
        if !events.is_empty() {
            match self.fan_out(&events).await {
                Ok(counts) => {
                    for ((i, e), n) in events.iter().zip(counts) {
                        tracing::debug!(grant_id = %e.grant_id, event_type = %e.event_type, messages = n, "fanned out");
                        outcomes[*i] = Some(Outcome::Ack(n));
                    }
                }
                Err(e) if store::is_transient(&e) => return Err(e),
                Err(e) => {
                    // Something in the batch is refused for what it holds (the ids are
                    // checked, so this is rare): fan out one by one to find it and park
                    // it, rather than block the grant events around it.
                    tracing::warn!(error = %e, "fan-out batch refused by the database; one by one");
                    for (i, ev) in &events {
                        outcomes[*i] = Some(
                            match self.fan_out(std::slice::from_ref(&(*i, ev.clone()))).await {
                                Ok(n) => Outcome::Ack(n[0]),
                                Err(e) if store::is_transient(&e) => return Err(e),
                                Err(e) => {
                                    tracing::error!(grant_id = %ev.grant_id, error = %e, "grant event refused by the database");
                                    Outcome::DeadLetter {
                                        code: "database_rejected",
                                        reason: format!(
                                            "the database refused this grant event: {e}"
                                        ),
                                    }
                                }
                            },
                        );
                    }
                }
            }
        }
        Ok(outcomes
            .into_iter()
            .map(|o| o.expect("every grant event has an outcome"))
            .collect())
    }

    async fn fan_out(&self, events: &[(usize, GrantEvent)]) -> Result<Vec<u64>, sqlx::Error> {
        let batch: Vec<messages::FanoutEvent<'_>> = events
            .iter()
            .map(|(_, e)| messages::FanoutEvent {
                business_id: e.business_id.as_str(),
                grant_id: e.grant_id.as_str(),
                event_type: &e.event_type,
                body: &e.body,
            })
            .collect();
        let held: Vec<(String, chrono::DateTime<chrono::Utc>)> = match &self.holds {
            Some((isolation, timeout)) => isolation
                .holding(
                    std::time::Instant::now(),
                    isolation.stall_after(STALLED_AFTER),
                    schedule::hold_for(0, *timeout),
                )
                .into_iter()
                .map(|(ep, until)| (ep, holds::wall_clock(until)))
                .collect(),
            None => Vec::new(),
        };
        let mut conn = self.pool.acquire().await?;
        messages::fan_out(&mut conn, &batch, &held).await
    }

    /// Consumes until `shutdown`, resubscribing when the channel breaks.
    pub async fn run(self, shutdown: CancellationToken) {
        let queue = self.broker.names().grant_events();
        loop {
            let (ch, consumer, publisher) = match self
                .broker
                .subscribe(&queue, "", self.prefetch, &shutdown)
                .await
            {
                Ok(x) => x,
                Err(_) => return,
            };
            let r = self.consume(consumer, &publisher, &shutdown).await;
            let _ = ch.close(200, "bye".into()).await;
            match r {
                Ok(()) => return,
                Err(e) => {
                    // Unacked grant events are redelivered by the broker.
                    tracing::warn!(error = %e, "grant-events consumer interrupted; resubscribing");
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
        let batch_size = self.batch_size.max(1);
        loop {
            let next = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Ok(()),
                n = consumer.next() => n,
            };
            let mut batch = match next {
                Some(Ok(d)) => vec![d],
                Some(Err(e)) => return Err(e.into()),
                None => return Err(BrokerError::ConsumerEnded),
            };
            // Every statement here is a durable commit and wakes the relay: fill the
            // batch for up to `batch_linger`. After shutdown only what is in hand is done.
            let more = batch_size - batch.len();
            batch.extend(
                amqp::more_deliveries(&mut consumer, more, self.batch_linger, shutdown).await,
            );
            let bodies: Vec<&[u8]> = batch.iter().map(|d| d.data.as_slice()).collect();
            let outcomes = self.handle_until_committed(&bodies, shutdown).await?;
            // Acked only now that the batch has committed: a crash before redelivers it,
            // and the deterministic message ids make the redelivery create nothing new.
            for (d, outcome) in batch.iter().zip(outcomes) {
                self.settle(d, outcome, publisher).await?;
            }
        }
    }

    /// Retries through database outages (never dead-letters for them); on shutdown gives
    /// up without acking, and the broker redelivers.
    async fn handle_until_committed(
        &self,
        bodies: &[&[u8]],
        shutdown: &CancellationToken,
    ) -> Result<Vec<Outcome>, BrokerError> {
        let mut backoff = amqp::reconnect_backoff();
        loop {
            match self.handle_batch(bodies).await {
                Ok(o) => return Ok(o),
                Err(e) => {
                    let wait = backoff.next().unwrap_or(Duration::from_secs(5));
                    tracing::warn!(error = %e, retry_in = ?wait, "database unavailable; holding the grant events");
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
        d: &Delivery,
        outcome: Outcome,
        publisher: &Channel,
    ) -> Result<(), BrokerError> {
        if let Outcome::DeadLetter { code, reason } = outcome {
            let names: &Names = self.broker.names();
            let (_dlx, _dead) = (
                names.dead_letter_exchange(),
                Names::dead(&names.grant_events()),
            );
            let id = d
                .properties
                .message_id()
                .as_ref()
                .map(|m| m.to_string())
                .unwrap_or_default();
            tracing::warn!(message_id = %id, code, %reason, "dead-lettering grant event");
            let out = Outgoing::parked(
                names,
                &names.grant_events(),
                &id,
                &d.data,
                d.properties.headers().clone().unwrap_or_default(),
                code,
                &reason,
            );
            // Confirmed before the original is acked: never in neither place.
            amqp::publish_confirmed(publisher, &[out]).await?;
        }
        d.ack(BasicAckOptions::default()).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CREATED: &str =
        include_str!("../../../shared/fixtures/webhooks/entitlement_grant.created.json");

    #[test]
    fn decodes_the_webhook_fixture_and_keeps_its_bytes() {
        let e = GrantEvent::decode(CREATED.as_bytes()).unwrap();
        assert_eq!(e.business_id.as_str(), "bus_H4ekzPSlcg");
        assert_eq!(e.grant_id.as_str(), "grant_DiscordPending5L");
        assert_eq!(e.event_type, "entitlement_grant.created");
        assert_eq!(e.body, CREATED);
    }

    #[test]
    fn refuses_what_is_not_a_grant_event() {
        assert_eq!(GrantEvent::decode(&[0xff]), Err(FanoutError::NotUtf8));
        assert!(matches!(
            GrantEvent::decode(b"{}"),
            Err(FanoutError::Shape(_))
        ));
        let other = CREATED.replace("entitlement_grant.created", "payment.succeeded");
        assert!(matches!(
            GrantEvent::decode(other.as_bytes()),
            Err(FanoutError::EventType(_))
        ));
        let bad_id = CREATED.replace("grant_DiscordPending5L", "grant <x>");
        assert!(matches!(
            GrantEvent::decode(bad_id.as_bytes()),
            Err(FanoutError::Shape(_))
        ));
    }
}
