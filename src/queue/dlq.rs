//! Dead-letter queues: list them, look inside, replay, purge (`guildgate dlq …`).
//!
//! Looking never removes anything: messages are fetched unacknowledged and return to
//! the queue when the channel closes. Replay republishes a message to the guildgate
//! queue it was dead-lettered from — never to the platform's shared exchange, whose other
//! consumers must not see it again — waits for the broker's confirm, and only then
//! acknowledges (removes) the parked copy. A crash between the two leaves the message
//! both replayed and parked; replaying it again is harmless, since every consumer is
//! idempotent. A replayed job starts its retries afresh (its attempt count is dropped);
//! each replay increments `x-guildgate-replays` instead, which the job keeps through its
//! retry tiers, and a message replayed `max_replays` times is left parked with a warning
//! rather than looping forever.

use lapin::options::{BasicAckOptions, BasicGetOptions, QueueDeclareOptions, QueuePurgeOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel};
use serde::Serialize;

use crate::amqp::{
    ATTEMPT_HEADER, BrokerError, DEFERRALS_HEADER, Names, REASON_CODE_HEADER, REASON_HEADER,
    header_int, header_str, header_text,
};
pub use crate::amqp::{REPLAYS_HEADER, ROUTING_KEY_HEADER, SOURCE_QUEUE_HEADER};

/// A dead-letter queue and how many messages it holds.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct QueueDepth {
    pub queue: String,
    pub messages: u32,
}

/// What a parked message is, as far as its headers and body tell.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Parked {
    pub message_id: Option<String>,
    /// The event or job type: the payment event's type, the webhook's type, or the
    /// original routing key.
    pub kind: Option<String>,
    pub reason_code: Option<String>,
    pub reason: Option<String>,
    /// The broker's own record (`x-death`): why, from where, how often.
    pub x_death: Option<String>,
    pub replays: i64,
    pub source_queue: String,
    pub bytes: usize,
}

/// What a replay did with each message it looked at.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ReplayReport {
    pub replayed: Vec<String>,
    pub skipped_filter: usize,
    pub left_parked_too_often: Vec<String>,
    pub dry_run: bool,
}

/// Which messages to replay.
#[derive(Clone, Debug, Default)]
pub struct ReplayFilter {
    pub limit: Option<usize>,
    pub kind: Option<String>,
    pub message_id: Option<String>,
    pub dry_run: bool,
    pub max_replays: i64,
}

/// Resolves what an operator typed (`payment-events`, `guildgate.payment-events`,
/// `guildgate.payment-events.dead`) to the dead-letter queue's full name; `None` if it
/// names none of guildgate's dead-letter queues.
pub fn resolve(names: &Names, input: &str) -> Option<String> {
    let mut q = input.to_string();
    if !q.starts_with(&format!("{}.", names.prefix)) {
        q = format!("{}.{q}", names.prefix);
    }
    if !q.ends_with(".dead") {
        q = format!("{q}.dead");
    }
    names.dead_queues().into_iter().find(|d| *d == q)
}

/// Depth of every dead-letter queue guildgate owns.
pub async fn depths(ch: &Channel, names: &Names) -> Result<Vec<QueueDepth>, BrokerError> {
    let mut out = Vec::new();
    for q in names.dead_queues() {
        out.push(QueueDepth {
            messages: depth(ch, &q).await?,
            queue: q,
        });
    }
    Ok(out)
}

async fn depth(ch: &Channel, queue: &str) -> Result<u32, BrokerError> {
    let q = ch
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    Ok(q.message_count())
}

fn describe(dead_queue: &str, props: &BasicProperties, body: &[u8]) -> Parked {
    let headers = props.headers().as_ref();
    let x_death = x_death_summary(headers);
    let kind = header_text(headers, ROUTING_KEY_HEADER)
        .or_else(|| {
            serde_json::from_slice::<serde_json::Value>(body)
                .ok()
                .and_then(|v| v.get("type").and_then(|t| t.as_str()).map(str::to_owned))
        })
        .or_else(|| first_death(headers).and_then(|t| death_routing_key(&t)));
    Parked {
        message_id: crate::amqp::message_id(props),
        kind,
        reason_code: header_text(headers, REASON_CODE_HEADER),
        reason: header_text(headers, REASON_HEADER),
        x_death,
        replays: header_int(headers, REPLAYS_HEADER).unwrap_or(0),
        source_queue: source_queue(dead_queue, headers),
        bytes: body.len(),
    }
}

fn first_death(headers: Option<&FieldTable>) -> Option<FieldTable> {
    match headers?.inner().get("x-death")? {
        AMQPValue::FieldArray(a) => match a.as_slice().first()? {
            AMQPValue::FieldTable(t) => Some(t.clone()),
            _ => None,
        },
        _ => None,
    }
}

fn death_routing_key(t: &FieldTable) -> Option<String> {
    match t.inner().get("routing-keys")? {
        AMQPValue::FieldArray(a) => match a.as_slice().first()? {
            AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
            _ => None,
        },
        _ => None,
    }
}

fn x_death_summary(headers: Option<&FieldTable>) -> Option<String> {
    let t = first_death(headers)?;
    let text = |k: &str| header_text(Some(&t), k).unwrap_or_default();
    let count = header_int(Some(&t), "count").unwrap_or(0);
    Some(format!(
        "{} from {} ({}x)",
        text("reason"),
        text("queue"),
        count
    ))
}

