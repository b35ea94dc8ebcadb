//! Webhook endpoints per business: storage and the rules checked on save (the SSRF
//! guard, at most [`MAX_ENDPOINTS_PER_BUSINESS`], event-type filters, secrets, metadata,
//! custom headers, rate limits). The REST routes are built on these functions.

use chrono::{DateTime, Utc};
use reqwest::header::{HeaderName, HeaderValue};
use sqlx::PgConnection;

use super::signing::{Secret, SecretError};
use super::ssrf::{self, SsrfError, TargetPolicy};
use crate::store::endpoints::{self as store, Inserted, NewRow, PatchRow};
use crate::store::endpoints::{Endpoint, Strings};

/// Like the payment platform: at most this many endpoints per business.
pub const MAX_ENDPOINTS_PER_BUSINESS: i64 = 5;

/// How long the previous secret keeps signing after a rotation.
pub const ROTATION_OVERLAP: chrono::Duration = chrono::Duration::hours(24);

/// The highest `rate_limit` (deliveries per second) an endpoint may have.
pub const MAX_RATE_LIMIT: i64 = 10_000;
/// Bounds of `metadata`: it is returned with every read of the endpoint.
pub const MAX_METADATA_KEYS: usize = 50;
pub const MAX_METADATA_KEY_CHARS: usize = 100;
pub const MAX_METADATA_VALUE_CHARS: usize = 1000;
/// Bounds of the custom headers: they go out with every delivery.
pub const MAX_HEADERS: usize = 20;
pub const MAX_HEADER_NAME_BYTES: usize = 256;
pub const MAX_HEADER_VALUE_BYTES: usize = 4096;
pub const MAX_IDEMPOTENCY_KEY_CHARS: usize = 255;

/// Headers guildgate sets on every delivery (Standard Webhooks, and those that describe
/// the body or the connection, which the HTTP client owns): a custom header of one of
/// these names would forge the signature or break the request.
const RESERVED_HEADERS: &[&str] = &[
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
    "connection",
    "keep-alive",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "host",
    "content-length",
    "content-type",
];

/// Parts of a header name that mark it as holding a credential: such a header's value is
/// never shown again (`GET /webhooks/{id}/headers` lists its name in `sensitive`).
const SENSITIVE_PARTS: &[&str] = &[
    "auth",
    "cookie",
    "token",
    "secret",
    "key",
    "password",
    "passwd",
    "signature",
    "session",
    "credential",
];

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
    #[error("rate_limit: must be between 1 and {MAX_RATE_LIMIT} (deliveries per second)")]
    RateLimit,
    #[error("{field}: {why}")]
    Invalid { field: String, why: String },
    #[error("no such endpoint")]
    NotFound,
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
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
    /// `None`: empty.
    pub metadata: Option<Strings>,
    /// Deliveries per second at most; `None`: no limit.
    pub rate_limit: Option<i64>,
    /// Custom headers sent with every delivery; `None`: none.
    pub headers: Option<Strings>,
    /// A create repeated with the same key returns the endpoint the first one made.
    pub idempotency_key: Option<String>,
}

