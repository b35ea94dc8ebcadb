//! SQL of ingest bookkeeping: processed event ids, subscription snapshots, payments and
//! their reversals, and the lookups that build [`crate::domain::decide::Facts`].

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use super::col;
use crate::domain::Grant;

/// The advisory-lock key of a subscription: whoever changes its grants outside ingest
/// (the grace timer, a backfill) takes it too.
pub fn subscription_key(subscription_id: &str) -> String {
    format!("sub:{subscription_id}")
}

/// The advisory-lock key of a payment.
pub fn payment_key(payment_id: &str) -> String {
    format!("pay:{payment_id}")
}

/// Begins an ingest transaction whose statements run their generic plans.
///
/// A batch's statements take arrays of keys. PostgreSQL plans a prepared statement for
/// its parameters (a custom plan) until the plan for any parameters (the generic plan)
/// looks no costlier; the generic plan assumes arrays of ten, so for the small batches
/// of a moderate, steady rate it kept planning anew: about 3 ms of a batch's 9 at 1,000
/// events/s, for the same plans. Under full load the batches are large and the generic
/// plans were chosen anyway. `SET LOCAL` ends with the transaction and rides in the
/// `BEGIN`'s round trip.
pub async fn begin(
    pool: &sqlx::PgPool,
) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, sqlx::Error> {
    pool.begin_with("BEGIN; SET LOCAL plan_cache_mode = force_generic_plan")
        .await
}

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

// ---- Batch forms: what a whole batch of events needs is read in two statements (the
// facts below, then the grants they lead to), and all of its writes but revocations go
// out in one. ----

/// Deletes up to `limit` applied event ids recorded before `cutoff`, oldest first,
/// passing over rows another pruner holds. Returns how many it deleted.
pub async fn prune_processed(
    conn: &mut PgConnection,
    cutoff: DateTime<Utc>,
    limit: i64,
) -> Result<u64, sqlx::Error> {
    let done = sqlx::query(
        "DELETE FROM processed_events WHERE event_id IN (
             SELECT event_id FROM processed_events WHERE processed_at < $1
             ORDER BY processed_at LIMIT $2 FOR UPDATE SKIP LOCKED)",
    )
    .bind(cutoff)
    .bind(limit)
    .execute(conn)
    .await?;
    Ok(done.rows_affected())
}

/// An applied event id and its outcome.
pub struct ProcessedRow {
    pub event_id: String,
    pub event_type: &'static str,
    pub business_id: String,
    pub outcome: &'static str,
}

/// The keys a batch's facts are read by. Pairs are two arrays of equal length.
#[derive(Default)]
pub struct FactKeys {
    /// Applied before?
    pub event_ids: Vec<String>,
    /// (business, product): active, undeleted entitlements attached.
    pub products: (Vec<String>, Vec<String>),
    /// Businesses that have at least one entitlement (deleted ones included)?
    pub businesses: Vec<String>,
    /// (business, payment): the payment as recorded, and its reversals.
    pub payments: (Vec<String>, Vec<String>),
    /// (business, subscription): its last applied event.
    pub subscriptions: (Vec<String>, Vec<String>),
    /// (business, customer): linked a Discord account?
    pub customers: (Vec<String>, Vec<String>),
    /// Businesses with an event in the batch that names no brand: their most recent one.
    pub brandless: Vec<String>,
}

/// A subscription's last applied event, as its snapshot records it.
#[derive(Debug, PartialEq)]
pub struct LastApplied {
    pub business_id: String,
    pub subscription_id: String,
    pub last_event_at: DateTime<Utc>,
    /// The ids of the events applied at `last_event_at`; `None` for a snapshot written
    /// before they were recorded (migration 0012).
    pub last_event_ids: Option<Vec<String>>,
    /// When the snapshot was written; for one without ids, when it was last written
    /// before ids were recorded.
    pub updated_at: DateTime<Utc>,
}

