//! SQL of the grant aggregate.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use crate::grants::{Grant, RevocationReason};

/// A grant to insert.
#[derive(Clone, Debug)]
pub struct NewGrant<'a> {
    pub business_id: &'a str,
    pub brand_id: Option<&'a str>,
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
    .bind(crate::ids::GrantId::mint().as_str())
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

/// Every grant of several subscriptions or payments: `(business, subscription)` pairs
/// when `by_subscription`, else `(business, payment)` pairs. Oldest first.
pub async fn of_sources(
    conn: &mut PgConnection,
    businesses: &[String],
    sources: &[String],
    by_subscription: bool,
) -> Result<Vec<Grant>, sqlx::Error> {
    let sql = if by_subscription {
        // The `= ANY` restrictions let the planner use the (partial) indexes; the pair
        // test keeps a subscription id from matching under another business.
        "SELECT * FROM grants WHERE business_id = ANY($1) AND subscription_id = ANY($2)
             AND (business_id, subscription_id) IN (SELECT * FROM unnest($1::text[], $2::text[]))
         ORDER BY created_at, id"
    } else {
        "SELECT * FROM grants WHERE business_id = ANY($1) AND payment_id = ANY($2)
             AND (business_id, payment_id) IN (SELECT * FROM unnest($1::text[], $2::text[]))
         ORDER BY created_at, id"
    };
    sqlx::query_as(sql)
        .bind(businesses)
        .bind(sources)
        .fetch_all(conn)
        .await
}

/// Revokes several live grants at `now`, each with its reason.
pub async fn revoke_many(
    conn: &mut PgConnection,
    ids: &[String],
    reasons: &[String],
    now: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    if ids.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "UPDATE grants g SET status = 'Revoked', revoked_at = $3, revocation_reason = r.reason, updated_at = $3
         FROM unnest($1::text[], $2::text[]) AS r(id, reason)
         WHERE g.id = r.id AND g.status <> 'Revoked'",
    )
    .bind(ids)
    .bind(reasons)
    .bind(now)
    .execute(conn)
    .await?;
    Ok(())
}
