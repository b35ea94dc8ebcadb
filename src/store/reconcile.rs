//! SQL of reconcile: the grants and roles it judges, and its member listings in progress (`reconcile_listings`,
//! `reconcile_listed_members`): what lets a listing of a large guild carry on after an
//! interruption instead of starting again.

use std::collections::{BTreeSet, HashSet};

use sqlx::{PgConnection, PgPool};

use crate::domain::compare::{GatedRole, GrantRow};
use crate::domain::{GrantStatus, Snowflake};

/// Where an unfinished listing got to.
#[derive(Debug, Default, PartialEq)]
pub struct Progress {
    /// The last user id listed; `None`: from the start.
    pub after_user: Option<String>,
    /// Members listed so far.
    pub listed: i64,
    /// The members it kept so far: (user, roles).
    pub kept: Vec<(String, Vec<String>)>,
}

/// Starts the listing of `guild` for `scope`, or takes up the unfinished one if it was
/// saved within `max_age_s` seconds (an older one is dropped: its members may have
/// changed since).
pub async fn begin(
    conn: &mut PgConnection,
    guild: &str,
    scope: &str,
    max_age_s: f64,
) -> Result<Progress, sqlx::Error> {
    sqlx::query(
        "DELETE FROM reconcile_listings WHERE guild_id = $1 AND scope = $2
           AND updated_at < now() - make_interval(secs => $3)",
    )
    .bind(guild)
    .bind(scope)
    .bind(max_age_s)
    .execute(&mut *conn)
    .await?;
    let (after, listed): (String, i64) = sqlx::query_as(
        "INSERT INTO reconcile_listings (guild_id, scope, after_user, listed)
         VALUES ($1, $2, '', 0)
         ON CONFLICT (guild_id, scope) DO UPDATE SET updated_at = now()
         RETURNING after_user, listed",
    )
    .bind(guild)
    .bind(scope)
    .fetch_one(&mut *conn)
    .await?;
    if after.is_empty() {
        return Ok(Progress::default());
    }
    let kept = sqlx::query_as(
        "SELECT user_id, roles FROM reconcile_listed_members
         WHERE guild_id = $1 AND scope = $2",
    )
    .bind(guild)
    .bind(scope)
    .fetch_all(&mut *conn)
    .await?;
    Ok(Progress {
        after_user: Some(after),
        listed,
        kept,
    })
}

/// Saves one page: the members it kept, and the listing's new position, if the
/// listing is still at `from` (`None`: the start). Returns `false`, saving nothing,
/// when another run moved it meanwhile: this run goes on without saving.
pub async fn save_page(
    conn: &mut PgConnection,
    guild: &str,
    scope: &str,
    from: Option<&str>,
    to: &str,
    listed: i64,
    kept: &[(String, Vec<String>)],
) -> Result<bool, sqlx::Error> {
    // Users' roles travel as one space-separated string each (ids hold no space).
    let users: Vec<&str> = kept.iter().map(|(u, _)| u.as_str()).collect();
    let roles: Vec<String> = kept.iter().map(|(_, r)| r.join(" ")).collect();
    let moved: i64 = sqlx::query_scalar(
        "WITH moved AS (
            UPDATE reconcile_listings SET after_user = $4, listed = $5, updated_at = now()
            WHERE guild_id = $1 AND scope = $2 AND after_user = $3
            RETURNING 1
         ), kept AS (
            INSERT INTO reconcile_listed_members (guild_id, scope, user_id, roles)
            SELECT $1, $2, u, string_to_array(r, ' ')
            FROM unnest($6::text[], $7::text[]) AS t(u, r)
            WHERE EXISTS (SELECT 1 FROM moved)
            ON CONFLICT (guild_id, scope, user_id) DO UPDATE SET roles = EXCLUDED.roles
         )
         SELECT count(*) FROM moved",
    )
    .bind(guild)
    .bind(scope)
    .bind(from.unwrap_or(""))
    .bind(to)
    .bind(listed)
    .bind(&users)
    .bind(&roles)
    .fetch_one(conn)
    .await?;
    Ok(moved > 0)
}

/// Drops a finished listing.
pub async fn finish(conn: &mut PgConnection, guild: &str, scope: &str) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM reconcile_listings WHERE guild_id = $1 AND scope = $2")
        .bind(guild)
        .bind(scope)
        .execute(conn)
        .await?;
    Ok(())
}

