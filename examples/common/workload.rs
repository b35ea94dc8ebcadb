//! The ingest benchmarks' workload: a realistic mix of payment events for a business,
//! the catalog it needs, a history of earlier events, and confirmed publishing.
//! Included by the bench examples with `#[path]`.
#![allow(dead_code)]

use std::collections::HashMap;
use std::time::Instant;

use chrono::{DateTime, Utc};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel};
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

/// One event as published: its id, routing key and body.
pub struct Msg {
    pub id: String,
    pub routing_key: String,
    pub body: Vec<u8>,
}

fn base(business: &str, kind: &str, at: DateTime<Utc>, data: Value) -> Value {
    json!({"business_id": business, "type": kind, "timestamp": at.to_rfc3339(), "data": data})
}

fn customer(c: &str) -> Value {
    json!({"customer_id": c, "email": "x@example.com", "name": "X", "metadata": {}, "phone_number": null})
}

/// A realistic mix: checkouts of one-time products, subscriptions starting, renewing,
/// changing plan, cancelling, refunds, lost disputes, events of products without
/// entitlements, and redelivered duplicates.
pub fn workload(n: usize, business: &str) -> Vec<Msg> {
    mix(n, business, "")
}

/// [`workload`] with every id (events, payments, subscriptions, customers, refunds,
/// disputes) starting with `tag`.
fn mix(n: usize, business: &str, tag: &str) -> Vec<Msg> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let t0: DateTime<Utc> = "2026-05-01T00:00:00Z".parse().unwrap();
    let mut out: Vec<Msg> = Vec::with_capacity(n);
    let mut subs: Vec<(String, String, &str)> = Vec::new();
    let mut payments: Vec<String> = Vec::new();
    let mut i = 0usize;
    while out.len() < n {
        i += 1;
        let at = t0 + chrono::Duration::seconds(i as i64);
        let roll: u32 = rng.random_range(0..100);
        let (kind, data) = match roll {
            0..=34 => {
                let pay = format!("{tag}pay_{i}");
                payments.push(pay.clone());
                let product = if rng.random_bool(0.5) {
                    "pdt_life"
                } else {
                    "pdt_bundle"
                };
                (
                    "payment.succeeded",
                    json!({"payload_type": "Payment", "payment_id": pay, "business_id": business,
                    "brand_id": "brd_1", "customer": customer(&format!("{tag}cus_{i}")), "subscription_id": null,
                    "product_cart": [{"product_id": product, "quantity": 1}], "total_amount": 4900, "status": "succeeded"}),
                )
            }
            35..=54 => {
                let sub = format!("{tag}sub_{i}");
                subs.push((sub.clone(), format!("{tag}cus_{i}"), "pdt_monthly"));
                (
                    "subscription.active",
                    sub_data(
                        business,
                        &sub,
                        &format!("{tag}cus_{i}"),
                        "pdt_monthly",
                        "active",
                    ),
                )
            }
            55..=69 if !subs.is_empty() => {
                let (s, c, p) = subs[rng.random_range(0..subs.len())].clone();
                (
                    "subscription.renewed",
                    sub_data(business, &s, &c, p, "active"),
                )
            }
            70..=76 if !subs.is_empty() => {
                let k = rng.random_range(0..subs.len());
                subs[k].2 = "pdt_vip";
                let (s, c, p) = subs[k].clone();
                (
                    "subscription.plan_changed",
                    sub_data(business, &s, &c, p, "active"),
                )
            }
            77..=82 if !subs.is_empty() => {
                let (s, c, p) = subs.swap_remove(rng.random_range(0..subs.len()));
                (
                    "subscription.cancelled",
                    sub_data(business, &s, &c, p, "cancelled"),
                )
            }
            83..=86 if !payments.is_empty() => {
                let pay = payments.swap_remove(rng.random_range(0..payments.len()));
                (
                    "refund.succeeded",
                    json!({"payload_type": "Refund", "refund_id": format!("{tag}ref_{i}"), "payment_id": pay,
                    "business_id": business, "is_partial": false, "amount": 4900}),
                )
            }
            87..=88 if !payments.is_empty() => {
                let pay = payments.swap_remove(rng.random_range(0..payments.len()));
                (
                    "dispute.lost",
                    json!({"payload_type": "Dispute", "dispute_id": format!("{tag}dsp_{i}"), "payment_id": pay,
                    "business_id": business}),
                )
            }
            89..=95 => (
                "payment.succeeded",
                json!({"payload_type": "Payment", "payment_id": format!("{tag}pay_{i}"),
                "business_id": business, "customer": customer(&format!("{tag}cus_{i}")), "subscription_id": null,
                "product_cart": [{"product_id": "pdt_no_entitlements", "quantity": 1}]}),
            ),
            _ if !out.is_empty() => {
                // A redelivered duplicate of an earlier event.
                let k = rng.random_range(0..out.len());
                let dup = Msg {
                    id: out[k].id.clone(),
                    routing_key: out[k].routing_key.clone(),
                    body: out[k].body.clone(),
                };
                out.push(dup);
                continue;
            }
            _ => continue,
        };
        out.push(Msg {
            id: format!("{tag}evt_{i}"),
            routing_key: kind.to_string(),
            body: serde_json::to_vec(&base(business, kind, at, data)).unwrap(),
        });
    }
    out
}

