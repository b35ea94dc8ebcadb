//! SQL of the grant aggregate.

use chrono::{DateTime, Utc};
use sqlx::encode::IsNull;
use sqlx::error::BoxDynError;
use sqlx::postgres::{PgArgumentBuffer, PgRow, PgTypeInfo, PgValueRef, Postgres};
use sqlx::{PgConnection, Row};

use crate::domain::{Grant, GrantStatus, RevocationReason};
use crate::grants::link::LinkBuilder;

/// Grants come out of any `SELECT` or `RETURNING` of all their columns (`*` or `g.*`).
impl<'r> sqlx::FromRow<'r, PgRow> for Grant {
    fn from_row(row: &'r PgRow) -> Result<Self, sqlx::Error> {
        Ok(Grant {
            id: row.try_get("id")?,
            business_id: row.try_get("business_id")?,
            brand_id: row.try_get("brand_id")?,
            entitlement_id: row.try_get("entitlement_id")?,
            customer_id: row.try_get("customer_id")?,
            payment_id: row.try_get("payment_id")?,
            subscription_id: row.try_get("subscription_id")?,
            status: row.try_get("status")?,
            delivered_at: row.try_get("delivered_at")?,
            revoked_at: row.try_get("revoked_at")?,
            revocation_reason: row.try_get("revocation_reason")?,
            error_code: row.try_get("error_code")?,
            error_message: row.try_get("error_message")?,
            oauth_nonce: row.try_get("oauth_nonce")?,
            oauth_expires_at: row.try_get("oauth_expires_at")?,
            metadata: row.try_get("metadata")?,
            created_at: row.try_get("created_at")?,
            updated_at: row.try_get("updated_at")?,
            applied_user_id: row.try_get("applied_user_id")?,
            applied_guild_id: row.try_get("applied_guild_id")?,
            applied_role_id: row.try_get("applied_role_id")?,
            intent_user_id: row.try_get("intent_user_id")?,
            intent_guild_id: row.try_get("intent_guild_id")?,
            intent_role_id: row.try_get("intent_role_id")?,
            ends_at: row.try_get("ends_at")?,
            ends_reason: row.try_get("ends_reason")?,
        })
    }
}

/// A domain value stored as its text (`as_str`), read back with `parse`: a text the
/// domain does not know is an error, never taken for another value.
macro_rules! stored_as_text {
    ($t:ty, $what:literal) => {
        impl sqlx::Type<Postgres> for $t {
            fn type_info() -> PgTypeInfo {
                <&str as sqlx::Type<Postgres>>::type_info()
            }

            fn compatible(ty: &PgTypeInfo) -> bool {
                <&str as sqlx::Type<Postgres>>::compatible(ty)
            }
        }

        impl<'r> sqlx::Decode<'r, Postgres> for $t {
            fn decode(value: PgValueRef<'r>) -> Result<Self, BoxDynError> {
                let text = <&str as sqlx::Decode<Postgres>>::decode(value)?;
                <$t>::parse(text)
                    .ok_or_else(|| format!(concat!("unknown ", $what, " {:?}"), text).into())
            }
        }

        impl sqlx::Encode<'_, Postgres> for $t {
            fn encode_by_ref(&self, buf: &mut PgArgumentBuffer) -> Result<IsNull, BoxDynError> {
                <&str as sqlx::Encode<Postgres>>::encode(self.as_str(), buf)
            }
        }
    };
}

stored_as_text!(GrantStatus, "grant status");
stored_as_text!(RevocationReason, "revocation reason");

/// A grant to insert.
#[derive(Clone, Debug)]
pub struct NewGrant<'a> {
    pub business_id: &'a str,
    pub brand_id: &'a str,
    pub entitlement_id: &'a str,
    pub customer_id: &'a str,
    pub payment_id: Option<&'a str>,
    pub subscription_id: Option<&'a str>,
    pub oauth_nonce: &'a str,
    pub oauth_expires_at: DateTime<Utc>,
    pub now: DateTime<Utc>,
}

