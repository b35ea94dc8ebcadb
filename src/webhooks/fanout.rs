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

use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::BasicAckOptions;
use lapin::{Channel, Consumer};
use serde::Deserialize;
use serde_json::value::RawValue;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::deliver::STALLED_AFTER;
use super::isolation::Isolation;
use super::{holds, schedule};
use crate::amqp::{self, Broker, BrokerError, Names, Outgoing};
use crate::domain::ids::{BusinessId, GrantId};
use crate::metrics::Metrics;
use crate::store;
use crate::store::messages;

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

/// The grant events one message carries, as byte ranges of its body (each element's
/// bytes are sent exactly as they are): a bundle, a JSON array, is what one ingest batch
/// emits; a single grant event is what the syncer and the API emit, and what a replayed
/// parked event is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Carried {
    pub bundle: bool,
    pub events: Vec<Range<usize>>,
}

impl Carried {
    /// Splits a message body; a bundle that is not a JSON array of values is refused
    /// whole (its elements cannot be told apart).
    pub fn of(body: &[u8]) -> Result<Self, FanoutError> {
        if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'[') {
            return Ok(Self {
                bundle: false,
                events: std::iter::once(0..body.len()).collect(),
            });
        }
        let text = std::str::from_utf8(body).map_err(|_| FanoutError::NotUtf8)?;
        let items: Vec<&RawValue> =
            serde_json::from_str(text).map_err(|e| FanoutError::Shape(e.to_string()))?;
        let events = items
            .into_iter()
            .map(|item| {
                // A raw value borrows its bytes from `text`: its offset is its range.
                let start = item.get().as_ptr() as usize - text.as_ptr() as usize;
                start..start + item.get().len()
            })
            .collect();
        Ok(Self {
            bundle: true,
            events,
        })
    }

    /// How many grant events, for filling a batch; a body that cannot be split counts
    /// as one.
    fn count(split: &Result<Self, FanoutError>) -> usize {
        split.as_ref().map_or(1, |c| c.events.len())
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
                    STALLED_AFTER,
                    schedule::hold_for(0, *timeout),
                )
                .into_iter()
                .map(|(ep, until)| (ep, holds::wall_clock(until)))
                .collect(),
            None => Vec::new(),
        };
        let mut conn = self.pool.acquire().await?;
        let created = messages::fan_out(&mut conn, &batch, &held).await?;
        // Noted again once written: a success of the endpoint in between ended its
        // holds, and its next one must park these too.
        if let Some((isolation, _)) = &self.holds {
            for (endpoint, _) in &held {
                isolation.note_held(endpoint);
            }
        }
        Ok(created)
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
            let first = match next {
                Some(Ok(d)) => d,
                Some(Err(e)) => return Err(e.into()),
                None => return Err(BrokerError::ConsumerEnded),
            };
            // Every statement here is a durable commit and wakes the relay: fill the
            // batch with up to `batch_size` grant events (a bundle is never split) for
            // up to `batch_linger`. After shutdown only what is in hand is done.
            let deadline = tokio::time::Instant::now() + self.batch_linger;
            let split = Carried::of(&first.data);
            let mut events = Carried::count(&split);
            let mut batch = vec![(first, split)];
            while events < batch_size {
                let more = amqp::more_deliveries_until(&mut consumer, 1, deadline, shutdown).await;
                let Some(d) = more.into_iter().next() else {
                    break;
                };
                let split = Carried::of(&d.data);
                events += Carried::count(&split);
                batch.push((d, split));
            }
            let bodies: Vec<&[u8]> = batch
                .iter()
                .flat_map(|(d, split)| {
                    split
                        .iter()
                        .flat_map(|c| c.events.iter().map(|r| &d.data[r.clone()]))
                })
                .collect();
            let mut outcomes = self
                .handle_until_committed(&bodies, shutdown)
                .await?
                .into_iter();
            // Acked only now that the batch has committed: a crash before redelivers it,
            // and the deterministic message ids make the redelivery create nothing new.
            for (d, split) in &batch {
                let carried = match split {
                    Ok(c) => c,
                    Err(e) => {
                        self.park(
                            d,
                            &[(d.data.as_slice(), None, e.code(), e.to_string())],
                            publisher,
                        )
                        .await?;
                        d.ack(BasicAckOptions::default()).await?;
                        continue;
                    }
                };
                let mut parked = Vec::new();
                for (i, range) in carried.events.iter().enumerate() {
                    let outcome = outcomes.next().expect("one outcome per grant event");
                    if let Outcome::DeadLetter { code, reason } = outcome {
                        let element = carried.bundle.then_some(i);
                        parked.push((&d.data[range.clone()], element, code, reason));
                    }
                }
                if !parked.is_empty() {
                    self.park(d, &parked, publisher).await?;
                }
                d.ack(BasicAckOptions::default()).await?;
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

    /// Parks grant events of delivery `d` in `<prefix>.grant-events.dead`, each with its
    /// reason: the whole message, or elements of a bundle (`Some(index)`), each on its
    /// own with the id `<bundle id>#<index>`, so the bundle's good events are not held
    /// back by a bad one. Confirmed before the caller acks the original: never in
    /// neither place.
    async fn park(
        &self,
        d: &Delivery,
        events: &[(&[u8], Option<usize>, &'static str, String)],
        publisher: &Channel,
    ) -> Result<(), BrokerError> {
        let names: &Names = self.broker.names();
        let source = names.grant_events();
        let id = amqp::message_id(&d.properties).unwrap_or_default();
        let ids: Vec<String> = events
            .iter()
            .map(|(_, element, _, _)| match element {
                Some(i) => format!("{id}#{i}"),
                None => id.clone(),
            })
            .collect();
        let headers = d.properties.headers().clone().unwrap_or_default();
        let out: Vec<Outgoing<'_>> = events
            .iter()
            .zip(&ids)
            .map(|((body, _, code, reason), id)| {
                tracing::warn!(message_id = %id, code, %reason, "dead-lettering grant event");
                Outgoing::parked(names, &source, id, body, headers.clone(), code, reason)
            })
            .collect();
        amqp::publish_confirmed(publisher, &out).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CREATED: &str =
        include_str!("../../tests/fixtures/contract/webhooks/entitlement_grant.created.json");

    #[test]
    fn decodes_the_webhook_fixture_and_keeps_its_bytes() {
        let e = GrantEvent::decode(CREATED.as_bytes()).unwrap();
        assert_eq!(e.business_id.as_str(), "bus_H4ekzPSlcg");
        assert_eq!(e.grant_id.as_str(), "grant_DiscordPending5L");
        assert_eq!(e.event_type, "entitlement_grant.created");
        assert_eq!(e.body, CREATED);
    }

    #[test]
    fn a_bundle_splits_into_its_elements_bytes_and_a_single_event_is_one() {
        let single = Carried::of(CREATED.as_bytes()).unwrap();
        assert!(!single.bundle);
        assert_eq!(single.events.len(), 1);
        assert_eq!(single.events[0], 0..CREATED.len());

        // The fixture file ends with a newline: whitespace between elements is not theirs.
        let created = CREATED.trim_end();
        let other = created.replace("grant_DiscordPending5L", "grant_Other");
        let body = format!(" [ {CREATED},\n{other} , 7]");
        let bundle = Carried::of(body.as_bytes()).unwrap();
        assert!(bundle.bundle);
        let parts: Vec<&str> = bundle.events.iter().map(|r| &body[r.clone()]).collect();
        // Each element's bytes as they were, whitespace around it excluded.
        assert_eq!(parts, [created, other.as_str(), "7"]);
        assert_eq!(GrantEvent::decode(parts[1].as_bytes()).unwrap().body, other);

        assert!(Carried::of(b"[]").unwrap().events.is_empty());
        assert!(matches!(
            Carried::of(b"[{\"cut\": "),
            Err(FanoutError::Shape(_))
        ));
        assert_eq!(Carried::of(b"[\xff]"), Err(FanoutError::NotUtf8));
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
