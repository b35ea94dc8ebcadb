//! A grant: what a customer was given, with its typed status and reasons. How it is
//! stored is the store's business (`store::grants`), how it is shown the web's.

use chrono::{DateTime, SecondsFormat, Utc};

/// Timestamps as the platform writes them: RFC 3339, whole seconds, `Z`.
pub fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// An enum whose values travel as fixed names: `as_str`, `parse` (a name it does not
/// know is `None`, never another value), `ALL` and `Display`.
macro_rules! named_values {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident = $text:literal,)+ }) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name {
            $($(#[$vdoc])* $variant,)+
        }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant,)+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }

            pub fn parse(s: &str) -> Option<Self> {
                Self::ALL.iter().copied().find(|v| v.as_str() == s)
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

named_values! {
    /// A grant's status, capitalised on the wire like the platform's.
    GrantStatus {
        Pending = "Pending",
        Delivered = "Delivered",
        Failed = "Failed",
        Revoked = "Revoked",
    }
}

impl GrantStatus {
    /// Live grants are the ones a revoke applies to and that block a duplicate.
    pub fn is_live(self) -> bool {
        self != GrantStatus::Revoked
    }
}

/// A status compares equal to its wire name.
impl PartialEq<&str> for GrantStatus {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

named_values! {
    /// Why a grant was revoked (`revocation_reason`).
    RevocationReason {
        SubscriptionOnHold = "subscription_on_hold",
        SubscriptionPaused = "subscription_paused",
        SubscriptionCancelled = "subscription_cancelled",
        SubscriptionExpired = "subscription_expired",
        SubscriptionFailed = "subscription_failed",
        PlanChanged = "plan_changed",
        Refund = "refund",
        DisputeLost = "dispute_lost",
        Manual = "manual",
        PlatformExternal = "platform_external",
        /// A comp grant's `expires_at` passed.
        Expired = "expired",
    }
}

named_values! {
    /// The `entitlement_grant.*` webhook types.
    GrantEventType {
        Created = "entitlement_grant.created",
        Delivered = "entitlement_grant.delivered",
        Failed = "entitlement_grant.failed",
        Revoked = "entitlement_grant.revoked",
    }
}

/// A grant as stored.
#[derive(Clone, Debug, PartialEq)]
pub struct Grant {
    pub id: String,
    pub business_id: String,
    pub brand_id: String,
    pub entitlement_id: String,
    pub customer_id: String,
    pub payment_id: Option<String>,
    pub subscription_id: Option<String>,
    pub status: GrantStatus,
    pub delivered_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub revocation_reason: Option<RevocationReason>,
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
    pub ends_reason: Option<RevocationReason>,
}
