//! Property tests of the two parsers that read bytes from outside:
//! payment event decoding and Discord's rate-limit headers. They run in CI with few
//! cases; the `fuzz/` crate runs the same functions under libFuzzer for longer.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use guildgate::discord::ratelimit::Observed;
use guildgate::domain::event::{EventKind, SubscriptionEventType};
use guildgate::events::decode::DecodeLimits;
use guildgate::events::{Decoded, decode};
use proptest::prelude::*;
use serde_json::{Value, json};

const CODES: [&str; 9] = [
    "too_large",
    "invalid_json",
    "missing_field",
    "wrong_type",
    "invalid_id",
    "business_mismatch",
    "future_timestamp",
    "routing_key_mismatch",
    "nul_character",
];

const TYPES: [&str; 13] = [
    "payment.succeeded",
    "refund.succeeded",
    "dispute.lost",
    "subscription.active",
    "subscription.renewed",
    "subscription.updated",
    "subscription.on_hold",
    "subscription.paused",
    "subscription.unpaused",
    "subscription.cancelled",
    "subscription.expired",
    "subscription.failed",
    "subscription.plan_changed",
];

fn limits() -> DecodeLimits {
    DecodeLimits {
        max_bytes: 64 * 1024,
        max_future_skew: chrono::Duration::hours(1),
    }
}

fn now() -> DateTime<Utc> {
    "2026-11-25T00:00:00Z".parse().unwrap()
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Any JSON value, a few levels deep.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|f| json!(f)),
        ".{0,20}".prop_map(Value::String),
        "[a-z_]{1,10}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_]{1,12}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A value for an id field: usually well-formed, sometimes anything.
fn id_like() -> impl Strategy<Value = Value> {
    prop_oneof![
        3 => "[A-Za-z0-9_.:-]{1,20}".prop_map(Value::String),
        1 => ".{0,140}".prop_map(Value::String),
        1 => any_json(),
    ]
}

/// An envelope of a known type whose fields are a mix of plausible and arbitrary values:
/// gets far deeper into `decode` than random bytes do.
fn near_valid_event() -> impl Strategy<Value = (String, Value)> {
    (
        prop::sample::select(TYPES.to_vec()),
        id_like(),
        prop_oneof![
            Just(json!("2026-05-01T10:31:00Z")),
            Just(json!("2999-01-01T00:00:00Z")),
            any_json()
        ],
        prop::collection::btree_map(
            prop::sample::select(vec![
                "payment_id",
                "refund_id",
                "dispute_id",
                "subscription_id",
                "product_id",
                "business_id",
                "brand_id",
                "status",
                "is_partial",
                "customer",
                "product_cart",
            ]),
            prop_oneof![
                id_like(),
                id_like().prop_map(|v| json!({ "customer_id": v })),
                prop::collection::vec(id_like(), 0..3).prop_map(|v| {
                    Value::Array(v.into_iter().map(|p| json!({ "product_id": p })).collect())
                }),
            ],
            0..11,
        ),
    )
        .prop_map(|(t, business, ts, data)| {
            let data: serde_json::Map<String, Value> =
                data.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
            (
                t.to_string(),
                json!({"business_id": business, "type": t, "timestamp": ts, "data": data}),
            )
        })
}

