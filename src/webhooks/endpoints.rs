//! Webhook endpoints per business: storage and the rules checked on save (the SSRF
//! guard, at most [`MAX_ENDPOINTS_PER_BUSINESS`], event-type filters, secrets). The REST
//! routes are built on these functions.

use std::fmt;

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use super::signing::{Secret, SecretError};
use super::ssrf::{self, SsrfError, TargetPolicy};
use crate::store;

/// Like the payment platform: at most this many endpoints per business.
pub const MAX_ENDPOINTS_PER_BUSINESS: i64 = 5;

/// How long the previous secret keeps signing after a rotation.
pub const ROTATION_OVERLAP: chrono::Duration = chrono::Duration::hours(24);

#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("url: {0}")]
    Url(#[from] SsrfError),
    #[error("secret: {0}")]
    Secret(#[from] SecretError),
    #[error("a business can have at most {MAX_ENDPOINTS_PER_BUSINESS} webhook endpoints")]
    TooMany,
    #[error("filter_types: {0:?} is not an event type")]
    BadFilter(String),
    #[error("description is longer than 1000 characters")]
    DescriptionTooLong,
    #[error("no such endpoint")]
    NotFound,
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
}

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
            .finish_non_exhaustive()
    }
}

/// What a merchant sends to create an endpoint.
#[derive(Clone, Debug, Default)]
pub struct NewEndpoint {
    pub url: String,
    pub description: Option<String>,
    /// `None` or empty: every event type.
    pub filter_types: Option<Vec<String>>,
    /// A secret of the merchant's choosing; generated when `None`.
    pub secret: Option<String>,
}

/// A partial update; `None` leaves a field as it is.
#[derive(Clone, Debug, Default)]
pub struct EndpointPatch {
    pub url: Option<String>,
    pub description: Option<Option<String>>,
    pub filter_types: Option<Option<Vec<String>>>,
    pub disabled: Option<bool>,
}

/// Whether an endpoint's filter accepts an event type (the same rule the fan-out's
/// SQL applies).
pub fn accepts(filter_types: Option<&[String]>, event_type: &str) -> bool {
    filter_types.is_none_or(|f| f.iter().any(|t| t == event_type))
}

fn normalize_filter(f: Option<Vec<String>>) -> Result<Option<Vec<String>>, EndpointError> {
    let Some(types) = f.filter(|t| !t.is_empty()) else {
        return Ok(None);
    };
    for t in &types {
        let ok = !t.is_empty()
            && t.len() <= 100
            && t.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if !ok {
            return Err(EndpointError::BadFilter(t.clone()));
        }
    }
    Ok(Some(types))
}

fn check_description(d: &Option<String>) -> Result<(), EndpointError> {
    match d {
        Some(d) if d.chars().count() > 1000 => Err(EndpointError::DescriptionTooLong),
        _ => Ok(()),
    }
}

/// A new endpoint whose fields were checked, its URL resolved: ready to store.
pub struct CheckedEndpoint {
    url: url::Url,
    description: Option<String>,
    filter: Option<Vec<String>>,
    secret: Secret,
}

/// Checks a new endpoint, resolving its URL (a DNS lookup, which can take seconds: call
/// it before taking a database connection).
pub async fn check_new(
    new: NewEndpoint,
    policy: TargetPolicy,
) -> Result<CheckedEndpoint, EndpointError> {
    let url = ssrf::check_on_save(&new.url, policy).await?;
    let filter = normalize_filter(new.filter_types)?;
    check_description(&new.description)?;
    let secret = match new.secret {
        Some(s) => Secret::parse(&s)?,
        None => Secret::generate(),
    };
    Ok(CheckedEndpoint {
        url,
        description: new.description,
        filter,
        secret,
    })
}

/// Creates an endpoint after checking its URL (resolving it) and the business's limit.
/// Resolves while holding `conn`: handlers use [`check_new`] and [`insert`] instead.
pub async fn create(
    conn: &mut PgConnection,
    business_id: &str,
    new: NewEndpoint,
    policy: TargetPolicy,
) -> Result<Endpoint, EndpointError> {
    let checked = check_new(new, policy).await?;
    insert(conn, business_id, checked).await
}

