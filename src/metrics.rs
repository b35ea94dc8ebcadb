//! Prometheus metrics: one registry per running app (tests run several apps in one
//! process), exposed on `/metrics`.

use std::sync::Arc;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, String)>;

/// The `type` label of payment events of every type guildgate does not act on.
pub const OTHER_TYPE: &str = "other";

fn latency_histogram() -> Histogram {
    // 1 ms .. ~16 s
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

/// Every metric guildgate exports.
pub struct Metrics {
    registry: Registry,
    /// Every payment event settled, whatever its outcome (benchmarks, tests).
    pub events_settled: std::sync::atomic::AtomicU64,
    /// Payment events by `type` (one guildgate acts on, or [`OTHER_TYPE`]) and
    /// `outcome` (applied, duplicate, stale, irrelevant, ignored, dead_lettered).
    pub events: Family<Labels, Counter>,
    /// Seconds from receipt of a batch to its commit.
    pub event_latency: Histogram,
    /// Applied event ids deleted once older than the retention.
    pub processed_pruned: Counter,
    /// Settled webhook messages (with their attempts) deleted once older than
    /// `webhooks.message_retention`.
    pub webhook_messages_pruned: Counter,
    /// Outbox rows relayed, by kind.
    pub outbox_relayed: Family<Labels, Counter>,
    /// Relay transactions that published rows (each a commit and a confirmed publish).
    pub outbox_drains: Counter,
    /// Claims of outbox rows the relay ran, including those that found none (wake-ups
    /// covered by an earlier drain, sweeps).
    pub outbox_claims: Counter,
    /// Rows waiting in the outbox, and the age of the oldest (seconds).
    pub outbox_backlog: Gauge,
    pub outbox_lag_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// Entitlement moves under way: saves whose grants the movers are still queuing.
    pub entitlement_moves: Gauge,
    /// HTTP requests waiting for their turn of the handlers' database pool.
    pub http_database_waiting: Gauge,
    /// Discord syncs by outcome.
    pub syncs: Family<Labels, Counter>,
    /// Discord requests by route and status.
    pub discord_requests: Family<Labels, Counter>,
    /// 401/403/429 answers from Discord in the last 10 minutes.
    pub discord_invalid_requests: Gauge,
    /// Stops recorded by `scope` (server, entitlement) and `code` (a fixed set).
    pub discord_stops: Family<Labels, Counter>,
    /// Grants revoked because their due time passed (the end of a grace period), by
    /// `reason`.
    pub grant_timers: Family<Labels, Counter>,
    /// Delivery emails by `kind` (join, reminder, resend) and `outcome` (sent, skipped,
    /// retried, deferred, failed, duplicate).
    pub emails: Family<Labels, Counter>,
    /// Webhook attempts by outcome, and their latency.
    pub webhook_attempts: Family<Labels, Counter>,
    pub webhook_latency: Histogram,
    /// Messages per queue, sampled.
    pub queue_depth: Family<Labels, Gauge>,
    /// API key reads by `source`: `memory` (a key that authenticated recently) or
    /// `database`.
    pub api_key_reads: Family<Labels, Counter>,
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("guildgate");
        let events = Family::<Labels, Counter>::default();
        registry.register("events", "Payment events consumed", events.clone());
        let event_latency = latency_histogram();
        registry.register(
            "event_batch_seconds",
            "Seconds from receiving a batch of events to its commit",
            event_latency.clone(),
        );
        let processed_pruned = Counter::default();
        registry.register(
            "processed_events_pruned",
            "Applied event ids deleted after ingest.processed_retention",
            processed_pruned.clone(),
        );
        let webhook_messages_pruned = Counter::default();
        registry.register(
            "webhook_messages_pruned",
            "Delivered or failed webhook messages deleted after webhooks.message_retention",
            webhook_messages_pruned.clone(),
        );
        let outbox_relayed = Family::<Labels, Counter>::default();
        registry.register(
            "outbox_relayed",
            "Outbox rows relayed to RabbitMQ",
            outbox_relayed.clone(),
        );
        let outbox_drains = Counter::default();
        registry.register(
            "outbox_drains",
            "Relay transactions that published outbox rows",
            outbox_drains.clone(),
        );
        let outbox_claims = Counter::default();
        registry.register(
            "outbox_claims",
            "Outbox claims the relay ran, including ones that found no rows",
            outbox_claims.clone(),
        );
        let outbox_backlog = Gauge::default();
        registry.register(
            "outbox_backlog",
            "Outbox rows waiting",
            outbox_backlog.clone(),
        );
        let outbox_lag_seconds = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "outbox_lag_seconds",
            "Age of the oldest outbox row",
            outbox_lag_seconds.clone(),
        );
        let entitlement_moves = Gauge::default();
        registry.register(
            "entitlement_moves",
            "Entitlement moves whose grants are still being queued for the syncer",
            entitlement_moves.clone(),
        );
        let http_database_waiting = Gauge::default();
        registry.register(
            "http_database_waiting",
            "HTTP requests waiting for their turn of the handlers' database pool",
            http_database_waiting.clone(),
        );
        let syncs = Family::<Labels, Counter>::default();
        registry.register(
            "discord_syncs",
            "Discord sync jobs by outcome",
            syncs.clone(),
        );
        let discord_requests = Family::<Labels, Counter>::default();
        registry.register(
            "discord_requests",
            "Discord API requests by route and status",
            discord_requests.clone(),
        );
        let discord_invalid_requests = Gauge::default();
        registry.register(
            "discord_invalid_requests_10m",
            "401/403/429 answers from Discord in the last 10 minutes",
            discord_invalid_requests.clone(),
        );
        let discord_stops = Family::<Labels, Counter>::default();
        registry.register(
            "discord_stops",
            "Servers and entitlements the syncer stopped calling Discord for, by scope and code",
            discord_stops.clone(),
        );
        let grant_timers = Family::<Labels, Counter>::default();
        registry.register(
            "grant_timers_fired",
            "Grants revoked when their due time passed (the end of a grace period), by reason",
            grant_timers.clone(),
        );
        let emails = Family::<Labels, Counter>::default();
        registry.register(
            "emails",
            "Delivery emails by kind and outcome",
            emails.clone(),
        );
        let webhook_attempts = Family::<Labels, Counter>::default();
        registry.register(
            "webhook_attempts",
            "Webhook delivery attempts by outcome",
            webhook_attempts.clone(),
        );
        let webhook_latency = latency_histogram();
        registry.register(
            "webhook_seconds",
            "Webhook delivery latency",
            webhook_latency.clone(),
        );
        let queue_depth = Family::<Labels, Gauge>::default();
        registry.register(
            "queue_depth",
            "Messages ready in each queue",
            queue_depth.clone(),
        );
        let api_key_reads = Family::<Labels, Counter>::default();
        registry.register(
            "api_key_reads",
            "API keys read by source (memory, database)",
            api_key_reads.clone(),
        );
        Arc::new(Self {
            registry,
            events_settled: Default::default(),
            events,
            event_latency,
            processed_pruned,
            webhook_messages_pruned,
            outbox_relayed,
            outbox_drains,
            outbox_claims,
            outbox_backlog,
            outbox_lag_seconds,
            entitlement_moves,
            http_database_waiting,
            syncs,
            discord_requests,
            discord_invalid_requests,
            discord_stops,
            grant_timers,
            emails,
            webhook_attempts,
            webhook_latency,
            queue_depth,
            api_key_reads,
        })
    }

    /// Counts one API key read from `source` (`memory` or `database`).
    pub fn api_key_read(&self, source: &'static str) {
        self.api_key_reads
            .get_or_create(&vec![("source", source.to_string())])
            .inc();
    }

    /// Counts a settled payment event. `event_type` may come from the message (its
    /// `type`, or the routing key of one that could not be read): any type guildgate
    /// does not act on is counted as [`OTHER_TYPE`], so publishers cannot add series.
    pub fn event(&self, event_type: &str, outcome: &'static str) {
        self.events_settled
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let label = crate::domain::event::known_type(event_type).unwrap_or(OTHER_TYPE);
        self.events
            .get_or_create(&vec![
                ("type", label.to_string()),
                ("outcome", outcome.to_string()),
            ])
            .inc();
    }

    /// The current value of the event counter labelled `type=event_type` (a type
    /// guildgate acts on, or [`OTHER_TYPE`]) and `outcome` (tests, benchmarks).
    pub fn event_count(&self, event_type: &str, outcome: &str) -> u64 {
        self.events
            .get(&vec![
                ("type", event_type.to_string()),
                ("outcome", outcome.to_string()),
            ])
            .map(|c| c.get())
            .unwrap_or(0)
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}
