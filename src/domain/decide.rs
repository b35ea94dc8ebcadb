//! The pure core of ingest: given what the database says (the [`Facts`] the shell loaded
//! for one event) and the event, decide what changes. No I/O and no clock.
//!
//! The rules are the event table of docs/architecture.md:
//! - a one-time `payment.succeeded` grants each entitlement of each product in the cart,
//!   unless a full refund or lost dispute of that payment was already seen;
//! - `subscription.active` / `unpaused` (and any snapshot whose status is `active`) grant
//!   each entitlement of the product that has no live grant for the subscription, unless
//!   the last grant of that entitlement was revoked by hand;
//! - `on_hold`, `paused`, `cancelled`, `expired`, `failed` revoke every live grant, except
//!   that `on_hold` and `failed` start the grace period of a grant whose entitlement has
//!   one (it stays live until the period ends, which revokes it with that reason), and a
//!   later `active` ends the grace;
//! - `plan_changed` also revokes what the new product lacks;
//! - a full refund of a one-time payment, or a lost dispute, revokes that payment's grants;
//! - a subscription event older than the last one applied changes nothing;
//! - an event the recorded state shows as applied already (its payment, its reversal,
//!   or its id among the subscription's events at the last applied time) changes
//!   nothing, even once its id has left `processed_events`.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};

use super::event::{Event, EventKind, SubscriptionEventType, SubscriptionStatus};
use super::ids::{BrandId, CustomerId, EntitlementId, PaymentId, ProductId, SubscriptionId};
use super::{GrantStatus, RevocationReason};

/// A grant the event may touch.
#[derive(Clone, Debug, PartialEq)]
pub struct GrantFact {
    pub id: String,
    pub entitlement_id: EntitlementId,
    pub customer_id: CustomerId,
    pub status: GrantStatus,
    /// In a grace period: due to end unless the subscription is active again first.
    pub in_grace: bool,
}

/// What the shell loaded from the database for one event.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Facts {
    /// Active entitlements attached to each product the event names.
    pub product_entitlements: HashMap<ProductId, Vec<EntitlementId>>,
    /// `payment.succeeded` (one-time), refund, dispute: every grant of the payment, any
    /// status. Subscription events, and refunds of subscription payments: the live
    /// grants of the subscription.
    pub grants: Vec<GrantFact>,
    /// Entitlements whose latest grant for this subscription was revoked by hand.
    pub manually_revoked: HashSet<EntitlementId>,
    /// When the last applied event of this subscription was stamped, if any.
    pub subscription_last_event_at: Option<DateTime<Utc>>,
    /// The ids of the subscription's events applied at that time; `None` when the
    /// snapshot predates their recording (migration 0012).
    pub subscription_last_event_ids: Option<Vec<String>>,
    /// The snapshot predates that recording and was written longer ago than applied
    /// event ids are kept: its last event's id may have been pruned, so an event
    /// stamped at its time is taken as that event.
    pub subscription_last_ids_pruned: bool,
    /// `payment.succeeded`: this payment was applied already.
    pub payment_recorded: bool,
    /// Full refunds and lost disputes recorded for this payment (for a payment, seen
    /// before it), oldest first.
    pub reversals_recorded: Vec<RevocationReason>,
    /// Refund / dispute: the payment as recorded, `None` if guildgate never saw it;
    /// `Some(None)` for a one-time payment, `Some(Some(sub))` for a subscription's.
    pub payment_subscription: Option<Option<SubscriptionId>>,
    /// The business has at least one entitlement (refunds and disputes are remembered
    /// only for such businesses; so is a subscription's payment without a cart).
    pub business_has_entitlements: bool,
    /// The grace period, in days, of the business's entitlements that have one.
    pub grace_days: HashMap<EntitlementId, u32>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Policy {
    /// A full refund of a subscription payment revokes the subscription's grants.
    pub revoke_on_subscription_refund: bool,
}

/// Where a grant comes from: one per (entitlement, customer, source) is live at most.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GrantSource {
    Payment(PaymentId),
    Subscription(SubscriptionId),
}

#[derive(Clone, Debug, PartialEq)]
pub enum Effect {
    CreateGrant {
        entitlement_id: EntitlementId,
        customer_id: CustomerId,
        brand_id: Option<BrandId>,
        source: GrantSource,
    },
    RevokeGrant {
        grant_id: String,
        reason: RevocationReason,
    },
    /// Keep a live grant until `until`, then revoke it with `reason` unless the
    /// subscription is active again first.
    StartGrace {
        grant_id: String,
        reason: RevocationReason,
        until: DateTime<Utc>,
    },
    /// The subscription is active again: the grant's grace period is over, and it stays.
    EndGrace { grant_id: String },
    /// Remember the subscription's latest snapshot (for ordering and refunds).
    RecordSubscription,
    /// Remember a payment (its subscription, for a later refund).
    RecordPayment,
    /// Remember a full refund or lost dispute, so a late payment grants nothing.
    RecordReversal { reason: RevocationReason },
}

