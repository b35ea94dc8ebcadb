//! SQL of `grant_history`: the events of a grant recorded as they happen; how they are
//! shown is [`crate::grants::history`].

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgConnection;

/// Records one event of `grant_id`.
pub async fn record(
    conn: &mut PgConnection,
    grant_id: &str,
    at: DateTime<Utc>,
    event: &str,
    detail: Value,
) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO grant_history (grant_id, at, event, detail) VALUES ($1, $2, $3, $4)")
        .bind(grant_id)
        .bind(at)
        .bind(event)
        .bind(detail)
        .execute(conn)
        .await?;
    Ok(())
}

/// The events recorded for `grant_id`, in the order they were recorded.
pub async fn recorded(
    conn: &mut PgConnection,
    grant_id: &str,
) -> Result<Vec<(DateTime<Utc>, String, Value)>, sqlx::Error> {
    sqlx::query_as("SELECT at, event, detail FROM grant_history WHERE grant_id = $1 ORDER BY id")
        .bind(grant_id)
        .fetch_all(conn)
        .await
}
