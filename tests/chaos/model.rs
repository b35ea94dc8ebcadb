//! The chaos scenarios' traffic and what it must lead to.
//!
//! [`generate`] writes a realistic mix of payment events (checkouts, renewals,
//! cancellations, pauses, plan changes, one-time purchases, refunds, lost disputes,
//! refunds before their payment, duplicates under the same and under another id, stale
//! snapshots, other merchants' traffic) as *stories*, one per subscription or payment,
//! laid out in rounds: a round holds at most one event of each story (plus exact
//! duplicates), so events of one subscription are applied in publish order whatever the
//! consumers interleave, and the outcome is deterministic.
//!
//! [`Model`] applies the event table of docs/architecture.md to those events, written here
//! from the table and never from guildgate's own decision code: a test that asks the code under
//! test what to expect cannot fail.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use chrono::{DateTime, Duration as ChronoDuration, SecondsFormat, Utc};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::Value;

use crate::common::events;

/// The merchant with most of the traffic: two roles in one server, a membership-only
/// server, subscriptions and one-time products.
pub const MAIN: &str = "bus_ChaosMain01";
/// A second merchant with its own server and webhook endpoint.
pub const OTHER: &str = "bus_ChaosOther2";
/// A merchant without entitlements: its events are acknowledged and nothing else.
pub const NONE: &str = "bus_ChaosNone03";

/// Entitlements: (name, business, guild, role; `None` = membership only).
pub const ENTITLEMENTS: [(&str, &str, &str, Option<&str>); 4] = [
    ("gold", MAIN, "Main", Some("Gold")),
    ("silver", MAIN, "Main", Some("Silver")),
    ("club", MAIN, "Club", None),
    ("member", OTHER, "Other", Some("Member")),
];

/// Products and the entitlements attached to them.
pub const PRODUCTS: [(&str, &str, &[&str]); 6] = [
    (MAIN, "pdt_basic", &["silver"]),
    (MAIN, "pdt_pro", &["silver", "gold"]),
    (MAIN, "pdt_club", &["club"]),
    (MAIN, "pdt_life", &["gold"]),
    (MAIN, "pdt_bundle", &["gold", "club"]),
    (OTHER, "pdt_other", &["member"]),
];

fn product_entitlements(product: &str) -> &'static [&'static str] {
    PRODUCTS
        .iter()
        .find(|(_, p, _)| *p == product)
        .map(|(_, _, e)| *e)
        .unwrap_or(&[])
}

/// A payment event as the model sees it.
#[derive(Clone, Debug)]
pub enum Ev {
    Payment {
        business: &'static str,
        payment: String,
        customer: String,
        products: Vec<&'static str>,
        subscription: Option<String>,
    },
    Refund {
        business: &'static str,
        payment: String,
        partial: bool,
    },
    DisputeLost {
        business: &'static str,
        payment: String,
    },
    Subscription {
        business: &'static str,
        kind: &'static str,
        subscription: String,
        customer: String,
        product: &'static str,
        status: &'static str,
        at: i64,
    },
}

/// One message to publish.
#[derive(Clone, Debug)]
pub struct Msg {
    pub routing_key: String,
    pub message_id: String,
    pub body: Vec<u8>,
    pub ev: Ev,
}

/// A customer of a merchant; linked ones connected Discord before the traffic starts.
#[derive(Clone, Debug)]
pub struct Customer {
    pub business: &'static str,
    pub id: String,
    pub linked: bool,
}

pub struct Plan {
    pub rounds: Vec<Vec<Msg>>,
    pub customers: Vec<Customer>,
}

impl Plan {
    pub fn messages(&self) -> usize {
        self.rounds.iter().map(Vec::len).sum()
    }

    pub fn linked(&self) -> impl Iterator<Item = &Customer> {
        self.customers.iter().filter(|c| c.linked)
    }
}

/// How long a story is, in rounds.
const ROUNDS: usize = 4;

struct Gen {
    rng: StdRng,
    base: DateTime<Utc>,
    n: usize,
}

impl Gen {
    fn id(&mut self, prefix: &str) -> String {
        self.n += 1;
        format!("{prefix}_{:06}", self.n)
    }

    /// A timestamp in round `round`, `offset` seconds in (rounds are 600 s apart).
    fn at(&self, round: usize, offset: i64) -> i64 {
        self.base.timestamp() + round as i64 * 600 + offset
    }

    /// A timestamp in round `round`, at a random moment of its first 200 s.
    fn at_some(&mut self, round: usize) -> i64 {
        let offset = self.rng.random_range(0..200);
        self.at(round, offset)
    }
}

