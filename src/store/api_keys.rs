//! SQL of API keys.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

/// What authentication needs of a key row.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct KeyRow {
    pub id: String,
    pub business_id: String,
    pub key_hash: Vec<u8>,
    pub revoked_at: Option<DateTime<Utc>>,
}

/// Stores a new key's hash.
pub async fn insert(
    conn: &mut PgConnection,
    id: &str,
    business_id: &str,
    name: Option<&str>,
    hash: &[u8],
) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO api_keys (id, business_id, name, key_hash) VALUES ($1, $2, $3, $4)")
        .bind(id)
        .bind(business_id)
        .bind(name)
        .bind(hash)
        .execute(conn)
        .await?;
    Ok(())
}

/// One key by id.
pub async fn get(conn: &mut PgConnection, id: &str) -> Result<Option<KeyRow>, sqlx::Error> {
    sqlx::query_as("SELECT id, business_id, key_hash, revoked_at FROM api_keys WHERE id = $1")
        .bind(id)
        .fetch_optional(conn)
        .await
}

/// Revokes a key; `false` if there is no such key (revoking twice is fine).
pub async fn revoke(conn: &mut PgConnection, id: &str) -> Result<bool, sqlx::Error> {
    let r =
        sqlx::query("UPDATE api_keys SET revoked_at = COALESCE(revoked_at, now()) WHERE id = $1")
            .bind(id)
            .execute(conn)
            .await?;
    Ok(r.rows_affected() == 1)
}
