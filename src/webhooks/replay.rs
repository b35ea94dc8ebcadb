//! Replay: a merchant (or ops) asks for a message again, or for every failed message of
//! an endpoint. The message becomes `pending` and gets a new delivery job through the
//! outbox in the same statement; it keeps its `webhook-id`, so a receiver that already
//! processed it can tell. A replay starts a fresh retry schedule.

use sqlx::PgConnection;

use super::messages;

/// Replays one message of a business; `false` if there is no such message.
pub async fn replay_message(
    conn: &mut PgConnection,
    business_id: &str,
    message_id: &str,
) -> Result<bool, sqlx::Error> {
    Ok(!messages::rearm(conn, business_id, Some(message_id), None)
        .await?
        .is_empty())
}

/// Replays every failed message of an endpoint; returns their ids.
pub async fn replay_failed(
    conn: &mut PgConnection,
    business_id: &str,
    endpoint_id: &str,
) -> Result<Vec<String>, sqlx::Error> {
    messages::rearm(conn, business_id, None, Some(endpoint_id)).await
}