/// One fact read for a batch.
#[derive(Debug, PartialEq)]
pub enum Fact {
    /// This event id was applied before.
    Processed(String),
    /// An active entitlement attached to a product, at a position in its list.
    ProductEntitlement {
        business: String,
        product: String,
        entitlement: String,
        position: i32,
    },
    /// This business has at least one entitlement.
    BusinessWithEntitlements(String),
    /// A payment as recorded, with its subscription for a subscription's payment.
    Payment {
        business: String,
        payment: String,
        subscription: Option<String>,
    },
    /// A full refund or lost dispute recorded for a payment.
    Reversal {
        business: String,
        payment: String,
        reason: String,
        at: DateTime<Utc>,
    },
    /// A subscription's last applied event.
    LastApplied(LastApplied),
    /// This customer has linked a Discord account.
    Linked { business: String, customer: String },
    /// The brand of the business's newest grant; `None` before it has any.
    Brand {
        business: String,
        brand: Option<String>,
    },
    /// An entitlement of a business with subscription events, and its grace period.
    Grace {
        business: String,
        entitlement: String,
        days: i32,
    },
}

/// The row every part of [`FACTS`] returns: `kind` says what the other columns hold.
#[derive(sqlx::FromRow)]
struct FactRow {
    kind: String,
    a: String,
    b: Option<String>,
    c: Option<String>,
    n: Option<i32>,
    at: Option<DateTime<Utc>>,
    at2: Option<DateTime<Utc>>,
    ids: Option<Vec<String>>,
}

