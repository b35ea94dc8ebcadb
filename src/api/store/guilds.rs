//! SQL of the Discord servers merchants connected (bot installs).

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

/// A connected server.
#[derive(Clone, Debug, PartialEq, sqlx::FromRow)]
pub struct GuildRow {
    pub business_id: String,
    pub guild_id: String,
    pub name: Option<String>,
    pub permissions: Option<i64>,
    pub installed_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// Records (or refreshes) a bot install for a business.
pub async fn upsert(
    conn: &mut PgConnection,
    business_id: &str,
    guild_id: &str,
    name: Option<&str>,
    permissions: Option<i64>,
    now: DateTime<Utc>,
) -> Result<GuildRow, sqlx::Error> {
    sqlx::query_as(
        "INSERT INTO discord_guilds (business_id, guild_id, name, permissions, installed_at, updated_at)
         VALUES ($1, $2, $3, $4, $5, $5)
         ON CONFLICT (business_id, guild_id) DO UPDATE SET
             name = COALESCE(EXCLUDED.name, discord_guilds.name),
             permissions = EXCLUDED.permissions, updated_at = EXCLUDED.updated_at
         RETURNING *",
    )
    .bind(business_id)
    .bind(guild_id)
    .bind(name)
    .bind(permissions)
    .bind(now)
    .fetch_one(conn)
    .await
}

/// The servers of a business, in install order.
pub async fn list(
    conn: &mut PgConnection,
    business_id: &str,
) -> Result<Vec<GuildRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT * FROM discord_guilds WHERE business_id = $1 ORDER BY installed_at, guild_id",
    )
    .bind(business_id)
    .fetch_all(conn)
    .await
}

/// One server of a business.
pub async fn get(
    conn: &mut PgConnection,
    business_id: &str,
    guild_id: &str,
) -> Result<Option<GuildRow>, sqlx::Error> {
    sqlx::query_as("SELECT * FROM discord_guilds WHERE business_id = $1 AND guild_id = $2")
        .bind(business_id)
        .bind(guild_id)
        .fetch_optional(conn)
        .await
}
