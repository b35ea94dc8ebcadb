//! Grants: what a customer was given, its lifecycle, and how it is shown to merchants.
//!
//! - [`decide`]: the pure core, `(facts, event) -> effects`.
//! - [`link`]: the customer's signed OAuth link.
//! - [`render`]: the Dodo-compatible JSON of a grant and of its webhooks.

pub mod backfill;
pub mod decide;
pub mod history;
pub mod link;
pub mod render;
pub mod timers;

use chrono::{DateTime, Utc};

/// A grant's status, capitalised on the wire like the platform's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GrantStatus {
    Pending,
    Delivered,
    Failed,
    Revoked,
}

impl GrantStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            GrantStatus::Pending => "Pending",
            GrantStatus::Delivered => "Delivered",
            GrantStatus::Failed => "Failed",
            GrantStatus::Revoked => "Revoked",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "Pending" => GrantStatus::Pending,
            "Delivered" => GrantStatus::Delivered,
            "Failed" => GrantStatus::Failed,
            "Revoked" => GrantStatus::Revoked,
            _ => return None,
        })
    }

    /// Live grants are the ones a revoke applies to and that block a duplicate.
    pub fn is_live(self) -> bool {
        self != GrantStatus::Revoked
    }
}

/// Why a grant was revoked (`revocation_reason`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RevocationReason {
    SubscriptionOnHold,
    SubscriptionPaused,
    SubscriptionCancelled,
    SubscriptionExpired,
    SubscriptionFailed,
    PlanChanged,
    Refund,
    DisputeLost,
    Manual,
    PlatformExternal,
    /// A comp grant's `expires_at` passed.
    Expired,
}

impl RevocationReason {
    pub fn as_str(self) -> &'static str {
        use RevocationReason::*;
        match self {
            SubscriptionOnHold => "subscription_on_hold",
            SubscriptionPaused => "subscription_paused",
            SubscriptionCancelled => "subscription_cancelled",
            SubscriptionExpired => "subscription_expired",
            SubscriptionFailed => "subscription_failed",
            PlanChanged => "plan_changed",
            Refund => "refund",
            DisputeLost => "dispute_lost",
            Manual => "manual",
            PlatformExternal => "platform_external",
            Expired => "expired",
        }
    }
}

/// The `entitlement_grant.*` webhook types.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GrantEventType {
    Created,
    Delivered,
    Failed,
    Revoked,
}

impl GrantEventType {
    pub const ALL: [GrantEventType; 4] = [
        GrantEventType::Created,
        GrantEventType::Delivered,
        GrantEventType::Failed,
        GrantEventType::Revoked,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            GrantEventType::Created => "entitlement_grant.created",
            GrantEventType::Delivered => "entitlement_grant.delivered",
            GrantEventType::Failed => "entitlement_grant.failed",
            GrantEventType::Revoked => "entitlement_grant.revoked",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == s)
    }
}

/// A grant as stored.
#[derive(Clone, Debug, PartialEq, sqlx::FromRow)]
pub struct Grant {
    pub id: String,
    pub business_id: String,
    pub brand_id: String,
    pub entitlement_id: String,
    pub customer_id: String,
    pub payment_id: Option<String>,
    pub subscription_id: Option<String>,
    pub status: String,
    pub delivered_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub revocation_reason: Option<String>,
    pub error_code: Option<String>,
    pub error_message: Option<String>,
    pub oauth_nonce: String,
    pub oauth_expires_at: DateTime<Utc>,
    pub metadata: serde_json::Value,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// What this grant applied in Discord, so a later revoke undoes exactly that.
    pub applied_user_id: Option<String>,
    pub applied_guild_id: Option<String>,
    pub applied_role_id: Option<String>,
    /// What this grant is about to apply beside what it applied (an account switch or
    /// a role change under way), recorded before the call to Discord.
    pub intent_user_id: Option<String>,
    pub intent_guild_id: Option<String>,
    pub intent_role_id: Option<String>,
    /// When the grant ends unless something changes first (the end of a grace period),
    /// and the reason it is revoked with then.
    pub ends_at: Option<DateTime<Utc>>,
    pub ends_reason: Option<String>,
}

impl Grant {
    pub fn status(&self) -> GrantStatus {
        GrantStatus::parse(&self.status).unwrap_or(GrantStatus::Failed)
    }
}
