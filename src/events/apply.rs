//! The shell around [`crate::domain::decide`]: load what a batch of events needs, decide
//! each event in order, and write the effects — grant rows, bookkeeping, outbox rows and
//! the processed event ids that make a redelivery a no-op — in the caller's transaction.
//!
//! Work is done per batch, not per event: the state of every subscription and payment
//! the batch touches is read in two statements (every kind of fact the events name, then
//! the grants of their payments and subscriptions), events are decided in order against
//! that state as it evolves in memory (two events of one subscription in one batch see
//! each other), and the writes go out in one statement (revocations in a second). With
//! its begin, locks and commit, a batch of a hundred events costs seven round trips
//! instead of a thousand. The caller holds the advisory locks of every aggregate in the
//! batch ([`lock_keys_of`]), so what was read cannot change underneath until the
//! transaction ends.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use crate::domain::decide::{self, Effect, Facts, GrantFact, GrantSource, Policy, Verdict};
use crate::domain::event::{Event, EventKind};
use crate::domain::ids::{BrandId, CustomerId, EntitlementId, GrantId, ProductId, SubscriptionId};
use crate::domain::{Grant, GrantEventType, GrantStatus, RevocationReason};
use crate::grants::link::LinkBuilder;
use crate::grants::render::webhook_body;
use crate::outbox::produce::{GRANT_EVENTS_PER_MESSAGE, grant_events_bundle, sync_job};
use crate::store::ingest::{payment_key, subscription_key};
use crate::store::outbox::OutboxKind;
use crate::store::{grants as grant_store, ingest as db};

/// What applying one event did; also the `outcome` label of metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    /// Effects written (possibly none).
    Applied,
    /// The event id was applied before, or the recorded state shows the event was
    /// (its payment, its reversal, its id at its subscription's last time).
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
    /// How long applied event ids are kept (`ingest.processed_retention`; `None`:
    /// forever).
    pub processed_retention: Option<std::time::Duration>,
    /// Whether delivery email is on (`email.smtp_url` set): a grant made for a customer
    /// who has not linked Discord queues a join email to the event's address.
    pub email: bool,
}

/// The advisory-lock keys of the aggregates an event touches: its subscription or its
/// payment. A subscription's payment takes both: its subscription's events read and
/// write the subscription, and a refund or lost dispute of it, which locks only the
/// payment, must see it recorded (or be seen by it) to map the payment to its
/// subscription.
pub fn lock_keys_of(event: &Event) -> Vec<String> {
    match &event.kind {
        EventKind::PaymentSucceeded(p) => match &p.subscription_id {
            Some(s) => vec![
                subscription_key(s.as_str()),
                payment_key(p.payment_id.as_str()),
            ],
            None => vec![payment_key(p.payment_id.as_str())],
        },
        EventKind::RefundSucceeded(r) => vec![payment_key(r.payment_id.as_str())],
        EventKind::DisputeLost(d) => vec![payment_key(d.payment_id.as_str())],
        EventKind::Subscription(_, s) => vec![subscription_key(s.subscription_id.as_str())],
    }
}

type Key = (String, String); // (business, subscription or payment)

/// A subscription's last applied event, kept current as the batch is decided.
struct LastApplied {
    at: DateTime<Utc>,
    /// The ids of the events applied at `at`; `None`: not recorded (a snapshot from
    /// before migration 0012, at its own time).
    ids: Option<Vec<String>>,
    /// Without ids, and written before the oldest applied event id still kept.
    ids_pruned: bool,
}

