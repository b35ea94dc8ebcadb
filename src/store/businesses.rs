//! SQL of businesses: the tenants everything else belongs to.

use sqlx::PgConnection;

/// Creates the business if it does not exist.
pub async fn ensure_business(conn: &mut PgConnection, id: &str) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO businesses (id) VALUES ($1) ON CONFLICT DO NOTHING")
        .bind(id)
        .execute(conn)
        .await?;
    Ok(())
}