/// Stores a checked endpoint, within the business's limit.
pub async fn insert(
    conn: &mut PgConnection,
    business_id: &str,
    new: CheckedEndpoint,
) -> Result<Endpoint, EndpointError> {
    let CheckedEndpoint {
        url,
        description,
        filter,
        secret,
    } = new;
    let mut tx = sqlx::Connection::begin(conn).await?;
    store::setup::ensure_business(&mut tx, business_id).await?;
    // The business row lock serializes concurrent creates, so the count cannot race.
    sqlx::query("SELECT 1 FROM businesses WHERE id = $1 FOR UPDATE")
        .bind(business_id)
        .execute(&mut *tx)
        .await?;
    let n: i64 =
        sqlx::query_scalar("SELECT count(*) FROM webhook_endpoints WHERE business_id = $1")
            .bind(business_id)
            .fetch_one(&mut *tx)
            .await?;
    if n >= MAX_ENDPOINTS_PER_BUSINESS {
        return Err(EndpointError::TooMany);
    }
    let ep = sqlx::query_as(
        "INSERT INTO webhook_endpoints (id, business_id, url, description, filter_types, secret)
         VALUES ($1, $2, $3, $4, $5, $6) RETURNING *",
    )
    .bind(crate::ids::mint("ep"))
    .bind(business_id)
    .bind(url.as_str())
    .bind(&description)
    .bind(&filter)
    .bind(secret.expose())
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(ep)
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

/// One endpoint of a business.
pub async fn get(
    conn: &mut PgConnection,
    business_id: &str,
    id: &str,
) -> Result<Endpoint, EndpointError> {
    sqlx::query_as("SELECT * FROM webhook_endpoints WHERE business_id = $1 AND id = $2")
        .bind(business_id)
        .bind(id)
        .fetch_optional(conn)
        .await?
        .ok_or(EndpointError::NotFound)
}

/// A patch whose fields were checked, a new URL resolved: ready to apply.
pub struct CheckedPatch {
    url: Option<String>,
    set_desc: bool,
    desc: Option<String>,
    set_filter: bool,
    filter: Option<Vec<String>>,
    disabled: Option<bool>,
}

/// Checks a patch; a new URL is checked like on create (a DNS lookup: call it before
/// taking a database connection).
pub async fn check_patch(
    patch: EndpointPatch,
    policy: TargetPolicy,
) -> Result<CheckedPatch, EndpointError> {
    let url = match &patch.url {
        Some(u) => Some(ssrf::check_on_save(u, policy).await?.to_string()),
        None => None,
    };
    if let Some(d) = &patch.description {
        check_description(d)?;
    }
    let (set_filter, filter) = match patch.filter_types {
        Some(f) => (true, normalize_filter(f)?),
        None => (false, None),
    };
    let (set_desc, desc) = match patch.description {
        Some(d) => (true, d),
        None => (false, None),
    };
    Ok(CheckedPatch {
        url,
        set_desc,
        desc,
        set_filter,
        filter,
        disabled: patch.disabled,
    })
}

/// Applies a patch; a new URL is checked like on create. Enabling clears the reason it
/// was disabled for. Resolves while holding `conn`: handlers use [`check_patch`] and
/// [`apply_patch`] instead.
pub async fn update(
    conn: &mut PgConnection,
    business_id: &str,
    id: &str,
    patch: EndpointPatch,
    policy: TargetPolicy,
) -> Result<Endpoint, EndpointError> {
    let checked = check_patch(patch, policy).await?;
    apply_patch(conn, business_id, id, checked).await
}

/// Applies a checked patch.
pub async fn apply_patch(
    conn: &mut PgConnection,
    business_id: &str,
    id: &str,
    patch: CheckedPatch,
) -> Result<Endpoint, EndpointError> {
    let CheckedPatch {
        url,
        set_desc,
        desc,
        set_filter,
        filter,
        disabled,
    } = patch;
    sqlx::query_as(
        "UPDATE webhook_endpoints SET
            url = COALESCE($3, url),
            description = CASE WHEN $4 THEN $5 ELSE description END,
            filter_types = CASE WHEN $6 THEN $7 ELSE filter_types END,
            disabled = COALESCE($8, disabled),
            disabled_reason = CASE WHEN $8 IS NULL THEN disabled_reason
                                   WHEN $8 THEN 'disabled by the merchant' ELSE NULL END,
            updated_at = now()
         WHERE business_id = $1 AND id = $2 RETURNING *",
    )
    .bind(business_id)
    .bind(id)
    .bind(url)
    .bind(set_desc)
    .bind(desc)
    .bind(set_filter)
    .bind(filter)
    .bind(disabled)
    .fetch_optional(conn)
    .await?
    .ok_or(EndpointError::NotFound)
}

/// Deletes an endpoint with its messages and attempts; jobs still queued for them find
/// nothing and are dropped.
pub async fn delete(
    conn: &mut PgConnection,
    business_id: &str,
    id: &str,
) -> Result<(), EndpointError> {
    let r = sqlx::query("DELETE FROM webhook_endpoints WHERE business_id = $1 AND id = $2")
        .bind(business_id)
        .bind(id)
        .execute(conn)
        .await?;
    if r.rows_affected() == 0 {
        return Err(EndpointError::NotFound);
    }
    Ok(())
}

/// Rotates the secret: `new` (or a generated one) signs from now on, and the current one
/// keeps signing too, as another signature, for [`ROTATION_OVERLAP`]. Secrets rotated
/// away from earlier keep signing until their own overlap ends, so rotating twice within
/// it drops neither (`webhook_endpoint_old_secrets`); expired ones are removed here.
pub async fn rotate_secret(
    conn: &mut PgConnection,
    business_id: &str,
    id: &str,
    new: Option<&str>,
    now: DateTime<Utc>,
) -> Result<Endpoint, EndpointError> {
    let secret = match new {
        Some(s) => Secret::parse(s)?,
        None => Secret::generate(),
    };
    // The secret rotated away from is read from the updated row (`previous_secret`), so
    // of two rotations at once the second keeps the secret the first one set.
    // `previous_secret` is still written for releases before migration 0015.
    sqlx::query_as(
        "WITH upd AS (
            UPDATE webhook_endpoints SET previous_secret = secret, previous_secret_expires_at = $4,
                secret = $3, updated_at = now()
            WHERE business_id = $1 AND id = $2 RETURNING *
         ), kept AS (
            INSERT INTO webhook_endpoint_old_secrets (endpoint_id, secret, expires_at)
            SELECT id, previous_secret, $4 FROM upd
            ON CONFLICT (endpoint_id, secret) DO UPDATE SET expires_at = EXCLUDED.expires_at
         ), expired AS (
            DELETE FROM webhook_endpoint_old_secrets o USING upd
            WHERE o.endpoint_id = upd.id AND o.expires_at <= now()
              AND o.secret <> upd.previous_secret
         )
         SELECT * FROM upd",
    )
    .bind(business_id)
    .bind(id)
    .bind(secret.expose())
    .bind(now + ROTATION_OVERLAP)
    .fetch_optional(conn)
    .await?
    .ok_or(EndpointError::NotFound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters() {
        let only = vec!["entitlement_grant.revoked".to_string()];
        assert!(accepts(None, "entitlement_grant.created"));
        assert!(accepts(Some(&only), "entitlement_grant.revoked"));
        assert!(!accepts(Some(&only), "entitlement_grant.created"));
        assert_eq!(normalize_filter(Some(vec![])).unwrap(), None);
        assert!(matches!(
            normalize_filter(Some(vec!["a b".into()])),
            Err(EndpointError::BadFilter(_))
        ));
    }
}