fn id() -> impl Strategy<Value = String> {
    "[A-Za-z0-9_.:-]{1,128}"
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn decode_never_panics_on_arbitrary_bytes(
        body in prop::collection::vec(any::<u8>(), 0..512),
        message_id in prop::option::of(".{0,40}"),
        routing_key in prop_oneof![Just(String::new()), prop::sample::select(TYPES.to_vec()).prop_map(String::from), ".{0,30}"],
    ) {
        if let Err(e) = decode(message_id.as_deref(), &routing_key, &body, limits(), now()) {
            prop_assert!(CODES.contains(&e.code()));
            prop_assert!(!e.to_string().is_empty());
        }
    }

    #[test]
    fn decode_never_panics_on_arbitrary_json(v in any_json(), routing_key in prop::sample::select(TYPES.to_vec())) {
        let body = serde_json::to_vec(&v).unwrap();
        if let Err(e) = decode(Some("evt_1"), routing_key, &body, limits(), now()) {
            prop_assert!(CODES.contains(&e.code()));
        }
    }

    /// Whatever a nearly valid event holds, decoding either refuses it with a known code
    /// or yields an event whose type is the routing key's and whose timestamp is not in
    /// the future beyond the skew.
    #[test]
    fn near_valid_events_decode_or_are_refused_with_a_code((t, v) in near_valid_event()) {
        let body = serde_json::to_vec(&v).unwrap();
        match decode(None, &t, &body, limits(), now()) {
            Ok(Decoded::Event(e)) => {
                prop_assert_eq!(e.type_name(), t.as_str());
                prop_assert!(e.timestamp <= now() + limits().max_future_skew);
                prop_assert!(e.id.as_str().starts_with("sha256:"));
                prop_assert_eq!(Some(e.business_id.as_str()), v["business_id"].as_str());
            }
            Ok(Decoded::Ignored { event_type }) => prop_assert!(false, "known type {} ignored", event_type),
            Err(e) => prop_assert!(CODES.contains(&e.code())),
        }
    }

    /// Every body over the limit is refused as too large before anything else is read.
    #[test]
    fn oversized_bodies_are_too_large(extra in 1usize..2048, byte in any::<u8>()) {
        let body = vec![byte; limits().max_bytes + extra];
        let e = decode(Some("evt_1"), "payment.succeeded", &body, limits(), now()).unwrap_err();
        prop_assert_eq!(e.code(), "too_large");
    }

    /// Valid generated events decode to exactly the fields they were built from.
    #[test]
    fn valid_events_round_trip(
        kind in 0usize..4,
        sub_type in prop::sample::select(TYPES[3..].to_vec()),
        business in id(),
        a in id(),
        b in id(),
        c in id(),
        brand in prop::option::of(id()),
        products in prop::collection::vec(id(), 0..4),
        sub_of_payment in prop::option::of(id()),
        partial in any::<bool>(),
        status in prop::sample::select(vec!["active", "on_hold", "paused", "cancelled", "expired", "failed", "pending", "something_new"]),
        secs in 0i64..1_700_000_000,
        message_id in prop::option::of(id()),
    ) {
        let at = Utc.timestamp_opt(secs, 0).unwrap();
        let ts = at.to_rfc3339();
        let (t, data) = match kind {
            0 => ("payment.succeeded", json!({
                "payment_id": a, "business_id": business, "brand_id": brand,
                "customer": {"customer_id": b, "email": "<b>x</b>@example.com"},
                "subscription_id": sub_of_payment,
                "product_cart": products.iter().map(|p| json!({"product_id": p, "quantity": 1})).collect::<Vec<_>>(),
            })),
            1 => ("refund.succeeded", json!({"refund_id": a, "payment_id": b, "business_id": business, "is_partial": partial})),
            2 => ("dispute.lost", json!({"dispute_id": a, "payment_id": b})),
            _ => (sub_type, json!({
                "subscription_id": a, "product_id": c, "status": status, "brand_id": brand,
                "customer": {"customer_id": b}, "business_id": business,
            })),
        };
        let body = serde_json::to_vec(&json!({"business_id": business, "type": t, "timestamp": ts, "data": data})).unwrap();
        let decoded = decode(message_id.as_deref(), t, &body, limits(), now());
        let Ok(Decoded::Event(e)) = decoded else {
            return Err(TestCaseError::fail(format!("{decoded:?}")));
        };
        prop_assert_eq!(e.business_id.as_str(), business.as_str());
        prop_assert_eq!(e.timestamp, at);
        prop_assert_eq!(e.type_name(), t);
        match &message_id {
            Some(m) => prop_assert_eq!(e.id.as_str(), m.as_str()),
            None => prop_assert!(e.id.as_str().starts_with("sha256:")),
        }
        match e.kind {
            EventKind::PaymentSucceeded(p) => {
                prop_assert_eq!(p.payment_id.as_str(), a.as_str());
                prop_assert_eq!(p.customer_id.as_str(), b.as_str());
                prop_assert_eq!(p.brand_id.as_ref().map(|x| x.as_str()), brand.as_deref());
                prop_assert_eq!(p.subscription_id.as_ref().map(|x| x.as_str()), sub_of_payment.as_deref());
                let got: Vec<&str> = p.product_ids.iter().map(|x| x.as_str()).collect();
                prop_assert_eq!(got, products.iter().map(String::as_str).collect::<Vec<_>>());
            }
            EventKind::RefundSucceeded(r) => {
                prop_assert_eq!(r.refund_id, a);
                prop_assert_eq!(r.payment_id.as_str(), b.as_str());
                prop_assert_eq!(r.is_partial, partial);
            }
            EventKind::DisputeLost(d) => {
                prop_assert_eq!(d.dispute_id, a);
                prop_assert_eq!(d.payment_id.as_str(), b.as_str());
            }
            EventKind::Subscription(st, s) => {
                prop_assert_eq!(Some(st), SubscriptionEventType::parse(sub_type));
                prop_assert_eq!(s.subscription_id.as_str(), a.as_str());
                prop_assert_eq!(s.customer_id.as_str(), b.as_str());
                prop_assert_eq!(s.product_id.as_str(), c.as_str());
                prop_assert_eq!(s.brand_id.as_ref().map(|x| x.as_str()), brand.as_deref());
                prop_assert_eq!(s.status.as_str(), status);
            }
        }
    }
}

