//! SQL of webhook endpoints (`webhook_endpoints`) and the secrets they rotated away from
//! (`webhook_endpoint_old_secrets`). The rules an endpoint is checked against before it
//! is stored live in [`crate::webhooks::endpoints`].

use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use sqlx::types::Json;

/// `metadata` and custom `headers`: strings by string.
pub type Strings = BTreeMap<String, String>;

/// A stored endpoint. `Debug` leaves the secrets out.
#[derive(Clone, PartialEq, sqlx::FromRow)]
pub struct Endpoint {
    pub id: String,
    pub business_id: String,
    pub url: String,
    pub description: Option<String>,
    pub filter_types: Option<Vec<String>>,
    pub disabled: bool,
    pub disabled_reason: Option<String>,
    pub secret: String,
    pub previous_secret: Option<String>,
    pub previous_secret_expires_at: Option<DateTime<Utc>>,
    pub metadata: Json<Strings>,
    /// Deliveries per second at most; `None`: no limit.
    pub rate_limit: Option<i32>,
    /// Custom headers sent with every delivery (may hold credentials).
    pub headers: Json<Strings>,
    pub idempotency_key: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Endpoint")
            .field("id", &self.id)
            .field("business_id", &self.business_id)
            .field("url", &self.url)
            .field("filter_types", &self.filter_types)
            .field("disabled", &self.disabled)
            .field("rate_limit", &self.rate_limit)
            .finish_non_exhaustive()
    }
}

/// A checked endpoint to store.
pub struct NewRow<'a> {
    pub url: &'a str,
    pub description: Option<&'a str>,
    pub filter_types: Option<&'a [String]>,
    pub secret: &'a str,
    pub metadata: &'a Strings,
    pub rate_limit: Option<i32>,
    pub headers: &'a Strings,
    pub idempotency_key: Option<&'a str>,
}

/// What [`insert`] did.
pub enum Inserted {
    /// Stored as a new endpoint.
    New(Endpoint),
    /// An endpoint of the business was created with the same idempotency key: that one.
    Existing(Endpoint),
    /// The business has `max` endpoints already; nothing stored.
    TooMany,
}

/// Stores an endpoint unless the business has `max` already or created one with the same
/// idempotency key. The business row's lock serializes concurrent creates, so neither
/// the count nor the key lookup can race.
pub async fn insert(
    conn: &mut PgConnection,
    business_id: &str,
    new: &NewRow<'_>,
    max: i64,
) -> Result<Inserted, sqlx::Error> {
    let mut tx = sqlx::Connection::begin(conn).await?;
    super::businesses::ensure_business(&mut tx, business_id).await?;
    sqlx::query("SELECT 1 FROM businesses WHERE id = $1 FOR UPDATE")
        .bind(business_id)
        .execute(&mut *tx)
        .await?;
    if let Some(key) = new.idempotency_key {
        let first: Option<Endpoint> = sqlx::query_as(
            "SELECT * FROM webhook_endpoints WHERE business_id = $1 AND idempotency_key = $2",
        )
        .bind(business_id)
        .bind(key)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(first) = first {
            return Ok(Inserted::Existing(first));
        }
    }
    let n: i64 =
        sqlx::query_scalar("SELECT count(*) FROM webhook_endpoints WHERE business_id = $1")
            .bind(business_id)
            .fetch_one(&mut *tx)
            .await?;
    if n >= max {
        return Ok(Inserted::TooMany);
    }
    let ep = sqlx::query_as(
        "INSERT INTO webhook_endpoints (id, business_id, url, description, filter_types, secret,
                                        metadata, rate_limit, headers, idempotency_key)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) RETURNING *",
    )
    .bind(crate::domain::ids::mint("ep"))
    .bind(business_id)
    .bind(new.url)
    .bind(new.description)
    .bind(new.filter_types)
    .bind(new.secret)
    .bind(Json(new.metadata))
    .bind(new.rate_limit)
    .bind(Json(new.headers))
    .bind(new.idempotency_key)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Inserted::New(ep))
}

/// Every endpoint of a business, oldest first.
pub async fn list(
    conn: &mut PgConnection,
    business_id: &str,
) -> Result<Vec<Endpoint>, sqlx::Error> {
    sqlx::query_as("SELECT * FROM webhook_endpoints WHERE business_id = $1 ORDER BY created_at, id")
        .bind(business_id)
        .fetch_all(conn)
        .await
}

/// Where a page of endpoints continues: after the endpoint created at `created_at` with
/// id `id` (endpoints are listed by creation, then id).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct After {
    pub created_at: DateTime<Utc>,
    pub id: String,
}

/// At most `limit` endpoints of a business, oldest first, after `after`.
pub async fn page(
    conn: &mut PgConnection,
    business_id: &str,
    after: Option<&After>,
    limit: i64,
) -> Result<Vec<Endpoint>, sqlx::Error> {
    sqlx::query_as(
        "SELECT * FROM webhook_endpoints
         WHERE business_id = $1 AND ($2::timestamptz IS NULL OR (created_at, id) > ($2, $3))
         ORDER BY created_at, id LIMIT $4",
    )
    .bind(business_id)
    .bind(after.map(|a| a.created_at))
    .bind(after.map(|a| a.id.as_str()))
    .bind(limit)
    .fetch_all(conn)
    .await
}

