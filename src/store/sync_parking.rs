//! SQL of the syncer's parked jobs (`discord_sync_parked`) and of the leases of their
//! drainers (`discord_sync_draining`); how lanes use them is [`crate::sync::lanes`].

use std::time::Duration;

use sqlx::PgPool;

use super::pg_interval;

/// Parks a job of `grant_id` (of `business_id`'s) for `bot`. A grant parked already
/// keeps its row (its lowest attempt); one being run is marked to run once more.
pub async fn park(
    pool: &PgPool,
    grant_id: &str,
    bot: &str,
    business_id: &str,
    attempt: u32,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO discord_sync_parked (grant_id, bot, business_id, attempt)
         VALUES ($1, $2, $3, $4)
         ON CONFLICT (grant_id) DO UPDATE SET
             again = discord_sync_parked.again OR discord_sync_parked.taken_by IS NOT NULL,
             attempt = least(discord_sync_parked.attempt, excluded.attempt)",
    )
    .bind(grant_id)
    .bind(bot)
    .bind(business_id)
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

/// A parked job taken to run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Taken {
    pub grant_id: String,
    pub attempt: u32,
    /// Whose turn it was.
    pub business_id: String,
}

/// Takes for `holder` the oldest waiting parked job of `bot` of the business whose
/// turn follows `after`'s, passing over the businesses in `full` (those holding their
/// share of the lane's seats) while another business has a job waiting. Businesses take
/// turns in the order of their ids, round and round, so a business with jobs waiting
/// gets a seat as soon as one frees, however many jobs another has parked or however
/// long its jobs hold their seats. `None`: none waits. Each look is one probe of the
/// index by bot, business and time.
pub async fn take(
    pool: &PgPool,
    bot: &str,
    holder: &str,
    after: &str,
    full: &[String],
) -> Result<Option<Taken>, sqlx::Error> {
    // A row the look found may be taken by another process in between (only while two
    // drainers overlap, as a lease changes hands): look again.
    for _ in 0..3 {
        let none: &[String] = &[];
        for skip in [full, none] {
            if let Some(taken) = take_once(pool, bot, holder, after, skip).await? {
                return Ok(Some(taken));
            }
            if full.is_empty() {
                break;
            }
        }
        let waiting: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM discord_sync_parked WHERE bot = $1 AND taken_by IS NULL)",
        )
        .bind(bot)
        .fetch_one(pool)
        .await?;
        if !waiting {
            return Ok(None);
        }
    }
    Ok(None)
}

async fn take_once(
    pool: &PgPool,
    bot: &str,
    holder: &str,
    after: &str,
    skip: &[String],
) -> Result<Option<Taken>, sqlx::Error> {
    let row: Option<(String, i32, String)> = sqlx::query_as(
        "WITH next AS (
            SELECT grant_id FROM (
                (SELECT grant_id, 0 AS lap FROM discord_sync_parked
                 WHERE bot = $1 AND taken_by IS NULL AND business_id > $3
                   AND business_id <> ALL ($4)
                 ORDER BY business_id, parked_at LIMIT 1)
                UNION ALL
                (SELECT grant_id, 1 FROM discord_sync_parked
                 WHERE bot = $1 AND taken_by IS NULL AND business_id <> ALL ($4)
                 ORDER BY business_id, parked_at LIMIT 1)
            ) c ORDER BY lap LIMIT 1
         )
         UPDATE discord_sync_parked p SET taken_by = $2
         FROM next WHERE p.grant_id = next.grant_id AND p.taken_by IS NULL
         RETURNING p.grant_id, p.attempt, p.business_id",
    )
    .bind(bot)
    .bind(holder)
    .bind(after)
    .bind(skip)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|(grant_id, a, business_id)| Taken {
        grant_id,
        attempt: u32::try_from(a).unwrap_or(0),
        business_id,
    }))
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
