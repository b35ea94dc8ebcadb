//! SQL of entitlement translations. Every query here takes an entitlement id the caller
//! has already found undeleted and of its business: these rows carry no business of
//! their own.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

/// One locale's translation of an entitlement.
#[derive(Clone, Debug, PartialEq, sqlx::FromRow)]
pub struct Translation {
    pub entitlement_id: String,
    pub locale: String,
    pub name: Option<String>,
    pub description: Option<String>,
    pub updated_at: DateTime<Utc>,
}

/// The translations of an entitlement, by locale; only `locales` when given.
pub async fn list(
    conn: &mut PgConnection,
    entitlement_id: &str,
    locales: Option<&[String]>,
) -> Result<Vec<Translation>, sqlx::Error> {
    sqlx::query_as(
        "SELECT * FROM entitlement_translations
         WHERE entitlement_id = $1 AND ($2::text[] IS NULL OR locale = ANY($2))
         ORDER BY locale",
    )
    .bind(entitlement_id)
    .bind(locales)
    .fetch_all(conn)
    .await
}

/// The translations of `entitlement_ids` in any of `locales`.
pub async fn of_entitlements(
    conn: &mut PgConnection,
    entitlement_ids: &[String],
    locales: &[String],
) -> Result<Vec<Translation>, sqlx::Error> {
    sqlx::query_as(
        "SELECT * FROM entitlement_translations
         WHERE entitlement_id = ANY($1) AND locale = ANY($2)",
    )
    .bind(entitlement_ids)
    .bind(locales)
    .fetch_all(conn)
    .await
}

/// Creates or replaces one locale's translation; `true` when it is new.
pub async fn put(
    conn: &mut PgConnection,
    entitlement_id: &str,
    locale: &str,
    name: Option<&str>,
    description: Option<&str>,
    now: DateTime<Utc>,
) -> Result<(Translation, bool), sqlx::Error> {
    // `xmax = 0` only on a row this statement inserted: it tells 201 from 200 in the
    // same statement, with no read before that a concurrent save could invalidate.
    let row: (String, String, Option<String>, Option<String>, DateTime<Utc>, bool) =
        sqlx::query_as(
            "INSERT INTO entitlement_translations (entitlement_id, locale, name, description, updated_at)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (entitlement_id, locale) DO UPDATE
                 SET name = EXCLUDED.name, description = EXCLUDED.description,
                     updated_at = EXCLUDED.updated_at
             RETURNING entitlement_id, locale, name, description, updated_at, xmax = 0",
        )
        .bind(entitlement_id)
        .bind(locale)
        .bind(name)
        .bind(description)
        .bind(now)
        .fetch_one(conn)
        .await?;
    let (entitlement_id, locale, name, description, updated_at, created) = row;
    Ok((
        Translation {
            entitlement_id,
            locale,
            name,
            description,
            updated_at,
        },
        created,
    ))
}

/// Deletes one locale's translation; `false` when there was none.
pub async fn delete(
    conn: &mut PgConnection,
    entitlement_id: &str,
    locale: &str,
) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "DELETE FROM entitlement_translations WHERE entitlement_id = $1 AND locale = $2",
    )
    .bind(entitlement_id)
    .bind(locale)
    .execute(conn)
    .await?;
    Ok(done.rows_affected() > 0)
}