const RATE_LIMIT_HEADERS: [&str; 8] = [
    "x-ratelimit-bucket",
    "x-ratelimit-limit",
    "x-ratelimit-remaining",
    "x-ratelimit-reset-after",
    "x-ratelimit-reset",
    "x-ratelimit-global",
    "x-ratelimit-scope",
    "retry-after",
];

/// A header value: numbers in Discord's formats, their edge cases, or anything.
fn header_value() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<u32>().prop_map(|n| n.to_string()),
        any::<u64>().prop_map(|n| n.to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|f| f.to_string()),
        (0u32..100_000, 0u32..1000).prop_map(|(s, ms)| format!("{s}.{ms:03}")),
        prop::sample::select(vec![
            "", " ", "NaN", "inf", "-inf", "-0", "1e308", "1e400", "true", "TRUE", "false",
            "global", "shared", "user", "+5", "0x10", "1_000", "١٢",
        ])
        .prop_map(String::from),
        ".{0,24}",
    ]
}

proptest! {
    #![proptest_config(config())]

    /// Any headers: no panic, durations are finite and non-negative, `retry_after` only
    /// on a 429, and `global` only for a literal "true".
    #[test]
    fn rate_limit_parser_never_panics(
        status in prop_oneof![Just(429u16), Just(200u16), any::<u16>()],
        headers in prop::collection::hash_map(prop::sample::select(RATE_LIMIT_HEADERS.to_vec()), header_value(), 0..8),
        body_retry in prop::option::of(any::<f64>()),
        body_global in prop::option::of(any::<bool>()),
    ) {
        let o = Observed::parse(status, |name| headers.get(name).cloned());
        prop_assert_eq!(o.status, status);
        if status != 429 {
            prop_assert_eq!(o.retry_after, None);
        }
        prop_assert_eq!(
            o.global,
            headers.get("x-ratelimit-global").is_some_and(|v| v.eq_ignore_ascii_case("true"))
        );
        prop_assert_eq!(o.bucket.as_ref(), headers.get("x-ratelimit-bucket"));
        let o = o.with_body_retry_after(body_retry, body_global);
        if let Some(r) = o.retry_after {
            prop_assert!(r.as_secs_f64().is_finite());
        }
    }

    /// Well-formed values are read exactly: whole numbers for limit and remaining (so
    /// `remaining <= limit` holds whenever Discord's headers say so), seconds with
    /// millisecond precision for the reset.
    #[test]
    fn rate_limit_parser_reads_discords_numbers(
        limit in any::<u32>(),
        used in any::<u32>(),
        reset_ms in 0u64..10_000_000,
        pad in prop::sample::select(vec!["", " ", "  "]),
    ) {
        let remaining = limit.saturating_sub(used);
        let headers: HashMap<&str, String> = [
            ("x-ratelimit-limit", format!("{pad}{limit}{pad}")),
            ("x-ratelimit-remaining", format!("{pad}{remaining}")),
            ("x-ratelimit-reset-after", format!("{}.{:03}", reset_ms / 1000, reset_ms % 1000)),
            ("retry-after", format!("{}", reset_ms / 1000)),
        ].into_iter().collect();
        let o = Observed::parse(429, |name| headers.get(name).cloned());
        prop_assert_eq!(o.limit, Some(limit));
        prop_assert_eq!(o.remaining, Some(remaining));
        prop_assert!(o.remaining <= o.limit);
        let reset = o.reset_after.unwrap();
        prop_assert!(reset.abs_diff(Duration::from_millis(reset_ms)) < Duration::from_micros(1));
        prop_assert_eq!(o.retry_after, Some(Duration::from_secs(reset_ms / 1000)));
    }
}
