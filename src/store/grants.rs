//! SQL of the grant aggregate.

use chrono::{DateTime, Utc};
use sqlx::encode::IsNull;
use sqlx::error::BoxDynError;
use sqlx::postgres::{PgArgumentBuffer, PgRow, PgTypeInfo, PgValueRef, Postgres};
use sqlx::{PgConnection, Row};

use super::Page;
use crate::domain::{Grant, GrantStatus, RevocationReason};

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

/// A scalar subquery: the brand of the newest grant (by creation, then id) of the
/// business `$business` names, NULL before it has any. A grant names an entitlement of
/// its own business (a foreign key), so it is the newest of the business's entitlements'
/// newest grants, each one step down `grants_entitlement_created`: no index by business
/// and time is kept for this lookup, which only events naming no brand and the product
/// listing need, while every grant written would pay for one.
macro_rules! newest_grant_brand {
    ($business:literal) => {
        concat!(
            "(SELECT g.brand_id FROM entitlements e
               CROSS JOIN LATERAL (SELECT brand_id, created_at, id FROM grants
                                   WHERE entitlement_id = e.id
                                   ORDER BY created_at DESC, id DESC LIMIT 1) g
               WHERE e.business_id = ",
            $business,
            " ORDER BY g.created_at DESC, g.id DESC LIMIT 1)"
        )
    };
}
pub(crate) use newest_grant_brand;

/// The business's most recent brand: that of its newest grant, or, before it has any,
/// the business's own id, which on the platform is the id of a business's default brand.
/// What a product shows, and what a grant gets when its event names no brand.
pub async fn business_brand(
    conn: &mut PgConnection,
    business_id: &str,
) -> Result<String, sqlx::Error> {
    // One row always: the subquery is NULL before the business has a grant.
    let latest: Option<String> = sqlx::query_scalar(concat!("SELECT ", newest_grant_brand!("$1")))
        .bind(business_id)
        .fetch_one(conn)
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

/// Locks a grant and returns its customer; `None` if there is no such grant.
pub async fn customer_for_update(
    conn: &mut PgConnection,
    id: &str,
) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT customer_id FROM grants WHERE id = $1 FOR UPDATE")
        .bind(id)
        .fetch_optional(conn)
        .await
}

/// The business a grant belongs to; `None` if there is no such grant.
pub async fn business_of<'e>(
    db: impl sqlx::PgExecutor<'e>,
    id: &str,
) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT business_id FROM grants WHERE id = $1")
        .bind(id)
        .fetch_optional(db)
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
    // Each pair is looked up in the (partial) index by business and payment or
    // subscription, one probe per pair: `business_id = ANY(..) AND payment_id = ANY(..)`
    // probed every business with every id, so a batch of 60 payments of 50 businesses
    // read 18,500 index pages instead of 900. The `IS NOT NULL` lets the planner use the
    // partial indexes. A grant has a payment or a subscription, never both, so the two
    // parts never return the same row (nor does a pair given twice, being distinct).
    sqlx::query_as(
        "SELECT g.*, EXISTS (SELECT 1 FROM discord_links l
                             WHERE l.business_id = g.business_id AND l.customer_id = g.customer_id)
                     AS customer_linked
         FROM (SELECT DISTINCT * FROM unnest($1::text[], $2::text[])) AS k(business_id, source_id)
         JOIN grants g ON g.business_id = k.business_id AND g.payment_id = k.source_id
         WHERE g.payment_id IS NOT NULL
         UNION ALL
         SELECT g.*, EXISTS (SELECT 1 FROM discord_links l
                             WHERE l.business_id = g.business_id AND l.customer_id = g.customer_id)
         FROM (SELECT DISTINCT * FROM unnest($3::text[], $4::text[])) AS k(business_id, source_id)
         JOIN grants g ON g.business_id = k.business_id AND g.subscription_id = k.source_id
         WHERE g.subscription_id IS NOT NULL
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

// The merchant API's reads and comp grants: one business's grants, filtered, paginated.

/// A page of an entitlement's grants, newest first, optionally by status and customer.
pub async fn page_of_entitlement(
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
pub async fn page_of_customer(
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
pub async fn get_of_entitlement(
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

// What the syncer and the OAuth callback change on a grant.

/// Records what a grant is about to apply beside what it holds (an account switch, a
/// role change), before the call to Discord.
pub async fn set_intent(
    conn: &mut PgConnection,
    id: &str,
    intent: &super::holdings::AccessKey,
    now: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE grants SET intent_guild_id = $2, intent_user_id = $3, intent_role_id = $4, updated_at = $5
         WHERE id = $1",
    )
    .bind(id)
    .bind(&intent.0)
    .bind(&intent.1)
    .bind(&intent.2)
    .bind(now)
    .execute(conn)
    .await?;
    Ok(())
}

/// Ids of every live grant of a customer (to sync after they linked an account).
pub async fn live_grant_ids(
    conn: &mut PgConnection,
    business_id: &str,
    customer_id: &str,
) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT id FROM grants WHERE business_id = $1 AND customer_id = $2 AND status <> 'Revoked' ORDER BY created_at",
    )
    .bind(business_id)
    .bind(customer_id)
    .fetch_all(conn)
    .await
}

