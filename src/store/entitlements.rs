//! SQL of entitlements (the API's reads are one business's, undeleted) and of the
//! products they are attached to.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use super::Page;

/// A stored entitlement.
#[derive(Clone, Debug, PartialEq, sqlx::FromRow)]
pub struct Entitlement {
    pub id: String,
    pub business_id: String,
    pub name: String,
    pub description: Option<String>,
    pub integration_type: String,
    pub guild_id: String,
    pub role_id: Option<String>,
    pub is_active: bool,
    pub metadata: serde_json::Value,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub deleted_at: Option<DateTime<Utc>>,
    /// Days a subscription's access is kept after it goes on hold or fails.
    pub grace_period_days: Option<i32>,
    /// Whether guildgate emails the entitlement's customers (`None`: yes, the default).
    pub send_email: Option<bool>,
    /// The role's name when the configuration was last checked with Discord.
    pub role_name: Option<String>,
}

/// The fields of an entitlement a merchant sets.
#[derive(Clone, Debug, PartialEq)]
pub struct Fields {
    pub name: String,
    pub description: Option<String>,
    pub guild_id: String,
    pub role_id: Option<String>,
    /// Checked to be 1 to 365 before it is stored.
    pub grace_period_days: Option<i64>,
    /// `None`: on (the default).
    pub send_email: Option<bool>,
    /// The role's name as Discord gave it when the configuration was checked (shown on
    /// the customer's access page).
    pub role_name: Option<String>,
    pub is_active: bool,
    pub metadata: serde_json::Value,
}

/// Inserts an entitlement with every merchant-set field.
pub async fn insert(
    conn: &mut PgConnection,
    business_id: &str,
    f: &Fields,
    now: DateTime<Utc>,
) -> Result<Entitlement, sqlx::Error> {
    sqlx::query_as(
        "INSERT INTO entitlements (id, business_id, name, description, guild_id, role_id, is_active,
             metadata, created_at, updated_at, grace_period_days, send_email, role_name)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9, $10::int, $11, $12) RETURNING *",
    )
    .bind(crate::domain::ids::EntitlementId::mint().as_str())
    .bind(business_id)
    .bind(&f.name)
    .bind(&f.description)
    .bind(&f.guild_id)
    .bind(&f.role_id)
    .bind(f.is_active)
    .bind(&f.metadata)
    .bind(now)
    .bind(f.grace_period_days)
    .bind(f.send_email)
    .bind(&f.role_name)
    .fetch_one(conn)
    .await
}

/// A page of a business's undeleted entitlements, newest first.
pub async fn list(
    conn: &mut PgConnection,
    business_id: &str,
    integration_type: Option<&str>,
    page: Page,
) -> Result<Vec<Entitlement>, sqlx::Error> {
    sqlx::query_as(
        "SELECT * FROM entitlements
         WHERE business_id = $1 AND deleted_at IS NULL AND ($2::text IS NULL OR integration_type = $2)
         ORDER BY created_at DESC, id DESC LIMIT $3 OFFSET $4",
    )
    .bind(business_id)
    .bind(integration_type)
    .bind(page.limit)
    .bind(page.offset)
    .fetch_all(conn)
    .await
}

/// One undeleted entitlement of a business, locked for the rest of the transaction
/// when `lock` (a save and a concurrent save or delete must not interleave).
pub async fn get(
    conn: &mut PgConnection,
    business_id: &str,
    id: &str,
    lock: bool,
) -> Result<Option<Entitlement>, sqlx::Error> {
    let sql = if lock {
        "SELECT * FROM entitlements WHERE business_id = $1 AND id = $2 AND deleted_at IS NULL FOR UPDATE"
    } else {
        "SELECT * FROM entitlements WHERE business_id = $1 AND id = $2 AND deleted_at IS NULL"
    };
    sqlx::query_as(sql)
        .bind(business_id)
        .bind(id)
        .fetch_optional(conn)
        .await
}

/// One entitlement of a business, deleted ones included (its grants outlive it).
pub async fn get_any(
    conn: &mut PgConnection,
    business_id: &str,
    id: &str,
) -> Result<Option<Entitlement>, sqlx::Error> {
    sqlx::query_as("SELECT * FROM entitlements WHERE business_id = $1 AND id = $2")
        .bind(business_id)
        .bind(id)
        .fetch_optional(conn)
        .await
}

/// Replaces the merchant-set fields.
pub async fn update(
    conn: &mut PgConnection,
    id: &str,
    f: &Fields,
    now: DateTime<Utc>,
) -> Result<Entitlement, sqlx::Error> {
    sqlx::query_as(
        "UPDATE entitlements SET name = $2, description = $3, guild_id = $4, role_id = $5,
             is_active = $6, metadata = $7, updated_at = $8, grace_period_days = $9::int,
             send_email = $10, role_name = $11
         WHERE id = $1 RETURNING *",
    )
    .bind(id)
    .bind(&f.name)
    .bind(&f.description)
    .bind(&f.guild_id)
    .bind(&f.role_id)
    .bind(f.is_active)
    .bind(&f.metadata)
    .bind(now)
    .bind(f.grace_period_days)
    .bind(f.send_email)
    .bind(&f.role_name)
    .fetch_one(conn)
    .await
}