/// The outcome of deciding one event.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    /// Nothing here concerns guildgate (no entitlements for this business or product).
    Irrelevant,
    /// Older than the subscription's last applied event: changes nothing.
    Stale,
    /// Applied already, by the recorded state (a payment, a reversal, a subscription
    /// event at the last applied time), though its id is not among the processed ones:
    /// a duplicate that arrives after its id was pruned. Changes nothing.
    Repeat,
    /// Apply these effects (possibly none).
    Apply(Vec<Effect>),
}

/// Decides one event. `facts` must have been loaded for this event.
pub fn decide(facts: &Facts, event: &Event, policy: Policy) -> Verdict {
    match &event.kind {
        EventKind::PaymentSucceeded(p) => {
            // A payment succeeds once; it is recorded whenever it was applied.
            if facts.payment_recorded {
                return Verdict::Repeat;
            }
            if p.subscription_id.is_some() {
                // A subscription's payment grants nothing itself; remember which
                // subscription it paid for, so a refund of it can be mapped. It concerns
                // guildgate when one of its products has entitlements (or, without a
                // cart, its business has some), even before the subscription's first
                // event: the platform may send the first payment ahead of
                // `subscription.active`.
                let for_entitlements = if p.product_ids.is_empty() {
                    facts.business_has_entitlements
                } else {
                    p.product_ids.iter().any(|pid| {
                        facts
                            .product_entitlements
                            .get(pid)
                            .is_some_and(|e| !e.is_empty())
                    })
                };
                if facts.subscription_last_event_at.is_none()
                    && facts.reversals_recorded.is_empty()
                    && !for_entitlements
                {
                    return Verdict::Irrelevant;
                }
                let mut effects = vec![Effect::RecordPayment];
                // Only a refund revokes a subscription's grants, whichever came first.
                if facts.reversals_recorded.contains(&RevocationReason::Refund)
                    && policy.revoke_on_subscription_refund
                {
                    effects.extend(revoke_live(&facts.grants, RevocationReason::Refund));
                }
                return Verdict::Apply(effects);
            }
            let wanted: Vec<&EntitlementId> = p
                .product_ids
                .iter()
                .filter_map(|pid| facts.product_entitlements.get(pid))
                .flatten()
                .collect();
            if wanted.is_empty()
                && facts.reversals_recorded.is_empty()
                && !facts.business_has_entitlements
            {
                return Verdict::Irrelevant;
            }
            let mut effects = vec![Effect::RecordPayment];
            if !facts.reversals_recorded.is_empty() {
                // Refunded or lost before we saw it: grant nothing.
                return Verdict::Apply(effects);
            }
            let mut seen: HashSet<&EntitlementId> = facts
                .grants
                .iter()
                .filter(|g| g.customer_id == p.customer_id)
                .map(|g| &g.entitlement_id)
                .collect();
            for ent in wanted {
                // A cart with the same entitlement twice (two products) grants it once.
                if seen.insert(ent) {
                    effects.push(Effect::CreateGrant {
                        entitlement_id: ent.clone(),
                        customer_id: p.customer_id.clone(),
                        brand_id: p.brand_id.clone(),
                        source: GrantSource::Payment(p.payment_id.clone()),
                    });
                }
            }
            Verdict::Apply(effects)
        }
        EventKind::RefundSucceeded(r) => {
            if r.is_partial {
                return Verdict::Irrelevant;
            }
            reversal(facts, RevocationReason::Refund, policy)
        }
        EventKind::DisputeLost(_) => reversal(facts, RevocationReason::DisputeLost, policy),
        EventKind::Subscription(kind, sub) => {
            let entitlements = facts
                .product_entitlements
                .get(&sub.product_id)
                .map(Vec::as_slice)
                .unwrap_or_default();
            let known = facts.subscription_last_event_at.is_some();
            // A business with entitlements records every subscription (backfill).
            if entitlements.is_empty()
                && facts.grants.is_empty()
                && !known
                && !facts.business_has_entitlements
            {
                return Verdict::Irrelevant;
            }
            if let Some(last) = facts.subscription_last_event_at {
                if event.timestamp < last {
                    return Verdict::Stale;
                }
                // Events stamped alike are all applied; this one was, if it is named.
                let named = match &facts.subscription_last_event_ids {
                    Some(ids) => ids.iter().any(|id| id == event.id.as_str()),
                    None => facts.subscription_last_ids_pruned,
                };
                if event.timestamp == last && named {
                    return Verdict::Repeat;
                }
            }
            let mut effects = vec![Effect::RecordSubscription];
            match implied(*kind, &sub.status) {
                Implied::Grant => {
                    let live: HashSet<&EntitlementId> =
                        facts.grants.iter().map(|g| &g.entitlement_id).collect();
                    let mut added = HashSet::new();
                    for ent in entitlements {
                        if !live.contains(ent)
                            && !facts.manually_revoked.contains(ent)
                            && added.insert(ent)
                        {
                            effects.push(Effect::CreateGrant {
                                entitlement_id: ent.clone(),
                                customer_id: sub.customer_id.clone(),
                                brand_id: sub.brand_id.clone(),
                                source: GrantSource::Subscription(sub.subscription_id.clone()),
                            });
                        }
                    }
                    for g in facts
                        .grants
                        .iter()
                        .filter(|g| g.status.is_live() && g.in_grace)
                    {
                        effects.push(Effect::EndGrace {
                            grant_id: g.id.clone(),
                        });
                    }
                    if *kind == SubscriptionEventType::PlanChanged {
                        for g in &facts.grants {
                            if g.status.is_live() && !entitlements.contains(&g.entitlement_id) {
                                effects.push(Effect::RevokeGrant {
                                    grant_id: g.id.clone(),
                                    reason: RevocationReason::PlanChanged,
                                });
                            }
                        }
                    }
                }
                Implied::Revoke(
                    reason @ (RevocationReason::SubscriptionOnHold
                    | RevocationReason::SubscriptionFailed),
                ) => {
                    for g in facts.grants.iter().filter(|g| g.status.is_live()) {
                        match facts.grace_days.get(&g.entitlement_id) {
                            // Already in grace: its end stays where the first hold put it.
                            Some(_) if g.in_grace => {}
                            Some(days) => effects.push(Effect::StartGrace {
                                grant_id: g.id.clone(),
                                reason,
                                until: event.timestamp + chrono::TimeDelta::days(i64::from(*days)),
                            }),
                            None => effects.push(Effect::RevokeGrant {
                                grant_id: g.id.clone(),
                                reason,
                            }),
                        }
                    }
                }
                Implied::Revoke(reason) => effects.extend(revoke_live(&facts.grants, reason)),
                Implied::Nothing => {}
            }
            Verdict::Apply(effects)
        }
    }
}