/// Inserts a `Pending` grant and returns it.
pub async fn insert(conn: &mut PgConnection, g: NewGrant<'_>) -> Result<Grant, sqlx::Error> {
    sqlx::query_as(
        "INSERT INTO grants (id, business_id, brand_id, entitlement_id, customer_id, payment_id,
             subscription_id, status, oauth_nonce, oauth_expires_at, created_at, updated_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, 'Pending', $8, $9, $10, $10)
         RETURNING *",
    )
    .bind(crate::domain::ids::GrantId::mint().as_str())
    .bind(g.business_id)
    .bind(g.brand_id)
    .bind(g.entitlement_id)
    .bind(g.customer_id)
    .bind(g.payment_id)
    .bind(g.subscription_id)
    .bind(g.oauth_nonce)
    .bind(g.oauth_expires_at)
    .bind(g.now)
    .fetch_one(conn)
    .await
}

/// The business's most recent brand: that of its newest grant, or, before it has any,
/// the business's own id, which on the platform is the id of a business's default brand.
/// What a product shows, and what a grant gets when its event names no brand.
pub async fn business_brand(
    conn: &mut PgConnection,
    business_id: &str,
) -> Result<String, sqlx::Error> {
    let latest: Option<String> = sqlx::query_scalar(
        "SELECT brand_id FROM grants WHERE business_id = $1 ORDER BY created_at DESC, id DESC LIMIT 1",
    )
    .bind(business_id)
    .fetch_optional(conn)
    .await?;
    Ok(latest.unwrap_or_else(|| business_id.to_string()))
}

/// Revokes a live grant; `None` if it was already revoked (or does not exist).
pub async fn revoke(
    conn: &mut PgConnection,
    id: &str,
    reason: RevocationReason,
    now: DateTime<Utc>,
) -> Result<Option<Grant>, sqlx::Error> {
    sqlx::query_as(
        "UPDATE grants SET status = 'Revoked', revoked_at = $3, revocation_reason = $2, updated_at = $3
         WHERE id = $1 AND status <> 'Revoked'
         RETURNING *",
    )
    .bind(id)
    .bind(reason.as_str())
    .bind(now)
    .fetch_optional(conn)
    .await
}

/// Live grants whose due time has passed, soonest first: `(id, subscription)`.
pub async fn due(
    conn: &mut PgConnection,
    now: DateTime<Utc>,
    limit: i64,
) -> Result<Vec<(String, Option<String>)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, subscription_id FROM grants
         WHERE ends_at <= $1 AND status <> 'Revoked'
         ORDER BY ends_at LIMIT $2",
    )
    .bind(now)
    .bind(limit)
    .fetch_all(conn)
    .await
}

/// Revokes a grant whose due time has passed with the reason it was due for, if it is
/// still live and due; returns it revoked.
pub async fn end_due(
    conn: &mut PgConnection,
    id: &str,
    now: DateTime<Utc>,
) -> Result<Option<Grant>, sqlx::Error> {
    sqlx::query_as(
        "UPDATE grants SET status = 'Revoked', revoked_at = $2, revocation_reason = ends_reason,
             ends_at = NULL, ends_reason = NULL, updated_at = $2
         WHERE id = $1 AND status <> 'Revoked' AND ends_at <= $2
         RETURNING *",
    )
    .bind(id)
    .bind(now)
    .fetch_optional(conn)
    .await
}

/// One grant by id.
pub async fn get(conn: &mut PgConnection, id: &str) -> Result<Option<Grant>, sqlx::Error> {
    sqlx::query_as("SELECT * FROM grants WHERE id = $1")
        .bind(id)
        .fetch_optional(conn)
        .await
}

/// One grant by id, locked for the rest of the transaction.
pub async fn get_for_update(
    conn: &mut PgConnection,
    id: &str,
) -> Result<Option<Grant>, sqlx::Error> {
    sqlx::query_as("SELECT * FROM grants WHERE id = $1 FOR UPDATE")
        .bind(id)
        .fetch_optional(conn)
        .await
}

