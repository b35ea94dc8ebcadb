//! `entitlement_moves`: what is left to queue of a save that hands an entitlement's
//! grants to the syncer again (see [`crate::lifecycle::moves`]).

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

/// The last grant a move queued, newest first by (`created_at`, `id`).
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct Cursor {
    #[sqlx(rename = "id")]
    pub grant_id: String,
    pub created_at: DateTime<Utc>,
}

/// Before the newest grant, as [`Move::after`] gives it: `infinity` sorts after every
/// time.
pub const START: (&str, &str) = ("infinity", "");

/// An entitlement whose grants after its cursor are still to be queued.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct Move {
    /// The entitlement's server or role changed: every live grant that applied
    /// something is queued, not only those that failed for a configuration cause.
    pub moved: bool,
    /// A save came during the move: once it is done, the failed grants get one more
    /// pass from the start.
    pub retry_failed: bool,
    /// The cursor, as text (`infinity` at the start), cast by PostgreSQL.
    after_created: String,
    after_grant: String,
}

impl Move {
    /// The cursor as (time, grant id), both as PostgreSQL reads them back.
    pub fn after(&self) -> (&str, &str) {
        (&self.after_created, &self.after_grant)
    }
}

const COLUMNS: &str = "moved, retry_failed, after_created::text AS after_created, after_grant";

/// `entitlement`'s move, locked until the caller's transaction ends (a save holds its
/// entitlement's row already, so saves of one entitlement never meet here). `None` when
/// there is none, or, with `skip_locked` (a mover's turn), when another process or a
/// save holds it.
pub async fn lock(
    conn: &mut PgConnection,
    entitlement_id: &str,
    skip_locked: bool,
) -> Result<Option<Move>, sqlx::Error> {
    let skip = if skip_locked { " SKIP LOCKED" } else { "" };
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM entitlement_moves WHERE entitlement_id = $1 FOR UPDATE{skip}"
    )))
    .bind(entitlement_id)
    .fetch_optional(conn)
    .await
}

/// Records a move of `entitlement` whose first page, up to `after`, a save queued.
pub async fn insert(
    conn: &mut PgConnection,
    (business_id, entitlement_id): (&str, &str),
    moved: bool,
    after: &Cursor,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO entitlement_moves (entitlement_id, business_id, moved, after_created, after_grant)
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(entitlement_id)
    .bind(business_id)
    .bind(moved)
    .bind(after.created_at)
    .bind(&after.grant_id)
    .execute(conn)
    .await?;
    Ok(())
}

/// Starts `entitlement`'s move over from its newest grant, with no pass over the failed
/// grants left to ask for: its server or role changed again (`moved`), or the move is
/// done and becomes the pass over the failed grants a save asked for.
pub async fn start_over(
    conn: &mut PgConnection,
    entitlement_id: &str,
    moved: bool,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE entitlement_moves SET after_created = 'infinity', after_grant = '',
             moved = $2, retry_failed = false, updated_at = now()
         WHERE entitlement_id = $1",
    )
    .bind(entitlement_id)
    .bind(moved)
    .execute(conn)
    .await?;
    Ok(())
}

/// Asks `entitlement`'s move for one more pass over its failed grants once it is done.
pub async fn retry_failed_after(
    conn: &mut PgConnection,
    entitlement_id: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE entitlement_moves SET retry_failed = true WHERE entitlement_id = $1")
        .bind(entitlement_id)
        .execute(conn)
        .await?;
    Ok(())
}

/// Records how far `entitlement`'s move has queued.
pub async fn advance(
    conn: &mut PgConnection,
    entitlement_id: &str,
    after: &Cursor,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE entitlement_moves SET after_created = $2, after_grant = $3, updated_at = now()
         WHERE entitlement_id = $1",
    )
    .bind(entitlement_id)
    .bind(after.created_at)
    .bind(&after.grant_id)
    .execute(conn)
    .await?;
    Ok(())
}

/// Ends `entitlement`'s move: every grant it covers is queued.
pub async fn finish(conn: &mut PgConnection, entitlement_id: &str) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM entitlement_moves WHERE entitlement_id = $1")
        .bind(entitlement_id)
        .execute(conn)
        .await?;
    Ok(())
}

/// The moves to work on now: each business's least recently advanced one, so that a
/// business moving many entitlements takes one turn among the others, not many.
pub async fn turns(conn: &mut PgConnection) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT entitlement_id FROM (
             SELECT DISTINCT ON (business_id) entitlement_id, updated_at
             FROM entitlement_moves ORDER BY business_id, updated_at
         ) AS m ORDER BY updated_at",
    )
    .fetch_all(conn)
    .await
}

/// Moves under way.
pub async fn count(conn: &mut PgConnection) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT count(*) FROM entitlement_moves")
        .fetch_one(conn)
        .await
}