/// The database state a batch reads, kept current in memory as the batch is decided.
#[derive(Default)]
struct State {
    processed: HashSet<String>,
    product_entitlements: HashMap<Key, Vec<EntitlementId>>,
    businesses_with_entitlements: HashSet<String>,
    /// Each (business, subscription)'s last applied event.
    subscription_last: HashMap<Key, LastApplied>,
    /// Grants by (business, subscription) and (business, payment), oldest first.
    sub_grants: HashMap<Key, Vec<Grant>>,
    pay_grants: HashMap<Key, Vec<Grant>>,
    payments: HashMap<Key, Option<String>>,
    /// Reversals recorded per payment, oldest first.
    reversals: HashMap<Key, Vec<RevocationReason>>,
    /// Customers who linked a Discord account: only their grants can need Discord work.
    linked: HashSet<Key>,
    /// Each business's most recent brand, for a grant whose event names none: read for
    /// the businesses of such events, then the brand of each grant the batch makes.
    brands: HashMap<String, String>,
    /// Grace periods in days, by (business, entitlement), of businesses with
    /// subscription events in the batch.
    grace_days: HashMap<Key, u32>,
}

/// The writes a batch makes, flushed once at the end.
#[derive(Default)]
struct Writes {
    /// Grants created in this batch (flushed in their final state).
    new_grants: Vec<String>,
    /// Pre-existing grants revoked in this batch: id → reason.
    revoked: Vec<(String, RevocationReason)>,
    outbox_kinds: Vec<&'static str>,
    outbox_ids: Vec<String>,
    outbox_payloads: Vec<Vec<u8>>,
    /// The batch's grant webhooks, in order, serialized: written as bundles at the end
    /// ([`GRANT_EVENTS_PER_MESSAGE`] to an outbox row). With the id of a grant that
    /// existed before the batch when it is that grant's revocation: emitted only if the
    /// batch's update is what revoked it.
    grant_events: Vec<(Option<String>, Vec<u8>)>,
    /// Grants that existed before the batch, revoked by it, whose revocation needs a
    /// sync job if it takes effect.
    pending_syncs: Vec<String>,
    processed: Vec<db::ProcessedRow>,
    /// One row per (business, subscription): the last snapshot applied in the batch.
    subscriptions: HashMap<Key, db::SubscriptionRow>,
    payments: Vec<db::PaymentRow>,
    reversals: Vec<db::ReversalRow>,
    /// Grace periods started (with their end) or ended, in order.
    grace: Vec<db::GraceRow>,
}

impl Writes {
    fn outbox(&mut self, kind: OutboxKind, id: String, payload: Vec<u8>) {
        self.outbox_kinds.push(kind.as_str());
        self.outbox_ids.push(id);
        self.outbox_payloads.push(payload);
    }

    /// What one grant transition emits: its webhook (bundled with the batch's others),
    /// and a sync job when `needs_sync` — the customer has linked Discord (a delivery
    /// may be under way or due) or the grant applied something that a revoke must undo.
    /// A grant of a customer who never linked has nothing in Discord; the OAuth callback
    /// queues its sync. `if_revoked_here`: the revocation of a grant that existed before
    /// the batch, which emits only if the batch's update is what revokes it — another
    /// transaction (the API, another consumer) may have revoked it first, and emitted
    /// its own webhook, with its own reason.
    fn transition(
        &mut self,
        links: &LinkBuilder,
        g: &Grant,
        ev: GrantEventType,
        now: DateTime<Utc>,
        needs_sync: bool,
        if_revoked_here: bool,
    ) {
        let condition = if_revoked_here.then(|| g.id.clone());
        self.grant_events
            .push((condition, webhook_body(g, ev, now, links)));
        if needs_sync && matches!(ev, GrantEventType::Created | GrantEventType::Revoked) {
            if if_revoked_here {
                self.pending_syncs.push(g.id.clone());
            } else {
                let (id, payload) = sync_job(&g.id);
                self.outbox(OutboxKind::Sync, id, payload);
            }
        }
    }
}

fn key(business: &str, id: &str) -> Key {
    (business.to_string(), id.to_string())
}

impl Applier {
    /// Applies a batch of events, in order, in the caller's transaction, which must hold
    /// every event's [`lock_keys_of`]. Returns one outcome per event.
    pub async fn apply_batch(
        &self,
        conn: &mut PgConnection,
        events: &[&Event],
        now: DateTime<Utc>,
    ) -> Result<Vec<Applied>, sqlx::Error> {
        let mut state = self.load(conn, events, now).await?;
        let mut writes = Writes::default();
        let mut out = Vec::with_capacity(events.len());
        for event in events {
            out.push(self.apply_one(&mut state, &mut writes, event, now));
        }
        self.flush(conn, &state, writes, now).await?;
        Ok(out)
    }