/// [`workload`] of `n` events spread over several businesses: each business's own mix
/// (its ids prefixed with the business, so no two businesses share an event, payment,
/// subscription or customer id, as on the platform), taken in turn, so a batch holds the
/// events of many businesses, as a platform serving many merchants publishes them. With
/// one business, exactly [`workload`].
pub fn workload_of(n: usize, businesses: &[String]) -> Vec<Msg> {
    if let [business] = businesses {
        return workload(n, business);
    }
    let count = businesses.len().max(1);
    let mut each: Vec<std::vec::IntoIter<Msg>> = businesses
        .iter()
        .enumerate()
        .map(|(k, b)| {
            let share = n / count + usize::from(k < n % count);
            mix(share, b, &format!("{b}_")).into_iter()
        })
        .collect();
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        for msgs in &mut each {
            out.extend(msgs.next());
        }
    }
    out
}

fn sub_data(business: &str, sub: &str, cus: &str, product: &str, status: &str) -> Value {
    json!({"payload_type": "Subscription", "subscription_id": sub, "product_id": product, "status": status,
        "customer": customer(cus), "brand_id": "brd_1", "business_id": business, "quantity": 1})
}

/// Publishes `msgs` with publisher confirms, 500 at a time; notes when each id was
/// first sent.
pub async fn publish_all(
    ch: &Channel,
    exchange: &str,
    msgs: &[Msg],
    sent_at: &mut HashMap<String, Instant>,
) {
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    for chunk in msgs.chunks(500) {
        for m in chunk {
            sent_at.entry(m.id.clone()).or_insert_with(Instant::now);
            // The confirm is awaited for the whole chunk by wait_for_confirms below.
            drop(
                ch.basic_publish(
                    exchange.into(),
                    m.routing_key.as_str().into(),
                    BasicPublishOptions::default(),
                    &m.body,
                    BasicProperties::default()
                        .with_delivery_mode(2)
                        .with_message_id(m.id.as_str().into()),
                )
                .await
                .unwrap(),
            );
        }
        ch.wait_for_confirms().await.unwrap();
    }
}