/// The queue a parked message came from: our header, else the broker's `x-death`, else
/// the dead queue's name without `.dead`.
fn source_queue(dead_queue: &str, headers: Option<&FieldTable>) -> String {
    header_text(headers, SOURCE_QUEUE_HEADER)
        .or_else(|| first_death(headers).and_then(|t| header_text(Some(&t), "queue")))
        .unwrap_or_else(|| dead_queue.trim_end_matches(".dead").to_string())
}

/// The first `limit` messages of a dead-letter queue, left in place.
pub async fn peek(
    ch: &Channel,
    dead_queue: &str,
    limit: usize,
) -> Result<Vec<Parked>, BrokerError> {
    let n = (depth(ch, dead_queue).await? as usize).min(limit);
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        match ch
            .basic_get(dead_queue.into(), BasicGetOptions { no_ack: false })
            .await?
        {
            Some(m) => out.push(describe(
                dead_queue,
                &m.delivery.properties,
                &m.delivery.data,
            )),
            None => break,
        }
    }
    // Unacknowledged, so closing the channel puts them back.
    let _ = ch.close(200, "peeked".into()).await;
    Ok(out)
}

/// Replays parked messages matching `filter` (see the module docs). `publisher` must be
/// in confirm mode; `ch` is used for fetching and is closed at the end, which returns
/// the messages that were not replayed to the queue.
pub async fn replay(
    ch: &Channel,
    publisher: &Channel,
    names: &Names,
    dead_queue: &str,
    filter: &ReplayFilter,
) -> Result<ReplayReport, BrokerError> {
    let mut report = ReplayReport {
        replayed: Vec::new(),
        skipped_filter: 0,
        left_parked_too_often: Vec::new(),
        dry_run: filter.dry_run,
    };
    // Only what is parked now: messages dead-lettered again while we replay are not
    // looked at twice.
    let n = depth(ch, dead_queue).await? as usize;
    for _ in 0..n {
        if filter.limit.is_some_and(|l| report.replayed.len() >= l) {
            break;
        }
        let Some(m) = ch
            .basic_get(dead_queue.into(), BasicGetOptions { no_ack: false })
            .await?
        else {
            break;
        };
        let d = m.delivery;
        let parked = describe(dead_queue, &d.properties, &d.data);
        let id = parked.message_id.clone().unwrap_or_default();
        let matches = filter
            .kind
            .as_ref()
            .is_none_or(|k| parked.kind.as_ref() == Some(k))
            && filter.message_id.as_ref().is_none_or(|i| *i == id);
        if !matches {
            report.skipped_filter += 1;
            continue;
        }
        if parked.replays >= filter.max_replays {
            tracing::warn!(message_id = %id, replays = parked.replays, queue = dead_queue, "replayed too often; left parked");
            report.left_parked_too_often.push(id);
            continue;
        }
        // Only guildgate's own work queues are valid targets.
        let target = if names.work_queues().contains(&parked.source_queue) {
            parked.source_queue.clone()
        } else {
            dead_queue.trim_end_matches(".dead").to_string()
        };
        if !filter.dry_run {
            let mut headers = fresh_round(d.properties.headers().as_ref());
            headers.insert(
                REPLAYS_HEADER.into(),
                AMQPValue::LongLongInt(parked.replays + 1),
            );
            if let Some(kind) = &parked.kind
                && target == names.payment_events()
            {
                headers.insert(ROUTING_KEY_HEADER.into(), header_str(kind));
            }
            let props = d
                .properties
                .clone()
                .with_headers(headers)
                .with_delivery_mode(2);
            let confirm = publisher
                .basic_publish(
                    "".into(),
                    target.as_str().into(),
                    lapin::options::BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    &d.data,
                    props,
                )
                .await?
                .await?;
            if !confirm.is_ack() || confirm.take_message().is_some() {
                return Err(BrokerError::Nacked(target));
            }
            // Only now remove the parked copy.
            d.ack(BasicAckOptions::default()).await?;
        }
        report.replayed.push(id);
    }
    let _ = ch.close(200, "replayed".into()).await;
    Ok(report)
}

/// The headers a replayed message keeps: all but the retry counters of the round that
/// parked it (`x-guildgate-attempt`, `x-guildgate-deferrals`), so a replayed job starts
/// its retries afresh instead of being parked again by its first transient failure. How
/// often it was replayed is counted apart, in `x-guildgate-replays`.
fn fresh_round(headers: Option<&FieldTable>) -> FieldTable {
    let mut kept = headers.map(|h| h.inner().clone()).unwrap_or_default();
    kept.remove(ATTEMPT_HEADER);
    kept.remove(DEFERRALS_HEADER);
    FieldTable::from(kept)
}

/// Empties a dead-letter queue; returns how many messages it held.
pub async fn purge(ch: &Channel, dead_queue: &str) -> Result<u32, BrokerError> {
    Ok(ch
        .queue_purge(dead_queue.into(), QueuePurgeOptions::default())
        .await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_short_and_full_names() {
        let n = Names::new("gg", "payments");
        for input in [
            "payment-events",
            "gg.payment-events",
            "gg.payment-events.dead",
            "payment-events.dead",
        ] {
            assert_eq!(
                resolve(&n, input).as_deref(),
                Some("gg.payment-events.dead"),
                "{input}"
            );
        }
        assert_eq!(resolve(&n, "webhooks").as_deref(), Some("gg.webhooks.dead"));
        assert_eq!(resolve(&n, "payments"), None);
        assert_eq!(resolve(&n, "other.payment-events.dead"), None);
    }
}
