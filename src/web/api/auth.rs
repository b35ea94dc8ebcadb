//! Authentication: `Authorization: Bearer <api key>` → the business the key belongs to.
//! Every API handler takes a [`Merchant`]; without a valid key it answers 401 before
//! the handler runs, and past its business's `api.requests_per_second` 429. Also the key management the CLI does (`guildgate api-key …`).
//!
//! A key that authenticated is remembered by this process for [`KNOWN_KEY_TTL`]
//! ([`KnownKeys`]), so that its business's requests past the rate limit are refused
//! without a database read or a pool connection. A request the limit lets through
//! always reads its key, so a revoked key is refused at once. A key the process does
//! not know is read only within its client address's
//! `api.key_reads_per_address_per_second`, so made-up keys cannot cost a read each.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use secrecy::SecretString;
use sqlx::PgConnection;

use super::keys::{NewKey, PresentedKey};
use crate::domain::ids::BusinessId;
use crate::shares::Share;
use crate::store::api_keys as db;
use crate::web::AppState;
use crate::web::error::ApiError;
use crate::web::limits::ClientIp;
use crate::web::pool::Caller;

/// The authenticated caller, holding one of its business's places in flight
/// (`api.max_in_flight_per_business`) while the request is handled.
#[derive(Clone, Debug)]
pub struct Merchant {
    pub business_id: BusinessId,
    _in_flight: Arc<Share>,
}

impl Merchant {
    pub fn business(&self) -> &str {
        self.business_id.as_str()
    }

    /// Whose turn of the handlers' database pool this request takes.
    pub fn caller(&self) -> Caller<'_> {
        Caller::Business(self.business())
    }
}

impl FromRequestParts<AppState> for Merchant {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let header = parts
            .headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .ok_or(ApiError::Unauthorized)?;
        let (scheme, token) = header.split_once(' ').ok_or(ApiError::Unauthorized)?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(ApiError::Unauthorized);
        }
        let key = PresentedKey::parse(token.trim()).ok_or(ApiError::Unauthorized)?;
        let limited = |business: &BusinessId| {
            state
                .limits
                .check_business(business.as_str())
                .map_err(ApiError::rate_limited)
        };
        // A key known to be its business's (the secret matches what it matched) is
        // counted against the rate limit first: past it, refused without a read.
        let too_many = |business: &BusinessId| {
            tracing::info!(business_id = %business, "API request refused: too many of this business at once");
            ApiError::rate_limited(Duration::from_secs(1))
        };
        let known = state.keys.get(&key.id);
        // A known key's business takes its place in flight before the read, so that
        // its requests past that are refused without one.
        let mut in_flight = None;
        if let Some(known) = &known {
            if !key.matches(&known.key_hash) {
                state.metrics.api_key_read("memory");
                return Err(ApiError::Unauthorized);
            }
            if let Err(refused) = limited(&known.business_id) {
                state.metrics.api_key_read("memory");
                return Err(refused);
            }
            match state.limits.enter(known.business_id.as_str()) {
                Some(place) => in_flight = Some((known.business_id.clone(), place)),
                None => {
                    state.metrics.api_key_read("memory");
                    return Err(too_many(&known.business_id));
                }
            }
        }
        let Ok(ClientIp(address)) = ClientIp::from_request_parts(parts, state).await;
        if known.is_none()
            && let Some(ip) = address
        {
            // Made-up keys are never known: one address cannot spend a read (and a
            // pool connection) per request with them.
            state
                .limits
                .check_key_read(ip)
                .map_err(ApiError::rate_limited)?;
        }
        state.metrics.api_key_read("database");
        // A key not known yet reads on its address's turn: it names no business yet.
        let caller = match &known {
            Some(known) => Caller::Business(known.business_id.as_str()),
            None => Caller::Address(address),
        };
        let mut conn = state.pool.acquire(caller).await?;
        let row = db::get(&mut conn, &key.id)
            .await?
            .ok_or(ApiError::Unauthorized)?;
        drop(conn);
        // Compare the hash even for a revoked key, so both refusals cost the same.
        let ok = key.matches(&row.key_hash) && row.revoked_at.is_none();
        if !ok {
            state.keys.forget(&key.id);
            return Err(ApiError::Unauthorized);
        }
        let business_id = BusinessId::parse(row.business_id)
            .map_err(|e| ApiError::Internal(format!("stored business id: {e}")))?;
        // Remembered (again) from each read, so a key in use stays known, and before the
        // rate is checked, so a first request past it is remembered too.
        state.keys.insert(
            key.id.clone(),
            Arc::new(Known {
                business_id: business_id.clone(),
                key_hash: row.key_hash,
            }),
        );
        if known.is_none() {
            // After authentication, so that nobody can spend another business's budget.
            limited(&business_id)?;
        }
        let in_flight = match in_flight {
            Some((known, place)) if known == business_id => place,
            _ => state
                .limits
                .enter(business_id.as_str())
                .ok_or_else(|| too_many(&business_id))?,
        };
        Ok(Merchant {
            business_id,
            _in_flight: Arc::new(in_flight),
        })
    }
}

/// How long a process remembers a key after it last read it: how long its business's
/// requests past the rate limit are refused without a read.
pub const KNOWN_KEY_TTL: Duration = Duration::from_secs(5);
/// Keys remembered at most per process (beyond it, the least used are forgotten).
const KNOWN_KEYS: u64 = 10_000;

/// A key that authenticated: whose it is, and the hash a presented secret must match.
pub struct Known {
    business_id: BusinessId,
    key_hash: Vec<u8>,
}

/// The keys that authenticated in this process within [`KNOWN_KEY_TTL`], by key id.
/// Only keys that matched their stored hash and were not revoked are kept (a key found
/// revoked is forgotten); a secret presented with a known id is still checked against
/// the hash. Cheap to clone.
#[derive(Clone)]
pub struct KnownKeys(moka::sync::Cache<String, Arc<Known>>);

impl Default for KnownKeys {
    fn default() -> Self {
        KnownKeys(
            moka::sync::Cache::builder()
                .max_capacity(KNOWN_KEYS)
                .time_to_live(KNOWN_KEY_TTL)
                .build(),
        )
    }
}

impl KnownKeys {
    fn get(&self, id: &str) -> Option<Arc<Known>> {
        self.0.get(id)
    }

    fn insert(&self, id: String, known: Arc<Known>) {
        self.0.insert(id, known);
    }

    fn forget(&self, id: &str) {
        self.0.invalidate(id);
    }
}

/// Creates a key for `business_id` (creating the business if new). Returns the key's id
/// and its text, which is not stored anywhere and must be shown to the operator now.
pub async fn create_api_key(
    conn: &mut PgConnection,
    business_id: &BusinessId,
    name: Option<&str>,
) -> Result<(String, SecretString), sqlx::Error> {
    let key = NewKey::mint();
    let mut tx = sqlx::Connection::begin(conn).await?;
    crate::store::businesses::ensure_business(&mut tx, business_id.as_str()).await?;
    db::insert(&mut tx, &key.id, business_id.as_str(), name, &key.hash).await?;
    tx.commit().await?;
    Ok((key.id, key.text))
}

/// Revokes a key by id; `false` if there is none.
pub async fn revoke_api_key(conn: &mut PgConnection, key_id: &str) -> Result<bool, sqlx::Error> {
    db::revoke(conn, key_id).await
}