fn rfc3339(at: i64) -> String {
    DateTime::<Utc>::from_timestamp(at, 0)
        .unwrap()
        .to_rfc3339_opts(SecondsFormat::Secs, true)
}

impl Ev {
    pub fn routing_key(&self) -> String {
        match self {
            Ev::Payment { .. } => "payment.succeeded".into(),
            Ev::Refund { .. } => "refund.succeeded".into(),
            Ev::DisputeLost { .. } => "dispute.lost".into(),
            Ev::Subscription { kind, .. } => format!("subscription.{kind}"),
        }
    }

    /// The platform's JSON for this event, stamped `at`.
    fn body(&self, at: i64) -> Value {
        let ts = rfc3339(at);
        match self {
            Ev::Payment {
                business,
                payment,
                customer,
                products,
                subscription,
            } => match subscription {
                Some(sub) => {
                    events::subscription_payment(business, payment, customer, sub, products[0], &ts)
                }
                None => events::payment(business, payment, customer, products, &ts),
            },
            Ev::Refund {
                business,
                payment,
                partial,
            } => events::refund(business, payment, *partial, &ts),
            Ev::DisputeLost { business, payment } => events::dispute_lost(business, payment, &ts),
            Ev::Subscription {
                business,
                kind,
                subscription,
                customer,
                product,
                status,
                ..
            } => events::subscription(kind, business, subscription, customer, product, status, &ts),
        }
    }
}