    /// Reads what the batch needs in two round trips: the facts its events name, then
    /// the grants of their payments and subscriptions (a refund's payment, once read,
    /// names its subscription).
    async fn load(
        &self,
        conn: &mut PgConnection,
        events: &[&Event],
        now: DateTime<Utc>,
    ) -> Result<State, sqlx::Error> {
        let mut state = State::default();
        let (keys, mut subscriptions) = fact_keys(events);
        // Ids recorded before this may have been pruned.
        let kept_since = self
            .processed_retention
            .and_then(|r| super::retention::kept_since(r, now));
        for fact in db::facts(conn, &keys).await? {
            state.learn(fact, kept_since, &mut subscriptions);
        }
        if !keys.payments.0.is_empty() || !subscriptions.0.is_empty() {
            let grants = grant_store::of_sources(
                conn,
                (&keys.payments.0, &keys.payments.1),
                (&subscriptions.0, &subscriptions.1),
            )
            .await?;
            state.add_grants(grants);
        }
        Ok(state)
    }

    fn facts(&self, state: &State, event: &Event) -> Facts {
        let b = event.business_id.as_str();
        let mut facts = Facts::default();
        let products: Vec<&ProductId> = match &event.kind {
            EventKind::PaymentSucceeded(p) => p.product_ids.iter().collect(),
            EventKind::Subscription(_, s) => vec![&s.product_id],
            _ => vec![],
        };
        for p in products {
            if let Some(es) = state.product_entitlements.get(&key(b, p.as_str())) {
                facts.product_entitlements.insert(p.clone(), es.clone());
            }
        }
        // The decision reads a grant's id, entitlement, customer and status, not the
        // whole row: no grant is cloned.
        let live = |gs: Option<&Vec<Grant>>| -> Vec<GrantFact> {
            gs.into_iter()
                .flatten()
                .filter(|g| g.status.is_live())
                .filter_map(fact_of)
                .collect()
        };
        facts.grants = match &event.kind {
            EventKind::PaymentSucceeded(p) => {
                let pay = key(b, p.payment_id.as_str());
                facts.business_has_entitlements = state.businesses_with_entitlements.contains(b);
                facts.reversals_recorded = state.reversals.get(&pay).cloned().unwrap_or_default();
                facts.payment_recorded = state.payments.contains_key(&pay);
                match &p.subscription_id {
                    Some(s) => {
                        facts.subscription_last_event_at = state
                            .subscription_last
                            .get(&key(b, s.as_str()))
                            .map(|l| l.at);
                        live(state.sub_grants.get(&key(b, s.as_str())))
                    }
                    None => state
                        .pay_grants
                        .get(&key(b, p.payment_id.as_str()))
                        .into_iter()
                        .flatten()
                        .filter_map(fact_of)
                        .collect(),
                }
            }
            EventKind::RefundSucceeded(_) | EventKind::DisputeLost(_) => {
                let pay = match &event.kind {
                    EventKind::RefundSucceeded(r) => r.payment_id.as_str(),
                    EventKind::DisputeLost(d) => d.payment_id.as_str(),
                    _ => unreachable!(),
                };
                facts.business_has_entitlements = state.businesses_with_entitlements.contains(b);
                facts.reversals_recorded = state
                    .reversals
                    .get(&key(b, pay))
                    .cloned()
                    .unwrap_or_default();
                facts.payment_subscription = state.payments.get(&key(b, pay)).map(|s| {
                    s.as_ref()
                        .and_then(|s| SubscriptionId::parse(s.as_str()).ok())
                });
                match state.payments.get(&key(b, pay)) {
                    Some(Some(sub)) => live(state.sub_grants.get(&key(b, sub))),
                    Some(None) => live(state.pay_grants.get(&key(b, pay))),
                    None => Vec::new(),
                }
            }
            EventKind::Subscription(_, s) => {
                let sub = s.subscription_id.as_str();
                facts.business_has_entitlements = state.businesses_with_entitlements.contains(b);
                if let Some(last) = state.subscription_last.get(&key(b, sub)) {
                    facts.subscription_last_event_at = Some(last.at);
                    facts.subscription_last_event_ids = last.ids.clone();
                    facts.subscription_last_ids_pruned = last.ids_pruned;
                }
                let all = state.sub_grants.get(&key(b, sub));
                // The latest grant of each entitlement decides whether it was revoked by
                // hand; grants are oldest first, so later ones overwrite earlier ones.
                let mut latest: HashMap<&str, &Grant> = HashMap::new();
                for g in all.into_iter().flatten() {
                    latest.insert(&g.entitlement_id, g);
                }
                facts.manually_revoked = latest
                    .values()
                    .filter(|g| g.revocation_reason == Some(RevocationReason::Manual))
                    .filter_map(|g| EntitlementId::parse(g.entitlement_id.as_str()).ok())
                    .collect();
                facts.grace_days = state
                    .grace_days
                    .iter()
                    .filter(|((business, _), _)| business == b)
                    .filter_map(|((_, e), days)| {
                        Some((EntitlementId::parse(e.as_str()).ok()?, *days))
                    })
                    .collect();
                live(all)
            }
        };
        facts
    }

