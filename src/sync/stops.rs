//! What the syncer does about stopped servers and entitlements; their SQL is
//! [`crate::store::stops`], which says why they exist.

use sqlx::PgConnection;

use crate::store::stops::resume;

/// [`resume`], and queues the grants it returns (through the outbox, in the same
/// transaction).
pub async fn resume_and_queue(
    conn: &mut PgConnection,
    guild_id: &str,
    entitlement_id: &str,
) -> Result<usize, sqlx::Error> {
    let grants = resume(conn, guild_id, entitlement_id).await?;
    crate::outbox::queue_syncs(conn, &grants).await?;
    Ok(grants.len())
}
