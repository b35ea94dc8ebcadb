//! The outbox's producer: every row that says what must happen after a transaction
//! commits — a grant webhook (or a bundle of them), a Discord sync job, an email job — is
//! written through here, in the caller's transaction. The relay
//! ([`super::Relay`]) publishes them once it has committed.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use crate::domain::{Grant, GrantEventType};
use crate::grants::link::LinkBuilder;
use crate::grants::render::webhook_body;
use crate::store::outbox::{self, OutboxKind};

/// Grant webhooks an ingest batch writes to one outbox row (one message), at most. A
/// batch of `amqp.batch_size` events emits about 1.2 per event (up to 4 for a plan
/// change), so one row per batch in practice; the bound keeps a message small whatever
/// the batch size is set to.
pub const GRANT_EVENTS_PER_MESSAGE: usize = 256;

/// The message id of a grant webhook: stable per grant and event type, so every repeat
/// of it is recognisable downstream.
pub fn grant_event_id(grant_id: &str, event: GrantEventType) -> String {
    format!("{grant_id}:{}", event.as_str())
}

pub fn sync_job(grant_id: &str) -> (String, Vec<u8>) {
    (
        format!("sync:{grant_id}:{}", crate::domain::ids::mint("s")),
        serde_json::to_vec(&serde_json::json!({ "grant_id": grant_id }))
            .expect("a JSON value serializes"),
    )
}

/// Writes the outbox rows for one grant transition made outside ingest (the syncer,
/// the API, the timers, a backfill): the webhook body and, for `created`/`revoked`, a
/// sync job.
pub async fn emit(
    conn: &mut PgConnection,
    links: &LinkBuilder,
    grant: &Grant,
    event: GrantEventType,
    now: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    let body = webhook_body(grant, event, now, links);
    outbox::insert(
        conn,
        OutboxKind::GrantEvent,
        &grant_event_id(&grant.id, event),
        &body,
    )
    .await?;
    if matches!(event, GrantEventType::Created | GrantEventType::Revoked) {
        queue_sync(conn, &grant.id).await?;
    }
    Ok(())
}

/// Writes a sync job for a grant.
pub async fn queue_sync(conn: &mut PgConnection, grant_id: &str) -> Result<(), sqlx::Error> {
    let (id, payload) = sync_job(grant_id);
    outbox::insert(conn, OutboxKind::Sync, &id, &payload).await
}

/// Sync jobs [`queue_syncs`] writes in one statement, at most: a few hundred kilobytes
/// of parameters.
pub const SYNC_JOBS_PER_STATEMENT: usize = 5_000;

/// Writes a sync job for each of `grant_ids`, in order, with one statement per
/// [`SYNC_JOBS_PER_STATEMENT`]: a save that touches every grant of a large entitlement
/// (its role or server changed, a stop on its server resolved) writes tens of thousands
/// of jobs in a few statements, not one round trip each.
pub async fn queue_syncs(conn: &mut PgConnection, grant_ids: &[String]) -> Result<(), sqlx::Error> {
    for chunk in grant_ids.chunks(SYNC_JOBS_PER_STATEMENT) {
        let (ids, payloads): (Vec<String>, Vec<Vec<u8>>) =
            chunk.iter().map(|g| sync_job(g)).unzip();
        outbox::insert_many(conn, OutboxKind::Sync, &ids, &payloads).await?;
    }
    Ok(())
}

/// One outbox row of grant webhooks: its message id and a JSON array of the bodies, as
/// they are, in order.
pub fn grant_events_bundle(bodies: &[Vec<u8>]) -> (String, Vec<u8>) {
    let mut bundle = Vec::with_capacity(bodies.iter().map(|b| b.len() + 1).sum::<usize>() + 1);
    bundle.push(b'[');
    for (i, body) in bodies.iter().enumerate() {
        if i > 0 {
            bundle.push(b',');
        }
        bundle.extend_from_slice(body);
    }
    bundle.push(b']');
    (
        format!("grant-events:{}", crate::domain::ids::mint("b")),
        bundle,
    )
}

/// Writes an email job: its email id (the message id) and its body.
pub async fn queue_email(
    conn: &mut PgConnection,
    email_id: &str,
    payload: &[u8],
) -> Result<(), sqlx::Error> {
    outbox::insert(conn, OutboxKind::Email, email_id, payload).await
}