fn reversal(facts: &Facts, reason: RevocationReason, policy: Policy) -> Verdict {
    // A payment is fully refunded, or lost in a dispute, once.
    if facts.reversals_recorded.contains(&reason) {
        return Verdict::Repeat;
    }
    let mut effects = Vec::new();
    match &facts.payment_subscription {
        // A subscription's payment: its own events decide, unless configured otherwise.
        Some(Some(_))
            if reason == RevocationReason::Refund && policy.revoke_on_subscription_refund =>
        {
            effects.extend(revoke_live(&facts.grants, reason));
        }
        Some(Some(_)) => {}
        Some(None) => effects.extend(revoke_live(&facts.grants, reason)),
        // Not seen yet: remembered below, so the late payment grants nothing.
        None => {}
    }
    if facts.business_has_entitlements || !effects.is_empty() {
        effects.insert(0, Effect::RecordReversal { reason });
        Verdict::Apply(effects)
    } else {
        Verdict::Irrelevant
    }
}

fn revoke_live(grants: &[GrantFact], reason: RevocationReason) -> impl Iterator<Item = Effect> {
    grants
        .iter()
        .filter(|g| g.status.is_live())
        .map(move |g| Effect::RevokeGrant {
            grant_id: g.id.clone(),
            reason,
        })
}

enum Implied {
    Grant,
    Revoke(RevocationReason),
    Nothing,
}