/// Gives the live grants of a customer the link nonce `nonce` (their expiries kept), so
/// the links made before stop working. Passes over a grant another transaction has
/// locked at that moment (an event or a sync changing it) rather than wait for it: the
/// caller is a customer's page. Returns how many it changed.
pub async fn spend_links_of_customer(
    conn: &mut PgConnection,
    business_id: &str,
    customer_id: &str,
    nonce: &str,
    now: DateTime<Utc>,
) -> Result<u64, sqlx::Error> {
    let r = sqlx::query(
        "UPDATE grants SET oauth_nonce = $3, updated_at = $4
         WHERE id IN (SELECT id FROM grants
                      WHERE business_id = $1 AND customer_id = $2 AND status <> 'Revoked'
                      FOR UPDATE SKIP LOCKED)",
    )
    .bind(business_id)
    .bind(customer_id)
    .bind(nonce)
    .bind(now)
    .execute(conn)
    .await?;
    Ok(r.rows_affected())
}

/// Records what a grant applied in Discord (`None`: nothing any more); it is about to
/// apply nothing else.
pub async fn set_applied(
    conn: &mut PgConnection,
    id: &str,
    applied: Option<(String, String, Option<String>)>,
    now: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    let (u, g, r) = match applied {
        Some((u, g, r)) => (Some(u), Some(g), r),
        None => (None, None, None),
    };
    sqlx::query(
        "UPDATE grants SET applied_user_id = $2, applied_guild_id = $3, applied_role_id = $4,
             intent_user_id = NULL, intent_guild_id = NULL, intent_role_id = NULL, updated_at = $5
         WHERE id = $1",
    )
    .bind(id)
    .bind(u)
    .bind(g)
    .bind(r)
    .bind(now)
    .execute(conn)
    .await?;
    Ok(())
}

/// `Pending`/`Failed` → `Delivered`; `None` if the grant was in another status.
pub async fn mark_delivered(
    conn: &mut PgConnection,
    id: &str,
    now: DateTime<Utc>,
) -> Result<Option<Grant>, sqlx::Error> {
    sqlx::query_as(
        "UPDATE grants SET status = 'Delivered', delivered_at = $2, error_code = NULL, error_message = NULL, updated_at = $2
         WHERE id = $1 AND status IN ('Pending', 'Failed')
         RETURNING *",
    )
    .bind(id)
    .bind(now)
    .fetch_optional(conn)
    .await
}

/// `Pending` → `Failed` with an error (returns the grant), or, for a grant already
/// `Failed`, refreshes its error (returns `None`: no second `failed` webhook).
pub async fn mark_failed(
    conn: &mut PgConnection,
    id: &str,
    code: &str,
    message: &str,
    now: DateTime<Utc>,
) -> Result<Option<Grant>, sqlx::Error> {
    let moved: Option<Grant> = sqlx::query_as(
        "UPDATE grants SET status = 'Failed', error_code = $2, error_message = $3, updated_at = $4
         WHERE id = $1 AND status = 'Pending'
         RETURNING *",
    )
    .bind(id)
    .bind(code)
    .bind(message)
    .bind(now)
    .fetch_optional(&mut *conn)
    .await?;
    if moved.is_none() {
        sqlx::query(
            "UPDATE grants SET error_code = $2, error_message = $3, updated_at = $4 WHERE id = $1 AND status = 'Failed'",
        )
        .bind(id)
        .bind(code)
        .bind(message)
        .bind(now)
        .execute(conn)
        .await?;
    }
    Ok(moved)
}

/// Gives a grant a new link nonce (and expiry): the old `oauth_url` stops working.
pub async fn set_nonce(
    conn: &mut PgConnection,
    id: &str,
    nonce: &str,
    expires_at: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Result<Grant, sqlx::Error> {
    sqlx::query_as(
        "UPDATE grants SET oauth_nonce = $2, oauth_expires_at = $3, updated_at = $4 WHERE id = $1 RETURNING *",
    )
    .bind(id)
    .bind(nonce)
    .bind(expires_at)
    .bind(now)
    .fetch_one(conn)
    .await
}

/// A new nonce and expiry for a `Pending` grant whose link expired; `None` if it is
/// not (any more) pending and expired.
pub async fn renew_nonce_if_expired(
    conn: &mut PgConnection,
    id: &str,
    nonce: &str,
    expires_at: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Result<Option<Grant>, sqlx::Error> {
    sqlx::query_as(
        "UPDATE grants SET oauth_nonce = $2, oauth_expires_at = $3, updated_at = $4
         WHERE id = $1 AND status = 'Pending' AND oauth_expires_at <= $4 RETURNING *",
    )
    .bind(id)
    .bind(nonce)
    .bind(expires_at)
    .bind(now)
    .fetch_optional(conn)
    .await
}
