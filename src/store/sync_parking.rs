//! SQL of the syncer's parked jobs (`discord_sync_parked`) and of the leases of their
//! drainers (`discord_sync_draining`); how lanes use them is [`crate::sync::lanes`].

use std::time::Duration;

use sqlx::PgPool;

use super::pg_interval;

/// Parks a job of `grant_id` for `bot`. A grant parked already keeps its row (its
/// lowest attempt); one being run is marked to run once more.
pub async fn park(
    pool: &PgPool,
    grant_id: &str,
    bot: &str,
    attempt: u32,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO discord_sync_parked (grant_id, bot, attempt) VALUES ($1, $2, $3)
         ON CONFLICT (grant_id) DO UPDATE SET
             again = discord_sync_parked.again OR discord_sync_parked.taken_by IS NOT NULL,
             attempt = least(discord_sync_parked.attempt, excluded.attempt)",
    )
    .bind(grant_id)
    .bind(bot)
    .bind(i32::try_from(attempt).unwrap_or(i32::MAX))
    .execute(pool)
    .await?;
    Ok(())
}

/// Takes or renews `bot`'s drainer lease for `holder`, for `lease` from now; `false` while another process
/// holds it. A `fresh` taker gives back the rows other holders took and never finished.
pub async fn lease(
    pool: &PgPool,
    bot: &str,
    holder: &str,
    fresh: bool,
    lease: Duration,
) -> Result<bool, sqlx::Error> {
    let held: Option<String> = sqlx::query_scalar(
        "INSERT INTO discord_sync_draining (bot, holder, lease_until)
         VALUES ($1, $2, clock_timestamp() + $3)
         ON CONFLICT (bot) DO UPDATE SET holder = excluded.holder, lease_until = excluded.lease_until
         WHERE discord_sync_draining.lease_until < clock_timestamp()
            OR discord_sync_draining.holder = excluded.holder
         RETURNING bot",
    )
    .bind(bot)
    .bind(holder)
    .bind(pg_interval(lease))
    .fetch_optional(pool)
    .await?;
    if held.is_some() && fresh {
        let given = sqlx::query(
            "UPDATE discord_sync_parked SET taken_by = NULL
             WHERE bot = $1 AND taken_by IS NOT NULL AND taken_by <> $2",
        )
        .bind(bot)
        .bind(holder)
        .execute(pool)
        .await?;
        if given.rows_affected() > 0 {
            tracing::info!(
                bot,
                jobs = given.rows_affected(),
                "took over parked sync jobs a stopped process had taken"
            );
        }
    }
    Ok(held.is_some())
}

/// Ends `holder`'s lease of `bot`.
pub async fn release(pool: &PgPool, bot: &str, holder: &str) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM discord_sync_draining WHERE bot = $1 AND holder = $2")
        .bind(bot)
        .bind(holder)
        .execute(pool)
        .await?;
    Ok(())
}

/// Takes `bot`'s oldest waiting parked job for `holder`: (grant id, attempt).
pub async fn take(
    pool: &PgPool,
    bot: &str,
    holder: &str,
) -> Result<Option<(String, u32)>, sqlx::Error> {
    let row: Option<(String, i32)> = sqlx::query_as(
        "UPDATE discord_sync_parked SET taken_by = $2
         WHERE grant_id = (
             SELECT grant_id FROM discord_sync_parked
             WHERE bot = $1 AND taken_by IS NULL
             ORDER BY parked_at LIMIT 1 FOR UPDATE SKIP LOCKED)
         RETURNING grant_id, attempt",
    )
    .bind(bot)
    .bind(holder)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|(g, a)| (g, u32::try_from(a).unwrap_or(0))))
}

/// Parked jobs of `bot`, waiting or being run.
pub async fn parked(pool: &PgPool, bot: &str) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT count(*) FROM discord_sync_parked WHERE bot = $1")
        .bind(bot)
        .fetch_one(pool)
        .await
}

/// A parked job `holder` ran is done: its row goes, unless a job for the grant came
/// meanwhile; then it waits again, at the back.
pub async fn finish(pool: &PgPool, grant_id: &str, holder: &str) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query(
        "DELETE FROM discord_sync_parked WHERE grant_id = $1 AND taken_by = $2 AND NOT again",
    )
    .bind(grant_id)
    .bind(holder)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "UPDATE discord_sync_parked SET taken_by = NULL, again = false, parked_at = clock_timestamp()
         WHERE grant_id = $1 AND taken_by = $2",
    )
    .bind(grant_id)
    .bind(holder)
    .execute(&mut *tx)
    .await?;
    tx.commit().await
}

/// Gives a taken job back to wait again (its outcome could not be published).
pub async fn give_back(pool: &PgPool, grant_id: &str, holder: &str) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE discord_sync_parked SET taken_by = NULL WHERE grant_id = $1 AND taken_by = $2",
    )
    .bind(grant_id)
    .bind(holder)
    .execute(pool)
    .await?;
    Ok(())
}

/// Bots with parked jobs and no live drainer.
pub async fn undrained(pool: &PgPool) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT DISTINCT p.bot FROM discord_sync_parked p
         WHERE NOT EXISTS (
             SELECT 1 FROM discord_sync_draining d
             WHERE d.bot = p.bot AND d.lease_until > clock_timestamp())",
    )
    .fetch_all(pool)
    .await
}
