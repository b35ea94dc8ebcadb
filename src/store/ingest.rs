//! SQL of ingest bookkeeping: processed event ids, subscription snapshots, payments and
//! their reversals, and the lookups that build [`crate::grants::decide::Facts`].

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use super::col;

/// Serialises work on the same subscription or payment across consumers: a transaction
/// takes the advisory locks of every key it will touch, in sorted order (so two batches
/// never wait on each other in a cycle), and holds them until it ends.
pub async fn lock_keys(conn: &mut PgConnection, keys: &[String]) -> Result<(), sqlx::Error> {
    sqlx::query(
        "SELECT pg_advisory_xact_lock(hashtextextended(k, 0))
         FROM (SELECT DISTINCT k FROM unnest($1::text[]) AS k ORDER BY k) AS sorted",
    )
    .bind(keys)
    .execute(conn)
    .await?;
    Ok(())
}

/// Like [`lock_keys`], without waiting: takes the locks that are free (in sorted order)
/// and returns their keys; keys another transaction holds are left out.
pub async fn try_lock_keys(
    conn: &mut PgConnection,
    keys: &[String],
) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT k FROM (SELECT DISTINCT k FROM unnest($1::text[]) AS k ORDER BY k) AS sorted
         WHERE pg_try_advisory_xact_lock(hashtextextended(k, 0))",
    )
    .bind(keys)
    .fetch_all(conn)
    .await
}

// ---- Batch forms: one round trip per kind of row for a whole batch of events. ----

/// Which of `event_ids` were applied before.
pub async fn processed_among(
    conn: &mut PgConnection,
    event_ids: &[String],
) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT event_id FROM processed_events WHERE event_id = ANY($1)")
        .bind(event_ids)
        .fetch_all(conn)
        .await
}

/// An applied event id and its outcome.
pub struct ProcessedRow {
    pub event_id: String,
    pub event_type: &'static str,
    pub business_id: String,
    pub outcome: &'static str,
}

/// Records applied event ids with their outcomes.
pub async fn mark_processed_many(
    conn: &mut PgConnection,
    rows: &[ProcessedRow],
) -> Result<(), sqlx::Error> {
    if rows.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO processed_events (event_id, event_type, business_id, outcome)
         SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[])",
    )
    .bind(col(rows, |r| r.event_id.clone()))
    .bind(col(rows, |r| r.event_type))
    .bind(col(rows, |r| r.business_id.clone()))
    .bind(col(rows, |r| r.outcome))
    .execute(conn)
    .await?;
    Ok(())
}

/// Active, undeleted entitlements of each (business, product) pair, as
/// (business, product, entitlement) in attachment order.
pub async fn product_entitlements_many(
    conn: &mut PgConnection,
    businesses: &[String],
    products: &[String],
) -> Result<Vec<(String, String, String)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT pe.business_id, pe.product_id, pe.entitlement_id
         FROM product_entitlements pe
         JOIN entitlements e ON e.id = pe.entitlement_id
         WHERE pe.business_id = ANY($1) AND pe.product_id = ANY($2)
           AND (pe.business_id, pe.product_id) IN (SELECT * FROM unnest($1::text[], $2::text[]))
           AND e.deleted_at IS NULL AND e.is_active
         ORDER BY pe.business_id, pe.product_id, pe.position, pe.entitlement_id",
    )
    .bind(businesses)
    .bind(products)
    .fetch_all(conn)
    .await
}

/// Which of `businesses` have at least one entitlement (deleted ones included).
pub async fn businesses_with_entitlements(
    conn: &mut PgConnection,
    businesses: &[String],
) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT DISTINCT business_id FROM entitlements WHERE business_id = ANY($1)")
        .bind(businesses)
        .fetch_all(conn)
        .await
}

/// Last applied event time of each of `subscriptions`.
pub async fn subscriptions_last_event_at(
    conn: &mut PgConnection,
    subscriptions: &[String],
) -> Result<Vec<(String, DateTime<Utc>)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT subscription_id, last_event_at FROM subscriptions WHERE subscription_id = ANY($1)",
    )
    .bind(subscriptions)
    .fetch_all(conn)
    .await
}

/// A subscription's latest applied snapshot.
pub struct SubscriptionRow {
    pub subscription_id: String,
    pub business_id: String,
    pub customer_id: String,
    pub product_id: String,
    pub status: String,
    pub last_event_at: DateTime<Utc>,
}

