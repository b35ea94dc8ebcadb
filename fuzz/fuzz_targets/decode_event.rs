//! `decode` on arbitrary bytes: the first byte picks the routing key and whether a
//! `message_id` is given; the rest is the body. It must never panic, and a refusal must
//! carry one of the documented reason codes.
#![no_main]

use guildgate::events::decode::{DecodeLimits, decode};
use libfuzzer_sys::fuzz_target;

const KEYS: [&str; 6] = [
    "",
    "payment.succeeded",
    "refund.succeeded",
    "dispute.lost",
    "subscription.active",
    "subscription.plan_changed",
];

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

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let routing_key = KEYS[selector as usize % KEYS.len()];
    let message_id = (selector & 0x80 != 0).then_some("evt_fuzz");
    let limits = DecodeLimits {
        max_bytes: 256 * 1024,
        max_future_skew: chrono::Duration::hours(1),
    };
    let now = chrono::DateTime::from_timestamp(1_795_000_000, 0).unwrap();
    if let Err(e) = decode(message_id, routing_key, body, limits, now) {
        assert!(CODES.contains(&e.code()), "{e:?}");
    }
});