/// Soft-deletes an entitlement and detaches it from every product, so no purchase
/// grants it again; its grants are kept as they are.
pub async fn soft_delete(
    conn: &mut PgConnection,
    business_id: &str,
    id: &str,
    now: DateTime<Utc>,
) -> Result<bool, sqlx::Error> {
    let r = sqlx::query(
        "UPDATE entitlements SET deleted_at = $3, updated_at = $3
         WHERE business_id = $1 AND id = $2 AND deleted_at IS NULL",
    )
    .bind(business_id)
    .bind(id)
    .bind(now)
    .execute(&mut *conn)
    .await?;
    if r.rows_affected() == 0 {
        return Ok(false);
    }
    sqlx::query("DELETE FROM product_entitlements WHERE business_id = $1 AND entitlement_id = $2")
        .bind(business_id)
        .bind(id)
        .execute(conn)
        .await?;
    Ok(true)
}

/// The undeleted entitlements attached to a product, in attachment order.
pub async fn of_product(
    conn: &mut PgConnection,
    business_id: &str,
    product_id: &str,
) -> Result<Vec<Entitlement>, sqlx::Error> {
    sqlx::query_as(
        "SELECT e.* FROM product_entitlements pe JOIN entitlements e ON e.id = pe.entitlement_id
         WHERE pe.business_id = $1 AND pe.product_id = $2 AND e.deleted_at IS NULL
         ORDER BY pe.position, e.id",
    )
    .bind(business_id)
    .bind(product_id)
    .fetch_all(conn)
    .await
}

/// Which of `ids` are undeleted entitlements of the business.
pub async fn owned(
    conn: &mut PgConnection,
    business_id: &str,
    ids: &[String],
) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT id FROM entitlements WHERE business_id = $1 AND id = ANY($2) AND deleted_at IS NULL",
    )
    .bind(business_id)
    .bind(ids)
    .fetch_all(conn)
    .await
}

/// Grants a save must hand to the syncer again: those that failed for a configuration
/// cause (the save may have fixed it) and, when the guild or role changed, every live
/// grant that applied something, so the syncer moves it to the new configuration. At
/// most `limit` of them, newest first, after `after` (a time as text and a grant id:
/// [`super::moves::START`] for the newest), one step down `grants_entitlement_created`
/// per grant however far the move has gone.
pub async fn grants_to_resync(
    conn: &mut PgConnection,
    entitlement_id: &str,
    config_causes: &[&str],
    config_changed: bool,
    (after, limit): ((&str, &str), i64),
) -> Result<Vec<super::moves::Cursor>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, created_at FROM grants
         WHERE entitlement_id = $1 AND (created_at, id) < ($4::timestamptz, $5)
           AND ((status = 'Failed' AND error_code = ANY($2))
                OR ($3 AND status <> 'Revoked' AND applied_guild_id IS NOT NULL))
         ORDER BY created_at DESC, id DESC LIMIT $6",
    )
    .bind(entitlement_id)
    .bind(config_causes)
    .bind(config_changed)
    .bind(after.0)
    .bind(after.1)
    .bind(limit)
    .fetch_all(conn)
    .await
}

/// Inserts an entitlement.
pub async fn insert_entitlement(
    conn: &mut PgConnection,
    business_id: &str,
    name: &str,
    guild_id: &str,
    role_id: Option<&str>,
) -> Result<Entitlement, sqlx::Error> {
    sqlx::query_as(
        "INSERT INTO entitlements (id, business_id, name, guild_id, role_id) VALUES ($1, $2, $3, $4, $5)
         RETURNING *",
    )
    .bind(crate::domain::ids::EntitlementId::mint().as_str())
    .bind(business_id)
    .bind(name)
    .bind(guild_id)
    .bind(role_id)
    .fetch_one(conn)
    .await
}

/// One entitlement, deleted ones included (a grant's entitlement outlives deletion).
pub async fn entitlement(
    conn: &mut PgConnection,
    id: &str,
) -> Result<Option<Entitlement>, sqlx::Error> {
    sqlx::query_as("SELECT * FROM entitlements WHERE id = $1")
        .bind(id)
        .fetch_optional(conn)
        .await
}

/// Replaces the entitlements a product grants.
pub async fn set_product_entitlements(
    conn: &mut PgConnection,
    business_id: &str,
    product_id: &str,
    entitlement_ids: &[String],
) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM product_entitlements WHERE business_id = $1 AND product_id = $2")
        .bind(business_id)
        .bind(product_id)
        .execute(&mut *conn)
        .await?;
    sqlx::query(
        "INSERT INTO product_entitlements (business_id, product_id, entitlement_id, position)
         SELECT $1, $2, e, (ord - 1)::int FROM unnest($3::text[]) WITH ORDINALITY AS t(e, ord)",
    )
    .bind(business_id)
    .bind(product_id)
    .bind(entitlement_ids)
    .execute(conn)
    .await?;
    Ok(())
}
