//! SQL of `discord_holdings`: the accesses (memberships and roles) of Discord accounts
//! that guildgate gave or found already there, and which live grants hold them.

use chrono::{DateTime, Utc};

use sqlx::PgConnection;

use crate::domain::Grant;

/// Live grants other than `except_grant`, of any customer or business, that hold (or
/// are about to hold) an access of one of `accounts` (`(guild, Discord user)` pairs).
pub async fn other_holders(
    conn: &mut PgConnection,
    accounts: &[(String, String)],
    except_grant: &str,
) -> Result<Vec<Grant>, sqlx::Error> {
    let (guilds, users): (Vec<String>, Vec<String>) = accounts.iter().cloned().unzip();
    sqlx::query_as(
        "SELECT g.* FROM unnest($1::text[], $2::text[]) AS a (guild_id, user_id)
         JOIN grants g ON (g.applied_guild_id = a.guild_id AND g.applied_user_id = a.user_id)
                       OR (g.intent_guild_id = a.guild_id AND g.intent_user_id = a.user_id)
         WHERE g.id <> $3 AND g.status <> 'Revoked'",
    )
    .bind(&guilds)
    .bind(&users)
    .bind(except_grant)
    .fetch_all(conn)
    .await
}

/// An access of a Discord account (`role_id` `None`: the membership) as recorded in
/// `discord_holdings`.
pub type AccessKey = (String, String, Option<String>);

/// The accesses of `accounts` guildgate found already there when it first gave them.
pub async fn found_accesses(
    conn: &mut PgConnection,
    accounts: &[(String, String)],
) -> Result<Vec<AccessKey>, sqlx::Error> {
    let (guilds, users): (Vec<String>, Vec<String>) = accounts.iter().cloned().unzip();
    let rows: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT h.guild_id, h.user_id, h.role_id
         FROM unnest($1::text[], $2::text[]) AS a (guild_id, user_id)
         JOIN discord_holdings h ON h.guild_id = a.guild_id AND h.user_id = a.user_id
         WHERE h.found",
    )
    .bind(&guilds)
    .bind(&users)
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(g, u, r)| (g, u, (!r.is_empty()).then_some(r)))
        .collect())
}

/// The accesses of `accounts` recorded before a call to Discord whose answer was never
/// recorded (a run died in between), with when they were about to be given.
pub async fn unsettled_accesses(
    conn: &mut PgConnection,
    accounts: &[(String, String)],
) -> Result<Vec<(AccessKey, DateTime<Utc>)>, sqlx::Error> {
    let (guilds, users): (Vec<String>, Vec<String>) = accounts.iter().cloned().unzip();
    let rows: Vec<(String, String, String, DateTime<Utc>)> = sqlx::query_as(
        "SELECT h.guild_id, h.user_id, h.role_id, h.since
         FROM unnest($1::text[], $2::text[]) AS a (guild_id, user_id)
         JOIN discord_holdings h ON h.guild_id = a.guild_id AND h.user_id = a.user_id
         WHERE NOT h.settled",
    )
    .bind(&guilds)
    .bind(&users)
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(g, u, r, since)| ((g, u, (!r.is_empty()).then_some(r)), since))
        .collect())
}

/// Records accesses about to be given, unsettled (counted as added by guildgate) until
/// Discord's answer says whether they were there already; returns those that were not
/// recorded before.
pub async fn hold(
    conn: &mut PgConnection,
    accesses: &[AccessKey],
    now: DateTime<Utc>,
) -> Result<Vec<AccessKey>, sqlx::Error> {
    let mut created = Vec::new();
    for (g, u, r) in accesses {
        let done = sqlx::query(
            "INSERT INTO discord_holdings (guild_id, user_id, role_id, found, since, settled)
             VALUES ($1, $2, $3, false, $4, false) ON CONFLICT DO NOTHING",
        )
        .bind(g)
        .bind(u)
        .bind(r.as_deref().unwrap_or(""))
        .bind(now)
        .execute(&mut *conn)
        .await?;
        if done.rows_affected() == 1 {
            created.push((g.clone(), u.clone(), r.clone()));
        }
    }
    Ok(created)
}

