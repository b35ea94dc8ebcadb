//! Settling jobs: the copies an outcome publishes (a retry, dead letters), confirmed,
//! then the acks.

use std::borrow::Cow;

use lapin::Channel;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicRejectOptions};
use lapin::types::{AMQPValue, FieldTable};

use super::{Handler, Job, Outcome};
use crate::amqp::{
    self, ATTEMPT_HEADER, BrokerError, Names, Outgoing, REASON_HEADER, ROUTING_KEY_HEADER,
    header_str,
};

/// Publishes what the outcomes ask for (confirmed), then acks every job not deferred.
pub(super) async fn batch<H: Handler>(
    handler: &H,
    names: &Names,
    queue: &str,
    deliveries: &[Delivery],
    jobs: &[Job],
    outcomes: &[Outcome],
    publisher: &Channel,
) -> Result<(), BrokerError> {
    let ids: Vec<Ids<'_>> = jobs
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
            amqp::bounded("basic.ack", last.ack(BasicAckOptions { multiple: true })).await?;
        }
        return Ok(());
    }
    for (d, o) in deliveries.iter().zip(outcomes) {
        if *o != Outcome::Defer {
            amqp::bounded("basic.ack", d.ack(BasicAckOptions::default())).await?;
        }
    }
    Ok(())
}

/// Publishes what one job's outcome asks for (confirmed), then acks it; a deferred job
/// is rejected with requeue, so the broker hands it over again.
pub(super) async fn one<H: Handler>(
    handler: &H,
    names: &Names,
    queue: &str,
    delivery: &Delivery,
    job: &Job,
    outcome: &Outcome,
    publisher: &Channel,
) -> Result<(), BrokerError> {
    if *outcome == Outcome::Defer {
        amqp::bounded(
            "basic.reject",
            delivery.reject(BasicRejectOptions { requeue: true }),
        )
        .await?;
        return Ok(());
    }
    let ids = Ids::of(handler, job, outcome);
    let headers = delivery.properties.headers().as_ref();
    let out = copies(handler, names, queue, &ids, job, headers, outcome);
    if !out.is_empty() {
        amqp::publish_confirmed(publisher, &out).await?;
    }
    amqp::bounded("basic.ack", delivery.ack(BasicAckOptions::default())).await?;
    Ok(())
}

/// Publishes what one job's outcome asks for, confirmed, for a job without a delivery.
pub(super) async fn publish<H: Handler>(
    handler: &H,
    names: &Names,
    queue: &str,
    job: &Job,
    outcome: &Outcome,
    publisher: &Channel,
) -> Result<(), BrokerError> {
    let ids = Ids::of(handler, job, outcome);
    let out = copies(handler, names, queue, &ids, job, None, outcome);
    if !out.is_empty() {
        amqp::publish_confirmed(publisher, &out).await?;
    }
    Ok(())
}

/// The ids of what an outcome publishes: the job's (a retry, a dead letter) and its
/// parked elements', and the body of a retry.
struct Ids<'j> {
    job: String,
    parts: Vec<String>,
    retry_body: Cow<'j, [u8]>,
}

impl<'j> Ids<'j> {
    fn of<H: Handler>(handler: &H, job: &'j Job, outcome: &Outcome) -> Self {
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
        let retry_body = match outcome {
            Outcome::Retry { .. } => handler.retry_body(job),
            _ => Cow::Borrowed(job.body.as_slice()),
        };
        Self {
            job: id,
            parts,
            retry_body,
        }
    }
}

/// The messages `outcome` publishes for a job: a copy for its retry tier, or parked
/// copies for the dead-letter queue; none for an ack or a deferral.
fn copies<'a, H: Handler>(
    handler: &H,
    names: &Names,
    queue: &str,
    ids: &'a Ids<'a>,
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
            let mut retry = Outgoing::to_queue("", &ids.job, &ids.retry_body)
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
        copy = copy.header(ROUTING_KEY_HEADER, header_str(&job.routing_key));
    }
    copy
}