/// A partial update; `None` leaves a field as it is.
#[derive(Clone, Debug, Default)]
pub struct EndpointPatch {
    pub url: Option<String>,
    pub description: Option<Option<String>>,
    pub filter_types: Option<Option<Vec<String>>>,
    pub disabled: Option<bool>,
    /// `Some(None)`: empty.
    pub metadata: Option<Option<Strings>>,
    /// `Some(None)`: no limit.
    pub rate_limit: Option<Option<i64>>,
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

fn check_rate_limit(r: Option<i64>) -> Result<Option<i32>, EndpointError> {
    match r {
        None => Ok(None),
        Some(r) if (1..=MAX_RATE_LIMIT).contains(&r) => Ok(i32::try_from(r).ok()),
        Some(_) => Err(EndpointError::RateLimit),
    }
}

fn invalid(field: impl Into<String>, why: impl Into<String>) -> EndpointError {
    EndpointError::Invalid {
        field: field.into(),
        why: why.into(),
    }
}

fn check_metadata(m: Option<Strings>) -> Result<Strings, EndpointError> {
    let m = m.unwrap_or_default();
    if m.len() > MAX_METADATA_KEYS {
        return Err(invalid(
            "metadata",
            format!("at most {MAX_METADATA_KEYS} keys"),
        ));
    }
    for (k, v) in &m {
        if k.is_empty() || k.chars().count() > MAX_METADATA_KEY_CHARS {
            return Err(invalid(
                "metadata",
                format!("a key must have 1 to {MAX_METADATA_KEY_CHARS} characters"),
            ));
        }
        if v.chars().count() > MAX_METADATA_VALUE_CHARS {
            return Err(invalid(
                format!("metadata.{k}"),
                format!("must be at most {MAX_METADATA_VALUE_CHARS} characters"),
            ));
        }
    }
    Ok(m)
}

/// Checks custom headers: valid HTTP names and values, none guildgate sets itself or
/// that belongs to the connection, each name once (names are case-insensitive).
pub fn check_headers(headers: &Strings) -> Result<(), EndpointError> {
    if headers.len() > MAX_HEADERS {
        return Err(invalid("headers", format!("at most {MAX_HEADERS} headers")));
    }
    let mut seen = std::collections::HashSet::new();
    for (name, value) in headers {
        let field = format!("headers.{name}");
        if name.len() > MAX_HEADER_NAME_BYTES || HeaderName::from_bytes(name.as_bytes()).is_err() {
            return Err(invalid(field, "is not a valid header name"));
        }
        let lower = name.to_ascii_lowercase();
        if RESERVED_HEADERS.contains(&lower.as_str()) || lower.starts_with("proxy-") {
            return Err(invalid(
                field,
                "is set by guildgate or belongs to the connection; it cannot be a custom header",
            ));
        }
        if !seen.insert(lower) {
            return Err(invalid(
                field,
                "is given twice (header names are case-insensitive)",
            ));
        }
        // Visible ASCII, spaces and tabs only: no line breaks (header injection), and no
        // bytes whose meaning receivers disagree on.
        let printable = value
            .bytes()
            .all(|b| b == b'\t' || (0x20..0x7f).contains(&b));
        if value.len() > MAX_HEADER_VALUE_BYTES
            || !printable
            || HeaderValue::from_str(value).is_err()
        {
            return Err(invalid(
                field,
                format!(
                    "the value must be printable ASCII of at most {MAX_HEADER_VALUE_BYTES} bytes"
                ),
            ));
        }
    }
    Ok(())
}

/// Whether a custom header holds a credential by its name: its value is not shown again.
pub fn is_sensitive(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    SENSITIVE_PARTS.iter().any(|p| lower.contains(p))
}

fn check_idempotency_key(k: &Option<String>) -> Result<(), EndpointError> {
    match k {
        Some(k) if k.is_empty() || k.chars().count() > MAX_IDEMPOTENCY_KEY_CHARS => Err(invalid(
            "idempotency_key",
            format!("must have 1 to {MAX_IDEMPOTENCY_KEY_CHARS} characters"),
        )),
        _ => Ok(()),
    }
}

/// A new endpoint whose fields were checked, its URL resolved: ready to store.
pub struct CheckedEndpoint {
    url: url::Url,
    description: Option<String>,
    filter: Option<Vec<String>>,
    secret: Secret,
    metadata: Strings,
    rate_limit: Option<i32>,
    headers: Strings,
    idempotency_key: Option<String>,
}

/// Checks a new endpoint, resolving its URL (a DNS lookup, which can take seconds: call
/// it before taking a database connection).
pub async fn check_new(
    business_id: &str,
    new: NewEndpoint,
    policy: TargetPolicy,
) -> Result<CheckedEndpoint, EndpointError> {
    let url = ssrf::check_on_save(&new.url, policy, business_id).await?;
    let filter = normalize_filter(new.filter_types)?;
    check_description(&new.description)?;
    let secret = match new.secret {
        Some(s) => Secret::parse(&s)?,
        None => Secret::generate(),
    };
    let metadata = check_metadata(new.metadata)?;
    let rate_limit = check_rate_limit(new.rate_limit)?;
    let headers = new.headers.unwrap_or_default();
    check_headers(&headers)?;
    check_idempotency_key(&new.idempotency_key)?;
    Ok(CheckedEndpoint {
        url,
        description: new.description,
        filter,
        secret,
        metadata,
        rate_limit,
        headers,
        idempotency_key: new.idempotency_key,
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
    let checked = check_new(business_id, new, policy).await?;
    Ok(insert(conn, business_id, checked).await?.0)
}

/// Stores a checked endpoint, within the business's limit; `true` with it. With an
/// idempotency key that an endpoint of the business was created with, returns that
/// endpoint and `false` instead (also when the business is at its limit: nothing new is
/// stored).
pub async fn insert(
    conn: &mut PgConnection,
    business_id: &str,
    new: CheckedEndpoint,
) -> Result<(Endpoint, bool), EndpointError> {
    let row = NewRow {
        url: new.url.as_str(),
        description: new.description.as_deref(),
        filter_types: new.filter.as_deref(),
        secret: new.secret.expose(),
        metadata: &new.metadata,
        rate_limit: new.rate_limit,
        headers: &new.headers,
        idempotency_key: new.idempotency_key.as_deref(),
    };
    match store::insert(conn, business_id, &row, MAX_ENDPOINTS_PER_BUSINESS).await? {
        Inserted::New(ep) => Ok((ep, true)),
        Inserted::Existing(ep) => Ok((ep, false)),
        Inserted::TooMany => Err(EndpointError::TooMany),
    }
}

/// One endpoint of a business.
pub async fn get(
    conn: &mut PgConnection,
    business_id: &str,
    id: &str,
) -> Result<Endpoint, EndpointError> {
    store::get(conn, business_id, id)
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
    metadata: Option<Strings>,
    set_rate_limit: bool,
    rate_limit: Option<i32>,
}

/// Checks a patch; a new URL is checked like on create (a DNS lookup: call it before
/// taking a database connection).
pub async fn check_patch(
    business_id: &str,
    patch: EndpointPatch,
    policy: TargetPolicy,
) -> Result<CheckedPatch, EndpointError> {
    let url = match &patch.url {
        Some(u) => Some(
            ssrf::check_on_save(u, policy, business_id)
                .await?
                .to_string(),
        ),
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
    let metadata = match patch.metadata {
        Some(m) => Some(check_metadata(m)?),
        None => None,
    };
    let (set_rate_limit, rate_limit) = match patch.rate_limit {
        Some(r) => (true, check_rate_limit(r)?),
        None => (false, None),
    };
    Ok(CheckedPatch {
        url,
        set_desc,
        desc,
        set_filter,
        filter,
        disabled: patch.disabled,
        metadata,
        set_rate_limit,
        rate_limit,
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
    let checked = check_patch(business_id, patch, policy).await?;
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
        metadata,
        set_rate_limit,
        rate_limit,
    } = patch;
    let row = PatchRow {
        url,
        set_description: set_desc,
        description: desc,
        set_filter,
        filter_types: filter,
        disabled,
        metadata,
        set_rate_limit,
        rate_limit,
    };
    store::update(conn, business_id, id, row)
        .await?
        .ok_or(EndpointError::NotFound)
}

/// Replaces the custom headers of an endpoint of the business (checked with
/// [`check_headers`]).
pub async fn set_headers(
    conn: &mut PgConnection,
    business_id: &str,
    id: &str,
    headers: &Strings,
) -> Result<Endpoint, EndpointError> {
    check_headers(headers)?;
    store::set_headers(conn, business_id, id, headers)
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
    if store::delete(conn, business_id, id).await? {
        Ok(())
    } else {
        Err(EndpointError::NotFound)
    }
}

/// Rotates the secret: `new` (or a generated one) signs from now on, and the current one
/// keeps signing too, as another signature, for [`ROTATION_OVERLAP`]. Secrets rotated
/// away from earlier keep signing until their own overlap ends, so rotating twice within
/// it drops neither (`webhook_endpoint_old_secrets`); expired ones are removed here, and
/// beyond the latest [`store::MAX_OLD_SECRETS`] the oldest go at once.
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
    store::rotate_secret(
        conn,
        business_id,
        id,
        secret.expose(),
        now + ROTATION_OVERLAP,
    )
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

    fn headers(pairs: &[(&str, &str)]) -> Strings {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn refused_header(pairs: &[(&str, &str)]) -> String {
        match check_headers(&headers(pairs)) {
            Err(EndpointError::Invalid { field, .. }) => field,
            other => panic!("{pairs:?} must be refused, got {other:?}"),
        }
    }

    #[test]
    fn custom_headers_are_checked() {
        assert!(
            check_headers(&headers(&[
                ("X-Tenant", "acme"),
                ("Authorization", "Bearer a\tb")
            ]))
            .is_ok()
        );
        assert!(check_headers(&Strings::new()).is_ok());
        for name in [
            "webhook-id",
            "Webhook-Signature",
            "webhook-timestamp",
            "Proxy-Authenticate",
            "TE",
            "Content-Type",
            "a b",
            "",
        ] {
            assert_eq!(refused_header(&[(name, "v")]), format!("headers.{name}"));
        }
        for value in ["a\nb", "a\rb", "\u{0}", "é"] {
            assert_eq!(refused_header(&[("X-A", value)]), "headers.X-A");
        }
        assert_eq!(refused_header(&[("X-A", "1"), ("x-a", "2")]), "headers.x-a");
        let many: Vec<(String, String)> = (0..=MAX_HEADERS)
            .map(|i| (format!("x-{i}"), "v".to_string()))
            .collect();
        assert!(check_headers(&many.into_iter().collect()).is_err());
    }

    #[test]
    fn credentials_are_recognised_by_their_header_names() {
        for name in [
            "Authorization",
            "X-Api-Key",
            "x-auth-token",
            "Cookie",
            "X-Client-Secret",
        ] {
            assert!(is_sensitive(name), "{name}");
        }
        for name in ["X-Tenant", "X-Region", "Accept"] {
            assert!(!is_sensitive(name), "{name}");
        }
    }

    #[test]
    fn rate_limits_and_metadata_are_bounded() {
        assert_eq!(check_rate_limit(None).unwrap(), None);
        assert_eq!(check_rate_limit(Some(1)).unwrap(), Some(1));
        assert_eq!(
            check_rate_limit(Some(MAX_RATE_LIMIT)).unwrap(),
            Some(10_000)
        );
        for bad in [0, -1, MAX_RATE_LIMIT + 1, i64::MAX] {
            assert!(matches!(
                check_rate_limit(Some(bad)),
                Err(EndpointError::RateLimit)
            ));
        }
        assert_eq!(check_metadata(None).unwrap(), Strings::new());
        assert!(check_metadata(Some(headers(&[("", "v")]))).is_err());
        let long = "x".repeat(MAX_METADATA_VALUE_CHARS + 1);
        assert!(check_metadata(Some(headers(&[("k", &long)]))).is_err());
    }
}
