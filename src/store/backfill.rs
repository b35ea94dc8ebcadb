//! SQL of backfills: which purchases an entitlement newly attached to a product is to
//! be given to, and giving it to one of them.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use crate::domain::Grant;

/// An entitlement attached to a product, to give to the product's earlier buyers.
#[derive(Debug, sqlx::FromRow)]
pub struct Backfill {
    pub id: i64,
    pub business_id: String,
    pub product_id: String,
    pub entitlement_id: String,
}

/// A purchase of the product without a grant of the entitlement.
#[derive(Debug)]
pub enum Source {
    Subscription(String),
    Payment(String),
}

#[derive(Debug)]
pub struct Candidate {
    pub customer_id: String,
    pub source: Source,
}

/// Records a backfill for each of `entitlement_ids` not attached to the product yet;
/// called before the product's list is replaced.
pub async fn start(
    conn: &mut PgConnection,
    business_id: &str,
    product_id: &str,
    entitlement_ids: &[String],
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO backfills (business_id, product_id, entitlement_id)
         SELECT $1, $2, e FROM unnest($3::text[]) AS e
         WHERE NOT EXISTS (SELECT 1 FROM product_entitlements pe
                           WHERE pe.business_id = $1 AND pe.product_id = $2 AND pe.entitlement_id = e)",
    )
    .bind(business_id)
    .bind(product_id)
    .bind(entitlement_ids)
    .execute(conn)
    .await?;
    Ok(())
}

/// Up to 100 open backfills, taken in turns by business: every business's oldest, then
/// every business's second oldest, and so on, so that one business's many backfills
/// never keep another's waiting for a turn.
pub async fn open(conn: &mut PgConnection) -> Result<Vec<Backfill>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, business_id, product_id, entitlement_id FROM (
             SELECT id, business_id, product_id, entitlement_id, created_at,
                    row_number() OVER (PARTITION BY business_id ORDER BY created_at, id) AS turn
             FROM backfills WHERE done_at IS NULL) AS b
         ORDER BY turn, created_at, id LIMIT 100",
    )
    .fetch_all(conn)
    .await
}

/// The purchases a backfill is still to reach, while the entitlement is attached (and
/// live): live subscriptions of the product and paid, unreversed one-time purchases
/// with it in the cart, that have no grant of the entitlement (any status: a revoked
/// one was ended on purpose).
const CANDIDATES: &str = "
    WITH attached AS (
        SELECT 1 FROM product_entitlements pe JOIN entitlements e ON e.id = pe.entitlement_id
        WHERE pe.business_id = $1 AND pe.product_id = $2 AND pe.entitlement_id = $3
          AND e.deleted_at IS NULL AND e.is_active
    )
    SELECT 's' AS kind, s.subscription_id AS id, s.customer_id FROM subscriptions s
    WHERE EXISTS (SELECT 1 FROM attached)
      AND s.business_id = $1 AND s.product_id = $2 AND s.status = 'active'
      AND NOT EXISTS (SELECT 1 FROM grants g WHERE g.business_id = $1 AND g.entitlement_id = $3
                      AND g.subscription_id = s.subscription_id)
    UNION ALL
    SELECT 'p', p.payment_id, p.customer_id FROM payments p
    WHERE EXISTS (SELECT 1 FROM attached)
      AND p.business_id = $1 AND p.subscription_id IS NULL
      AND $2 = ANY (string_to_array(p.product_ids, ' '))
      AND NOT EXISTS (SELECT 1 FROM payment_reversals r
                      WHERE r.business_id = $1 AND r.payment_id = p.payment_id)
      AND NOT EXISTS (SELECT 1 FROM grants g WHERE g.business_id = $1 AND g.entitlement_id = $3
                      AND g.payment_id = p.payment_id)";

