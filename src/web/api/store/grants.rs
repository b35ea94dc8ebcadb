//! SQL of grants as the merchant API lists them: one business's, filtered, paginated.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use super::Page;
use crate::domain::Grant;

/// A page of an entitlement's grants, newest first, optionally by status and customer.
pub async fn of_entitlement(
    conn: &mut PgConnection,
    business_id: &str,
    entitlement_id: &str,
    status: Option<&str>,
    customer_id: Option<&str>,
    page: Page,
) -> Result<Vec<Grant>, sqlx::Error> {
    sqlx::query_as(
        "SELECT * FROM grants
         WHERE business_id = $1 AND entitlement_id = $2
           AND ($3::text IS NULL OR status = $3) AND ($4::text IS NULL OR customer_id = $4)
         ORDER BY created_at DESC, id DESC LIMIT $5 OFFSET $6",
    )
    .bind(business_id)
    .bind(entitlement_id)
    .bind(status)
    .bind(customer_id)
    .bind(page.limit)
    .bind(page.offset)
    .fetch_all(conn)
    .await
}

/// A page of a customer's grants across entitlements, newest first.
pub async fn of_customer(
    conn: &mut PgConnection,
    business_id: &str,
    customer_id: &str,
    status: Option<&str>,
    page: Page,
) -> Result<Vec<Grant>, sqlx::Error> {
    sqlx::query_as(
        "SELECT * FROM grants
         WHERE business_id = $1 AND customer_id = $2 AND ($3::text IS NULL OR status = $3)
         ORDER BY created_at DESC, id DESC LIMIT $4 OFFSET $5",
    )
    .bind(business_id)
    .bind(customer_id)
    .bind(status)
    .bind(page.limit)
    .bind(page.offset)
    .fetch_all(conn)
    .await
}

/// One grant of an entitlement of a business, locked when `lock`.
pub async fn get(
    conn: &mut PgConnection,
    business_id: &str,
    entitlement_id: &str,
    grant_id: &str,
    lock: bool,
) -> Result<Option<Grant>, sqlx::Error> {
    let sql = if lock {
        "SELECT * FROM grants WHERE business_id = $1 AND entitlement_id = $2 AND id = $3 FOR UPDATE"
    } else {
        "SELECT * FROM grants WHERE business_id = $1 AND entitlement_id = $2 AND id = $3"
    };
    sqlx::query_as(sql)
        .bind(business_id)
        .bind(entitlement_id)
        .bind(grant_id)
        .fetch_optional(conn)
        .await
}

/// A live grant of a customer with its entitlement's name and description, as
/// `GET /customers/{customer_id}/entitlements` lists it.
#[derive(Debug, sqlx::FromRow)]
pub struct Held {
    pub grant_id: String,
    pub entitlement_id: String,
    pub entitlement_name: String,
    pub entitlement_description: Option<String>,
    pub integration_type: String,
    pub status: String,
    pub delivered_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A customer's live (unrevoked) grants of a business, newest first, each with its
/// entitlement, a deleted one's included (its grants outlive it until revoked).
pub async fn held_by_customer(
    conn: &mut PgConnection,
    business_id: &str,
    customer_id: &str,
) -> Result<Vec<Held>, sqlx::Error> {
    sqlx::query_as(
        "SELECT g.id AS grant_id, g.entitlement_id, e.name AS entitlement_name,
                e.description AS entitlement_description, e.integration_type, g.status,
                g.delivered_at, g.revoked_at, g.created_at, g.updated_at
         FROM grants g JOIN entitlements e ON e.id = g.entitlement_id
         WHERE g.business_id = $1 AND g.customer_id = $2 AND g.status <> 'Revoked'
         ORDER BY g.created_at DESC, g.id DESC",
    )
    .bind(business_id)
    .bind(customer_id)
    .fetch_all(conn)
    .await
}

/// The live comp grant of a customer for an entitlement, locked, if there is one.
pub async fn live_comp(
    conn: &mut PgConnection,
    entitlement_id: &str,
    customer_id: &str,
) -> Result<Option<Grant>, sqlx::Error> {
    sqlx::query_as(
        "SELECT * FROM grants WHERE entitlement_id = $1 AND customer_id = $2 AND comp
           AND status <> 'Revoked' FOR UPDATE",
    )
    .bind(entitlement_id)
    .bind(customer_id)
    .fetch_optional(conn)
    .await
}

/// A comp grant to insert: given by the merchant, without a payment.
pub struct NewComp<'a> {
    pub id: &'a str,
    pub business_id: &'a str,
    pub brand_id: &'a str,
    pub entitlement_id: &'a str,
    pub customer_id: &'a str,
    pub oauth_nonce: &'a str,
    pub oauth_expires_at: DateTime<Utc>,
    /// Revoked with `expired` then.
    pub expires_at: Option<DateTime<Utc>>,
    pub now: DateTime<Utc>,
}

/// Inserts a comp grant, `Pending`; `None` when another transaction inserted the
/// customer's live comp grant for the entitlement first.
pub async fn insert_comp(
    conn: &mut PgConnection,
    g: &NewComp<'_>,
) -> Result<Option<Grant>, sqlx::Error> {
    sqlx::query_as(
        "INSERT INTO grants (id, business_id, brand_id, entitlement_id, customer_id, status,
             oauth_nonce, oauth_expires_at, created_at, updated_at, comp, ends_at, ends_reason)
         VALUES ($1, $2, $3, $4, $5, 'Pending', $6, $7, $8, $8, true, $9,
             CASE WHEN $9::timestamptz IS NULL THEN NULL ELSE 'expired' END)
         ON CONFLICT DO NOTHING
         RETURNING *",
    )
    .bind(g.id)
    .bind(g.business_id)
    .bind(g.brand_id)
    .bind(g.entitlement_id)
    .bind(g.customer_id)
    .bind(g.oauth_nonce)
    .bind(g.oauth_expires_at)
    .bind(g.now)
    .bind(g.expires_at)
    .fetch_optional(conn)
    .await
}
