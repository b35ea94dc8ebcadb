//! Replay: a merchant (or ops) asks for a settled message again, or for the failed
//! messages of an endpoint, a page at a time. The message becomes `pending` and gets a
//! new delivery job through the outbox in the same statement; it keeps its `webhook-id`,
//! so a receiver that already processed it can tell. A replay starts a fresh retry
//! schedule. A message still pending is never replayed: it has a job on its way already.

use sqlx::PgConnection;

use crate::store::messages;

/// How many failed messages one `retry-failed` call replays when the caller says nothing.
pub const DEFAULT_FAILED_PAGE: i64 = 100;
/// The most failed messages one `retry-failed` call replays.
pub const MAX_FAILED_PAGE: i64 = 1000;

/// Replays one settled (`failed` or `delivered`) message of a business; `false` if there
/// is no such message or it is still pending.
pub async fn replay_message(
    conn: &mut PgConnection,
    business_id: &str,
    message_id: &str,
) -> Result<bool, sqlx::Error> {
    Ok(messages::rearm_settled(conn, business_id, message_id)
        .await?
        .is_some())
}

/// Replays up to `limit` failed messages of an endpoint after the cursor `after`.
/// Returns their ids, and the cursor of the next page when this one was full.
pub async fn replay_failed(
    conn: &mut PgConnection,
    business_id: &str,
    endpoint_id: &str,
    after: Option<&str>,
    limit: i64,
) -> Result<(Vec<String>, Option<String>), sqlx::Error> {
    let ids = messages::rearm_failed(conn, business_id, endpoint_id, after, limit).await?;
    let next = (ids.len() as i64 >= limit)
        .then(|| ids.last().cloned())
        .flatten();
    Ok((ids, next))
}
