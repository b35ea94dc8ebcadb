//! SQL of ingest bookkeeping: processed event ids, subscription snapshots, payments and
//! their reversals, and the lookups that build [`crate::grants::decide::Facts`].

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

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

/// Whether an event id was already applied.
pub async fn is_processed(conn: &mut PgConnection, event_id: &str) -> Result<bool, sqlx::Error> {
    let row: Option<(i32,)> = sqlx::query_as("SELECT 1 FROM processed_events WHERE event_id = $1")
        .bind(event_id)
        .fetch_optional(conn)
        .await?;
    Ok(row.is_some())
}

/// Records an applied event id with its outcome.
pub async fn mark_processed(
    conn: &mut PgConnection,
    event_id: &str,
    event_type: &str,
    business_id: &str,
    outcome: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO processed_events (event_id, event_type, business_id, outcome) VALUES ($1, $2, $3, $4)",
    )
    .bind(event_id)
    .bind(event_type)
    .bind(business_id)
    .bind(outcome)
    .execute(conn)
    .await?;
    Ok(())
}

/// Active, undeleted entitlements attached to each of `products` of a business.
pub async fn product_entitlements(
    conn: &mut PgConnection,
    business_id: &str,
    products: &[String],
) -> Result<HashMap<String, Vec<String>>, sqlx::Error> {
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT pe.product_id, pe.entitlement_id
         FROM product_entitlements pe
         JOIN entitlements e ON e.id = pe.entitlement_id
         WHERE pe.business_id = $1 AND pe.product_id = ANY($2)
           AND e.deleted_at IS NULL AND e.is_active
         ORDER BY pe.product_id, pe.position, pe.entitlement_id",
    )
    .bind(business_id)
    .bind(products)
    .fetch_all(conn)
    .await?;
    let mut map: HashMap<String, Vec<String>> = HashMap::new();
    for (p, e) in rows {
        map.entry(p).or_default().push(e);
    }
    Ok(map)
}

/// Whether the business has any entitlement (deleted ones included: their grants live on).
pub async fn business_has_entitlements(
    conn: &mut PgConnection,
    business_id: &str,
) -> Result<bool, sqlx::Error> {
    let row: Option<(i32,)> =
        sqlx::query_as("SELECT 1 FROM entitlements WHERE business_id = $1 LIMIT 1")
            .bind(business_id)
            .fetch_optional(conn)
            .await?;
    Ok(row.is_some())
}

/// When the subscription's last applied event was stamped.
pub async fn subscription_last_event_at(
    conn: &mut PgConnection,
    subscription_id: &str,
) -> Result<Option<DateTime<Utc>>, sqlx::Error> {
    let row: Option<(DateTime<Utc>,)> =
        sqlx::query_as("SELECT last_event_at FROM subscriptions WHERE subscription_id = $1")
            .bind(subscription_id)
            .fetch_optional(conn)
            .await?;
    Ok(row.map(|r| r.0))
}

/// Stores the subscription's latest applied snapshot.
pub async fn upsert_subscription(
    conn: &mut PgConnection,
    subscription_id: &str,
    business_id: &str,
    customer_id: &str,
    product_id: &str,
    status: &str,
    last_event_at: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO subscriptions (subscription_id, business_id, customer_id, product_id, status, last_event_at)
         VALUES ($1, $2, $3, $4, $5, $6)
         ON CONFLICT (subscription_id) DO UPDATE
         SET customer_id = EXCLUDED.customer_id, product_id = EXCLUDED.product_id,
             status = EXCLUDED.status, last_event_at = EXCLUDED.last_event_at, updated_at = now()",
    )
    .bind(subscription_id)
    .bind(business_id)
    .bind(customer_id)
    .bind(product_id)
    .bind(status)
    .bind(last_event_at)
    .execute(conn)
    .await?;
    Ok(())
}

/// Remembers a payment and, for a subscription's payment, its subscription.
pub async fn insert_payment(
    conn: &mut PgConnection,
    payment_id: &str,
    business_id: &str,
    customer_id: &str,
    subscription_id: Option<&str>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO payments (payment_id, business_id, customer_id, subscription_id)
         VALUES ($1, $2, $3, $4) ON CONFLICT (payment_id) DO NOTHING",
    )
    .bind(payment_id)
    .bind(business_id)
    .bind(customer_id)
    .bind(subscription_id)
    .execute(conn)
    .await?;
    Ok(())
}

/// The payment as recorded: `None` if never seen, `Some(sub)` otherwise.
pub async fn payment_subscription(
    conn: &mut PgConnection,
    business_id: &str,
    payment_id: &str,
) -> Result<Option<Option<String>>, sqlx::Error> {
    let row: Option<(Option<String>,)> = sqlx::query_as(
        "SELECT subscription_id FROM payments WHERE payment_id = $1 AND business_id = $2",
    )
    .bind(payment_id)
    .bind(business_id)
    .fetch_optional(conn)
    .await?;
    Ok(row.map(|r| r.0))
}

/// Remembers a full refund or lost dispute of a payment.
pub async fn insert_reversal(
    conn: &mut PgConnection,
    payment_id: &str,
    reason: &str,
    business_id: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO payment_reversals (payment_id, reason, business_id) VALUES ($1, $2, $3)
         ON CONFLICT DO NOTHING",
    )
    .bind(payment_id)
    .bind(reason)
    .bind(business_id)
    .execute(conn)
    .await?;
    Ok(())
}

/// The first reversal recorded for a payment (`refund` or `dispute_lost`).
pub async fn payment_reversal(
    conn: &mut PgConnection,
    business_id: &str,
    payment_id: &str,
) -> Result<Option<String>, sqlx::Error> {
    let row: Option<(String,)> = sqlx::query_as(
        "SELECT reason FROM payment_reversals WHERE payment_id = $1 AND business_id = $2
         ORDER BY created_at LIMIT 1",
    )
    .bind(payment_id)
    .bind(business_id)
    .fetch_optional(conn)
    .await?;
    Ok(row.map(|r| r.0))
}