/// The business's catalog: four entitlements and the products the workload buys
/// (`pdt_life`, `pdt_bundle`, `pdt_monthly`, `pdt_vip`); returns the entitlement ids.
pub async fn setup(pool: &sqlx::PgPool, business: &str) -> Vec<String> {
    use guildgate::store::{
        businesses::ensure_business,
        entitlements::{insert_entitlement, set_product_entitlements},
    };
    let mut c = pool.acquire().await.unwrap();
    ensure_business(&mut c, business).await.unwrap();
    let mut ents = Vec::new();
    for i in 0..4 {
        ents.push(
            insert_entitlement(
                &mut c,
                business,
                &format!("Role {i}"),
                "123456789012345678",
                Some(&format!("{}", 1000 + i)),
            )
            .await
            .unwrap()
            .id,
        );
    }
    for (product, range) in [
        ("pdt_life", 0..1),
        ("pdt_bundle", 0..2),
        ("pdt_monthly", 1..3),
        ("pdt_vip", 2..4),
    ] {
        set_product_entitlements(&mut c, business, product, &ents[range])
            .await
            .unwrap();
    }
    ents
}

/// Fills a fresh database with what a deployment that has run for a while holds:
/// `n` earlier events' payments (grant and event ids start with `old_` and the business,
/// so several businesses can be seeded), subscriptions, grants (some revoked), processed ids and
/// reversals, then ANALYZEs, as autovacuum would have by then. Without it every table
/// starts empty and the planner's first plans (sequential scans of tiny tables) are
/// measured as the tables grow, which no running deployment sees for long.
pub async fn seed_history(pool: &sqlx::PgPool, business: &str, ents: &[String], n: usize) {
    if n == 0 {
        return;
    }
    let n = n as i32;
    let statements = [
        "INSERT INTO payments (payment_id, business_id, customer_id, subscription_id)
         SELECT 'old_pay_' || i, $1, 'old_cus_' || i, CASE WHEN i % 3 = 0 THEN 'old_sub_' || i END
         FROM generate_series(1, $2) AS i",
        "INSERT INTO subscriptions (subscription_id, business_id, customer_id, product_id, status, last_event_at)
         SELECT 'old_sub_' || i, $1, 'old_cus_' || i, 'pdt_monthly',
                CASE WHEN i % 5 = 0 THEN 'cancelled' ELSE 'active' END, now() - interval '30 days'
         FROM generate_series(3, $2, 3) AS i",
        "INSERT INTO grants (id, business_id, brand_id, entitlement_id, customer_id, payment_id,
             subscription_id, status, delivered_at, revoked_at, revocation_reason, oauth_nonce,
             oauth_expires_at, created_at, updated_at)
         SELECT 'old_' || $1 || '_gr_' || i, $1, 'brd_1', ($3::text[])[1 + i % 4], 'old_cus_' || i,
                CASE WHEN i % 3 <> 0 THEN 'old_pay_' || i END,
                CASE WHEN i % 3 = 0 THEN 'old_sub_' || i END,
                CASE WHEN i % 10 = 0 THEN 'Revoked' WHEN i % 2 = 0 THEN 'Delivered' ELSE 'Pending' END,
                CASE WHEN i % 2 = 0 THEN now() - interval '29 days' END,
                CASE WHEN i % 10 = 0 THEN now() - interval '1 day' END,
                CASE WHEN i % 10 = 0 THEN 'subscription_cancelled' END,
                md5(i::text), now() - interval '23 days', now() - interval '30 days', now() - interval '1 day'
         FROM generate_series(1, $2) AS i",
        "INSERT INTO processed_events (event_id, event_type, business_id, outcome)
         SELECT 'old_' || $1 || '_evt_' || i, 'payment.succeeded', $1, 'applied' FROM generate_series(1, $2) AS i",
        "INSERT INTO payment_reversals (payment_id, reason, business_id)
         SELECT 'old_pay_' || i, 'refund', $1 FROM generate_series(20, $2, 20) AS i",
    ];
    for sql in statements {
        let q = sqlx::query(sql).bind(business).bind(n);
        let q = if sql.contains("$3") { q.bind(ents) } else { q };
        q.execute(pool).await.unwrap();
    }
    sqlx::query("ANALYZE").execute(pool).await.unwrap();
}
