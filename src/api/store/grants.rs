//! SQL of grants as the merchant API lists them: one business's, filtered, paginated.

use sqlx::PgConnection;

use super::Page;
use crate::grants::Grant;

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