/// Writes about `events` messages for customers of which `linked_share` linked Discord.
pub fn generate(events: usize, seed: u64, linked_share: f64) -> Plan {
    let mut g = Gen {
        rng: StdRng::seed_from_u64(seed),
        base: Utc::now() - ChronoDuration::days(3),
        n: 0,
    };
    // About one customer per three stories, so customers hold several grants at once.
    let stories_estimate = (events / 3).max(4);
    let mut customers = Vec::new();
    for (business, share) in [(MAIN, 0.85), (OTHER, 0.10), (NONE, 0.05)] {
        let n = ((stories_estimate as f64 * share / 3.0).ceil() as usize).max(2);
        for i in 0..n {
            customers.push(Customer {
                business,
                id: format!(
                    "cus_{}{i:05}",
                    if business == MAIN {
                        "m"
                    } else if business == OTHER {
                        "o"
                    } else {
                        "n"
                    }
                ),
                // Customers of the merchant without entitlements never link anything.
                linked: business != NONE && g.rng.random_bool(linked_share),
            });
        }
    }
    let pick = |g: &mut Gen, business: &str| -> String {
        let of: Vec<&Customer> = customers
            .iter()
            .filter(|c| c.business == business)
            .collect();
        of[g.rng.random_range(0..of.len())].id.clone()
    };

    let mut rounds: Vec<Vec<Msg>> = vec![Vec::new(); ROUNDS + 1];
    let mut total = 0;
    while total < events {
        let roll = g.rng.random_range(0..100);
        // A story: (events with their timestamps, in round order).
        let mut story: Vec<(Ev, i64)> = Vec::new();
        let start = g.rng.random_range(0..ROUNDS - 2);
        let sub = |g: &mut Gen,
                   business: &'static str,
                   customer: &str,
                   sub_id: &str,
                   steps: &[(&'static str, &'static str, &'static str)]|
         -> Vec<(Ev, i64)> {
            steps
                .iter()
                .enumerate()
                .map(|(i, (kind, product, status))| {
                    let at = g.at_some(start + i);
                    (
                        Ev::Subscription {
                            business,
                            kind,
                            subscription: sub_id.to_string(),
                            customer: customer.to_string(),
                            product,
                            status,
                            at,
                        },
                        at,
                    )
                })
                .collect()
        };
        match roll {
            // Checkout, renewals with their payments.
            0..=21 => {
                let (c, s) = (pick(&mut g, MAIN), g.id("sub"));
                let p = ["pdt_basic", "pdt_pro", "pdt_club"][g.rng.random_range(0..3)];
                story = sub(
                    &mut g,
                    MAIN,
                    &c,
                    &s,
                    &[
                        ("active", p, "active"),
                        ("renewed", p, "active"),
                        ("renewed", p, "active"),
                    ],
                );
                // The renewal's payment, in the round of the first renewal.
                let pay = g.id("pay");
                let at = story[1].1 + 1;
                story.insert(
                    2,
                    (
                        Ev::Payment {
                            business: MAIN,
                            payment: pay,
                            customer: c,
                            products: vec![p],
                            subscription: Some(s),
                        },
                        at,
                    ),
                );
            }
            // Cancelled, expired or failed after a while.
            22..=37 => {
                let (c, s) = (pick(&mut g, MAIN), g.id("sub"));
                let p = ["pdt_basic", "pdt_pro"][g.rng.random_range(0..2)];
                let end = [
                    ("cancelled", "cancelled"),
                    ("expired", "expired"),
                    ("failed", "failed"),
                ][g.rng.random_range(0..3)];
                story = sub(
                    &mut g,
                    MAIN,
                    &c,
                    &s,
                    &[
                        ("active", p, "active"),
                        ("renewed", p, "active"),
                        (end.0, p, end.1),
                    ],
                );
            }
            // Plan changes: up, then sideways to another server or back down.
            38..=49 => {
                let (c, s) = (pick(&mut g, MAIN), g.id("sub"));
                let last = ["pdt_basic", "pdt_club"][g.rng.random_range(0..2)];
                story = sub(
                    &mut g,
                    MAIN,
                    &c,
                    &s,
                    &[
                        ("active", "pdt_basic", "active"),
                        ("plan_changed", "pdt_pro", "active"),
                        ("plan_changed", last, "active"),
                    ],
                );
            }
            // Paused and unpaused, or on hold and active again: a new grant each time.
            50..=59 => {
                let (c, s) = (pick(&mut g, MAIN), g.id("sub"));
                let p = ["pdt_pro", "pdt_club"][g.rng.random_range(0..2)];
                let steps: [(&'static str, &'static str, &'static str); 3] =
                    if g.rng.random_bool(0.5) {
                        [
                            ("active", p, "active"),
                            ("paused", p, "paused"),
                            ("unpaused", p, "active"),
                        ]
                    } else {
                        [
                            ("active", p, "active"),
                            ("on_hold", p, "on_hold"),
                            ("active", p, "active"),
                        ]
                    };
                story = sub(&mut g, MAIN, &c, &s, &steps);
            }
            // A stale snapshot: the cancellation arrives before an older renewal.
            60..=64 => {
                let (c, s) = (pick(&mut g, MAIN), g.id("sub"));
                story = sub(
                    &mut g,
                    MAIN,
                    &c,
                    &s,
                    &[
                        ("active", "pdt_basic", "active"),
                        ("cancelled", "pdt_basic", "cancelled"),
                        ("renewed", "pdt_basic", "active"),
                    ],
                );
                let older = g.at(start, 300);
                if let Ev::Subscription { at, .. } = &mut story[2].0 {
                    *at = older;
                }
                story[2].1 = older;
            }
            // One-time purchases, some refunded (fully or partly) or lost in a dispute.
            65..=81 => {
                let c = pick(&mut g, MAIN);
                let pay = g.id("pay");
                let products = match g.rng.random_range(0..3) {
                    0 => vec!["pdt_life"],
                    1 => vec!["pdt_bundle"],
                    _ => vec!["pdt_life", "pdt_bundle"], // gold twice in one cart
                };
                let at = g.at_some(start);
                story.push((
                    Ev::Payment {
                        business: MAIN,
                        payment: pay.clone(),
                        customer: c,
                        products,
                        subscription: None,
                    },
                    at,
                ));
                let at = g.at_some(start + 1);
                match g.rng.random_range(0..6) {
                    0 | 1 => story.push((
                        Ev::Refund {
                            business: MAIN,
                            payment: pay,
                            partial: false,
                        },
                        at,
                    )),
                    2 => story.push((
                        Ev::Refund {
                            business: MAIN,
                            payment: pay,
                            partial: true,
                        },
                        at,
                    )),
                    3 => story.push((
                        Ev::DisputeLost {
                            business: MAIN,
                            payment: pay,
                        },
                        at,
                    )),
                    _ => {}
                }
            }
            // The refund or lost dispute arrives before its payment.
            82..=84 => {
                let c = pick(&mut g, MAIN);
                let pay = g.id("pay");
                let first = if g.rng.random_bool(0.5) {
                    Ev::Refund {
                        business: MAIN,
                        payment: pay.clone(),
                        partial: false,
                    }
                } else {
                    Ev::DisputeLost {
                        business: MAIN,
                        payment: pay.clone(),
                    }
                };
                story.push((first, g.at_some(start)));
                story.push((
                    Ev::Payment {
                        business: MAIN,
                        payment: pay,
                        customer: c,
                        products: vec!["pdt_life"],
                        subscription: None,
                    },
                    g.at_some(start + 1),
                ));
            }
            // The other merchant's subscriptions.
            85..=92 => {
                let (c, s) = (pick(&mut g, OTHER), g.id("sub"));
                let last = if g.rng.random_bool(0.5) {
                    ("renewed", "active")
                } else {
                    ("cancelled", "cancelled")
                };
                story = sub(
                    &mut g,
                    OTHER,
                    &c,
                    &s,
                    &[
                        ("active", "pdt_other", "active"),
                        (last.0, "pdt_other", last.1),
                    ],
                );
            }
            // Traffic of a merchant without entitlements.
            _ => {
                let c = pick(&mut g, NONE);
                let pay = g.id("pay");
                story.push((
                    Ev::Payment {
                        business: NONE,
                        payment: pay,
                        customer: c,
                        products: vec!["pdt_x"],
                        subscription: None,
                    },
                    g.at_some(start),
                ));
            }
        }
        // Lay the story out: one event per round, except that a subscription's payment
        // shares its round with the renewal it paid for (different aggregates).
        let mut round = start;
        let mut previous_was_sub = false;
        for (ev, at) in story {
            let is_sub_payment = matches!(
                &ev,
                Ev::Payment {
                    subscription: Some(_),
                    ..
                }
            );
            if is_sub_payment && previous_was_sub {
                round -= 1;
            }
            previous_was_sub = matches!(ev, Ev::Subscription { .. });
            let id = g.id("evt");
            let msg = Msg {
                routing_key: ev.routing_key(),
                message_id: id.clone(),
                body: serde_json::to_vec(&ev.body(at)).unwrap(),
                ev: ev.clone(),
            };
            total += 1;
            // Exact duplicates (a redelivery by the platform): same id and body, in the
            // same round or a later one.
            if g.rng.random_bool(0.03) {
                let later = g.rng.random_range(round..=ROUNDS);
                rounds[later].push(msg.clone());
                total += 1;
            }
            // The same one-time payment under another event id.
            if matches!(&ev, Ev::Payment { subscription: None, business, .. } if *business != NONE)
                && g.rng.random_bool(0.1)
            {
                let mut again = msg.clone();
                again.message_id = g.id("evt");
                rounds[round].push(again);
                total += 1;
            }
            rounds[round].push(msg);
            round += 1;
        }
    }
    for r in &mut rounds {
        r.shuffle(&mut g.rng);
    }
    rounds.retain(|r| !r.is_empty());
    Plan { rounds, customers }
}

/// Where a grant comes from.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Source {
    Subscription(String),
    Payment(String),
}

/// (entitlement name, customer, source): at most one live grant each.
pub type GrantKey = (&'static str, String, Source);

#[derive(Clone, Debug)]
pub struct ModelGrant {
    pub key: GrantKey,
    /// The revocation reason once revoked.
    pub revoked: Option<&'static str>,
}

/// The event table of docs/architecture.md, applied in order.
#[derive(Default)]
pub struct Model {
    pub grants: Vec<ModelGrant>,
    live: HashMap<GrantKey, usize>,
    seen_ids: HashSet<String>,
    last_snapshot: HashMap<String, i64>,
    reversed: HashSet<String>,
    subscription_payments: HashSet<String>,
    /// One-time payments applied, under whichever event id came first.
    payments_applied: HashSet<String>,
    /// Event ids guildgate records (every event of a merchant with entitlements, except
    /// partial refunds, exact duplicates, a payment again under another id and events of
    /// unknown subscriptions).
    pub recorded: usize,
}

impl Model {
    pub fn apply(&mut self, msg: &Msg) {
        if !self.seen_ids.insert(msg.message_id.clone()) {
            return; // the same event again
        }
        match &msg.ev {
            Ev::Payment {
                business,
                payment,
                customer,
                products,
                subscription,
            } => {
                if *business == NONE {
                    return;
                }
                if subscription.is_none() && !self.payments_applied.insert(payment.clone()) {
                    // The same payment under another event id: a repeat, recognised by
                    // the payment recorded, and not recorded itself.
                    return;
                }
                self.recorded += 1;
                if subscription.is_some() {
                    // A subscription's payment grants nothing; its subscription decides.
                    self.subscription_payments.insert(payment.clone());
                    return;
                }
                if self.reversed.contains(payment) {
                    return; // refunded or lost before it arrived
                }
                let src = Source::Payment(payment.clone());
                let wanted: BTreeSet<&'static str> = products
                    .iter()
                    .flat_map(|p| product_entitlements(p).iter().copied())
                    .collect();
                for ent in wanted {
                    self.create((ent, customer.clone(), src.clone()));
                }
            }
            Ev::Refund {
                business,
                payment,
                partial,
            } => {
                if *business == NONE || *partial {
                    return;
                }
                self.recorded += 1;
                self.reverse(payment, "refund");
            }
            Ev::DisputeLost { business, payment } => {
                if *business == NONE {
                    return;
                }
                self.recorded += 1;
                self.reverse(payment, "dispute_lost");
            }
            Ev::Subscription {
                business,
                kind,
                subscription,
                customer,
                product,
                status,
                at,
            } => {
                if *business == NONE {
                    return;
                }
                self.recorded += 1;
                if let Some(last) = self.last_snapshot.get(subscription)
                    && at < last
                {
                    return; // older than what was applied: changes nothing
                }
                self.last_snapshot.insert(subscription.clone(), *at);
                let src = Source::Subscription(subscription.clone());
                let ents = product_entitlements(product);
                // What the event (or for renewed/updated, the snapshot's status) implies.
                let revoke_reason = match (*kind, *status) {
                    ("active" | "unpaused" | "plan_changed", _) => None,
                    ("renewed" | "updated", "active") => None,
                    ("on_hold", _) | (_, "on_hold") => Some("subscription_on_hold"),
                    ("paused", _) | (_, "paused") => Some("subscription_paused"),
                    ("cancelled", _) | (_, "cancelled") => Some("subscription_cancelled"),
                    ("expired", _) | (_, "expired") => Some("subscription_expired"),
                    ("failed", _) | (_, "failed") => Some("subscription_failed"),
                    other => panic!("the generator never writes {other:?}"),
                };
                match revoke_reason {
                    Some(reason) => self.revoke_where(reason, |k| k.2 == src),
                    None => {
                        if *kind == "plan_changed" {
                            self.revoke_where("plan_changed", |k| {
                                k.2 == src && !ents.contains(&k.0)
                            });
                        }
                        for ent in ents {
                            let key = (*ent, customer.clone(), src.clone());
                            if !self.live.contains_key(&key) {
                                self.create(key);
                            }
                        }
                    }
                }
            }
        }
    }

    fn create(&mut self, key: GrantKey) {
        self.live.insert(key.clone(), self.grants.len());
        self.grants.push(ModelGrant { key, revoked: None });
    }

    fn revoke_where(&mut self, reason: &'static str, pred: impl Fn(&GrantKey) -> bool) {
        let hit: Vec<GrantKey> = self.live.keys().filter(|k| pred(k)).cloned().collect();
        for k in hit {
            let i = self.live.remove(&k).unwrap();
            self.grants[i].revoked = Some(reason);
        }
    }

    fn reverse(&mut self, payment: &str, reason: &'static str) {
        if self.subscription_payments.contains(payment) {
            return; // a subscription's own events decide
        }
        self.reversed.insert(payment.to_string());
        let src = Source::Payment(payment.to_string());
        self.revoke_where(reason, |k| k.2 == src);
    }

    /// Every grant per key, in creation order.
    pub fn by_key(&self) -> BTreeMap<GrantKey, Vec<&ModelGrant>> {
        let mut m: BTreeMap<GrantKey, Vec<&ModelGrant>> = BTreeMap::new();
        for g in &self.grants {
            m.entry(g.key.clone()).or_default().push(g);
        }
        m
    }

    /// Entitlements each customer holds live.
    pub fn live_entitlements(&self) -> HashMap<String, BTreeSet<&'static str>> {
        let mut m: HashMap<String, BTreeSet<&'static str>> = HashMap::new();
        for k in self.live.keys() {
            m.entry(k.1.clone()).or_default().insert(k.0);
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_model_follows_the_event_table() {
        let plan = generate(3_000, 7, 0.3);
        let mut m = Model::default();
        for r in &plan.rounds {
            for msg in r {
                m.apply(msg);
            }
        }
        let reasons: BTreeSet<&str> = m.grants.iter().filter_map(|g| g.revoked).collect();
        for r in [
            "subscription_cancelled",
            "subscription_paused",
            "subscription_on_hold",
            "plan_changed",
            "refund",
            "dispute_lost",
        ] {
            assert!(reasons.contains(r), "{r} missing from {reasons:?}");
        }
        assert!(m.grants.iter().any(|g| g.revoked.is_none()));
        assert!(plan.messages() >= 3_000);
    }
}