/// One endpoint of a business.
pub async fn get(
    conn: &mut PgConnection,
    business_id: &str,
    id: &str,
) -> Result<Option<Endpoint>, sqlx::Error> {
    sqlx::query_as("SELECT * FROM webhook_endpoints WHERE business_id = $1 AND id = $2")
        .bind(business_id)
        .bind(id)
        .fetch_optional(conn)
        .await
}

/// A checked change of an endpoint: a field is changed where its `set_*` is true (or,
/// for the optional ones, where it is `Some`).
pub struct PatchRow {
    pub url: Option<String>,
    pub set_description: bool,
    pub description: Option<String>,
    pub set_filter: bool,
    pub filter_types: Option<Vec<String>>,
    pub disabled: Option<bool>,
    pub metadata: Option<Strings>,
    pub set_rate_limit: bool,
    pub rate_limit: Option<i32>,
}

/// Applies a change to an endpoint of the business; enabling it clears the reason it was
/// disabled for. `None` if there is no such endpoint.
pub async fn update(
    conn: &mut PgConnection,
    business_id: &str,
    id: &str,
    patch: PatchRow,
) -> Result<Option<Endpoint>, sqlx::Error> {
    sqlx::query_as(
        "UPDATE webhook_endpoints SET
            url = COALESCE($3, url),
            description = CASE WHEN $4 THEN $5 ELSE description END,
            filter_types = CASE WHEN $6 THEN $7 ELSE filter_types END,
            disabled = COALESCE($8, disabled),
            disabled_reason = CASE WHEN $8 IS NULL THEN disabled_reason
                                   WHEN $8 THEN 'disabled by the merchant' ELSE NULL END,
            metadata = COALESCE($9, metadata),
            rate_limit = CASE WHEN $10 THEN $11 ELSE rate_limit END,
            updated_at = now()
         WHERE business_id = $1 AND id = $2 RETURNING *",
    )
    .bind(business_id)
    .bind(id)
    .bind(patch.url)
    .bind(patch.set_description)
    .bind(patch.description)
    .bind(patch.set_filter)
    .bind(patch.filter_types)
    .bind(patch.disabled)
    .bind(patch.metadata.map(Json))
    .bind(patch.set_rate_limit)
    .bind(patch.rate_limit)
    .fetch_optional(conn)
    .await
}

/// Replaces the custom headers of an endpoint of the business.
pub async fn set_headers(
    conn: &mut PgConnection,
    business_id: &str,
    id: &str,
    headers: &Strings,
) -> Result<Option<Endpoint>, sqlx::Error> {
    sqlx::query_as(
        "UPDATE webhook_endpoints SET headers = $3, updated_at = now()
         WHERE business_id = $1 AND id = $2 RETURNING *",
    )
    .bind(business_id)
    .bind(id)
    .bind(Json(headers))
    .fetch_optional(conn)
    .await
}

/// Deletes an endpoint of the business with its messages and attempts; `false` if there
/// was none.
pub async fn delete(
    conn: &mut PgConnection,
    business_id: &str,
    id: &str,
) -> Result<bool, sqlx::Error> {
    let r = sqlx::query("DELETE FROM webhook_endpoints WHERE business_id = $1 AND id = $2")
        .bind(business_id)
        .bind(id)
        .execute(conn)
        .await?;
    Ok(r.rows_affected() > 0)
}

/// How many secrets an endpoint rotated away from keep signing at most, the latest:
/// each is another signature on every request, so an endpoint rotated in a loop must
/// not make its messages' reads and requests grow without end.
pub const MAX_OLD_SECRETS: u8 = 4;

/// Makes `secret` the endpoint's signing secret; the one it replaces keeps signing until
/// `overlap_until`, and so do secrets rotated away from earlier until their own overlap
/// ends (`webhook_endpoint_old_secrets`, expired ones removed here), the latest
/// [`MAX_OLD_SECRETS`] of them. The secret rotated
/// away from is read from the updated row (`previous_secret`), so of two rotations at
/// once the second keeps the secret the first one set. `previous_secret` is still
/// written for releases before migration 0015. `None` if there is no such endpoint.
pub async fn rotate_secret(
    conn: &mut PgConnection,
    business_id: &str,
    id: &str,
    secret: &str,
    overlap_until: DateTime<Utc>,
) -> Result<Option<Endpoint>, sqlx::Error> {
    sqlx::query_as(
        "WITH upd AS (
            UPDATE webhook_endpoints SET previous_secret = secret, previous_secret_expires_at = $4,
                secret = $3, updated_at = now()
            WHERE business_id = $1 AND id = $2 RETURNING *
         ), kept AS (
            INSERT INTO webhook_endpoint_old_secrets (endpoint_id, secret, expires_at)
            SELECT id, previous_secret, $4 FROM upd
            ON CONFLICT (endpoint_id, secret) DO UPDATE SET expires_at = EXCLUDED.expires_at
         ), dropped AS (
            DELETE FROM webhook_endpoint_old_secrets o USING upd
            WHERE o.endpoint_id = upd.id AND o.secret <> upd.previous_secret
              AND (o.expires_at <= now() OR o.secret NOT IN (
                  SELECT k.secret FROM webhook_endpoint_old_secrets k
                  WHERE k.endpoint_id = upd.id AND k.secret <> upd.previous_secret
                    AND k.expires_at > now()
                  ORDER BY k.expires_at DESC LIMIT $5))
         )
         SELECT * FROM upd",
    )
    .bind(business_id)
    .bind(id)
    .bind(secret)
    .bind(overlap_until)
    .bind(i64::from(MAX_OLD_SECRETS) - 1)
    .fetch_optional(conn)
    .await
}