/// Records whether accesses were found already there (`true`: the answers showed them
/// before guildgate gave them) or added by guildgate (`false`: Discord added them now),
/// settling them.
pub async fn set_found(
    conn: &mut PgConnection,
    accesses: &[AccessKey],
    found: bool,
) -> Result<(), sqlx::Error> {
    for (g, u, r) in accesses {
        sqlx::query(
            "UPDATE discord_holdings SET found = $4, settled = true
             WHERE guild_id = $1 AND user_id = $2 AND role_id = $3",
        )
        .bind(g)
        .bind(u)
        .bind(r.as_deref().unwrap_or(""))
        .bind(found)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// `access` was let go by its last holder: removed at Discord, so forget it, and the
/// account's membership record once no live grant holds anything of that account in
/// the server any more. An access found already there stays recorded as found (it is
/// still there, and not guildgate's: reconcile does not count it as drift).
pub async fn forget_holding(
    conn: &mut PgConnection,
    access: &AccessKey,
) -> Result<(), sqlx::Error> {
    let (g, u, r) = access;
    sqlx::query(
        "DELETE FROM discord_holdings
         WHERE guild_id = $1 AND user_id = $2 AND role_id = $3 AND NOT found",
    )
    .bind(g)
    .bind(u)
    .bind(r.as_deref().unwrap_or(""))
    .execute(&mut *conn)
    .await?;
    sqlx::query(
        "DELETE FROM discord_holdings h
         WHERE h.guild_id = $1 AND h.user_id = $2 AND h.role_id = '' AND NOT h.found
         AND NOT EXISTS (SELECT 1 FROM grants g WHERE g.status <> 'Revoked'
             AND ((g.applied_guild_id = $1 AND g.applied_user_id = $2)
               OR (g.intent_guild_id = $1 AND g.intent_user_id = $2)))",
    )
    .bind(g)
    .bind(u)
    .execute(conn)
    .await?;
    Ok(())
}

/// A grant of a business that gives (or is giving, or is taking back) a Discord account
/// something in a server, and the role it concerns (`None`: the membership only).
#[derive(Debug, sqlx::FromRow)]
pub struct AccountGrant {
    pub grant_id: String,
    pub entitlement_id: String,
    pub customer_id: String,
    pub status: crate::domain::GrantStatus,
    pub role_id: Option<String>,
}

/// The grants of `business_id` that hold or are about to hold something of the account
/// (`guild_id`, `user_id`), oldest first.
pub async fn grants_of_account(
    conn: &mut PgConnection,
    business_id: &str,
    guild_id: &str,
    user_id: &str,
) -> Result<Vec<AccountGrant>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id AS grant_id, entitlement_id, customer_id, status,
                CASE WHEN applied_guild_id = $2 AND applied_user_id = $3 THEN applied_role_id
                     ELSE intent_role_id END AS role_id
         FROM grants
         WHERE business_id = $1
           AND ((applied_guild_id = $2 AND applied_user_id = $3)
             OR (intent_guild_id = $2 AND intent_user_id = $3))
         ORDER BY created_at, id",
    )
    .bind(business_id)
    .bind(guild_id)
    .bind(user_id)
    .fetch_all(conn)
    .await
}

/// What guildgate recorded of the account (`guild_id`, `user_id`): the role (empty: the
/// membership), whether it was found already there, and since when.
pub async fn of_account(
    conn: &mut PgConnection,
    guild_id: &str,
    user_id: &str,
) -> Result<Vec<(String, bool, DateTime<Utc>)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT role_id, found, since FROM discord_holdings
         WHERE guild_id = $1 AND user_id = $2 ORDER BY role_id",
    )
    .bind(guild_id)
    .bind(user_id)
    .fetch_all(conn)
    .await
}

/// How many live grants of businesses other than `business_id` hold or are about to
/// hold something of the account (`guild_id`, `user_id`).
pub async fn other_businesses_holding(
    conn: &mut PgConnection,
    business_id: &str,
    guild_id: &str,
    user_id: &str,
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT count(*) FROM grants
         WHERE business_id <> $1 AND status <> 'Revoked'
           AND ((applied_guild_id = $2 AND applied_user_id = $3)
             OR (intent_guild_id = $2 AND intent_user_id = $3))",
    )
    .bind(business_id)
    .bind(guild_id)
    .bind(user_id)
    .fetch_one(conn)
    .await
}