#[derive(sqlx::FromRow)]
struct DbGrant {
    id: String,
    business_id: String,
    customer_id: String,
    status: GrantStatus,
    applied_user_id: Option<String>,
    applied_guild_id: Option<String>,
    applied_role_id: Option<String>,
    guild_id: String,
    role_id: Option<String>,
    discord_user_id: Option<String>,
}

#[derive(sqlx::FromRow)]
struct DbGated {
    business_id: String,
    guild_id: String,
    role_id: String,
}

fn snowflake(s: Option<&str>) -> Option<Snowflake> {
    s.and_then(Snowflake::parse)
}

/// The grants reconcile judges (live ones, and revoked ones that still record what they
/// applied) of a business and a server (`None`: any), of one customer when `customer`
/// is given.
pub async fn judged_grants<'e>(
    db: impl sqlx::PgExecutor<'e>,
    business_id: Option<&str>,
    guild_id: Option<&str>,
    customer: Option<&str>,
) -> Result<Vec<GrantRow>, sqlx::Error> {
    let rows: Vec<DbGrant> = sqlx::query_as(
        "SELECT g.id, g.business_id, g.customer_id, g.status, g.applied_user_id,
                g.applied_guild_id, g.applied_role_id, e.guild_id, e.role_id, l.discord_user_id
         FROM grants g
         JOIN entitlements e ON e.id = g.entitlement_id
         LEFT JOIN discord_links l ON l.business_id = g.business_id AND l.customer_id = g.customer_id
         WHERE (g.status <> 'Revoked' OR g.applied_user_id IS NOT NULL)
           AND ($1::text IS NULL OR g.business_id = $1)
           AND ($2::text IS NULL OR e.guild_id = $2 OR g.applied_guild_id = $2)
           AND ($3::text IS NULL OR g.customer_id = $3)
         ORDER BY g.created_at, g.id",
    )
    .bind(business_id)
    .bind(guild_id)
    .bind(customer)
    .fetch_all(db)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| GrantRow {
            status: r.status,
            applied_user: snowflake(r.applied_user_id.as_deref()),
            applied_guild: snowflake(r.applied_guild_id.as_deref()),
            applied_role: snowflake(r.applied_role_id.as_deref()),
            entitlement_guild: Snowflake::parse(&r.guild_id),
            entitlement_role: snowflake(r.role_id.as_deref()),
            linked_user: snowflake(r.discord_user_id.as_deref()),
            id: r.id,
            business_id: r.business_id,
            customer_id: r.customer_id,
        })
        .collect())
}

/// Roles that entitlements (not deleted) gate, of a business and a server (`None`: any).
pub async fn gated_roles(
    pool: &PgPool,
    business_id: Option<&str>,
    guild_id: Option<&str>,
) -> Result<Vec<GatedRole>, sqlx::Error> {
    let rows: Vec<DbGated> = sqlx::query_as(
        "SELECT DISTINCT business_id, guild_id, role_id FROM entitlements
         WHERE deleted_at IS NULL AND role_id IS NOT NULL
           AND ($1::text IS NULL OR business_id = $1)
           AND ($2::text IS NULL OR guild_id = $2)",
    )
    .bind(business_id)
    .bind(guild_id)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .filter_map(|r| {
            Some(GatedRole {
                guild: Snowflake::parse(&r.guild_id)?,
                role: Snowflake::parse(&r.role_id)?,
                business_id: r.business_id,
            })
        })
        .collect())
}

/// The roles guildgate found already there in `guilds` (its holdings): (server, user,
/// role).
pub async fn found_roles(
    pool: &PgPool,
    guilds: &BTreeSet<Snowflake>,
) -> Result<HashSet<(Snowflake, Snowflake, Snowflake)>, sqlx::Error> {
    let ids: Vec<String> = guilds.iter().map(|g| g.to_string()).collect();
    let rows: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT guild_id, user_id, role_id FROM discord_holdings
         WHERE found AND role_id <> '' AND guild_id = ANY($1)",
    )
    .bind(&ids)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .filter_map(|(g, u, r)| {
            Some((
                Snowflake::parse(&g)?,
                Snowflake::parse(&u)?,
                Snowflake::parse(&r)?,
            ))
        })
        .collect())
}
