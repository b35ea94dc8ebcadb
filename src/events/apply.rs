//! The shell around [`crate::grants::decide`]: for each event, load the facts it needs,
//! decide, and carry out the effects — grant rows, bookkeeping and outbox rows — in the
//! caller's transaction, together with the event id that makes a redelivery a no-op.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use super::{Event, EventKind};
use crate::grants::decide::{self, Effect, Facts, GrantFact, GrantSource, Policy, Verdict};
use crate::grants::link::LinkBuilder;
use crate::grants::render::webhook_body;
use crate::grants::{Grant, GrantEventType, GrantStatus, RevocationReason};
use crate::ids::{CustomerId, EntitlementId, ProductId, SubscriptionId};
use crate::store::outbox::{self, OutboxKind};
use crate::store::{grants as grant_store, ingest as db};

/// What applying one event did; also the `outcome` label of metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    /// Effects written (possibly none).
    Applied,
    /// The event id was applied before.
    Duplicate,
    /// Older than its subscription's last applied event.
    Stale,
    /// No entitlements concern it.
    Irrelevant,
}

impl Applied {
    pub fn as_str(self) -> &'static str {
        match self {
            Applied::Applied => "applied",
            Applied::Duplicate => "duplicate",
            Applied::Stale => "stale",
            Applied::Irrelevant => "irrelevant",
        }
    }
}

/// What an applier needs besides the connection.
#[derive(Clone, Debug)]
pub struct Applier {
    pub links: LinkBuilder,
    pub policy: Policy,
}

/// The advisory-lock key of the aggregate an event touches.
pub fn lock_key(event: &Event) -> String {
    match &event.kind {
        EventKind::PaymentSucceeded(p) => match &p.subscription_id {
            Some(s) => format!("sub:{s}"),
            None => format!("pay:{}", p.payment_id),
        },
        EventKind::RefundSucceeded(r) => format!("pay:{}", r.payment_id),
        EventKind::DisputeLost(d) => format!("pay:{}", d.payment_id),
        EventKind::Subscription(_, s) => format!("sub:{}", s.subscription_id),
    }
}

impl Applier {
    /// Applies one event in the caller's transaction. The caller holds the event's
    /// aggregate lock ([`lock_key`]), so the duplicate check and the writes below cannot
    /// interleave with another transaction working on the same subscription or payment.
    pub async fn apply(
        &self,
        conn: &mut PgConnection,
        event: &Event,
        now: DateTime<Utc>,
    ) -> Result<Applied, sqlx::Error> {
        if db::is_processed(conn, event.id.as_str()).await? {
            return Ok(Applied::Duplicate);
        }
        let facts = self.load_facts(conn, event).await?;
        let verdict = decide::decide(&facts, event, self.policy);
        let outcome = match verdict {
            Verdict::Irrelevant => return Ok(Applied::Irrelevant),
            Verdict::Stale => Applied::Stale,
            Verdict::Apply(effects) => {
                self.carry_out(conn, event, &effects, now).await?;
                Applied::Applied
            }
        };
        db::mark_processed(
            conn,
            event.id.as_str(),
            event.type_name(),
            event.business_id.as_str(),
            outcome.as_str(),
        )
        .await?;
        Ok(outcome)
    }

    async fn load_facts(
        &self,
        conn: &mut PgConnection,
        event: &Event,
    ) -> Result<Facts, sqlx::Error> {
        let business = event.business_id.as_str();
        let mut facts = Facts::default();
        let mut grants = Vec::new();
        match &event.kind {
            EventKind::PaymentSucceeded(p) => {
                let reversal = db::payment_reversal(conn, business, p.payment_id.as_str()).await?;
                facts.payment_reversed = reversal.as_deref().map(reason_of);
                if let Some(sub) = &p.subscription_id {
                    facts.subscription_last_event_at =
                        db::subscription_last_event_at(conn, sub.as_str()).await?;
                    if facts.payment_reversed.is_some() {
                        grants = grant_store::of_subscription(conn, business, sub.as_str()).await?;
                        grants.retain(|g| g.status().is_live());
                    }
                } else {
                    let products: Vec<String> =
                        p.product_ids.iter().map(|p| p.to_string()).collect();
                    facts.product_entitlements =
                        typed(db::product_entitlements(conn, business, &products).await?);
                    if !facts.product_entitlements.is_empty() {
                        grants =
                            grant_store::of_payment(conn, business, p.payment_id.as_str()).await?;
                    }
                }
            }
            EventKind::RefundSucceeded(r) if r.is_partial => {}
            EventKind::RefundSucceeded(_) | EventKind::DisputeLost(_) => {
                let payment_id = match &event.kind {
                    EventKind::RefundSucceeded(r) => &r.payment_id,
                    EventKind::DisputeLost(d) => &d.payment_id,
                    _ => unreachable!(),
                };
                facts.business_has_entitlements =
                    db::business_has_entitlements(conn, business).await?;
                facts.payment_subscription =
                    db::payment_subscription(conn, business, payment_id.as_str())
                        .await?
                        .map(|sub| sub.and_then(|s| SubscriptionId::parse(s).ok()));
                grants = match &facts.payment_subscription {
                    Some(Some(sub)) => {
                        grant_store::of_subscription(conn, business, sub.as_str()).await?
                    }
                    Some(None) => {
                        grant_store::of_payment(conn, business, payment_id.as_str()).await?
                    }
                    None => Vec::new(),
                };
                grants.retain(|g| g.status().is_live());
            }
            EventKind::Subscription(_, s) => {
                let sub = s.subscription_id.as_str();
                facts.product_entitlements = typed(
                    db::product_entitlements(conn, business, &[s.product_id.to_string()]).await?,
                );
                facts.subscription_last_event_at =
                    db::subscription_last_event_at(conn, sub).await?;
                let all = grant_store::of_subscription(conn, business, sub).await?;
                // The latest grant of each entitlement decides whether it was revoked
                // by hand; `all` is oldest first, so later rows overwrite earlier ones.
                let mut latest: HashMap<&str, &Grant> = HashMap::new();
                for g in &all {
                    latest.insert(&g.entitlement_id, g);
                }
                facts.manually_revoked = latest
                    .values()
                    .filter(|g| {
                        g.revocation_reason.as_deref() == Some(RevocationReason::Manual.as_str())
                    })
                    .filter_map(|g| EntitlementId::parse(g.entitlement_id.as_str()).ok())
                    .collect();
                grants = all.into_iter().filter(|g| g.status().is_live()).collect();
            }
        }
        facts.grants = grants.iter().filter_map(fact_of).collect();
        Ok(facts)
    }

