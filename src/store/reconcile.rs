//! SQL of a reconcile's member listings in progress (`reconcile_listings`,
//! `reconcile_listed_members`): what lets a listing of a large guild carry on after an
//! interruption instead of starting again.

use sqlx::PgConnection;

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
