//! SQL of the Discord servers merchants connected (bot installs) and of the single-use
//! install links that connect them.

use chrono::{DateTime, Utc};
use sqlx::{Connection, PgConnection};

/// A connected server.
#[derive(Clone, Debug, PartialEq, sqlx::FromRow)]
pub struct GuildRow {
    pub business_id: String,
    pub guild_id: String,
    pub name: Option<String>,
    pub permissions: Option<i64>,
    pub installed_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// Discord user id of the person who installed the bot (unknown for connections
    /// recorded before installs were proven).
    pub installed_by: Option<String>,
    /// The connection was never proven and another business claimed the same server:
    /// it counts for nothing until this business installs the bot again.
    pub needs_reinstall: bool,
}

/// Records a new install link of `business_id`, usable once until `expires_at`, and
/// forgets links that expired.
pub async fn create_install_state(
    conn: &mut PgConnection,
    nonce: &str,
    business_id: &str,
    now: DateTime<Utc>,
    expires_at: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM bot_install_states WHERE expires_at < $1")
        .bind(now)
        .execute(&mut *conn)
        .await?;
    sqlx::query(
        "INSERT INTO bot_install_states (nonce, business_id, created_at, expires_at)
         VALUES ($1, $2, $3, $4)",
    )
    .bind(nonce)
    .bind(business_id)
    .bind(now)
    .bind(expires_at)
    .execute(conn)
    .await?;
    Ok(())
}

/// Consumes an install link: true the first time for an unexpired link of
/// `business_id`, false ever after.
pub async fn take_install_state(
    conn: &mut PgConnection,
    nonce: &str,
    business_id: &str,
    now: DateTime<Utc>,
) -> Result<bool, sqlx::Error> {
    let taken = sqlx::query(
        "DELETE FROM bot_install_states
         WHERE nonce = $1 AND business_id = $2 AND expires_at > $3",
    )
    .bind(nonce)
    .bind(business_id)
    .bind(now)
    .execute(conn)
    .await?;
    Ok(taken.rows_affected() == 1)
}

/// What recording a proven install did.
#[derive(Debug)]
pub enum Connected {
    Connected(GuildRow),
    /// Another business holds the server (a proven connection): nothing changed.
    HeldByAnother,
}

/// A proven install, as Discord confirmed it.
pub struct Install<'a> {
    pub business_id: &'a str,
    pub guild_id: &'a str,
    pub name: &'a str,
    pub permissions: Option<i64>,
    pub installed_by: Option<&'a str>,
    pub now: DateTime<Utc>,
}

/// Records a proven install: connects the server to the business unless another
/// business holds it. Unproven claims of other businesses on the same server (rows
/// marked `needs_reinstall`) are removed: this install proves who manages it.
pub async fn connect(conn: &mut PgConnection, i: Install<'_>) -> Result<Connected, sqlx::Error> {
    let mut tx = conn.begin().await?;
    if held_by_another(&mut tx, i.business_id, i.guild_id).await? {
        return Ok(Connected::HeldByAnother);
    }
    sqlx::query(
        "DELETE FROM discord_guilds WHERE guild_id = $1 AND business_id <> $2 AND needs_reinstall",
    )
    .bind(i.guild_id)
    .bind(i.business_id)
    .execute(&mut *tx)
    .await?;
    let row = sqlx::query_as(
        "INSERT INTO discord_guilds
             (business_id, guild_id, name, permissions, installed_by, needs_reinstall,
              installed_at, updated_at)
         VALUES ($1, $2, $3, $4, $5, false, $6, $6)
         ON CONFLICT (business_id, guild_id) DO UPDATE SET
             name = EXCLUDED.name, permissions = EXCLUDED.permissions,
             installed_by = EXCLUDED.installed_by, needs_reinstall = false,
             installed_at = EXCLUDED.installed_at, updated_at = EXCLUDED.updated_at
         RETURNING *",
    )
    .bind(i.business_id)
    .bind(i.guild_id)
    .bind(i.name)
    .bind(i.permissions)
    .bind(i.installed_by)
    .bind(i.now)
    .fetch_one(&mut *tx)
    .await;
    match row {
        Ok(row) => {
            tx.commit().await?;
            Ok(Connected::Connected(row))
        }
        // Another business's install of the same server committed first
        // (`discord_guilds_one_business`).
        Err(sqlx::Error::Database(e)) if e.is_unique_violation() => Ok(Connected::HeldByAnother),
        Err(e) => Err(e),
    }
}