    async fn carry_out(
        &self,
        conn: &mut PgConnection,
        event: &Event,
        effects: &[Effect],
        now: DateTime<Utc>,
    ) -> Result<(), sqlx::Error> {
        let business = event.business_id.as_str();
        for effect in effects {
            match effect {
                Effect::CreateGrant {
                    entitlement_id,
                    customer_id,
                    brand_id,
                    source,
                } => {
                    let (payment_id, subscription_id) = match source {
                        GrantSource::Payment(p) => (Some(p.as_str()), None),
                        GrantSource::Subscription(s) => (None, Some(s.as_str())),
                    };
                    let grant = grant_store::insert(
                        conn,
                        grant_store::NewGrant {
                            business_id: business,
                            brand_id: brand_id.as_ref().map(|b| b.as_str()),
                            entitlement_id: entitlement_id.as_str(),
                            customer_id: customer_id.as_str(),
                            payment_id,
                            subscription_id,
                            oauth_nonce: &LinkBuilder::new_nonce(),
                            oauth_expires_at: now + self.links.ttl,
                            now,
                        },
                    )
                    .await?;
                    emit(conn, &self.links, &grant, GrantEventType::Created, now).await?;
                }
                Effect::RevokeGrant { grant_id, reason } => {
                    if let Some(grant) = grant_store::revoke(conn, grant_id, *reason, now).await? {
                        emit(conn, &self.links, &grant, GrantEventType::Revoked, now).await?;
                    }
                }
                Effect::RecordSubscription => {
                    if let EventKind::Subscription(_, s) = &event.kind {
                        db::upsert_subscription(
                            conn,
                            s.subscription_id.as_str(),
                            business,
                            s.customer_id.as_str(),
                            s.product_id.as_str(),
                            s.status.as_str(),
                            event.timestamp,
                        )
                        .await?;
                    }
                }
                Effect::RecordPayment => {
                    if let EventKind::PaymentSucceeded(p) = &event.kind {
                        db::insert_payment(
                            conn,
                            p.payment_id.as_str(),
                            business,
                            p.customer_id.as_str(),
                            p.subscription_id.as_ref().map(|s| s.as_str()),
                        )
                        .await?;
                    }
                }
                Effect::RecordReversal { reason } => {
                    let payment_id = match &event.kind {
                        EventKind::RefundSucceeded(r) => &r.payment_id,
                        EventKind::DisputeLost(d) => &d.payment_id,
                        _ => continue,
                    };
                    db::insert_reversal(conn, payment_id.as_str(), reason.as_str(), business)
                        .await?;
                }
            }
        }
        Ok(())
    }
}

/// Writes the outbox rows for one grant transition: the webhook body (its message id
/// is stable per grant and event type, so every repeat is recognisable downstream) and
/// a sync job, since every transition may need Discord to change.
pub async fn emit(
    conn: &mut PgConnection,
    links: &LinkBuilder,
    grant: &Grant,
    event: GrantEventType,
    now: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    let body = webhook_body(grant, event, now, links);
    outbox::insert(
        conn,
        OutboxKind::GrantEvent,
        &format!("{}:{}", grant.id, event.as_str()),
        &body,
    )
    .await?;
    if matches!(event, GrantEventType::Created | GrantEventType::Revoked) {
        queue_sync(conn, &grant.id).await?;
    }
    Ok(())
}

/// Writes a sync job for a grant.
pub async fn queue_sync(conn: &mut PgConnection, grant_id: &str) -> Result<(), sqlx::Error> {
    outbox::insert(
        conn,
        OutboxKind::Sync,
        &format!("sync:{grant_id}:{}", crate::ids::mint("s")),
        &serde_json::json!({ "grant_id": grant_id }),
    )
    .await
}

fn reason_of(s: &str) -> RevocationReason {
    if s == "dispute_lost" {
        RevocationReason::DisputeLost
    } else {
        RevocationReason::Refund
    }
}

fn typed(map: HashMap<String, Vec<String>>) -> HashMap<ProductId, Vec<EntitlementId>> {
    map.into_iter()
        .filter_map(|(p, es)| {
            Some((
                ProductId::parse(p).ok()?,
                es.into_iter()
                    .filter_map(|e| EntitlementId::parse(e).ok())
                    .collect(),
            ))
        })
        .collect()
}

fn fact_of(g: &Grant) -> Option<GrantFact> {
    Some(GrantFact {
        id: g.id.clone(),
        entitlement_id: EntitlementId::parse(g.entitlement_id.as_str()).ok()?,
        customer_id: CustomerId::parse(g.customer_id.as_str()).ok()?,
        status: GrantStatus::parse(&g.status)?,
    })
}