    fn apply_one(
        &self,
        state: &mut State,
        writes: &mut Writes,
        event: &Event,
        now: DateTime<Utc>,
    ) -> Applied {
        if state.processed.contains(event.id.as_str()) {
            return Applied::Duplicate;
        }
        let facts = self.facts(state, event);
        let outcome = match decide::decide(&facts, event, self.policy) {
            // Irrelevant events are not recorded: most of the platform's traffic is
            // other merchants' and would only fill the table.
            Verdict::Irrelevant => return Applied::Irrelevant,
            Verdict::Stale => Applied::Stale,
            // Not recorded again: its first application is.
            Verdict::Repeat => return Applied::Duplicate,
            Verdict::Apply(effects) => {
                for effect in &effects {
                    self.carry_out(state, writes, event, effect, now);
                }
                Applied::Applied
            }
        };
        state.processed.insert(event.id.to_string());
        writes.processed.push(db::ProcessedRow {
            event_id: event.id.to_string(),
            event_type: event.type_name(),
            business_id: event.business_id.to_string(),
            outcome: outcome.as_str(),
        });
        outcome
    }

    /// Carries out one effect on the batch's state and its pending writes.
    fn carry_out(
        &self,
        state: &mut State,
        writes: &mut Writes,
        event: &Event,
        effect: &Effect,
        now: DateTime<Utc>,
    ) {
        match effect {
            Effect::CreateGrant {
                entitlement_id,
                customer_id,
                brand_id,
                source,
            } => self.create_grant(
                state,
                writes,
                event,
                NewGrant {
                    entitlement_id,
                    customer_id,
                    brand_id: brand_id.as_ref(),
                    source,
                },
                now,
            ),
            Effect::RevokeGrant { grant_id, reason } => {
                self.revoke_grant(state, writes, grant_id, *reason, now)
            }
            Effect::StartGrace {
                grant_id,
                reason,
                until,
            } => start_grace(state, writes, grant_id, *reason, *until, now),
            Effect::EndGrace { grant_id } => end_grace(state, writes, grant_id, now),
            Effect::RecordSubscription => record_subscription(state, writes, event),
            Effect::RecordPayment => record_payment(state, writes, event),
            Effect::RecordReversal { reason } => record_reversal(state, writes, event, *reason),
        }
    }