/// Stores the latest applied snapshot of several subscriptions (one row each).
pub async fn upsert_subscriptions(
    conn: &mut PgConnection,
    rows: &[SubscriptionRow],
) -> Result<(), sqlx::Error> {
    if rows.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO subscriptions (subscription_id, business_id, customer_id, product_id, status, last_event_at)
         SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::timestamptz[])
         ON CONFLICT (subscription_id) DO UPDATE
         SET customer_id = EXCLUDED.customer_id, product_id = EXCLUDED.product_id,
             status = EXCLUDED.status, last_event_at = EXCLUDED.last_event_at, updated_at = now()",
    )
    .bind(col(rows, |r| r.subscription_id.clone()))
    .bind(col(rows, |r| r.business_id.clone()))
    .bind(col(rows, |r| r.customer_id.clone()))
    .bind(col(rows, |r| r.product_id.clone()))
    .bind(col(rows, |r| r.status.clone()))
    .bind(col(rows, |r| r.last_event_at))
    .execute(conn)
    .await?;
    Ok(())
}

/// Payments as recorded: (business, payment, its subscription if any).
pub async fn payments_many(
    conn: &mut PgConnection,
    businesses: &[String],
    payments: &[String],
) -> Result<Vec<(String, String, Option<String>)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT business_id, payment_id, subscription_id FROM payments
         WHERE payment_id = ANY($2)
           AND (business_id, payment_id) IN (SELECT * FROM unnest($1::text[], $2::text[]))",
    )
    .bind(businesses)
    .bind(payments)
    .fetch_all(conn)
    .await
}

/// A payment seen, with its subscription for a subscription's payment.
pub struct PaymentRow {
    pub payment_id: String,
    pub business_id: String,
    pub customer_id: String,
    pub subscription_id: Option<String>,
}

/// Remembers payments (ignoring ones already known).
pub async fn insert_payments(
    conn: &mut PgConnection,
    rows: &[PaymentRow],
) -> Result<(), sqlx::Error> {
    if rows.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO payments (payment_id, business_id, customer_id, subscription_id)
         SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[])
         ON CONFLICT (payment_id) DO NOTHING",
    )
    .bind(col(rows, |r| r.payment_id.clone()))
    .bind(col(rows, |r| r.business_id.clone()))
    .bind(col(rows, |r| r.customer_id.clone()))
    .bind(col(rows, |r| r.subscription_id.clone()))
    .execute(conn)
    .await?;
    Ok(())
}

/// Reversals recorded for payments: (business, payment, reason), the first per payment.
pub async fn reversals_many(
    conn: &mut PgConnection,
    businesses: &[String],
    payments: &[String],
) -> Result<Vec<(String, String, String)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT DISTINCT ON (business_id, payment_id) business_id, payment_id, reason FROM payment_reversals
         WHERE payment_id = ANY($2)
           AND (business_id, payment_id) IN (SELECT * FROM unnest($1::text[], $2::text[]))
         ORDER BY business_id, payment_id, created_at",
    )
    .bind(businesses)
    .bind(payments)
    .fetch_all(conn)
    .await
}

/// A full refund or lost dispute of a payment.
pub struct ReversalRow {
    pub payment_id: String,
    pub reason: &'static str,
    pub business_id: String,
}

/// Remembers full refunds and lost disputes.
pub async fn insert_reversals(
    conn: &mut PgConnection,
    rows: &[ReversalRow],
) -> Result<(), sqlx::Error> {
    if rows.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO payment_reversals (payment_id, reason, business_id)
         SELECT * FROM unnest($1::text[], $2::text[], $3::text[])
         ON CONFLICT DO NOTHING",
    )
    .bind(col(rows, |r| r.payment_id.clone()))
    .bind(col(rows, |r| r.reason))
    .bind(col(rows, |r| r.business_id.clone()))
    .execute(conn)
    .await?;
    Ok(())
}

/// Which (business, customer) pairs have linked a Discord account.
pub async fn linked_customers(
    conn: &mut PgConnection,
    businesses: &[String],
    customers: &[String],
) -> Result<Vec<(String, String)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT business_id, customer_id FROM discord_links
         WHERE customer_id = ANY($2)
           AND (business_id, customer_id) IN (SELECT * FROM unnest($1::text[], $2::text[]))",
    )
    .bind(businesses)
    .bind(customers)
    .fetch_all(conn)
    .await
}