/// What disconnecting a server did.
#[derive(Debug, PartialEq)]
pub enum Disconnected {
    Done,
    NotFound,
    /// Entitlements of the business still use the server: `(id, name)`, nothing changed.
    InUse(Vec<(String, String)>),
}

/// Disconnects a server from a business, unless one of its entitlements still uses it.
/// The row is locked first, so a concurrent install of the same business waits.
pub async fn disconnect(
    conn: &mut PgConnection,
    business_id: &str,
    guild_id: &str,
) -> Result<Disconnected, sqlx::Error> {
    let mut tx = conn.begin().await?;
    let found: Option<String> = sqlx::query_scalar(
        "SELECT guild_id FROM discord_guilds WHERE business_id = $1 AND guild_id = $2 FOR UPDATE",
    )
    .bind(business_id)
    .bind(guild_id)
    .fetch_optional(&mut *tx)
    .await?;
    if found.is_none() {
        return Ok(Disconnected::NotFound);
    }
    let users: Vec<(String, String)> = sqlx::query_as(
        "SELECT id, name FROM entitlements
         WHERE business_id = $1 AND guild_id = $2 AND deleted_at IS NULL
         ORDER BY created_at, id",
    )
    .bind(business_id)
    .bind(guild_id)
    .fetch_all(&mut *tx)
    .await?;
    if !users.is_empty() {
        return Ok(Disconnected::InUse(users));
    }
    sqlx::query("DELETE FROM discord_guilds WHERE business_id = $1 AND guild_id = $2")
        .bind(business_id)
        .bind(guild_id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(Disconnected::Done)
}

/// Whether another business than `business_id` holds the server (a proven connection):
/// then the server is that business's, and nothing of this one's is given there.
pub async fn held_by_another(
    conn: &mut PgConnection,
    business_id: &str,
    guild_id: &str,
) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM discord_guilds
            WHERE guild_id = $1 AND business_id <> $2 AND NOT needs_reinstall)",
    )
    .bind(guild_id)
    .bind(business_id)
    .fetch_one(conn)
    .await
}

/// Every business that holds or claims the server, the one holding it first.
pub async fn holders(
    conn: &mut PgConnection,
    guild_id: &str,
) -> Result<Vec<GuildRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT * FROM discord_guilds WHERE guild_id = $1
         ORDER BY needs_reinstall, installed_at, business_id",
    )
    .bind(guild_id)
    .fetch_all(conn)
    .await
}

/// Takes the server from the business (an operator's decision), whatever its
/// entitlements still name; returns whether it held or claimed it.
pub async fn release(
    conn: &mut PgConnection,
    business_id: &str,
    guild_id: &str,
) -> Result<bool, sqlx::Error> {
    let done = sqlx::query("DELETE FROM discord_guilds WHERE business_id = $1 AND guild_id = $2")
        .bind(business_id)
        .bind(guild_id)
        .execute(conn)
        .await?;
    Ok(done.rows_affected() > 0)
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

/// The name a connected server had when it was connected (or reconnected).
pub async fn guild_name(
    conn: &mut PgConnection,
    business_id: &str,
    guild_id: &str,
) -> Result<Option<String>, sqlx::Error> {
    Ok(sqlx::query_scalar::<_, Option<String>>(
        "SELECT name FROM discord_guilds WHERE business_id = $1 AND guild_id = $2",
    )
    .bind(business_id)
    .bind(guild_id)
    .fetch_optional(conn)
    .await?
    .flatten())
}