    /// A new grant: pending, with its OAuth link, its webhook and, for a customer who has
    /// linked no account, the email that asks them to.
    fn create_grant(
        &self,
        state: &mut State,
        writes: &mut Writes,
        event: &Event,
        new: NewGrant<'_>,
        now: DateTime<Utc>,
    ) {
        let b = event.business_id.as_str();
        let NewGrant {
            entitlement_id,
            customer_id,
            brand_id,
            source,
        } = new;
        let (payment_id, subscription_id) = match source {
            GrantSource::Payment(p) => (Some(p.to_string()), None),
            GrantSource::Subscription(s) => (None, Some(s.to_string())),
        };
        // The platform's events always name a brand, and its grants always have
        // one; an event without gets the business's most recent brand, or before
        // any the business's id (a business's default brand on the platform).
        let brand_id = match brand_id {
            Some(x) => x.to_string(),
            None => state
                .brands
                .get(b)
                .cloned()
                .unwrap_or_else(|| b.to_string()),
        };
        state.brands.insert(b.to_string(), brand_id.clone());
        let grant = Grant {
            id: GrantId::mint().to_string(),
            business_id: b.to_string(),
            brand_id,
            entitlement_id: entitlement_id.to_string(),
            customer_id: customer_id.to_string(),
            payment_id,
            subscription_id,
            status: GrantStatus::Pending,
            delivered_at: None,
            revoked_at: None,
            revocation_reason: None,
            error_code: None,
            error_message: None,
            oauth_nonce: LinkBuilder::new_nonce(),
            oauth_expires_at: now + self.links.ttl,
            metadata: serde_json::json!({}),
            created_at: now,
            updated_at: now,
            applied_user_id: None,
            applied_guild_id: None,
            applied_role_id: None,
            intent_user_id: None,
            intent_guild_id: None,
            intent_role_id: None,
            ends_at: None,
            ends_reason: None,
        };
        let linked = state.linked.contains(&key(b, customer_id.as_str()));
        writes.transition(
            &self.links,
            &grant,
            GrantEventType::Created,
            now,
            linked,
            false,
        );
        writes.new_grants.push(grant.id.clone());
        if self.email
            && !linked
            && let Some(to) = event.customer_email.as_deref()
        {
            let job = crate::email::Job::join(&grant.id, Some(to));
            writes.outbox(OutboxKind::Email, job.email_id.clone(), job.payload());
        }
        let list = match source {
            GrantSource::Payment(p) => state.pay_grants.entry(key(b, p.as_str())),
            GrantSource::Subscription(s) => state.sub_grants.entry(key(b, s.as_str())),
        };
        list.or_default().push(grant);
    }

    /// Revokes a live grant of the batch's state (with its webhook and, if Discord holds
    /// anything of it, its sync).
    fn revoke_grant(
        &self,
        state: &mut State,
        writes: &mut Writes,
        grant_id: &str,
        reason: RevocationReason,
        now: DateTime<Utc>,
    ) {
        let grant = state
            .sub_grants
            .values_mut()
            .chain(state.pay_grants.values_mut())
            .flatten()
            .find(|g| g.id == grant_id);
        if let Some(g) = grant
            && g.status.is_live()
        {
            g.status = GrantStatus::Revoked;
            g.revoked_at = Some(now);
            g.revocation_reason = Some(reason);
            g.updated_at = now;
            let needs_sync = g.applied_user_id.is_some()
                || state.linked.contains(&key(&g.business_id, &g.customer_id));
            let existed = !writes.new_grants.contains(&g.id);
            writes.transition(
                &self.links,
                g,
                GrantEventType::Revoked,
                now,
                needs_sync,
                existed,
            );
            if existed {
                writes.revoked.push((g.id.clone(), reason));
            }
        }
    }