/// Every fact of [`FactKeys`], one part per kind, in one round trip. Each part is read
/// as its own query would be: the `= ANY` restrictions let the planner use the indexes,
/// the pair tests keep an id from matching under another business. Product entitlements
/// are looked up one (business, product) pair at a time: `business_id = ANY(..) AND
/// product_id = ANY(..)` would probe every business of the batch with every product.
const FACTS: &str = concat!("
    SELECT 'p'::text AS kind, event_id AS a, NULL::text AS b, NULL::text AS c, NULL::int AS n,
           NULL::timestamptz AS at, NULL::timestamptz AS at2, NULL::text[] AS ids
    FROM processed_events WHERE event_id = ANY($1)
    UNION ALL
    SELECT 'e', pe.business_id, pe.product_id, pe.entitlement_id, pe.position, NULL, NULL, NULL
    FROM (SELECT DISTINCT * FROM unnest($2::text[], $3::text[])) AS k(business_id, product_id)
    JOIN product_entitlements pe ON pe.business_id = k.business_id AND pe.product_id = k.product_id
    JOIN entitlements e ON e.id = pe.entitlement_id
    WHERE e.deleted_at IS NULL AND e.is_active
    UNION ALL
    SELECT DISTINCT 'b', business_id, NULL, NULL, NULL::int, NULL::timestamptz, NULL::timestamptz, NULL::text[]
    FROM entitlements WHERE business_id = ANY($4)
    UNION ALL
    SELECT 'y', business_id, payment_id, subscription_id, NULL, NULL, NULL, NULL
    FROM payments
    WHERE payment_id = ANY($6)
      AND (business_id, payment_id) IN (SELECT * FROM unnest($5::text[], $6::text[]))
    UNION ALL
    SELECT 'r', business_id, payment_id, reason, NULL, created_at, NULL, NULL
    FROM payment_reversals
    WHERE payment_id = ANY($6)
      AND (business_id, payment_id) IN (SELECT * FROM unnest($5::text[], $6::text[]))
    UNION ALL
    SELECT 's', business_id, subscription_id, NULL, NULL, last_event_at, updated_at, last_event_ids
    FROM subscriptions
    WHERE subscription_id = ANY($10)
      AND (business_id, subscription_id) IN (SELECT * FROM unnest($7::text[], $10::text[]))
    UNION ALL
    SELECT 'l', business_id, customer_id, NULL, NULL, NULL, NULL, NULL
    FROM discord_links
    WHERE customer_id = ANY($9)
      AND (business_id, customer_id) IN (SELECT * FROM unnest($8::text[], $9::text[]))
    UNION ALL
    SELECT 'd', b, ",
    super::grants::newest_grant_brand!("b"),
    ", NULL, NULL, NULL, NULL, NULL
    FROM unnest($11::text[]) AS b
    UNION ALL
    SELECT 'g', business_id, id, NULL, grace_period_days, NULL, NULL, NULL
    FROM entitlements WHERE business_id = ANY($7) AND grace_period_days IS NOT NULL");

/// Reads the facts of a batch's keys, in one statement. Product entitlements come in
/// attachment order per (business, product), reversals oldest first per payment.
pub async fn facts(conn: &mut PgConnection, keys: &FactKeys) -> Result<Vec<Fact>, sqlx::Error> {
    let rows: Vec<FactRow> = sqlx::query_as(FACTS)
        .bind(&keys.event_ids)
        .bind(&keys.products.0)
        .bind(&keys.products.1)
        .bind(&keys.businesses)
        .bind(&keys.payments.0)
        .bind(&keys.payments.1)
        .bind(&keys.subscriptions.0)
        .bind(&keys.customers.0)
        .bind(&keys.customers.1)
        .bind(&keys.subscriptions.1)
        .bind(&keys.brandless)
        .fetch_all(conn)
        .await?;
    let mut out = rows
        .into_iter()
        .map(FactRow::into_fact)
        .collect::<Result<Vec<Fact>, sqlx::Error>>()?;
    // Only the order within a kind and key matters to the callers.
    out.sort_by(|x, y| x.order_key().cmp(&y.order_key()));
    Ok(out)
}

impl Fact {
    /// Product entitlements by (business, product, position, entitlement), reversals
    /// by (business, payment, time, reason); every other kind ties.
    fn order_key(&self) -> (u8, &str, &str, i64, &str) {
        match self {
            Fact::ProductEntitlement {
                business,
                product,
                entitlement,
                position,
            } => (1, business, product, i64::from(*position), entitlement),
            Fact::Reversal {
                business,
                payment,
                reason,
                at,
            } => (2, business, payment, at.timestamp_micros(), reason),
            _ => (0, "", "", 0, ""),
        }
    }
}

impl FactRow {
    /// The fact this row holds. A row [`FACTS`] cannot return (an unknown kind, a NULL
    /// where its part selects a NOT NULL column) is an error, never dropped: a fact lost
    /// silently could apply an event twice.
    fn into_fact(self) -> Result<Fact, sqlx::Error> {
        let FactRow {
            kind,
            a,
            b,
            c,
            n,
            at,
            at2,
            ids,
        } = self;
        let bad = |what: &str| sqlx::Error::Decode(format!("fact row {kind:?}: {what}").into());
        Ok(match kind.as_str() {
            "p" => Fact::Processed(a),
            "e" => Fact::ProductEntitlement {
                business: a,
                product: b.ok_or_else(|| bad("no product"))?,
                entitlement: c.ok_or_else(|| bad("no entitlement"))?,
                position: n.ok_or_else(|| bad("no position"))?,
            },
            "b" => Fact::BusinessWithEntitlements(a),
            "y" => Fact::Payment {
                business: a,
                payment: b.ok_or_else(|| bad("no payment"))?,
                subscription: c,
            },
            "r" => Fact::Reversal {
                business: a,
                payment: b.ok_or_else(|| bad("no payment"))?,
                reason: c.ok_or_else(|| bad("no reason"))?,
                at: at.ok_or_else(|| bad("no time"))?,
            },
            "s" => Fact::LastApplied(LastApplied {
                business_id: a,
                subscription_id: b.ok_or_else(|| bad("no subscription"))?,
                last_event_at: at.ok_or_else(|| bad("no last event time"))?,
                last_event_ids: ids,
                updated_at: at2.ok_or_else(|| bad("no update time"))?,
            }),
            "l" => Fact::Linked {
                business: a,
                customer: b.ok_or_else(|| bad("no customer"))?,
            },
            "d" => Fact::Brand {
                business: a,
                brand: b,
            },
            "g" => Fact::Grace {
                business: a,
                entitlement: b.ok_or_else(|| bad("no entitlement"))?,
                days: n.ok_or_else(|| bad("no days"))?,
            },
            _ => return Err(bad("unknown kind")),
        })
    }
}

/// A subscription's latest applied snapshot.
pub struct SubscriptionRow {
    pub subscription_id: String,
    pub business_id: String,
    pub customer_id: String,
    pub product_id: String,
    pub status: String,
    pub last_event_at: DateTime<Utc>,
    /// The ids of the events applied at `last_event_at`, this batch's included; `None`
    /// while they are unknown (a snapshot from before migration 0012, at its own time).
    pub last_event_ids: Option<Vec<String>>,
}

/// A payment seen, with its subscription for a subscription's payment.
pub struct PaymentRow {
    pub payment_id: String,
    pub business_id: String,
    pub customer_id: String,
    pub subscription_id: Option<String>,
    /// The products of its cart, space-separated (for a later backfill).
    pub product_ids: String,
}

/// A grace period started (`ends_at`: its end, `reason`: what the grant is revoked
/// with then) or ended (both `None`: the subscription is active again).
pub struct GraceRow {
    pub grant_id: String,
    pub ends_at: Option<DateTime<Utc>>,
    pub reason: Option<&'static str>,
}

/// Writes grace periods started or ended, in order, with their history entries
/// (`grace_started`, `grace_ended`). Rare (a subscription on hold or failed, with a
/// grace period), so one statement per row; a revoked grant is left as it is.
pub async fn write_grace(
    conn: &mut PgConnection,
    rows: &[GraceRow],
    now: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    for r in rows {
        let changed = sqlx::query(
            "UPDATE grants SET ends_at = $2, ends_reason = $3, updated_at = $4
             WHERE id = $1 AND status <> 'Revoked'",
        )
        .bind(&r.grant_id)
        .bind(r.ends_at)
        .bind(r.reason)
        .bind(now)
        .execute(&mut *conn)
        .await?;
        if changed.rows_affected() == 0 {
            continue;
        }
        let (event, detail) = match r.ends_at {
            Some(until) => (
                "grace_started",
                serde_json::json!({
                    "until": crate::domain::grant::ts(until),
                    "reason": r.reason,
                }),
            ),
            None => (
                "grace_ended",
                serde_json::json!({"outcome": "kept", "why": "the subscription is active again"}),
            ),
        };
        super::history::record(conn, &r.grant_id, now, event, detail).await?;
    }
    Ok(())
}

/// A full refund or lost dispute of a payment.
pub struct ReversalRow {
    pub payment_id: String,
    pub reason: &'static str,
    pub business_id: String,
}

/// Everything a batch writes besides revocations, as rows.
#[derive(Default)]
pub struct BatchRows<'a> {
    /// Grants created by the batch, in their final state.
    pub grants: Vec<&'a Grant>,
    pub subscriptions: Vec<SubscriptionRow>,
    pub payments: Vec<PaymentRow>,
    pub reversals: Vec<ReversalRow>,
    /// Outbox rows: kind, message id, payload, in order.
    pub outbox_kinds: Vec<&'static str>,
    pub outbox_ids: Vec<String>,
    pub outbox_payloads: Vec<Vec<u8>>,
    pub processed: Vec<ProcessedRow>,
}

