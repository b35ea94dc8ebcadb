//! Authentication: `Authorization: Bearer <api key>` → the business the key belongs to.
//! Every API handler takes a [`Merchant`]; without a valid key it answers 401 before
//! the handler runs, and past its business's `api.requests_per_second` 429. Also the key management the CLI does (`guildgate api-key …`).

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use secrecy::SecretString;
use sqlx::PgConnection;

use super::keys::{NewKey, PresentedKey};
use crate::domain::ids::BusinessId;
use crate::store::api_keys as db;
use crate::web::AppState;
use crate::web::error::ApiError;

/// The authenticated caller.
#[derive(Clone, Debug)]
pub struct Merchant {
    pub business_id: BusinessId,
}

impl Merchant {
    pub fn business(&self) -> &str {
        self.business_id.as_str()
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
        let mut conn = state.pool.acquire().await?;
        let row = db::get(&mut conn, &key.id)
            .await?
            .ok_or(ApiError::Unauthorized)?;
        // Compare the hash even for a revoked key, so both refusals cost the same.
        let ok = key.matches(&row.key_hash) && row.revoked_at.is_none();
        if !ok {
            return Err(ApiError::Unauthorized);
        }
        let business_id = BusinessId::parse(row.business_id)
            .map_err(|e| ApiError::Internal(format!("stored business id: {e}")))?;
        // After authentication, so that nobody can spend another business's budget.
        state
            .limits
            .check_business(business_id.as_str())
            .map_err(|retry_after| ApiError::RateLimited { retry_after })?;
        Ok(Merchant { business_id })
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