/// Up to `limit` purchases `b` is still to reach.
pub async fn candidates(
    conn: &mut PgConnection,
    b: &Backfill,
    limit: i64,
) -> Result<Vec<Candidate>, sqlx::Error> {
    let sql = format!("{CANDIDATES} LIMIT $4");
    let rows: Vec<(String, String, String)> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(&b.business_id)
        .bind(&b.product_id)
        .bind(&b.entitlement_id)
        .bind(limit)
        .fetch_all(conn)
        .await?;
    Ok(rows
        .into_iter()
        .map(|(kind, id, customer_id)| Candidate {
            customer_id,
            source: if kind == "s" {
                Source::Subscription(id)
            } else {
                Source::Payment(id)
            },
        })
        .collect())
}

/// How many purchases the open backfills of a product are still to reach.
pub async fn remaining(
    conn: &mut PgConnection,
    business_id: &str,
    product_id: &str,
) -> Result<i64, sqlx::Error> {
    let open: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT entitlement_id FROM backfills
         WHERE business_id = $1 AND product_id = $2 AND done_at IS NULL",
    )
    .bind(business_id)
    .bind(product_id)
    .fetch_all(&mut *conn)
    .await?;
    let sql = format!("SELECT count(*) FROM ({CANDIDATES}) AS c");
    let mut total = 0;
    for entitlement in open {
        let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(sql.clone()))
            .bind(business_id)
            .bind(product_id)
            .bind(&entitlement)
            .fetch_one(&mut *conn)
            .await?;
        total += n;
    }
    Ok(total)
}

/// Marks a backfill done: no purchase is left to reach.
pub async fn finish(
    conn: &mut PgConnection,
    id: i64,
    now: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE backfills SET done_at = $2 WHERE id = $1")
        .bind(id)
        .bind(now)
        .execute(conn)
        .await?;
    Ok(())
}

/// Gives `b`'s entitlement to the purchase `c`, `Pending`, if it is still attached and
/// the purchase still live without a grant of it, with the fresh link `(nonce,
/// expires_at)`; the caller holds the purchase's ingest lock.
pub async fn give(
    conn: &mut PgConnection,
    b: &Backfill,
    c: &Candidate,
    (nonce, expires_at): (&str, DateTime<Utc>),
    now: DateTime<Utc>,
) -> Result<Option<Grant>, sqlx::Error> {
    let brand = super::grants::business_brand(&mut *conn, &b.business_id).await?;
    let (payment, subscription) = match &c.source {
        Source::Payment(p) => (Some(p.as_str()), None),
        Source::Subscription(s) => (None, Some(s.as_str())),
    };
    sqlx::query_as(
        "INSERT INTO grants (id, business_id, brand_id, entitlement_id, customer_id, payment_id,
             subscription_id, status, oauth_nonce, oauth_expires_at, created_at, updated_at)
         SELECT $1, $2, $3, $4, $5, $6, $7, 'Pending', $8, $9, $10, $10
         WHERE EXISTS (SELECT 1 FROM product_entitlements pe JOIN entitlements e ON e.id = pe.entitlement_id
                       WHERE pe.business_id = $2 AND pe.product_id = $11 AND pe.entitlement_id = $4
                         AND e.deleted_at IS NULL AND e.is_active)
           AND NOT EXISTS (SELECT 1 FROM grants g WHERE g.business_id = $2 AND g.entitlement_id = $4
                           AND (g.subscription_id = $7 OR g.payment_id = $6))
           AND ($7::text IS NULL OR EXISTS (SELECT 1 FROM subscriptions s
                WHERE s.business_id = $2 AND s.subscription_id = $7 AND s.status = 'active'))
           AND ($6::text IS NULL OR NOT EXISTS (SELECT 1 FROM payment_reversals r
                WHERE r.business_id = $2 AND r.payment_id = $6))
         ON CONFLICT DO NOTHING
         RETURNING *",
    )
    .bind(crate::domain::ids::GrantId::mint().as_str())
    .bind(&b.business_id)
    .bind(&brand)
    .bind(&b.entitlement_id)
    .bind(&c.customer_id)
    .bind(payment)
    .bind(subscription)
    .bind(nonce)
    .bind(expires_at)
    .bind(now)
    .bind(&b.product_id)
    .fetch_optional(conn)
    .await
}
