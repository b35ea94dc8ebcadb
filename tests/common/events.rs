//! Payment events in the platform's real shape, built from `tests/fixtures/contract/events`
//! with the ids and timestamps a test needs.

use serde_json::{Value, json};

const FIXTURES: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/contract/events"
);

pub fn fixture(name: &str) -> Value {
    serde_json::from_slice(&std::fs::read(format!("{FIXTURES}/{name}")).unwrap()).unwrap()
}

/// A one-time `payment.succeeded` for `products`.
pub fn payment(
    business: &str,
    payment_id: &str,
    customer: &str,
    products: &[&str],
    at: &str,
) -> Value {
    let mut e = fixture("payment.succeeded.one_time.json");
    e["business_id"] = json!(business);
    e["timestamp"] = json!(at);
    e["data"]["business_id"] = json!(business);
    e["data"]["payment_id"] = json!(payment_id);
    e["data"]["customer"]["customer_id"] = json!(customer);
    e["data"]["product_cart"] = products
        .iter()
        .map(|p| json!({"product_id": p, "quantity": 1}))
        .collect();
    e
}

/// A subscription's `payment.succeeded`.
pub fn subscription_payment(
    business: &str,
    payment_id: &str,
    customer: &str,
    sub: &str,
    product: &str,
    at: &str,
) -> Value {
    let mut e = payment(business, payment_id, customer, &[product], at);
    e["data"]["subscription_id"] = json!(sub);
    e
}

/// A `subscription.<kind>` event whose snapshot has `status`.
pub fn subscription(
    kind: &str,
    business: &str,
    sub: &str,
    customer: &str,
    product: &str,
    status: &str,
    at: &str,
) -> Value {
    let mut e = fixture("subscription.active.json");
    e["type"] = json!(format!("subscription.{kind}"));
    e["business_id"] = json!(business);
    e["timestamp"] = json!(at);
    e["data"]["subscription_id"] = json!(sub);
    e["data"]["product_id"] = json!(product);
    e["data"]["status"] = json!(status);
    e["data"]["customer"]["customer_id"] = json!(customer);
    e
}

pub fn refund(business: &str, payment_id: &str, partial: bool, at: &str) -> Value {
    let mut e = fixture("refund.succeeded.json");
    e["business_id"] = json!(business);
    e["timestamp"] = json!(at);
    e["data"]["business_id"] = json!(business);
    e["data"]["payment_id"] = json!(payment_id);
    e["data"]["is_partial"] = json!(partial);
    e
}

pub fn dispute_lost(business: &str, payment_id: &str, at: &str) -> Value {
    let mut e = fixture("dispute.lost.json");
    e["business_id"] = json!(business);
    e["timestamp"] = json!(at);
    e["data"]["business_id"] = json!(business);
    e["data"]["payment_id"] = json!(payment_id);
    e
}
