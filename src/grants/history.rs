//! A grant's history (`grant_history`): what happened to it, for the merchant's
//! support. Creation and revocation are read from the grant row; everything else (the
//! customer linking or switching accounts, each change the syncer made in Discord with
//! Discord's answer, what it left in place and why, delivery, failures, waiting on a
//! stopped server) is recorded as it happens, in the transaction that records it
//! ([`crate::store::history::record`]).

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{Value, json};
use sqlx::PgConnection;

use crate::domain::Grant;
use crate::store::history;

/// One entry of a grant's history.
#[derive(Clone, Debug, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Entry {
    /// RFC 3339, UTC.
    #[serde(serialize_with = "rfc3339")]
    #[schema(value_type = String)]
    pub at: DateTime<Utc>,
    /// `created`, `linked`, `switched`, `member_added`, `member_found`, `role_added`,
    /// `role_found`, `role_removed`, `member_removed`, `left_in_place`, `delivered`,
    /// `failed`, `waiting`, `grace_started`, `grace_ended`, `revoked`.
    pub event: String,
    /// What the event concerns (Discord ids, Discord's answer, a code, a reason).
    #[schema(value_type = Object)]
    pub detail: Value,
}

fn rfc3339<S: serde::Serializer>(at: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&crate::grants::render::ts(*at))
}

/// The grant's history, oldest first: its creation and revocation (from the row) and
/// every recorded event.
pub async fn of(conn: &mut PgConnection, g: &Grant) -> Result<Vec<Entry>, sqlx::Error> {
    let mut out: Vec<Entry> = vec![Entry {
        at: g.created_at,
        event: "created".into(),
        detail: json!({
            "payment_id": g.payment_id,
            "subscription_id": g.subscription_id,
        }),
    }];
    let recorded = history::recorded(conn, &g.id).await?;
    out.extend(
        recorded
            .into_iter()
            .map(|(at, event, detail)| Entry { at, event, detail }),
    );
    if let Some(at) = g.revoked_at {
        out.push(Entry {
            at,
            event: "revoked".into(),
            detail: json!({ "reason": g.revocation_reason.map(crate::domain::RevocationReason::as_str) }),
        });
    }
    // Stable: entries recorded in one transaction share a time and keep their order.
    out.sort_by_key(|e| e.at);
    Ok(out)
}