    async fn flush(
        &self,
        conn: &mut PgConnection,
        state: &State,
        mut w: Writes,
        now: DateTime<Utc>,
    ) -> Result<(), sqlx::Error> {
        // Revocations first: a grant the batch creates may take the place of one it
        // revokes (a pause and an unpause), and the live-grant unique indexes see the
        // rows as they are written. What another transaction revoked first stays as it
        // revoked it, and this batch emits nothing for it.
        let (ids, reasons): (Vec<String>, Vec<String>) = std::mem::take(&mut w.revoked)
            .into_iter()
            .map(|(id, r)| (id, r.as_str().to_string()))
            .unzip();
        let revoked_here: HashSet<String> = grant_store::revoke_many(conn, &ids, &reasons, now)
            .await?
            .into_iter()
            .collect();
        for grant in std::mem::take(&mut w.pending_syncs) {
            if revoked_here.contains(&grant) {
                let (id, payload) = sync_job(&grant);
                w.outbox(OutboxKind::Sync, id, payload);
            }
        }
        let grant_events: Vec<Vec<u8>> = std::mem::take(&mut w.grant_events)
            .into_iter()
            .filter(|(only_if, _)| only_if.as_ref().is_none_or(|g| revoked_here.contains(g)))
            .map(|(_, body)| body)
            .collect();
        for bodies in grant_events.chunks(GRANT_EVENTS_PER_MESSAGE) {
            let (id, bundle) = grant_events_bundle(bodies);
            w.outbox(OutboxKind::GrantEvents, id, bundle);
        }
        let grace = std::mem::take(&mut w.grace);
        let new: HashSet<&String> = w.new_grants.iter().collect();
        let rows = db::BatchRows {
            grants: state
                .sub_grants
                .values()
                .chain(state.pay_grants.values())
                .flatten()
                .filter(|g| new.contains(&g.id))
                .collect(),
            subscriptions: w.subscriptions.into_values().collect(),
            payments: w.payments,
            reversals: w.reversals,
            outbox_kinds: w.outbox_kinds,
            outbox_ids: w.outbox_ids,
            outbox_payloads: w.outbox_payloads,
            processed: w.processed,
        };
        db::write_batch(conn, &rows).await?;
        // After the grants the batch created: one may start its grace in the same batch.
        db::write_grace(conn, &grace, now).await?;
        Ok(())
    }
}

fn reason_of(s: &str) -> RevocationReason {
    if s == "dispute_lost" {
        RevocationReason::DisputeLost
    } else {
        RevocationReason::Refund
    }
}

fn fact_of(g: &Grant) -> Option<GrantFact> {
    Some(GrantFact {
        id: g.id.clone(),
        entitlement_id: EntitlementId::parse(g.entitlement_id.as_str()).ok()?,
        customer_id: CustomerId::parse(g.customer_id.as_str()).ok()?,
        status: g.status,
        in_grace: g.subscription_id.is_some() && g.ends_at.is_some(),
    })
}

/// What the facts of a batch are keyed by, and the subscriptions whose grants it needs
/// (businesses, subscription ids).
fn fact_keys(events: &[&Event]) -> (db::FactKeys, (Vec<String>, Vec<String>)) {
    let mut keys = db::FactKeys {
        event_ids: events.iter().map(|e| e.id.to_string()).collect(),
        ..db::FactKeys::default()
    };
    let (mut sub_b, mut sub_s) = (Vec::new(), Vec::new());
    let mut customers: HashSet<(String, String)> = HashSet::new();
    for e in events {
        let b = e.business_id.to_string();
        match &e.kind {
            EventKind::PaymentSucceeded(p) => {
                if p.brand_id.is_none() {
                    keys.brandless.push(b.clone());
                }
                for product in &p.product_ids {
                    keys.products.0.push(b.clone());
                    keys.products.1.push(product.to_string());
                }
                keys.payments.0.push(b.clone());
                keys.payments.1.push(p.payment_id.to_string());
                // A business with entitlements records every payment (backfill).
                keys.businesses.push(b.clone());
                if let Some(s) = &p.subscription_id {
                    sub_b.push(b.clone());
                    sub_s.push(s.to_string());
                }
                customers.insert((b, p.customer_id.to_string()));
            }
            EventKind::RefundSucceeded(r) => {
                keys.payments.0.push(b.clone());
                keys.payments.1.push(r.payment_id.to_string());
                keys.businesses.push(b);
            }
            EventKind::DisputeLost(d) => {
                keys.payments.0.push(b.clone());
                keys.payments.1.push(d.payment_id.to_string());
                keys.businesses.push(b);
            }
            EventKind::Subscription(_, s) => {
                if s.brand_id.is_none() {
                    keys.brandless.push(b.clone());
                }
                keys.products.0.push(b.clone());
                keys.products.1.push(s.product_id.to_string());
                keys.businesses.push(b.clone());
                sub_b.push(b.clone());
                sub_s.push(s.subscription_id.to_string());
                customers.insert((b, s.customer_id.to_string()));
            }
        }
    }
    keys.businesses.sort();
    keys.businesses.dedup();
    keys.subscriptions = (sub_b.clone(), sub_s.clone());
    keys.customers = customers.into_iter().unzip();
    keys.brandless.sort();
    keys.brandless.dedup();

    (keys, (sub_b, sub_s))
}

