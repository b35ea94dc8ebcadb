//! SQL of webhook messages as the merchant API lists them (the webhooks module owns the
//! table and the rest of its SQL; this adds the paginated, filtered read).

use sqlx::PgConnection;

use super::Page;
use crate::webhooks::messages::Message;

/// A page of an endpoint's messages, newest first, optionally by status.
pub async fn of_endpoint(
    conn: &mut PgConnection,
    endpoint_id: &str,
    status: Option<&str>,
    page: Page,
) -> Result<Vec<Message>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, endpoint_id, business_id, grant_id, event_type, body, status, attempts,
                next_attempt_at, last_error, delivered_at
         FROM webhook_messages WHERE endpoint_id = $1 AND ($2::text IS NULL OR status = $2)
         ORDER BY created_at DESC, id DESC LIMIT $3 OFFSET $4",
    )
    .bind(endpoint_id)
    .bind(status)
    .bind(page.limit)
    .bind(page.offset)
    .fetch_all(conn)
    .await
}
