//! Payment events from the platform as the typed values the rest of guildgate works
//! with. [`crate::events::decode()`] turns AMQP bytes into them.

use chrono::{DateTime, Utc};

use super::ids::{BrandId, BusinessId, CustomerId, EventId, PaymentId, ProductId, SubscriptionId};

/// A payment event guildgate acts on.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    pub id: EventId,
    pub business_id: BusinessId,
    pub timestamp: DateTime<Utc>,
    pub kind: EventKind,
    /// `data.customer.email`, when it is an address an email can go to.
    pub customer_email: Option<String>,
}

impl Event {
    /// The platform's event type, e.g. `subscription.active`.
    pub fn type_name(&self) -> &'static str {
        match &self.kind {
            EventKind::PaymentSucceeded(_) => "payment.succeeded",
            EventKind::RefundSucceeded(_) => "refund.succeeded",
            EventKind::DisputeLost(_) => "dispute.lost",
            EventKind::Subscription(t, _) => t.type_name(),
        }
    }
}

/// `type_name` as the `&'static str` of an event type guildgate acts on, `None` for any
/// other type. Metrics label events by this, so a type made up by a publisher cannot
/// create a series of its own.
pub fn known_type(type_name: &str) -> Option<&'static str> {
    match type_name {
        "payment.succeeded" => Some("payment.succeeded"),
        "refund.succeeded" => Some("refund.succeeded"),
        "dispute.lost" => Some("dispute.lost"),
        other => SubscriptionEventType::parse(other).map(SubscriptionEventType::type_name),
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum EventKind {
    PaymentSucceeded(Payment),
    RefundSucceeded(Refund),
    DisputeLost(Dispute),
    Subscription(SubscriptionEventType, Subscription),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Payment {
    pub payment_id: PaymentId,
    pub customer_id: CustomerId,
    pub brand_id: Option<BrandId>,
    /// Set for a subscription's payment; such payments grant nothing themselves.
    pub subscription_id: Option<SubscriptionId>,
    pub product_ids: Vec<ProductId>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Refund {
    pub refund_id: String,
    pub payment_id: PaymentId,
    pub is_partial: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Dispute {
    pub dispute_id: String,
    pub payment_id: PaymentId,
}

/// The subscription snapshot every `subscription.*` event carries.
#[derive(Clone, Debug, PartialEq)]
pub struct Subscription {
    pub subscription_id: SubscriptionId,
    pub product_id: ProductId,
    pub customer_id: CustomerId,
    pub brand_id: Option<BrandId>,
    pub status: SubscriptionStatus,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SubscriptionEventType {
    Active,
    Renewed,
    Updated,
    OnHold,
    Paused,
    Unpaused,
    Cancelled,
    Expired,
    Failed,
    PlanChanged,
}

impl SubscriptionEventType {
    pub fn parse(type_name: &str) -> Option<Self> {
        use SubscriptionEventType::*;
        Some(match type_name {
            "subscription.active" => Active,
            "subscription.renewed" => Renewed,
            "subscription.updated" => Updated,
            "subscription.on_hold" => OnHold,
            "subscription.paused" => Paused,
            "subscription.unpaused" => Unpaused,
            "subscription.cancelled" => Cancelled,
            "subscription.expired" => Expired,
            "subscription.failed" => Failed,
            "subscription.plan_changed" => PlanChanged,
            _ => return None,
        })
    }

    pub fn type_name(self) -> &'static str {
        use SubscriptionEventType::*;
        match self {
            Active => "subscription.active",
            Renewed => "subscription.renewed",
            Updated => "subscription.updated",
            OnHold => "subscription.on_hold",
            Paused => "subscription.paused",
            Unpaused => "subscription.unpaused",
            Cancelled => "subscription.cancelled",
            Expired => "subscription.expired",
            Failed => "subscription.failed",
            PlanChanged => "subscription.plan_changed",
        }
    }
}

/// The snapshot's `status`. Values the platform may add later decode as `Other` and
/// imply nothing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SubscriptionStatus {
    Pending,
    Active,
    OnHold,
    Paused,
    Cancelled,
    Expired,
    Failed,
    Other(String),
}

impl SubscriptionStatus {
    pub fn parse(s: &str) -> Self {
        use SubscriptionStatus::*;
        match s {
            "pending" => Pending,
            "active" => Active,
            "on_hold" => OnHold,
            "paused" => Paused,
            "cancelled" => Cancelled,
            "expired" => Expired,
            "failed" => Failed,
            other => Other(other.to_string()),
        }
    }

    pub fn as_str(&self) -> &str {
        use SubscriptionStatus::*;
        match self {
            Pending => "pending",
            Active => "active",
            OnHold => "on_hold",
            Paused => "paused",
            Cancelled => "cancelled",
            Expired => "expired",
            Failed => "failed",
            Other(s) => s,
        }
    }
}