impl State {
    /// Takes in one fact read for the batch. A payment of a subscription adds that
    /// subscription to `subscriptions` (a refund of it needs its grants).
    fn learn(
        &mut self,
        fact: db::Fact,
        kept_since: Option<DateTime<Utc>>,
        subscriptions: &mut (Vec<String>, Vec<String>),
    ) {
        let state = self;
        let (sub_b, sub_s) = (&mut subscriptions.0, &mut subscriptions.1);
        match fact {
            db::Fact::Processed(id) => {
                state.processed.insert(id);
            }
            db::Fact::ProductEntitlement {
                business,
                product,
                entitlement,
                ..
            } => {
                if let Ok(e) = EntitlementId::parse(entitlement) {
                    state
                        .product_entitlements
                        .entry((business, product))
                        .or_default()
                        .push(e);
                }
            }
            db::Fact::BusinessWithEntitlements(b) => {
                state.businesses_with_entitlements.insert(b);
            }
            db::Fact::Payment {
                business,
                payment,
                subscription,
            } => {
                // A refund of a subscription's payment needs that subscription's grants.
                if let Some(sub) = &subscription {
                    sub_b.push(business.clone());
                    sub_s.push(sub.clone());
                }
                state.payments.insert((business, payment), subscription);
            }
            db::Fact::Reversal {
                business,
                payment,
                reason,
                ..
            } => state
                .reversals
                .entry((business, payment))
                .or_default()
                .push(reason_of(&reason)),
            db::Fact::LastApplied(s) => {
                let ids_pruned =
                    s.last_event_ids.is_none() && kept_since.is_some_and(|k| s.updated_at < k);
                state.subscription_last.insert(
                    (s.business_id, s.subscription_id),
                    LastApplied {
                        at: s.last_event_at,
                        ids: s.last_event_ids,
                        ids_pruned,
                    },
                );
            }
            db::Fact::Linked { business, customer } => {
                state.linked.insert((business, customer));
            }
            db::Fact::Brand { business, brand } => {
                if let Some(brand) = brand {
                    state.brands.insert(business, brand);
                }
            }
            db::Fact::Grace {
                business,
                entitlement,
                days,
            } => {
                if let Ok(days) = u32::try_from(days) {
                    state.grace_days.insert((business, entitlement), days);
                }
            }
        }
    }

    /// Takes in the grants of the batch's payments and subscriptions.
    fn add_grants(&mut self, grants: Vec<grant_store::GrantOfSource>) {
        let state = self;
        for grant_store::GrantOfSource {
            grant: g,
            customer_linked,
        } in grants
        {
            // Customers of the grants an event may touch (a refund names none).
            if customer_linked {
                state
                    .linked
                    .insert((g.business_id.clone(), g.customer_id.clone()));
            }
            let (k, list) = match (&g.subscription_id, &g.payment_id) {
                (Some(s), _) => (key(&g.business_id, s), &mut state.sub_grants),
                (None, Some(p)) => (key(&g.business_id, p), &mut state.pay_grants),
                (None, None) => continue,
            };
            list.entry(k).or_default().push(g);
        }
    }
}

/// What a new grant is given.
struct NewGrant<'a> {
    entitlement_id: &'a EntitlementId,
    customer_id: &'a CustomerId,
    brand_id: Option<&'a BrandId>,
    source: &'a GrantSource,
}

