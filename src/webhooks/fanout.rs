//! Consumes `<prefix>.grant-events`: each grant event becomes one message per enabled
//! endpoint of its business whose filter accepts the event type, each with a delivery
//! job in the outbox. Grant events are taken in batches (whatever has arrived, up to
//! `amqp.batch_size`) and fanned out in one statement ([`messages::fan_out`]). They are
//! acked only after that commits, so a crash in between redelivers them, and the
//! deterministic message ids make the redelivery create nothing new. The outbox relay publishes the
//! jobs to `<prefix>.webhooks` with publisher confirms.
//!
//! A database outage holds the message and retries it; a body that can never be fanned
//! out (not a grant event) is dead-lettered with its reason. The loop around it is the
//! one queue worker ([`crate::queue`]).

use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::value::RawValue;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::deliver::{Deliverer, STALLED_AFTER};
use super::{holds, schedule};
use crate::amqp::{Broker, Names};
use crate::domain::ids::{BusinessId, GrantId};
use crate::metrics::Metrics;
use crate::queue;
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

/// What became of one grant event.
#[derive(Clone, Debug, PartialEq)]
pub enum Fanned {
    /// Fanned out into this many new messages (0 for a redelivery or no endpoints).
    Messages(u64),
    /// Refused for what it holds: to be parked with why.
    Refused { code: &'static str, reason: String },
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
    /// The delivery workers of this process: messages for an endpoint that hangs or
    /// whose circuit is open in their view ([`super::isolation::Isolation::holding`])
    /// are created held, with no job, and parked for the endpoint's puller once it
    /// answers again. `None`: every message gets a job.
    pub holds: Option<Deliverer>,
}

impl Fanout {
    /// Handles one grant event; a database error is returned for the caller to retry.
    pub async fn handle(&self, body: &[u8]) -> Result<Fanned, sqlx::Error> {
        let mut outcomes = self.handle_batch(&[body]).await?;
        Ok(outcomes.remove(0))
    }

    /// Handles a batch of grant events in one statement: one outcome per body, in
    /// order, once it has committed. A transient database error is returned for the
    /// caller to retry the whole batch.
    #[tracing::instrument(name = "webhook_fanout", skip_all, fields(size = bodies.len()))]
    pub async fn handle_batch(&self, bodies: &[&[u8]]) -> Result<Vec<Fanned>, sqlx::Error> {
        let mut outcomes: Vec<Option<Fanned>> = vec![None; bodies.len()];
        let mut events: Vec<(usize, GrantEvent)> = Vec::with_capacity(bodies.len());
        for (i, body) in bodies.iter().enumerate() {
            match GrantEvent::decode(body) {
                Ok(e) => events.push((i, e)),
                Err(e) => {
                    outcomes[i] = Some(Fanned::Refused {
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
                        outcomes[*i] = Some(Fanned::Messages(n));
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
                                Ok(n) => Fanned::Messages(n[0]),
                                Err(e) if store::is_transient(&e) => return Err(e),
                                Err(e) => {
                                    tracing::error!(grant_id = %ev.grant_id, error = %e, "grant event refused by the database");
                                    Fanned::Refused {
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
        let (held, notes): (Vec<_>, Vec<_>) = match &self.holds {
            Some(deliverer) => deliverer
                .isolation
                .holding(
                    std::time::Instant::now(),
                    STALLED_AFTER,
                    schedule::hold_for(0, deliverer.timeout),
                )
                .into_iter()
                .map(|(ep, until, note)| ((ep, holds::wall_clock(until)), note))
                .unzip(),
            None => (Vec::new(), Vec::new()),
        };
        let mut conn = self.pool.acquire().await?;
        let created = messages::fan_out(&mut conn, &batch, &held).await?;
        drop(conn);
        // Noted once written, so the endpoint's next success parks these holds. One
        // that succeeded while they were written may have had its last request in
        // flight answer then: its held messages are parked at once, as that success
        // parks them, for its puller to send at its pace. (Making them due for the
        // hold releaser instead raced with that success's parking: when it came
        // first, the parking found nothing held, and the whole backlog went back
        // through the broker a second later.)
        if let Some(deliverer) = &self.holds {
            for ((endpoint, _), note) in held.iter().zip(notes) {
                if note.written() {
                    deliverer.release_held(endpoint);
                }
            }
        }
        Ok(created)
    }

    /// Consumes `<prefix>.grant-events` until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        let broker = self.broker.clone();
        queue::run(&self, &broker, shutdown).await;
    }
}

impl queue::Handler for Fanout {
    fn queue(&self, names: &Names) -> String {
        names.grant_events()
    }
}

impl queue::Batched for Fanout {
    fn shape(&self) -> queue::Shape {
        queue::Shape {
            prefetch: self.prefetch,
            batch: self.batch_size.max(1),
            linger: self.batch_linger,
        }
    }

    /// A bundle counts as its grant events: a batch holds `batch_size` of them at most,
    /// and a bundle is never split.
    fn size(&self, job: &queue::Job) -> usize {
        Carried::count(&Carried::of(&job.body))
    }

    /// Fans out every grant event of the batch in one statement. Acked only once it
    /// has committed: a crash before redelivers, and the deterministic message ids make
    /// the redelivery create nothing new. A bundle's refused elements are parked each
    /// on its own, so its good events are not held back by a bad one.
    async fn handle(
        &self,
        jobs: &[queue::Job],
        _shutdown: &CancellationToken,
    ) -> Result<Vec<queue::Outcome>, sqlx::Error> {
        let splits: Vec<Result<Carried, FanoutError>> =
            jobs.iter().map(|j| Carried::of(&j.body)).collect();
        let bodies: Vec<&[u8]> = jobs
            .iter()
            .zip(&splits)
            .flat_map(|(j, split)| {
                split
                    .iter()
                    .flat_map(|c| c.events.iter().map(|r| &j.body[r.clone()]))
            })
            .collect();
        let mut fanned = self.handle_batch(&bodies).await?.into_iter();
        Ok(jobs
            .iter()
            .zip(&splits)
            .map(|(j, split)| {
                let carried = match split {
                    Ok(c) => c,
                    Err(e) => {
                        return queue::Outcome::DeadLetter {
                            code: e.code(),
                            reason: e.to_string(),
                        };
                    }
                };
                let mut parts = Vec::new();
                for (index, range) in carried.events.iter().enumerate() {
                    let Fanned::Refused { code, reason } =
                        fanned.next().expect("one result per grant event")
                    else {
                        continue;
                    };
                    if !carried.bundle {
                        return queue::Outcome::DeadLetter { code, reason };
                    }
                    parts.push(queue::DeadPart {
                        index,
                        body: j.body[range.clone()].to_vec(),
                        code,
                        reason,
                    });
                }
                if parts.is_empty() {
                    queue::Outcome::Ack("fanned_out")
                } else {
                    queue::Outcome::DeadLetterParts(parts)
                }
            })
            .collect())
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