impl BatchRows<'_> {
    fn is_empty(&self) -> bool {
        self.grants.is_empty()
            && self.subscriptions.is_empty()
            && self.payments.is_empty()
            && self.reversals.is_empty()
            && self.outbox_kinds.is_empty()
            && self.processed.is_empty()
    }
}

/// The statement of [`write_batch`]: one insert per table as data-modifying CTEs, so a
/// batch's writes cost one round trip and one executor start instead of six. The
/// tables are distinct, so the order in which PostgreSQL runs the parts does not
/// matter. `$OUTBOX` is the outbox part, left out when there is nothing to relay (its
/// statement trigger would wake the relay for nothing).
macro_rules! write_batch_sql {
    ($outbox:literal) => {
        concat!(
            "WITH new_grants AS (
                INSERT INTO grants (id, business_id, brand_id, entitlement_id, customer_id, payment_id,
                    subscription_id, status, revoked_at, revocation_reason, oauth_nonce, oauth_expires_at,
                    created_at, updated_at)
                SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                    $7::text[], $8::text[], $9::timestamptz[], $10::text[], $11::text[], $12::timestamptz[],
                    $13::timestamptz[], $14::timestamptz[])
            ), snapshots AS (
                INSERT INTO subscriptions (subscription_id, business_id, customer_id, product_id, status,
                    last_event_at, last_event_ids)
                SELECT s, b, c, p, st, at, string_to_array(ids, ' ')
                FROM unnest($15::text[], $16::text[], $17::text[], $18::text[], $19::text[], $20::timestamptz[],
                    $35::text[]) AS t(s, b, c, p, st, at, ids)
                ON CONFLICT (subscription_id, business_id) DO UPDATE
                SET customer_id = EXCLUDED.customer_id, product_id = EXCLUDED.product_id,
                    status = EXCLUDED.status, last_event_at = EXCLUDED.last_event_at,
                    last_event_ids = EXCLUDED.last_event_ids,
                    -- Without ids the time of the last write before they were recorded
                    -- is what tells whether those ids may have been pruned.
                    updated_at = CASE WHEN EXCLUDED.last_event_ids IS NULL
                        THEN subscriptions.updated_at ELSE now() END
            ), seen_payments AS (
                INSERT INTO payments (payment_id, business_id, customer_id, subscription_id, product_ids)
                SELECT * FROM unnest($21::text[], $22::text[], $23::text[], $24::text[], $36::text[])
                ON CONFLICT (payment_id, business_id) DO NOTHING
            ), reversals AS (
                INSERT INTO payment_reversals (payment_id, reason, business_id)
                SELECT * FROM unnest($25::text[], $26::text[], $27::text[])
                ON CONFLICT DO NOTHING
            )",
            $outbox,
            "
            INSERT INTO processed_events (event_id, event_type, business_id, outcome)
            SELECT * FROM unnest($31::text[], $32::text[], $33::text[], $34::text[])"
        )
    };
}