/// A grace period starts for a live subscription grant: it stays until `until`.
fn start_grace(
    state: &mut State,
    writes: &mut Writes,
    grant_id: &str,
    reason: RevocationReason,
    until: DateTime<Utc>,
    now: DateTime<Utc>,
) {
    if let Some(g) = state
        .sub_grants
        .values_mut()
        .flatten()
        .find(|g| g.id == grant_id && g.status.is_live())
    {
        g.ends_at = Some(until);
        g.ends_reason = Some(reason);
        g.updated_at = now;
        writes.grace.push(db::GraceRow {
            grant_id: g.id.clone(),
            ends_at: Some(until),
            reason: Some(reason.as_str()),
        });
    }
}

/// A grace period ends early: the subscription is active again.
fn end_grace(state: &mut State, writes: &mut Writes, grant_id: &str, now: DateTime<Utc>) {
    if let Some(g) = state
        .sub_grants
        .values_mut()
        .flatten()
        .find(|g| g.id == grant_id && g.ends_at.is_some())
    {
        g.ends_at = None;
        g.ends_reason = None;
        g.updated_at = now;
        writes.grace.push(db::GraceRow {
            grant_id: g.id.clone(),
            ends_at: None,
            reason: None,
        });
    }
}

/// Remembers a subscription event: the snapshot, and the ids applied at its time.
fn record_subscription(state: &mut State, writes: &mut Writes, event: &Event) {
    let b = event.business_id.as_str();

    if let EventKind::Subscription(_, s) = &event.kind {
        // Events stamped alike are all remembered; a later time starts afresh.
        let fresh = || LastApplied {
            at: event.timestamp,
            ids: Some(Vec::new()),
            ids_pruned: false,
        };
        let last = state
            .subscription_last
            .entry(key(b, s.subscription_id.as_str()))
            .or_insert_with(fresh);
        if last.at != event.timestamp {
            *last = fresh();
        }
        // A snapshot without ids stays without them at its own time: the ids
        // of the events applied before are unknown.
        if let Some(ids) = &mut last.ids {
            ids.push(event.id.to_string());
        }
        let ids = last.ids.clone();
        writes.subscriptions.insert(
            key(b, s.subscription_id.as_str()),
            db::SubscriptionRow {
                subscription_id: s.subscription_id.to_string(),
                business_id: b.to_string(),
                customer_id: s.customer_id.to_string(),
                product_id: s.product_id.to_string(),
                status: s.status.as_str().to_string(),
                last_event_at: event.timestamp,
                last_event_ids: ids,
            },
        );
    }
}

/// Remembers a payment: for later refunds, disputes and backfills.
fn record_payment(state: &mut State, writes: &mut Writes, event: &Event) {
    let b = event.business_id.as_str();

    if let EventKind::PaymentSucceeded(p) = &event.kind {
        let sub = p.subscription_id.as_ref().map(|s| s.to_string());
        state
            .payments
            .insert(key(b, p.payment_id.as_str()), sub.clone());
        writes.payments.push(db::PaymentRow {
            payment_id: p.payment_id.to_string(),
            business_id: b.to_string(),
            customer_id: p.customer_id.to_string(),
            subscription_id: sub,
            product_ids: p
                .product_ids
                .iter()
                .map(|id| id.as_str())
                .collect::<Vec<_>>()
                .join(" "),
        });
    }
}

/// Remembers a refund or a lost dispute of a payment.
fn record_reversal(
    state: &mut State,
    writes: &mut Writes,
    event: &Event,
    reason: RevocationReason,
) {
    let b = event.business_id.as_str();

    let pay = match &event.kind {
        EventKind::RefundSucceeded(r) => r.payment_id.as_str(),
        EventKind::DisputeLost(d) => d.payment_id.as_str(),
        _ => return,
    };
    let recorded = state.reversals.entry(key(b, pay)).or_default();
    if !recorded.contains(&reason) {
        recorded.push(reason);
    }
    writes.reversals.push(db::ReversalRow {
        payment_id: pay.to_string(),
        reason: reason.as_str(),
        business_id: b.to_string(),
    });
}