/// Every grant of a customer of a business, newest first (tests, API).
pub async fn of_customer(
    conn: &mut PgConnection,
    business_id: &str,
    customer_id: &str,
) -> Result<Vec<Grant>, sqlx::Error> {
    sqlx::query_as(
        "SELECT * FROM grants WHERE business_id = $1 AND customer_id = $2 ORDER BY created_at DESC, id DESC",
    )
    .bind(business_id)
    .bind(customer_id)
    .fetch_all(conn)
    .await
}

/// A grant, and whether its customer has linked a Discord account.
#[derive(sqlx::FromRow)]
pub struct GrantOfSource {
    #[sqlx(flatten)]
    pub grant: Grant,
    pub customer_linked: bool,
}

/// Every grant of several payments and subscriptions, given as `(business, payment)`
/// and `(business, subscription)` pairs, oldest first, in one statement.
pub async fn of_sources(
    conn: &mut PgConnection,
    payments: (&[String], &[String]),
    subscriptions: (&[String], &[String]),
) -> Result<Vec<GrantOfSource>, sqlx::Error> {
    // The `= ANY` restrictions let the planner use the (partial) indexes; the pair
    // tests keep an id from matching under another business. A grant has a payment or
    // a subscription, never both, so the two parts never return the same row.
    sqlx::query_as(
        "SELECT g.*, EXISTS (SELECT 1 FROM discord_links l
                             WHERE l.business_id = g.business_id AND l.customer_id = g.customer_id)
                     AS customer_linked
         FROM grants g
         WHERE g.business_id = ANY($1) AND g.payment_id = ANY($2)
           AND (g.business_id, g.payment_id) IN (SELECT * FROM unnest($1::text[], $2::text[]))
         UNION ALL
         SELECT g.*, EXISTS (SELECT 1 FROM discord_links l
                             WHERE l.business_id = g.business_id AND l.customer_id = g.customer_id)
         FROM grants g
         WHERE g.business_id = ANY($3) AND g.subscription_id = ANY($4)
           AND (g.business_id, g.subscription_id) IN (SELECT * FROM unnest($3::text[], $4::text[]))
         ORDER BY created_at, id",
    )
    .bind(payments.0)
    .bind(payments.1)
    .bind(subscriptions.0)
    .bind(subscriptions.1)
    .fetch_all(conn)
    .await
}

/// Revokes several live grants at `now`, each with its reason, and returns the ids of
/// those it revoked: a grant another transaction revoked first is left as it is.
pub async fn revoke_many(
    conn: &mut PgConnection,
    ids: &[String],
    reasons: &[String],
    now: DateTime<Utc>,
) -> Result<Vec<String>, sqlx::Error> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    sqlx::query_scalar(
        "UPDATE grants g SET status = 'Revoked', revoked_at = $3, revocation_reason = r.reason, updated_at = $3
         FROM unnest($1::text[], $2::text[]) AS r(id, reason)
         WHERE g.id = r.id AND g.status <> 'Revoked'
         RETURNING g.id",
    )
    .bind(ids)
    .bind(reasons)
    .bind(now)
    .fetch_all(conn)
    .await
}

/// For a `Pending` grant whose link expired: a new nonce and expiry, so its
/// `oauth_url` works again. Any other grant is returned as it is.
pub async fn renew_link(
    conn: &mut PgConnection,
    links: &LinkBuilder,
    grant: &Grant,
    now: DateTime<Utc>,
) -> Result<Grant, sqlx::Error> {
    if grant.status != GrantStatus::Pending || grant.oauth_expires_at > now {
        return Ok(grant.clone());
    }
    match crate::sync::store::renew_nonce_if_expired(
        conn,
        &grant.id,
        &LinkBuilder::new_nonce(),
        now + links.ttl,
        now,
    )
    .await?
    {
        Some(g) => Ok(g),
        // Renewed by a concurrent reader: use theirs.
        None => Ok(get(conn, &grant.id).await?.unwrap_or_else(|| grant.clone())),
    }
}
