//! SQL of the customer's access page (migration 0030): a customer's grants with what
//! the page shows of them, the names of their linked account, and pending switches.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

/// A grant as the access page shows it.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct AccessRow {
    pub id: String,
    pub status: String,
    pub error_code: Option<String>,
    pub revocation_reason: Option<String>,
    pub entitlement_name: String,
    pub translated_name: Option<String>,
    pub guild_id: String,
    pub guild_name: Option<String>,
    pub role_id: Option<String>,
    pub role_name: Option<String>,
}

/// A customer's grants with the business (at most 100): live ones first, newest first.
/// `locale`: the platform's code of the merchant's translations to use.
pub async fn grants(
    conn: &mut PgConnection,
    business_id: &str,
    customer_id: &str,
    locale: &str,
) -> Result<Vec<AccessRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT g.id, g.status, g.error_code, g.revocation_reason, e.name AS entitlement_name,
                t.name AS translated_name, e.guild_id, dg.name AS guild_name, e.role_id, e.role_name
         FROM grants g
         JOIN entitlements e ON e.id = g.entitlement_id
         LEFT JOIN discord_guilds dg ON dg.business_id = g.business_id AND dg.guild_id = e.guild_id
         LEFT JOIN entitlement_translations t ON t.entitlement_id = e.id AND t.locale = $3
         WHERE g.business_id = $1 AND g.customer_id = $2
         ORDER BY g.status = 'Revoked', g.created_at DESC, g.id
         LIMIT 100",
    )
    .bind(business_id)
    .bind(customer_id)
    .bind(locale)
    .fetch_all(conn)
    .await
}

/// The customer's linked account: id, username, display name, and whether Discord
/// refused its authorization since it was linked.
pub async fn linked_account(
    conn: &mut PgConnection,
    business_id: &str,
    customer_id: &str,
) -> Result<Option<(String, Option<String>, Option<String>, bool)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT discord_user_id, username, global_name, needs_authorization_since IS NOT NULL
         FROM discord_links WHERE business_id = $1 AND customer_id = $2",
    )
    .bind(business_id)
    .bind(customer_id)
    .fetch_optional(conn)
    .await
}

/// Notes that Discord refused the customer's stored authorization.
pub async fn needs_authorization(
    conn: &mut PgConnection,
    business_id: &str,
    customer_id: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE discord_links SET needs_authorization_since = COALESCE(needs_authorization_since, now())
         WHERE business_id = $1 AND customer_id = $2",
    )
    .bind(business_id)
    .bind(customer_id)
    .execute(conn)
    .await?;
    Ok(())
}

/// A switch waiting for the customer's confirmation.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct Switch {
    pub id: String,
    pub business_id: String,
    pub customer_id: String,
    pub discord_user_id: String,
    pub username: String,
    pub global_name: Option<String>,
    pub access_token_enc: Vec<u8>,
    pub refresh_token_enc: Option<Vec<u8>>,
    pub token_key_id: String,
    pub token_expires_at: DateTime<Utc>,
    pub scopes: String,
    pub expires_at: DateTime<Utc>,
    /// The application the tokens were issued to; `None`: the shared one.
    pub client_id: Option<String>,
}

/// Stores a pending switch, deleting the ones that expired.
pub async fn save_switch(conn: &mut PgConnection, s: &Switch) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM account_switches WHERE expires_at < now()")
        .execute(&mut *conn)
        .await?;
    sqlx::query(
        "INSERT INTO account_switches (id, business_id, customer_id, discord_user_id, username,
             global_name, access_token_enc, refresh_token_enc, token_key_id, token_expires_at,
             scopes, expires_at, client_id)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
    )
    .bind(&s.id)
    .bind(&s.business_id)
    .bind(&s.customer_id)
    .bind(&s.discord_user_id)
    .bind(&s.username)
    .bind(&s.global_name)
    .bind(&s.access_token_enc)
    .bind(&s.refresh_token_enc)
    .bind(&s.token_key_id)
    .bind(s.token_expires_at)
    .bind(&s.scopes)
    .bind(s.expires_at)
    .bind(&s.client_id)
    .execute(conn)
    .await?;
    Ok(())
}

/// Takes (deletes and returns) a customer's unexpired pending switch.
pub async fn take_switch(
    conn: &mut PgConnection,
    id: &str,
    business_id: &str,
    customer_id: &str,
    now: DateTime<Utc>,
) -> Result<Option<Switch>, sqlx::Error> {
    sqlx::query_as(
        "DELETE FROM account_switches
         WHERE id = $1 AND business_id = $2 AND customer_id = $3 AND expires_at > $4
         RETURNING id, business_id, customer_id, discord_user_id, username, global_name,
             access_token_enc, refresh_token_enc, token_key_id, token_expires_at, scopes, expires_at,
             client_id",
    )
    .bind(id)
    .bind(business_id)
    .bind(customer_id)
    .bind(now)
    .fetch_optional(conn)
    .await
}
