//! SQL of stopped servers and entitlements (`discord_stops`) and of the grants waiting
//! on them (`discord_sync_waiting`).
//!
//! When Discord says the bot is not in a server (50001 Missing Access, 10004 Unknown
//! Guild), or may not do what an entitlement needs there (50013 Missing Permissions:
//! Manage Roles removed, the role moved above the bot's), every further call would earn
//! the same invalid answer, and Discord bans an address that collects 10,000 of them in
//! 10 minutes. So the syncer records a stop and stops calling: jobs for it are
//! acknowledged and their grants recorded as waiting, never kept spinning in the queue.
//! A save of the entitlement that validates against Discord (the merchant fixed it)
//! removes the stop and queues the waiting grants again.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

/// What a stop covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope<'a> {
    /// Every entitlement of the server.
    Server,
    /// This entitlement only.
    Entitlement(&'a str),
}

impl Scope<'_> {
    pub fn label(&self) -> &'static str {
        match self {
            Scope::Server => "server",
            Scope::Entitlement(_) => "entitlement",
        }
    }

    pub fn entitlement(&self) -> Option<&str> {
        match self {
            Scope::Server => None,
            Scope::Entitlement(id) => Some(id),
        }
    }
}

/// A recorded stop.
#[derive(Clone, Debug, PartialEq, sqlx::FromRow)]
pub struct Stop {
    pub guild_id: String,
    /// `None`: the whole server.
    pub entitlement_id: Option<String>,
    /// The `error_code` the grants it stops get (`discord_unknown_guild`, …).
    pub code: String,
    pub message: String,
    pub since: DateTime<Utc>,
}

/// The stop covering `entitlement_id` in `guild_id`, if any (the server's first).
pub async fn covering(
    conn: &mut PgConnection,
    guild_id: &str,
    entitlement_id: &str,
) -> Result<Option<Stop>, sqlx::Error> {
    sqlx::query_as(
        "SELECT guild_id, entitlement_id, code, message, since FROM discord_stops
         WHERE guild_id = $1 AND (entitlement_id IS NULL OR entitlement_id = $2)
         ORDER BY entitlement_id NULLS FIRST LIMIT 1",
    )
    .bind(guild_id)
    .bind(entitlement_id)
    .fetch_optional(conn)
    .await
}

/// Records a stop; one already recorded for the same scope is kept (and returned false).
pub async fn record(
    conn: &mut PgConnection,
    guild_id: &str,
    scope: Scope<'_>,
    code: &str,
    message: &str,
    now: DateTime<Utc>,
) -> Result<bool, sqlx::Error> {
    let r = sqlx::query(
        "INSERT INTO discord_stops (guild_id, entitlement_id, code, message, since)
         VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (guild_id, coalesce(entitlement_id, '')) DO NOTHING",
    )
    .bind(guild_id)
    .bind(scope.entitlement())
    .bind(code)
    .bind(message)
    .bind(now)
    .execute(conn)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// What [`wait`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Waiting {
    /// The grant waits for a resume from now on.
    Started,
    /// It was waiting already.
    Already,
    /// No stop covers it any more: a resume came since the stop was read, and the job
    /// must run instead.
    Lifted,
}

/// Records that `grant_id`'s sync waits for a resume, as long as a stop still covers it.
/// The covering stop is locked while the row is written: a resume deleting it either
/// commits first (then nothing is written) or waits for this transaction (then it finds
/// the row and queues the grant), so no grant is left waiting for a resume that passed.
pub async fn wait(
    conn: &mut PgConnection,
    grant_id: &str,
    guild_id: &str,
    entitlement_id: &str,
    now: DateTime<Utc>,
) -> Result<Waiting, sqlx::Error> {
    let covered: Option<i32> = sqlx::query_scalar(
        "SELECT 1 FROM discord_stops
         WHERE guild_id = $1 AND (entitlement_id IS NULL OR entitlement_id = $2)
         LIMIT 1 FOR SHARE",
    )
    .bind(guild_id)
    .bind(entitlement_id)
    .fetch_optional(&mut *conn)
    .await?;
    if covered.is_none() {
        return Ok(Waiting::Lifted);
    }
    let r = sqlx::query(
        "INSERT INTO discord_sync_waiting (grant_id, guild_id, entitlement_id, since)
         VALUES ($1, $2, $3, $4) ON CONFLICT (grant_id) DO NOTHING",
    )
    .bind(grant_id)
    .bind(guild_id)
    .bind(entitlement_id)
    .bind(now)
    .execute(conn)
    .await?;
    Ok(if r.rows_affected() == 1 {
        Waiting::Started
    } else {
        Waiting::Already
    })
}

/// A save of `entitlement_id` validated against Discord in `guild_id`: the bot is in the
/// server and may do what the entitlement needs. Removes the server's stop and the
/// entitlement's (in whichever server it was recorded), and returns (and forgets) the
/// waiting grants of the server or the entitlement that no stop covers any more, for
/// the caller to queue in the same transaction.
pub async fn resume(
    conn: &mut PgConnection,
    guild_id: &str,
    entitlement_id: &str,
) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query(
        "DELETE FROM discord_stops
         WHERE (guild_id = $1 AND entitlement_id IS NULL) OR entitlement_id = $2",
    )
    .bind(guild_id)
    .bind(entitlement_id)
    .execute(&mut *conn)
    .await?;
    sqlx::query_scalar(
        "DELETE FROM discord_sync_waiting w
         WHERE (w.guild_id = $1 OR w.entitlement_id = $2)
         AND NOT EXISTS (SELECT 1 FROM discord_stops s
                         WHERE s.guild_id = w.guild_id
                           AND (s.entitlement_id IS NULL OR s.entitlement_id = w.entitlement_id))
         RETURNING w.grant_id",
    )
    .bind(guild_id)
    .bind(entitlement_id)
    .fetch_all(conn)
    .await
}

/// The stops covering each of `entitlements` (`(id, guild_id)` pairs), by entitlement id.
pub async fn of_entitlements(
    conn: &mut PgConnection,
    entitlements: &[(String, String)],
) -> Result<Vec<(String, Stop)>, sqlx::Error> {
    if entitlements.is_empty() {
        return Ok(Vec::new());
    }
    let (ids, guilds): (Vec<String>, Vec<String>) = entitlements.iter().cloned().unzip();
    #[derive(sqlx::FromRow)]
    struct Row {
        id: String,
        #[sqlx(flatten)]
        stop: Stop,
    }
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT DISTINCT ON (e.id) e.id, s.guild_id, s.entitlement_id, s.code, s.message, s.since
         FROM unnest($1::text[], $2::text[]) AS e (id, guild_id)
         JOIN discord_stops s ON s.guild_id = e.guild_id
              AND (s.entitlement_id IS NULL OR s.entitlement_id = e.id COLLATE \"C\")
         ORDER BY e.id, s.entitlement_id NULLS FIRST",
    )
    .bind(&ids)
    .bind(&guilds)
    .fetch_all(conn)
    .await?;
    Ok(rows.into_iter().map(|r| (r.id, r.stop)).collect())
}