const WRITE_BATCH: &str = write_batch_sql!(
    ", relayed AS (
        INSERT INTO outbox (kind, message_id, payload)
        SELECT k, m, p FROM unnest($28::text[], $29::text[], $30::bytea[]) WITH ORDINALITY AS t(k, m, p, o)
        ORDER BY o
    )"
);
const WRITE_BATCH_NO_OUTBOX: &str =
    write_batch_sql!(", relayed AS (SELECT $28::text[], $29::text[], $30::bytea[])");

/// Writes a batch's new grants, subscription snapshots (the last per subscription),
/// payments and reversals (ignoring ones already known), outbox rows and processed
/// event ids, in one statement.
pub async fn write_batch(conn: &mut PgConnection, rows: &BatchRows<'_>) -> Result<(), sqlx::Error> {
    if rows.is_empty() {
        return Ok(());
    }
    let sql = if rows.outbox_kinds.is_empty() {
        WRITE_BATCH_NO_OUTBOX
    } else {
        WRITE_BATCH
    };
    let g = &rows.grants;
    let (s, p, r, done) = (
        &rows.subscriptions,
        &rows.payments,
        &rows.reversals,
        &rows.processed,
    );
    sqlx::query(sql)
        .bind(col(g, |g| g.id.as_str()))
        .bind(col(g, |g| g.business_id.as_str()))
        .bind(col(g, |g| g.brand_id.as_str()))
        .bind(col(g, |g| g.entitlement_id.as_str()))
        .bind(col(g, |g| g.customer_id.as_str()))
        .bind(col(g, |g| g.payment_id.as_deref()))
        .bind(col(g, |g| g.subscription_id.as_deref()))
        .bind(col(g, |g| g.status.as_str()))
        .bind(col(g, |g| g.revoked_at))
        .bind(col(g, |g| {
            g.revocation_reason
                .map(crate::domain::RevocationReason::as_str)
        }))
        .bind(col(g, |g| g.oauth_nonce.as_str()))
        .bind(col(g, |g| g.oauth_expires_at))
        .bind(col(g, |g| g.created_at))
        .bind(col(g, |g| g.updated_at))
        .bind(col(s, |r| r.subscription_id.as_str()))
        .bind(col(s, |r| r.business_id.as_str()))
        .bind(col(s, |r| r.customer_id.as_str()))
        .bind(col(s, |r| r.product_id.as_str()))
        .bind(col(s, |r| r.status.as_str()))
        .bind(col(s, |r| r.last_event_at))
        .bind(col(p, |r| r.payment_id.as_str()))
        .bind(col(p, |r| r.business_id.as_str()))
        .bind(col(p, |r| r.customer_id.as_str()))
        .bind(col(p, |r| r.subscription_id.as_deref()))
        .bind(col(r, |r| r.payment_id.as_str()))
        .bind(col(r, |r| r.reason))
        .bind(col(r, |r| r.business_id.as_str()))
        .bind(&rows.outbox_kinds)
        .bind(&rows.outbox_ids)
        .bind(&rows.outbox_payloads)
        .bind(col(done, |r| r.event_id.as_str()))
        .bind(col(done, |r| r.event_type))
        .bind(col(done, |r| r.business_id.as_str()))
        .bind(col(done, |r| r.outcome))
        // Event ids never hold a space (crate::domain::ids), so one string per row carries its
        // list through unnest, which cannot take arrays of unequal length.
        .bind(col(s, |r| {
            r.last_event_ids.as_ref().map(|ids| ids.join(" "))
        }))
        // Product ids never hold a space either (crate::domain::ids).
        .bind(col(p, |r| r.product_ids.as_str()))
        .execute(conn)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(kind: &str) -> FactRow {
        FactRow {
            kind: kind.into(),
            a: "a".into(),
            b: None,
            c: None,
            n: None,
            at: None,
            at2: None,
            ids: None,
        }
    }

    #[test]
    fn a_fact_row_that_cannot_be_is_an_error_not_dropped() {
        assert_eq!(row("p").into_fact().unwrap(), Fact::Processed("a".into()));
        assert_eq!(
            row("y").into_fact().unwrap_err().to_string(),
            sqlx::Error::Decode("fact row \"y\": no payment".into()).to_string()
        );
        assert!(row("x").into_fact().is_err());
        let at = Utc::now();
        let s = FactRow {
            at: Some(at),
            ..row("s")
        };
        assert!(s.into_fact().is_err(), "no update time");
    }

    #[test]
    fn product_entitlements_sort_by_position_and_reversals_by_time() {
        let pe = |p: &str, e: &str, n: i32| Fact::ProductEntitlement {
            business: "b".into(),
            product: p.into(),
            entitlement: e.into(),
            position: n,
        };
        let rev = |r: &str, secs: i64| Fact::Reversal {
            business: "b".into(),
            payment: "pay".into(),
            reason: r.into(),
            at: DateTime::from_timestamp(secs, 0).unwrap(),
        };
        let mut facts = vec![
            rev("refund", 20),
            pe("p1", "e_b", 1),
            Fact::Processed("x".into()),
            pe("p1", "e_z", 0),
            rev("dispute_lost", 10),
            pe("p0", "e_y", 5),
        ];
        facts.sort_by(|x, y| x.order_key().cmp(&y.order_key()));
        assert_eq!(
            facts,
            vec![
                Fact::Processed("x".into()),
                pe("p0", "e_y", 5),
                pe("p1", "e_z", 0),
                pe("p1", "e_b", 1),
                rev("dispute_lost", 10),
                rev("refund", 20),
            ]
        );
    }
}
