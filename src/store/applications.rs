//! SQL of `discord_applications`: businesses' own Discord applications, their secrets
//! sealed (see [`crate::discord::bots`]).

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool};

/// The `SELECT` of whole application rows ([`AppRow`]) where `$cond` holds.
macro_rules! select_apps {
    ($cond:literal) => {
        concat!(
            "SELECT business_id, client_id, client_secret_enc, bot_token_enc, key_id, ",
            "bot_username, created_at, updated_at FROM discord_applications WHERE ",
            $cond
        )
    };
}

/// A business's application as stored, secrets still sealed.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct AppRow {
    pub business_id: String,
    pub client_id: String,
    pub client_secret_enc: Vec<u8>,
    pub bot_token_enc: Vec<u8>,
    pub key_id: String,
    pub bot_username: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// An application to store, its secrets sealed for its business's row.
pub struct NewApp<'a> {
    pub business_id: &'a str,
    pub client_id: &'a str,
    pub client_secret_enc: Vec<u8>,
    pub bot_token_enc: Vec<u8>,
    pub key_id: &'a str,
    pub bot_username: &'a str,
    pub now: DateTime<Utc>,
}

/// What [`save`] did.
pub enum Saved {
    Saved(AppRow),
    /// Another business registered this application.
    Taken,
}

/// `business_id`'s application.
pub async fn of_business(
    conn: &mut PgConnection,
    business_id: &str,
) -> Result<Option<AppRow>, sqlx::Error> {
    sqlx::query_as(select_apps!("business_id = $1"))
        .bind(business_id)
        .fetch_optional(conn)
        .await
}

/// The application `client_id` names.
pub async fn of_client(pool: &PgPool, client_id: &str) -> Result<Option<AppRow>, sqlx::Error> {
    sqlx::query_as(select_apps!("client_id = $1"))
        .bind(client_id)
        .fetch_optional(pool)
        .await
}

/// The business holding application `client_id`, if any.
pub async fn holder(
    conn: &mut PgConnection,
    client_id: &str,
) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT business_id FROM discord_applications WHERE client_id = $1")
        .bind(client_id)
        .fetch_optional(conn)
        .await
}

/// Which business has which application, and when each last changed.
pub async fn directory(pool: &PgPool) -> Result<Vec<(String, String, DateTime<Utc>)>, sqlx::Error> {
    sqlx::query_as("SELECT business_id, client_id, updated_at FROM discord_applications")
        .fetch_all(pool)
        .await
}

/// Stores (or replaces) a business's application.
pub async fn save(conn: &mut PgConnection, a: NewApp<'_>) -> Result<Saved, sqlx::Error> {
    let saved = sqlx::query_as(
        "INSERT INTO discord_applications (business_id, client_id, client_secret_enc,
             bot_token_enc, key_id, bot_username, created_at, updated_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $7)
         ON CONFLICT (business_id) DO UPDATE SET
             client_id = EXCLUDED.client_id, client_secret_enc = EXCLUDED.client_secret_enc,
             bot_token_enc = EXCLUDED.bot_token_enc, key_id = EXCLUDED.key_id,
             bot_username = EXCLUDED.bot_username, updated_at = EXCLUDED.updated_at
         RETURNING business_id, client_id, client_secret_enc, bot_token_enc, key_id,
             bot_username, created_at, updated_at",
    )
    .bind(a.business_id)
    .bind(a.client_id)
    .bind(&a.client_secret_enc)
    .bind(&a.bot_token_enc)
    .bind(a.key_id)
    .bind(a.bot_username)
    .bind(a.now)
    .fetch_one(conn)
    .await;
    match saved {
        Ok(row) => Ok(Saved::Saved(row)),
        // Another business registered it between a check and this write.
        Err(e) if super::is_unique_violation(&e) => Ok(Saved::Taken),
        Err(e) => Err(e),
    }
}

/// Forgets `business_id`'s application; `false` if it had none.
pub async fn delete(conn: &mut PgConnection, business_id: &str) -> Result<bool, sqlx::Error> {
    let gone = sqlx::query("DELETE FROM discord_applications WHERE business_id = $1")
        .bind(business_id)
        .execute(conn)
        .await?;
    Ok(gone.rows_affected() == 1)
}

/// Applications whose secrets are not sealed with `key_id`.
pub async fn not_on_key(pool: &PgPool, key_id: &str) -> Result<Vec<AppRow>, sqlx::Error> {
    sqlx::query_as(select_apps!("key_id <> $1"))
        .bind(key_id)
        .fetch_all(pool)
        .await
}

/// Writes `read`'s secrets sealed anew with `key_id`, only if the row is still as read;
/// `false` when it changed meanwhile.
pub async fn reseal(
    conn: &mut PgConnection,
    read: &AppRow,
    client_secret_enc: &[u8],
    bot_token_enc: &[u8],
    key_id: &str,
) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE discord_applications SET client_secret_enc = $4, bot_token_enc = $5, key_id = $6
         WHERE business_id = $1 AND updated_at = $2 AND key_id = $3",
    )
    .bind(&read.business_id)
    .bind(read.updated_at)
    .bind(&read.key_id)
    .bind(client_secret_enc)
    .bind(bot_token_enc)
    .bind(key_id)
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}
