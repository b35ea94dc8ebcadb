//! SQL of the limits every process shares per bot (`discord_budget_slots`,
//! `discord_budget_blocks`) and per address (`discord_invalid_answers`); the logic
//! around them is [`crate::discord::shared`].

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use super::pg_interval;

/// What [`lease_slot`] answered.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Lease {
    /// Slot `slot` was taken, leased until `until` (its token for [`release_slot`]).
    Taken { slot: i32, until: DateTime<Utc> },
    /// No slot is free for this many seconds.
    Wait(f64),
    /// The ring has no slots yet.
    NoRing,
}

/// Takes a slot of `bot`'s ring of `kind` for a request (`guildgate_discord_lease`,
/// under the database's clock), leased for `lease`: it stays taken until
/// [`release_slot`] stamps it with the answer's time, or until the lease ends.
pub async fn lease_slot(
    pool: &PgPool,
    bot: &str,
    kind: &str,
    window: Duration,
    lease: Duration,
) -> Result<Lease, sqlx::Error> {
    let (wait, slot, until): (Option<f64>, Option<i32>, Option<DateTime<Utc>>) = sqlx::query_as(
        "SELECT wait, slot, leased_until FROM guildgate_discord_lease($1, $2, $3, $4)",
    )
    .bind(bot)
    .bind(kind)
    .bind(pg_interval(window))
    .bind(pg_interval(lease))
    .fetch_one(pool)
    .await?;
    Ok(match (slot, until, wait) {
        (Some(slot), Some(until), _) => Lease::Taken { slot, until },
        (_, _, Some(w)) => Lease::Wait(w),
        _ => Lease::NoRing,
    })
}

/// Leases the slot leased until `until` again, for `lease` from now, if nobody took it
/// since: the new end of its lease, or `None` when it was taken by another.
pub async fn renew_slot(
    pool: &PgPool,
    bot: &str,
    kind: &str,
    slot: i32,
    until: DateTime<Utc>,
    lease: Duration,
) -> Result<Option<DateTime<Utc>>, sqlx::Error> {
    sqlx::query_scalar(
        "UPDATE discord_budget_slots SET taken_at = clock_timestamp() + $5
          WHERE bot = $1 AND kind = $2 AND slot = $3 AND taken_at = $4
         RETURNING taken_at",
    )
    .bind(bot)
    .bind(kind)
    .bind(slot)
    .bind(until)
    .bind(pg_interval(lease))
    .fetch_optional(pool)
    .await
}

/// The request of a slot leased until `until` was answered (or will not be sent): the
/// slot is free a window from now. A slot whose lease ended and was taken again is left
/// to its new taker.
pub async fn release_slot(
    pool: &PgPool,
    bot: &str,
    kind: &str,
    slot: i32,
    until: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE discord_budget_slots SET taken_at = clock_timestamp()
          WHERE bot = $1 AND kind = $2 AND slot = $3 AND taken_at = $4",
    )
    .bind(bot)
    .bind(kind)
    .bind(slot)
    .bind(until)
    .execute(pool)
    .await
    .map(|_| ())
}

/// Makes `bot`'s ring of `kind` `size` slots long: slots are added, and slots beyond
/// `size` removed.
pub async fn size_ring(pool: &PgPool, bot: &str, kind: &str, size: u32) -> Result<(), sqlx::Error> {
    let size = i32::try_from(size.max(1)).unwrap_or(i32::MAX);
    let mut tx = pool.begin().await?;
    sqlx::query(
        "INSERT INTO discord_budget_slots (bot, kind, slot)
         SELECT $1, $2, g FROM generate_series(1, $3) g
         ON CONFLICT DO NOTHING",
    )
    .bind(bot)
    .bind(kind)
    .bind(size)
    .execute(&mut *tx)
    .await?;
    sqlx::query("DELETE FROM discord_budget_slots WHERE bot = $1 AND kind = $2 AND slot > $3")
        .bind(bot)
        .bind(kind)
        .bind(size)
        .execute(&mut *tx)
        .await?;
    tx.commit().await
}

