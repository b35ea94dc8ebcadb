//! SQL of merchants' configuration: businesses, entitlements, product attachments.
//! The merchant API is built on these; tests and the demo call them directly.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

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

/// The name a connected server had when it was connected (or reconnected).
pub async fn guild_name(
    conn: &mut PgConnection,
    business_id: &str,
    guild_id: &str,
) -> Result<Option<String>, sqlx::Error> {
    Ok(sqlx::query_scalar::<_, Option<String>>(
        "SELECT name FROM discord_guilds WHERE business_id = $1 AND guild_id = $2",
    )
    .bind(business_id)
    .bind(guild_id)
    .fetch_optional(conn)
    .await?
    .flatten())
}

/// Creates the business if it does not exist.
pub async fn ensure_business(conn: &mut PgConnection, id: &str) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO businesses (id) VALUES ($1) ON CONFLICT DO NOTHING")
        .bind(id)
        .execute(conn)
        .await?;
    Ok(())
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
