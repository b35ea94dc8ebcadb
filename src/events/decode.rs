//! The edge: AMQP body bytes (plus `message_id` and routing key) → [`Event`].
//!
//! Raw DTOs mirror the platform's JSON with every field optional, so a missing id is
//! reported by name instead of as a generic serde error; fields guildgate does not read
//! are ignored, and so are event types it does not act on. Everything that can never
//! succeed becomes a [`DecodeError`], which the consumer dead-letters with the error's
//! text as the reason.

use chrono::{DateTime, SubsecRound, Utc};
use serde::Deserialize;
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

use crate::domain::event::{
    Dispute, Event, EventKind, Payment, Refund, Subscription, SubscriptionEventType,
    SubscriptionStatus,
};
use crate::domain::ids::{
    BrandId, BusinessId, CustomerId, EventId, IdError, PaymentId, ProductId, SubscriptionId,
};

/// What a message turned out to be.
#[derive(Debug, PartialEq)]
pub enum Decoded {
    /// An event guildgate acts on.
    Event(Event),
    /// A well-formed message of a type guildgate does not act on (acked and counted).
    Ignored { event_type: String },
}

/// Why a message can never be applied. `code()` is a stable label for metrics and the
/// dead-letter reason header; `Display` is the human-readable reason.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    #[error("body of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    #[error("body is not valid JSON: {0}")]
    InvalidJson(String),
    #[error("missing field `{0}`")]
    Missing(&'static str),
    #[error("field `{field}` has the wrong type or value: {detail}")]
    WrongType { field: &'static str, detail: String },
    #[error("invalid id: {0}")]
    BadId(#[from] IdError),
    #[error("`data.business_id` ({data}) differs from the event's business_id ({envelope})")]
    BusinessMismatch { envelope: String, data: String },
    #[error("event timestamp {0} is too far in the future")]
    FutureTimestamp(DateTime<Utc>),
    #[error("routing key `{routing_key}` differs from the event type `{event_type}`")]
    RoutingKeyMismatch {
        routing_key: String,
        event_type: String,
    },
    #[error("a string PostgreSQL cannot store: {0}")]
    Nul(crate::nul::NulAt),
}

impl DecodeError {
    pub fn code(&self) -> &'static str {
        match self {
            DecodeError::TooLarge { .. } => "too_large",
            DecodeError::InvalidJson(_) => "invalid_json",
            DecodeError::Missing(_) => "missing_field",
            DecodeError::WrongType { .. } => "wrong_type",
            DecodeError::BadId(_) => "invalid_id",
            DecodeError::BusinessMismatch { .. } => "business_mismatch",
            DecodeError::FutureTimestamp(_) => "future_timestamp",
            DecodeError::RoutingKeyMismatch { .. } => "routing_key_mismatch",
            DecodeError::Nul(_) => "nul_character",
        }
    }
}

/// Limits and clock for [`decode`].
#[derive(Clone, Copy, Debug)]
pub struct DecodeLimits {
    pub max_bytes: usize,
    pub max_future_skew: chrono::Duration,
}

impl DecodeLimits {
    /// `amqp.max_message_bytes` and `grants.max_future_skew` (an hour if it does not fit).
    pub fn from_settings(s: &crate::config::Settings) -> Self {
        Self {
            max_bytes: s.amqp.max_message_bytes,
            max_future_skew: chrono::Duration::from_std(s.grants.max_future_skew)
                .unwrap_or(chrono::Duration::hours(1)),
        }
    }
}

#[derive(Deserialize)]
struct RawEnvelope<'a> {
    business_id: Option<serde_json::Value>,
    #[serde(rename = "type")]
    kind: Option<serde_json::Value>,
    timestamp: Option<serde_json::Value>,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct RawCustomer {
    customer_id: Option<String>,
    /// Where delivery email goes; an event without a usable one still applies.
    #[serde(default)]
    email: Option<serde_json::Value>,
}

impl RawCustomer {
    fn email(&self) -> Option<String> {
        crate::email::address(self.email.as_ref().and_then(|v| v.as_str()))
    }
}

#[derive(Deserialize)]
struct RawCartItem {
    product_id: Option<String>,
}

#[derive(Deserialize)]
struct RawPayment {
    payment_id: Option<String>,
    business_id: Option<String>,
    brand_id: Option<String>,
    customer: Option<RawCustomer>,
    subscription_id: Option<String>,
    product_cart: Option<Vec<RawCartItem>>,
}

#[derive(Deserialize)]
struct RawRefund {
    refund_id: Option<String>,
    payment_id: Option<String>,
    business_id: Option<String>,
    is_partial: Option<bool>,
}

#[derive(Deserialize)]
struct RawDispute {
    dispute_id: Option<String>,
    payment_id: Option<String>,
    business_id: Option<String>,
}

#[derive(Deserialize)]
struct RawSubscription {
    subscription_id: Option<String>,
    product_id: Option<String>,
    status: Option<String>,
    customer: Option<RawCustomer>,
    brand_id: Option<String>,
    business_id: Option<String>,
}

/// The event id: the AMQP `message_id` when present, else the SHA-256 of the body, so
/// that a byte-identical redelivery is still recognised.
pub fn event_id(message_id: Option<&str>, body: &[u8]) -> Result<EventId, DecodeError> {
    match message_id {
        Some(id) if !id.is_empty() => Ok(EventId::parse(id)?),
        _ => {
            let digest = Sha256::digest(body);
            let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
            Ok(EventId::parse(format!("sha256:{hex}"))?)
        }
    }
}

fn string_field(v: Option<serde_json::Value>, field: &'static str) -> Result<String, DecodeError> {
    match v {
        None | Some(serde_json::Value::Null) => Err(DecodeError::Missing(field)),
        Some(serde_json::Value::String(s)) => Ok(s),
        Some(other) => Err(DecodeError::WrongType {
            field,
            detail: format!("expected a string, found {}", json_kind(&other)),
        }),
    }
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

fn data_as<'a, T: Deserialize<'a>>(
    data: &'a RawValue,
    what: &'static str,
) -> Result<T, DecodeError> {
    serde_json::from_str(data.get()).map_err(|e| DecodeError::WrongType {
        field: what,
        detail: e.to_string(),
    })
}

fn required<T>(v: Option<T>, field: &'static str) -> Result<T, DecodeError> {
    v.ok_or(DecodeError::Missing(field))
}

fn check_business(envelope: &BusinessId, data: Option<String>) -> Result<(), DecodeError> {
    match data {
        Some(d) if d != envelope.as_str() => Err(DecodeError::BusinessMismatch {
            envelope: envelope.to_string(),
            data: d,
        }),
        _ => Ok(()),
    }
}

fn brand(v: Option<String>) -> Result<Option<BrandId>, DecodeError> {
    v.map(BrandId::parse).transpose().map_err(Into::into)
}

/// Decodes one message. `routing_key` is the AMQP routing key (the platform sets it to
/// the event type); a message whose key and `type` disagree is refused, since bindings
/// are chosen by key and a mismatch means a broken publisher.
pub fn decode(
    message_id: Option<&str>,
    routing_key: &str,
    body: &[u8],
    limits: DecodeLimits,
    now: DateTime<Utc>,
) -> Result<Decoded, DecodeError> {
    if body.len() > limits.max_bytes {
        return Err(DecodeError::TooLarge {
            size: body.len(),
            limit: limits.max_bytes,
        });
    }
    let env: RawEnvelope<'_> =
        serde_json::from_slice(body).map_err(|e| DecodeError::InvalidJson(e.to_string()))?;
    let event_type = string_field(env.kind, "type")?;
    if !routing_key.is_empty() && routing_key != event_type {
        return Err(DecodeError::RoutingKeyMismatch {
            routing_key: routing_key.to_string(),
            event_type,
        });
    }
    if crate::domain::event::known_type(&event_type).is_none() {
        return Ok(Decoded::Ignored { event_type });
    }
    // Any string, read or not: PostgreSQL stores no U+0000, and an event is refused
    // whole rather than applied with a field dropped. The body parsed above, so it is
    // valid JSON.
    if let Some(at) = crate::nul::find_in_json(body) {
        return Err(DecodeError::Nul(at));
    }

    let id = event_id(message_id, body)?;
    let business_id = BusinessId::parse(string_field(env.business_id, "business_id")?)?;
    let ts = string_field(env.timestamp, "timestamp")?;
    let timestamp = DateTime::parse_from_rfc3339(&ts)
        .map_err(|e| DecodeError::WrongType {
            field: "timestamp",
            detail: e.to_string(),
        })?
        .with_timezone(&Utc)
        // PostgreSQL keeps microseconds: an event compared with a stored time must be
        // compared at that precision, or its own repeat would look newer.
        .trunc_subsecs(6);
    if timestamp > now + limits.max_future_skew {
        return Err(DecodeError::FutureTimestamp(timestamp));
    }
    let data = required(env.data, "data")?;

    let mut customer_email = None;
    let kind = match event_type.as_str() {
        "payment.succeeded" => {
            let p: RawPayment = data_as(data, "data")?;
            check_business(&business_id, p.business_id)?;
            let customer = required(p.customer, "data.customer")?;
            customer_email = customer.email();
            let cart = p.product_cart.unwrap_or_default();
            let product_ids = cart
                .into_iter()
                .map(|item| {
                    ProductId::parse(required(item.product_id, "data.product_cart[].product_id")?)
                        .map_err(DecodeError::from)
                })
                .collect::<Result<Vec<_>, _>>()?;
            EventKind::PaymentSucceeded(Payment {
                payment_id: PaymentId::parse(required(p.payment_id, "data.payment_id")?)?,
                customer_id: CustomerId::parse(required(
                    customer.customer_id,
                    "data.customer.customer_id",
                )?)?,
                brand_id: brand(p.brand_id)?,
                subscription_id: p.subscription_id.map(SubscriptionId::parse).transpose()?,
                product_ids,
            })
        }
        "refund.succeeded" => {
            let r: RawRefund = data_as(data, "data")?;
            check_business(&business_id, r.business_id)?;
            EventKind::RefundSucceeded(Refund {
                refund_id: required(r.refund_id, "data.refund_id")?,
                payment_id: PaymentId::parse(required(r.payment_id, "data.payment_id")?)?,
                is_partial: r.is_partial.unwrap_or(false),
            })
        }
        "dispute.lost" => {
            let d: RawDispute = data_as(data, "data")?;
            check_business(&business_id, d.business_id)?;
            EventKind::DisputeLost(Dispute {
                dispute_id: required(d.dispute_id, "data.dispute_id")?,
                payment_id: PaymentId::parse(required(d.payment_id, "data.payment_id")?)?,
            })
        }
        other => {
            let t = SubscriptionEventType::parse(other).expect("checked above");
            let s: RawSubscription = data_as(data, "data")?;
            check_business(&business_id, s.business_id)?;
            let customer = required(s.customer, "data.customer")?;
            customer_email = customer.email();
            EventKind::Subscription(
                t,
                Subscription {
                    subscription_id: SubscriptionId::parse(required(
                        s.subscription_id,
                        "data.subscription_id",
                    )?)?,
                    product_id: ProductId::parse(required(s.product_id, "data.product_id")?)?,
                    customer_id: CustomerId::parse(required(
                        customer.customer_id,
                        "data.customer.customer_id",
                    )?)?,
                    brand_id: brand(s.brand_id)?,
                    status: SubscriptionStatus::parse(&required(s.status, "data.status")?),
                },
            )
        }
    };
    Ok(Decoded::Event(Event {
        id,
        business_id,
        timestamp,
        kind,
        customer_email,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURES: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/contract/events"
    );

    fn limits() -> DecodeLimits {
        DecodeLimits {
            max_bytes: 256 * 1024,
            max_future_skew: chrono::Duration::hours(1),
        }
    }

    fn now() -> DateTime<Utc> {
        "2026-11-25T00:00:00Z".parse().unwrap()
    }

    fn fixture(name: &str) -> Vec<u8> {
        std::fs::read(format!("{FIXTURES}/{name}")).unwrap()
    }

    fn event(name: &str, rk: &str) -> Event {
        match decode(Some("evt_1"), rk, &fixture(name), limits(), now()).unwrap() {
            Decoded::Event(e) => e,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn decodes_every_fixture() {
        let e = event("payment.succeeded.one_time.json", "payment.succeeded");
        assert_eq!(e.customer_email.as_deref(), Some("ada@example.com"));
        let EventKind::PaymentSucceeded(p) = e.kind else {
            panic!()
        };
        assert_eq!(p.payment_id.as_str(), "pay_2IjeQm4hqU");
        assert_eq!(p.customer_id.as_str(), "cus_8wM2kq1Zr7");
        assert_eq!(p.product_ids[0].as_str(), "pdt_lifetime_access");
        assert_eq!(p.subscription_id, None);
        assert_eq!(e.business_id.as_str(), "bus_H4ekzPSlcg");

        let e = event(
            "subscription.plan_changed.json",
            "subscription.plan_changed",
        );
        let EventKind::Subscription(t, s) = e.kind else {
            panic!()
        };
        assert_eq!(t, SubscriptionEventType::PlanChanged);
        assert_eq!(s.product_id.as_str(), "pdt_patrons_vip");
        assert_eq!(s.status, SubscriptionStatus::Active);

        assert!(matches!(
            event("refund.succeeded.json", "refund.succeeded").kind,
            EventKind::RefundSucceeded(Refund {
                is_partial: false,
                ..
            })
        ));
        assert!(matches!(
            event("dispute.lost.json", "dispute.lost").kind,
            EventKind::DisputeLost(_)
        ));
        assert!(matches!(
            event("subscription.cancelled.json", "subscription.cancelled").kind,
            EventKind::Subscription(SubscriptionEventType::Cancelled, _)
        ));
        assert!(matches!(
            event("subscription.active.json", "subscription.active").kind,
            EventKind::Subscription(SubscriptionEventType::Active, _)
        ));
    }

    #[test]
    fn timestamps_keep_the_microseconds_postgresql_stores() {
        let mut body: serde_json::Value =
            serde_json::from_slice(&fixture("subscription.active.json")).unwrap();
        body["timestamp"] = "2026-11-20T10:00:00.123456789Z".into();
        let body = serde_json::to_vec(&body).unwrap();
        let Decoded::Event(e) =
            decode(Some("evt_1"), "subscription.active", &body, limits(), now()).unwrap()
        else {
            panic!()
        };
        assert_eq!(
            e.timestamp,
            "2026-11-20T10:00:00.123456Z"
                .parse::<DateTime<Utc>>()
                .unwrap()
        );
    }

    #[test]
    fn ignores_unknown_fields_and_types() {
        let body = br#"{"business_id":"b","type":"customer.created","timestamp":"x","data":{}}"#;
        assert_eq!(
            decode(None, "customer.created", body, limits(), now()).unwrap(),
            Decoded::Ignored {
                event_type: "customer.created".into()
            }
        );
        let mut v: serde_json::Value =
            serde_json::from_slice(&fixture("dispute.lost.json")).unwrap();
        v["data"]["brand_new_field"] = serde_json::json!({"nested": [1, 2]});
        v["extra"] = serde_json::json!(true);
        let body = serde_json::to_vec(&v).unwrap();
        assert!(matches!(
            decode(None, "dispute.lost", &body, limits(), now()),
            Ok(Decoded::Event(_))
        ));
    }

    #[test]
    fn event_id_falls_back_to_body_hash() {
        let body = fixture("dispute.lost.json");
        let a = event_id(None, &body).unwrap();
        assert!(a.as_str().starts_with("sha256:"));
        assert_eq!(a, event_id(Some(""), &body).unwrap());
        assert_eq!(event_id(Some("evt_9"), &body).unwrap().as_str(), "evt_9");
    }

    fn err(body: &[u8], rk: &str) -> DecodeError {
        decode(Some("evt"), rk, body, limits(), now()).unwrap_err()
    }

    #[test]
    fn refuses_what_can_never_succeed() {
        assert_eq!(err(b"{not json", "dispute.lost").code(), "invalid_json");
        assert_eq!(err(b"\xff\xfe", "dispute.lost").code(), "invalid_json");
        let big = vec![b' '; 300 * 1024];
        assert_eq!(err(&big, "dispute.lost").code(), "too_large");
        assert_eq!(
            err(br#"{"business_id":"b","type":"dispute.lost","timestamp":"2026-01-01T00:00:00Z","data":{"dispute_id":"d"}}"#, "dispute.lost"),
            DecodeError::Missing("data.payment_id")
        );
        assert_eq!(
            err(
                br#"{"business_id":5,"type":"dispute.lost"}"#,
                "dispute.lost"
            )
            .code(),
            "wrong_type"
        );
        assert_eq!(
            err(br#"{"business_id":"b","type":"dispute.lost","timestamp":"2026-01-01T00:00:00Z","data":{"dispute_id":"d","payment_id":"x'; drop table grants"}}"#, "dispute.lost").code(),
            "invalid_id"
        );
        assert_eq!(
            err(br#"{"business_id":"b","type":"dispute.lost","timestamp":"2099-01-01T00:00:00Z","data":{}}"#, "dispute.lost").code(),
            "future_timestamp"
        );
        assert_eq!(
            err(br#"{"business_id":"b","type":"dispute.lost","timestamp":"2026-01-01T00:00:00Z","data":{"dispute_id":"d","payment_id":"p","business_id":"other"}}"#, "dispute.lost").code(),
            "business_mismatch"
        );
        assert_eq!(
            err(&fixture("dispute.lost.json"), "payment.succeeded").code(),
            "routing_key_mismatch"
        );
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        assert_eq!(err(deep.as_bytes(), "dispute.lost").code(), "invalid_json");
        let nul = err(br#"{"business_id":"b","type":"dispute.lost","timestamp":"2026-01-01T00:00:00Z","data":{"dispute_id":"d","payment_id":"p","x":["\u0000"]}}"#, "dispute.lost");
        assert_eq!(nul.code(), "nul_character");
        assert!(nul.to_string().contains("/data/x/0"), "{nul}");
    }
}