/// Blocks `bot` for `d` from now (a global 429), unless it is blocked for longer.
pub async fn block_for(pool: &PgPool, bot: &str, d: Duration) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO discord_budget_blocks (bot, blocked_until)
         VALUES ($1, clock_timestamp() + $2)
         ON CONFLICT (bot) DO UPDATE
         SET blocked_until = greatest(discord_budget_blocks.blocked_until, excluded.blocked_until)",
    )
    .bind(bot)
    .bind(pg_interval(d))
    .execute(pool)
    .await
    .map(|_| ())
}

/// Counts one invalid answer in the bucket of `bucket` width it falls in, in the whole
/// count and in `business`'s when the call was made for one, and forgets buckets older
/// than `keep`.
pub async fn record_invalid(
    pool: &PgPool,
    bucket: Duration,
    keep: Duration,
    business: Option<&str>,
) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query(
        "INSERT INTO discord_invalid_answers (bucket, answers)
         VALUES (date_bin($1, clock_timestamp(), 'epoch'), 1)
         ON CONFLICT (bucket) DO UPDATE SET answers = discord_invalid_answers.answers + 1",
    )
    .bind(pg_interval(bucket))
    .execute(&mut *tx)
    .await?;
    if let Some(business) = business {
        sqlx::query(
            "INSERT INTO discord_invalid_answers_by_business (business_id, bucket, answers)
             VALUES ($2, date_bin($1, clock_timestamp(), 'epoch'), 1)
             ON CONFLICT (business_id, bucket)
             DO UPDATE SET answers = discord_invalid_answers_by_business.answers + 1",
        )
        .bind(pg_interval(bucket))
        .bind(business)
        .execute(&mut *tx)
        .await?;
    }
    sqlx::query("DELETE FROM discord_invalid_answers WHERE bucket < clock_timestamp() - $1")
        .bind(pg_interval(keep))
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "DELETE FROM discord_invalid_answers_by_business WHERE bucket < clock_timestamp() - $1",
    )
    .bind(pg_interval(keep))
    .execute(&mut *tx)
    .await?;
    tx.commit().await
}

/// `business`'s invalid answers in the buckets that start within `window` of now.
pub async fn invalid_count_of(
    pool: &PgPool,
    business: &str,
    window: Duration,
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT coalesce(sum(answers), 0)::bigint FROM discord_invalid_answers_by_business
         WHERE business_id = $1 AND bucket > clock_timestamp() - $2",
    )
    .bind(business)
    .bind(pg_interval(window))
    .fetch_one(pool)
    .await
}

/// Seconds until `business`'s oldest bucket within `window` of now leaves it; `None`
/// without one.
pub async fn oldest_of_leaves_in(
    pool: &PgPool,
    business: &str,
    window: Duration,
) -> Result<Option<f64>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT extract(epoch FROM min(bucket) + $2 - clock_timestamp())::float8
         FROM discord_invalid_answers_by_business
         WHERE business_id = $1 AND bucket > clock_timestamp() - $2",
    )
    .bind(business)
    .bind(pg_interval(window))
    .fetch_one(pool)
    .await
}

/// Invalid answers in the buckets that start within `window` of now.
pub async fn invalid_count(pool: &PgPool, window: Duration) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT coalesce(sum(answers), 0)::bigint FROM discord_invalid_answers
         WHERE bucket > clock_timestamp() - $1",
    )
    .bind(pg_interval(window))
    .fetch_one(pool)
    .await
}

/// Seconds until the oldest bucket within `window` of now leaves it; `None` without one.
pub async fn oldest_leaves_in(pool: &PgPool, window: Duration) -> Result<Option<f64>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT extract(epoch FROM min(bucket) + $1 - clock_timestamp())::float8
         FROM discord_invalid_answers WHERE bucket > clock_timestamp() - $1",
    )
    .bind(pg_interval(window))
    .fetch_one(pool)
    .await
}
