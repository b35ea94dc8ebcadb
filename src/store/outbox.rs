//! SQL of the outbox: rows written in the transaction that changes grants, relayed to
//! RabbitMQ after commit.

use sqlx::PgConnection;

/// What an outbox row becomes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutboxKind {
    /// A grant webhook body, for `<prefix>.grant-events`.
    GrantEvent,
    /// Several grant webhook bodies (a JSON array, in order), relayed as one message to
    /// `<prefix>.grant-events`: what one ingest batch emits.
    GrantEvents,
    /// A grant id to sync with Discord, for `<prefix>.discord-sync`.
    Sync,
    /// A delivery email job, for `<prefix>.emails` ([`crate::email::Job`]).
    Email,
}

impl OutboxKind {
    pub fn as_str(self) -> &'static str {
        match self {
            OutboxKind::GrantEvent => "grant_event",
            OutboxKind::GrantEvents => "grant_events",
            OutboxKind::Sync => "sync",
            OutboxKind::Email => "email",
        }
    }
}

#[derive(Clone, Debug, sqlx::FromRow)]
pub struct OutboxRow {
    pub id: i64,
    pub kind: String,
    pub message_id: String,
    /// The message body, exactly as it is published (JSON).
    pub payload: Vec<u8>,
}

/// Adds a row (in the caller's transaction); `payload` is the message body as published.
pub async fn insert(
    conn: &mut PgConnection,
    kind: OutboxKind,
    message_id: &str,
    payload: &[u8],
) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO outbox (kind, message_id, payload) VALUES ($1, $2, $3)")
        .bind(kind.as_str())
        .bind(message_id)
        .bind(payload)
        .execute(conn)
        .await?;
    Ok(())
}

/// Adds rows of one kind in one statement (in the caller's transaction), in the order
/// given: `message_ids` and `payloads` pair up.
pub async fn insert_many(
    conn: &mut PgConnection,
    kind: OutboxKind,
    message_ids: &[String],
    payloads: &[Vec<u8>],
) -> Result<(), sqlx::Error> {
    debug_assert_eq!(message_ids.len(), payloads.len());
    sqlx::query(
        "INSERT INTO outbox (kind, message_id, payload)
         SELECT $1, m, p FROM unnest($2::text[], $3::bytea[]) WITH ORDINALITY AS t(m, p, o)
         ORDER BY o",
    )
    .bind(kind.as_str())
    .bind(message_ids)
    .bind(payloads)
    .execute(conn)
    .await?;
    Ok(())
}

/// The oldest unsent rows, locked; rows another relay holds are skipped.
pub async fn claim(conn: &mut PgConnection, limit: i64) -> Result<Vec<OutboxRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, kind, message_id, payload FROM outbox ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
    )
    .bind(limit)
    .fetch_all(conn)
    .await
}

/// Removes relayed rows.
pub async fn delete(conn: &mut PgConnection, ids: &[i64]) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM outbox WHERE id = ANY($1)")
        .bind(ids)
        .execute(conn)
        .await?;
    Ok(())
}

/// Rows waiting, and the age in seconds of the oldest (metrics, health).
pub async fn backlog(conn: &mut PgConnection) -> Result<(i64, f64), sqlx::Error> {
    sqlx::query_as(
        "SELECT count(*), COALESCE(EXTRACT(EPOCH FROM now() - min(created_at))::float8, 0) FROM outbox",
    )
    .fetch_one(conn)
    .await
}