/// What a subscription event means. Events named for a state change say so themselves;
/// `renewed`, `updated` and `plan_changed` carry a snapshot whose status decides.
fn implied(kind: SubscriptionEventType, status: &SubscriptionStatus) -> Implied {
    use RevocationReason as R;
    use SubscriptionEventType as T;
    match kind {
        T::Active | T::Unpaused => Implied::Grant,
        T::OnHold => Implied::Revoke(R::SubscriptionOnHold),
        T::Paused => Implied::Revoke(R::SubscriptionPaused),
        T::Cancelled => Implied::Revoke(R::SubscriptionCancelled),
        T::Expired => Implied::Revoke(R::SubscriptionExpired),
        T::Failed => Implied::Revoke(R::SubscriptionFailed),
        T::Renewed | T::Updated | T::PlanChanged => match status {
            SubscriptionStatus::Active => Implied::Grant,
            SubscriptionStatus::OnHold => Implied::Revoke(R::SubscriptionOnHold),
            SubscriptionStatus::Paused => Implied::Revoke(R::SubscriptionPaused),
            SubscriptionStatus::Cancelled => Implied::Revoke(R::SubscriptionCancelled),
            SubscriptionStatus::Expired => Implied::Revoke(R::SubscriptionExpired),
            SubscriptionStatus::Failed => Implied::Revoke(R::SubscriptionFailed),
            SubscriptionStatus::Pending | SubscriptionStatus::Other(_) => Implied::Nothing,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::event::{Dispute, Payment, Refund, Subscription};
    use crate::domain::ids::{BusinessId, EventId};

    fn ent(s: &str) -> EntitlementId {
        EntitlementId::parse(s).unwrap()
    }
    fn t(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }
    fn event(kind: EventKind, at: &str) -> Event {
        Event {
            id: EventId::parse("evt").unwrap(),
            business_id: BusinessId::parse("bus").unwrap(),
            timestamp: t(at),
            kind,
            customer_email: None,
        }
    }
    fn cus() -> CustomerId {
        CustomerId::parse("cus").unwrap()
    }
    fn payment(sub: Option<&str>, products: &[&str]) -> EventKind {
        EventKind::PaymentSucceeded(Payment {
            payment_id: PaymentId::parse("pay").unwrap(),
            customer_id: cus(),
            brand_id: None,
            subscription_id: sub.map(|s| SubscriptionId::parse(s).unwrap()),
            product_ids: products
                .iter()
                .map(|p| ProductId::parse(*p).unwrap())
                .collect(),
        })
    }
    fn subscription(kind: SubscriptionEventType, product: &str, status: &str) -> EventKind {
        EventKind::Subscription(
            kind,
            Subscription {
                subscription_id: SubscriptionId::parse("sub").unwrap(),
                product_id: ProductId::parse(product).unwrap(),
                customer_id: cus(),
                brand_id: None,
                status: SubscriptionStatus::parse(status),
            },
        )
    }
    fn grant(id: &str, e: &str, status: GrantStatus) -> GrantFact {
        GrantFact {
            id: id.into(),
            entitlement_id: ent(e),
            customer_id: cus(),
            status,
            in_grace: false,
        }
    }
    fn products(pairs: &[(&str, &[&str])]) -> HashMap<ProductId, Vec<EntitlementId>> {
        pairs
            .iter()
            .map(|(p, es)| {
                (
                    ProductId::parse(*p).unwrap(),
                    es.iter().map(|e| ent(e)).collect(),
                )
            })
            .collect()
    }
    fn created(v: &Verdict) -> Vec<&str> {
        match v {
            Verdict::Apply(es) => es
                .iter()
                .filter_map(|e| match e {
                    Effect::CreateGrant { entitlement_id, .. } => Some(entitlement_id.as_str()),
                    _ => None,
                })
                .collect(),
            _ => vec![],
        }
    }
    fn revoked(v: &Verdict) -> Vec<(&str, RevocationReason)> {
        match v {
            Verdict::Apply(es) => es
                .iter()
                .filter_map(|e| match e {
                    Effect::RevokeGrant { grant_id, reason } => Some((grant_id.as_str(), *reason)),
                    _ => None,
                })
                .collect(),
            _ => vec![],
        }
    }

    /// Grace periods, by table: the event, whether the grant is in grace already, and
    /// what must happen to a live grant of an entitlement with (e1) or without (e2) a
    /// three-day grace period.
    #[test]
    fn on_hold_and_failed_start_a_grace_period_where_the_entitlement_has_one() {
        use SubscriptionEventType as T;
        let at = "2026-03-01T12:00:00Z";
        let until = t("2026-03-04T12:00:00Z");
        #[derive(Debug, PartialEq)]
        enum Want {
            Grace(RevocationReason),
            Revoke(RevocationReason),
            EndGrace,
            Nothing,
        }
        use RevocationReason as R;
        let cases: &[(T, &str, bool, &str, Want)] = &[
            (
                T::OnHold,
                "on_hold",
                false,
                "e1",
                Want::Grace(R::SubscriptionOnHold),
            ),
            (
                T::Failed,
                "failed",
                false,
                "e1",
                Want::Grace(R::SubscriptionFailed),
            ),
            (
                T::Updated,
                "on_hold",
                false,
                "e1",
                Want::Grace(R::SubscriptionOnHold),
            ),
            (
                T::Renewed,
                "failed",
                false,
                "e1",
                Want::Grace(R::SubscriptionFailed),
            ),
            // A second hold keeps the first one's end.
            (T::OnHold, "on_hold", true, "e1", Want::Nothing),
            (T::Failed, "failed", true, "e1", Want::Nothing),
            // Without a grace period, at once.
            (
                T::OnHold,
                "on_hold",
                false,
                "e2",
                Want::Revoke(R::SubscriptionOnHold),
            ),
            (
                T::Failed,
                "failed",
                false,
                "e2",
                Want::Revoke(R::SubscriptionFailed),
            ),
            // Other endings never wait, in grace or not.
            (
                T::Cancelled,
                "cancelled",
                false,
                "e1",
                Want::Revoke(R::SubscriptionCancelled),
            ),
            (
                T::Cancelled,
                "cancelled",
                true,
                "e1",
                Want::Revoke(R::SubscriptionCancelled),
            ),
            (
                T::Expired,
                "expired",
                true,
                "e1",
                Want::Revoke(R::SubscriptionExpired),
            ),
            (
                T::Paused,
                "paused",
                true,
                "e1",
                Want::Revoke(R::SubscriptionPaused),
            ),
            // Active again: the grace ends and the grant stays (no new grant).
            (T::Active, "active", true, "e1", Want::EndGrace),
            (T::Renewed, "active", true, "e1", Want::EndGrace),
            (T::Active, "active", false, "e1", Want::Nothing),
        ];
        for (kind, status, in_grace, entitlement, want) in cases {
            let facts = Facts {
                product_entitlements: products(&[("p1", &["e1", "e2"])]),
                grants: vec![GrantFact {
                    in_grace: *in_grace,
                    ..grant("g1", entitlement, GrantStatus::Delivered)
                }],
                subscription_last_event_at: Some(t("2026-02-01T00:00:00Z")),
                grace_days: [(ent("e1"), 3)].into(),
                ..Facts::default()
            };
            let v = decide(
                &facts,
                &event(subscription(*kind, "p1", status), at),
                Policy::default(),
            );
            let Verdict::Apply(effects) = &v else {
                panic!("{kind:?} {status}: {v:?}");
            };
            let got: Vec<Want> = effects
                .iter()
                .filter_map(|e| match e {
                    Effect::StartGrace {
                        grant_id,
                        reason,
                        until: u,
                    } => {
                        assert_eq!((grant_id.as_str(), *u), ("g1", until), "{kind:?}");
                        Some(Want::Grace(*reason))
                    }
                    Effect::RevokeGrant { reason, .. } => Some(Want::Revoke(*reason)),
                    Effect::EndGrace { grant_id } => {
                        assert_eq!(grant_id, "g1");
                        Some(Want::EndGrace)
                    }
                    Effect::CreateGrant { entitlement_id, .. } => {
                        // e2 has no live grant in the cases of e1, and the reverse.
                        assert_ne!(
                            entitlement_id.as_str(),
                            *entitlement,
                            "{kind:?}: a second grant"
                        );
                        None
                    }
                    _ => None,
                })
                .collect();
            let got = got.into_iter().next().unwrap_or(Want::Nothing);
            assert_eq!(
                &got, want,
                "{kind:?} {status} in_grace={in_grace} {entitlement}"
            );
        }
    }

    #[test]
    fn one_time_payment_grants_each_entitlement_of_each_product_once() {
        let facts = Facts {
            product_entitlements: products(&[("p1", &["e1", "e2"]), ("p2", &["e2", "e3"])]),
            ..Facts::default()
        };
        let v = decide(
            &facts,
            &event(payment(None, &["p1", "p2"]), "2026-01-01T00:00:00Z"),
            Policy::default(),
        );
        assert_eq!(created(&v), ["e1", "e2", "e3"]);
    }

    #[test]
    fn payment_already_granted_grants_nothing_more() {
        let facts = Facts {
            product_entitlements: products(&[("p1", &["e1"])]),
            grants: vec![grant("g1", "e1", GrantStatus::Revoked)],
            ..Facts::default()
        };
        let v = decide(
            &facts,
            &event(payment(None, &["p1"]), "2026-01-01T00:00:00Z"),
            Policy::default(),
        );
        assert_eq!(v, Verdict::Apply(vec![Effect::RecordPayment]));
    }

    #[test]
    fn payment_without_entitlements_is_irrelevant() {
        let v = decide(
            &Facts::default(),
            &event(payment(None, &["p1"]), "2026-01-01T00:00:00Z"),
            Policy::default(),
        );
        assert_eq!(v, Verdict::Irrelevant);
    }

    #[test]
    fn subscription_payment_grants_nothing() {
        let facts = Facts {
            product_entitlements: products(&[("p1", &["e1"])]),
            subscription_last_event_at: Some(t("2026-01-01T00:00:00Z")),
            ..Facts::default()
        };
        let v = decide(
            &facts,
            &event(payment(Some("sub"), &["p1"]), "2026-01-01T00:00:00Z"),
            Policy::default(),
        );
        assert_eq!(v, Verdict::Apply(vec![Effect::RecordPayment]));
    }

    #[test]
    fn subscription_payment_is_remembered_before_its_subscription_when_it_concerns_entitlements() {
        let pay = |products: &[&str]| event(payment(Some("sub"), products), "2026-01-01T00:00:00Z");
        let ents = Facts {
            product_entitlements: products(&[("p1", &["e1"])]),
            ..Facts::default()
        };
        // Its subscription not known yet: a product with entitlements is enough.
        assert_eq!(
            decide(&ents, &pay(&["p1"]), Policy::default()),
            Verdict::Apply(vec![Effect::RecordPayment])
        );
        // A product without entitlements is not.
        assert_eq!(
            decide(&ents, &pay(&["p2"]), Policy::default()),
            Verdict::Irrelevant
        );
        // Without a cart, the business decides.
        let business = Facts {
            business_has_entitlements: true,
            ..Facts::default()
        };
        assert_eq!(
            decide(&business, &pay(&[]), Policy::default()),
            Verdict::Apply(vec![Effect::RecordPayment])
        );
        assert_eq!(
            decide(&Facts::default(), &pay(&[]), Policy::default()),
            Verdict::Irrelevant
        );
    }

    #[test]
    fn refund_or_dispute_before_payment_makes_it_grant_nothing() {
        let facts = Facts {
            product_entitlements: products(&[("p1", &["e1"])]),
            reversals_recorded: vec![RevocationReason::Refund],
            ..Facts::default()
        };
        let v = decide(
            &facts,
            &event(payment(None, &["p1"]), "2026-01-01T00:00:00Z"),
            Policy::default(),
        );
        assert_eq!(v, Verdict::Apply(vec![Effect::RecordPayment]));

        let early = Facts {
            business_has_entitlements: true,
            ..Facts::default()
        };
        let refund = EventKind::RefundSucceeded(Refund {
            refund_id: "r".into(),
            payment_id: PaymentId::parse("pay").unwrap(),
            is_partial: false,
        });
        assert_eq!(
            decide(
                &early,
                &event(refund, "2026-01-01T00:00:00Z"),
                Policy::default()
            ),
            Verdict::Apply(vec![Effect::RecordReversal {
                reason: RevocationReason::Refund
            }])
        );
    }

    fn refund(partial: bool) -> EventKind {
        EventKind::RefundSucceeded(Refund {
            refund_id: "r".into(),
            payment_id: PaymentId::parse("pay").unwrap(),
            is_partial: partial,
        })
    }

    #[test]
    fn full_refund_of_one_time_payment_revokes_its_live_grants() {
        let facts = Facts {
            grants: vec![
                grant("g1", "e1", GrantStatus::Delivered),
                grant("g2", "e2", GrantStatus::Pending),
                grant("g3", "e3", GrantStatus::Failed),
                grant("g4", "e4", GrantStatus::Revoked),
            ],
            payment_subscription: Some(None),
            business_has_entitlements: true,
            ..Facts::default()
        };
        let v = decide(
            &facts,
            &event(refund(false), "2026-01-01T00:00:00Z"),
            Policy::default(),
        );
        assert_eq!(
            revoked(&v),
            [
                ("g1", RevocationReason::Refund),
                ("g2", RevocationReason::Refund),
                ("g3", RevocationReason::Refund)
            ]
        );
        assert_eq!(
            decide(
                &facts,
                &event(refund(true), "2026-01-01T00:00:00Z"),
                Policy::default()
            ),
            Verdict::Irrelevant
        );
    }

    #[test]
    fn refund_of_subscription_payment_revokes_only_when_configured() {
        let facts = Facts {
            grants: vec![grant("g1", "e1", GrantStatus::Delivered)],
            payment_subscription: Some(Some(SubscriptionId::parse("sub").unwrap())),
            business_has_entitlements: true,
            ..Facts::default()
        };
        let e = event(refund(false), "2026-01-01T00:00:00Z");
        assert!(revoked(&decide(&facts, &e, Policy::default())).is_empty());
        let on = Policy {
            revoke_on_subscription_refund: true,
        };
        assert_eq!(
            revoked(&decide(&facts, &e, on)),
            [("g1", RevocationReason::Refund)]
        );
    }

    #[test]
    fn dispute_lost_revokes_payment_grants() {
        let facts = Facts {
            grants: vec![grant("g1", "e1", GrantStatus::Delivered)],
            payment_subscription: Some(None),
            business_has_entitlements: true,
            ..Facts::default()
        };
        let d = EventKind::DisputeLost(Dispute {
            dispute_id: "d".into(),
            payment_id: PaymentId::parse("pay").unwrap(),
        });
        assert_eq!(
            revoked(&decide(
                &facts,
                &event(d, "2026-01-01T00:00:00Z"),
                Policy::default()
            )),
            [("g1", RevocationReason::DisputeLost)]
        );
    }

    #[test]
    fn subscription_event_table() {
        use RevocationReason as R;
        use SubscriptionEventType as T;
        let live = Facts {
            product_entitlements: products(&[("p1", &["e1"])]),
            grants: vec![grant("g1", "e1", GrantStatus::Delivered)],
            subscription_last_event_at: Some(t("2026-01-01T00:00:00Z")),
            ..Facts::default()
        };
        let cases = [
            (T::OnHold, "on_hold", R::SubscriptionOnHold),
            (T::Paused, "paused", R::SubscriptionPaused),
            (T::Cancelled, "cancelled", R::SubscriptionCancelled),
            (T::Expired, "expired", R::SubscriptionExpired),
            (T::Failed, "failed", R::SubscriptionFailed),
            (T::Updated, "cancelled", R::SubscriptionCancelled),
            (T::Renewed, "on_hold", R::SubscriptionOnHold),
        ];
        for (kind, status, reason) in cases {
            let v = decide(
                &live,
                &event(subscription(kind, "p1", status), "2026-02-01T00:00:00Z"),
                Policy::default(),
            );
            assert_eq!(revoked(&v), [("g1", reason)], "{kind:?}");
            assert!(created(&v).is_empty());
        }
        for (kind, status) in [
            (T::Renewed, "active"),
            (T::Updated, "active"),
            (T::Active, "active"),
        ] {
            let v = decide(
                &live,
                &event(subscription(kind, "p1", status), "2026-02-01T00:00:00Z"),
                Policy::default(),
            );
            assert_eq!(
                v,
                Verdict::Apply(vec![Effect::RecordSubscription]),
                "{kind:?}"
            );
        }
    }

    #[test]
    fn active_and_unpaused_grant_what_is_missing() {
        let facts = Facts {
            product_entitlements: products(&[("p1", &["e1", "e2"])]),
            grants: vec![grant("g1", "e1", GrantStatus::Pending)],
            ..Facts::default()
        };
        for kind in [
            SubscriptionEventType::Active,
            SubscriptionEventType::Unpaused,
        ] {
            let v = decide(
                &facts,
                &event(subscription(kind, "p1", "active"), "2026-02-01T00:00:00Z"),
                Policy::default(),
            );
            assert_eq!(created(&v), ["e2"]);
        }
    }

    #[test]
    fn manual_revoke_is_never_followed_by_a_new_grant() {
        let facts = Facts {
            product_entitlements: products(&[("p1", &["e1", "e2"])]),
            manually_revoked: [ent("e1")].into_iter().collect(),
            subscription_last_event_at: Some(t("2026-01-01T00:00:00Z")),
            ..Facts::default()
        };
        let v = decide(
            &facts,
            &event(
                subscription(SubscriptionEventType::Active, "p1", "active"),
                "2026-02-01T00:00:00Z",
            ),
            Policy::default(),
        );
        assert_eq!(created(&v), ["e2"]);
    }

    #[test]
    fn older_subscription_event_is_stale() {
        let facts = Facts {
            product_entitlements: products(&[("p1", &["e1"])]),
            subscription_last_event_at: Some(t("2026-02-01T00:00:00Z")),
            ..Facts::default()
        };
        let v = decide(
            &facts,
            &event(
                subscription(SubscriptionEventType::Active, "p1", "active"),
                "2026-01-01T00:00:00Z",
            ),
            Policy::default(),
        );
        assert_eq!(v, Verdict::Stale);
        let same = decide(
            &facts,
            &event(
                subscription(SubscriptionEventType::Active, "p1", "active"),
                "2026-02-01T00:00:00Z",
            ),
            Policy::default(),
        );
        assert_eq!(created(&same), ["e1"], "an equal timestamp is not older");
    }

    #[test]
    fn an_event_the_recorded_state_shows_as_applied_is_a_repeat() {
        // The test events' id is "evt".
        let at = "2026-02-01T00:00:00Z";
        let sub = Facts {
            product_entitlements: products(&[("p1", &["e1"])]),
            subscription_last_event_at: Some(t(at)),
            subscription_last_event_ids: Some(vec!["other".into(), "evt".into()]),
            ..Facts::default()
        };
        let active = |at| {
            event(
                subscription(SubscriptionEventType::Active, "p1", "active"),
                at,
            )
        };
        assert_eq!(
            decide(&sub, &active(at), Policy::default()),
            Verdict::Repeat
        );
        // Another event stamped alike is applied; so is one whose snapshot predates
        // the recording of ids.
        let others = Facts {
            subscription_last_event_ids: Some(vec!["other".into()]),
            ..sub.clone()
        };
        assert_eq!(
            created(&decide(&others, &active(at), Policy::default())),
            ["e1"]
        );
        let legacy = Facts {
            subscription_last_event_ids: None,
            ..sub.clone()
        };
        assert_eq!(
            created(&decide(&legacy, &active(at), Policy::default())),
            ["e1"]
        );
        // Older is stale, whatever the ids; a listed id stamped later is a new event.
        assert_eq!(
            decide(&sub, &active("2026-01-01T00:00:00Z"), Policy::default()),
            Verdict::Stale
        );
        assert_eq!(
            created(&decide(
                &sub,
                &active("2026-03-01T00:00:00Z"),
                Policy::default()
            )),
            ["e1"]
        );
        // Without ids, written before the oldest id still kept: the event at that time
        // may be the last one, its id pruned, so it is taken as that one.
        let pruned = Facts {
            subscription_last_ids_pruned: true,
            ..legacy.clone()
        };
        assert_eq!(
            decide(&pruned, &active(at), Policy::default()),
            Verdict::Repeat
        );
        assert_eq!(
            created(&decide(
                &pruned,
                &active("2026-03-01T00:00:00Z"),
                Policy::default()
            )),
            ["e1"]
        );

        // A recorded payment, one-time or a subscription's, even if its product has
        // gained an entitlement since.
        let paid = Facts {
            product_entitlements: products(&[("p1", &["e1", "e2"])]),
            grants: vec![grant("g1", "e1", GrantStatus::Delivered)],
            payment_recorded: true,
            subscription_last_event_at: Some(t(at)),
            ..Facts::default()
        };
        for sub in [None, Some("sub")] {
            let v = decide(&paid, &event(payment(sub, &["p1"]), at), Policy::default());
            assert_eq!(v, Verdict::Repeat, "{sub:?}");
        }

        // A recorded reversal of the same kind; the other kind still applies.
        let on = Policy {
            revoke_on_subscription_refund: true,
        };
        let refunded = Facts {
            grants: vec![grant("g1", "e1", GrantStatus::Delivered)],
            payment_subscription: Some(Some(SubscriptionId::parse("sub").unwrap())),
            business_has_entitlements: true,
            reversals_recorded: vec![RevocationReason::Refund],
            ..Facts::default()
        };
        assert_eq!(
            decide(&refunded, &event(refund(false), at), on),
            Verdict::Repeat
        );
        // A lost dispute and a refund, in either order, before a subscription's
        // payment: the refund revokes, by policy; a lost dispute alone does not.
        use RevocationReason::{DisputeLost, Refund};
        for reversals_recorded in [vec![DisputeLost, Refund], vec![Refund, DisputeLost]] {
            let late = Facts {
                grants: vec![grant("g1", "e1", GrantStatus::Delivered)],
                subscription_last_event_at: Some(t(at)),
                reversals_recorded,
                ..Facts::default()
            };
            let v = decide(&late, &event(payment(Some("sub"), &["p1"]), at), on);
            assert_eq!(
                revoked(&v),
                [("g1", Refund)],
                "{:?}",
                late.reversals_recorded
            );
        }
        let disputed = Facts {
            grants: vec![grant("g1", "e1", GrantStatus::Delivered)],
            subscription_last_event_at: Some(t(at)),
            reversals_recorded: vec![DisputeLost],
            ..Facts::default()
        };
        assert_eq!(
            decide(&disputed, &event(payment(Some("sub"), &["p1"]), at), on),
            Verdict::Apply(vec![Effect::RecordPayment])
        );
        // The recorded refund is what makes a refund a repeat, whatever is known of
        // its payment: without it, the same refund is applied.
        for payment_subscription in [None, Some(None)] {
            let f = Facts {
                payment_subscription,
                ..refunded.clone()
            };
            assert_eq!(decide(&f, &event(refund(false), at), on), Verdict::Repeat);
            let first = Facts {
                reversals_recorded: Vec::new(),
                ..f
            };
            let v = decide(&first, &event(refund(false), at), on);
            assert!(
                matches!(&v, Verdict::Apply(e) if e.first() == Some(&Effect::RecordReversal { reason: Refund })),
                "{v:?}"
            );
        }
        let one_time = Facts {
            payment_subscription: Some(None),
            ..refunded.clone()
        };
        let d = EventKind::DisputeLost(Dispute {
            dispute_id: "d".into(),
            payment_id: PaymentId::parse("pay").unwrap(),
        });
        assert_eq!(
            revoked(&decide(&one_time, &event(d, at), on)),
            [("g1", RevocationReason::DisputeLost)]
        );
    }

    #[test]
    fn plan_change_keeps_shared_revokes_lacking_adds_new() {
        let facts = Facts {
            product_entitlements: products(&[("vip", &["shared", "vip_only"])]),
            grants: vec![
                grant("g_shared", "shared", GrantStatus::Delivered),
                grant("g_basic", "basic_only", GrantStatus::Delivered),
            ],
            subscription_last_event_at: Some(t("2026-01-01T00:00:00Z")),
            ..Facts::default()
        };
        let v = decide(
            &facts,
            &event(
                subscription(SubscriptionEventType::PlanChanged, "vip", "active"),
                "2026-02-01T00:00:00Z",
            ),
            Policy::default(),
        );
        assert_eq!(created(&v), ["vip_only"]);
        assert_eq!(revoked(&v), [("g_basic", RevocationReason::PlanChanged)]);
    }

    #[test]
    fn subscription_of_product_without_entitlements_is_irrelevant() {
        let v = decide(
            &Facts::default(),
            &event(
                subscription(SubscriptionEventType::Active, "p1", "active"),
                "2026-02-01T00:00:00Z",
            ),
            Policy::default(),
        );
        assert_eq!(v, Verdict::Irrelevant);
    }
}
