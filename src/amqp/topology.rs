//! Everything guildgate owns in RabbitMQ, named from the queue prefix
//! (docs/architecture.md, "Names"), and its declaration.
//!
//! Every queue is a quorum queue (replicated, durable, with a delivery limit). Queues
//! that can hold a message that will never succeed dead-letter to their `.dead` queue
//! through the `<prefix>.dead-letter` direct exchange, with the at-least-once strategy,
//! so a message is never dropped between the two. Retry tiers are TTL queues that
//! dead-letter back into their work queue when the TTL expires; a tier is named by its
//! delay because a queue's TTL cannot change once declared.
//!
//! Message size is not bounded here: RabbitMQ 3.10 has no per-queue or
//! per-exchange limit on the size of one message, only the node-wide `max_message_size`
//! of `rabbitmq.conf` (`deploy/rabbitmq/rabbitmq.conf` sets it), which AMQP does not let a
//! client read or set. `x-max-length-bytes` bounds a queue's total, not one message.
//! guildgate's own ceiling, `amqp.max_message_bytes`, applies once a payment event is read.

use std::time::Duration;

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, ExchangeKind};

use crate::config::{Settings, format_duration_short};

/// Routing keys of the platform's exchange that guildgate consumes.
pub const PAYMENT_BINDINGS: [&str; 4] = [
    "payment.succeeded",
    "refund.succeeded",
    "dispute.lost",
    "subscription.#",
];

/// Names of everything guildgate owns.
#[derive(Clone, Debug)]
pub struct Names {
    pub prefix: String,
    /// The platform's topic exchange.
    pub platform_exchange: String,
}

impl Names {
    pub fn new(prefix: &str, platform_exchange: &str) -> Self {
        Self {
            prefix: prefix.to_string(),
            platform_exchange: platform_exchange.to_string(),
        }
    }

    pub fn from_settings(s: &Settings) -> Self {
        Self::new(&s.amqp.queue_prefix, &s.amqp.exchange)
    }

    fn q(&self, name: &str) -> String {
        format!("{}.{name}", self.prefix)
    }

    pub fn payment_events(&self) -> String {
        self.q("payment-events")
    }
    pub fn discord_sync(&self) -> String {
        self.q("discord-sync")
    }
    pub fn grant_events(&self) -> String {
        self.q("grant-events")
    }
    pub fn webhooks(&self) -> String {
        self.q("webhooks")
    }
    pub fn emails(&self) -> String {
        self.q("emails")
    }
    /// The dead-letter exchange (direct; routing key = the dead queue's name).
    pub fn dead_letter_exchange(&self) -> String {
        self.q("dead-letter")
    }
    /// `<queue>.dead`.
    pub fn dead(queue: &str) -> String {
        format!("{queue}.dead")
    }
    /// `<queue>.retry.<delay>`.
    pub fn retry(queue: &str, delay: Duration) -> String {
        format!("{queue}.retry.{}", format_duration_short(delay))
    }

    /// The work queues that have a dead-letter queue.
    pub fn work_queues(&self) -> [String; 5] {
        [
            self.payment_events(),
            self.discord_sync(),
            self.grant_events(),
            self.webhooks(),
            self.emails(),
        ]
    }

    /// Every dead-letter queue guildgate owns.
    pub fn dead_queues(&self) -> Vec<String> {
        self.work_queues().iter().map(|q| Self::dead(q)).collect()
    }
}

fn args(pairs: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in pairs {
        t.insert(ShortString::from(*k), v.clone());
    }
    t
}

fn s(v: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(v))
}

fn durable() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    }
}

/// Declares the whole topology. Idempotent: re-run on every start and reconnect.
pub async fn declare(ch: &Channel, names: &Names, settings: &Settings) -> Result<(), lapin::Error> {
    let ex_opts = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    // The platform's exchange: declared if missing, with the type it must have.
    ch.exchange_declare(
        names.platform_exchange.as_str().into(),
        ExchangeKind::Topic,
        ex_opts,
        FieldTable::default(),
    )
    .await?;
    let dlx = names.dead_letter_exchange();
    ch.exchange_declare(
        dlx.as_str().into(),
        ExchangeKind::Direct,
        ex_opts,
        FieldTable::default(),
    )
    .await?;

    let delivery_limit = AMQPValue::LongInt(settings.amqp.delivery_limit as i32);
    // Every queue is a quorum queue, with the cluster placement the settings ask for.
    let mut quorum = vec![("x-queue-type", s("quorum"))];
    if let Some(n) = settings.amqp.quorum_replicas {
        quorum.push(("x-quorum-initial-group-size", AMQPValue::LongInt(n.into())));
    }
    if let Some(l) = &settings.amqp.leader_locator {
        quorum.push(("x-queue-leader-locator", s(l)));
    }
    let at_least_once = [
        ("x-dead-letter-strategy", s("at-least-once")),
        ("x-overflow", s("reject-publish")),
    ];

    for queue in names.work_queues() {
        let dead = Names::dead(&queue);
        ch.queue_declare(dead.as_str().into(), durable(), args(&quorum))
            .await?;
        ch.queue_bind(
            dead.as_str().into(),
            dlx.as_str().into(),
            dead.as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
        let mut a = quorum.clone();
        a.extend([
            ("x-dead-letter-exchange", s(&dlx)),
            ("x-dead-letter-routing-key", s(&dead)),
            ("x-delivery-limit", delivery_limit.clone()),
        ]);
        a.extend(at_least_once.iter().cloned());
        if queue == names.discord_sync() {
            // One process owns Discord's rate limit; the others stand by.
            a.push(("x-single-active-consumer", AMQPValue::Boolean(true)));
        }
        ch.queue_declare(queue.as_str().into(), durable(), args(&a))
            .await?;
    }

    for key in PAYMENT_BINDINGS {
        ch.queue_bind(
            names.payment_events().as_str().into(),
            names.platform_exchange.as_str().into(),
            key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    }

    for (queue, delays) in [
        (names.discord_sync(), &settings.sync.retry_delays),
        (names.webhooks(), &settings.webhooks.retry_delays),
        (names.emails(), &settings.email.retry_delays),
    ] {
        for delay in delays.iter().filter(|d| !d.is_zero()) {
            let tier = Names::retry(&queue, *delay);
            let mut a = quorum.clone();
            a.extend([
                (
                    "x-message-ttl",
                    AMQPValue::LongLongInt(delay.as_millis() as i64),
                ),
                // Expired messages go back to the work queue through the default exchange.
                ("x-dead-letter-exchange", s("")),
                ("x-dead-letter-routing-key", s(&queue)),
            ]);
            a.extend(at_least_once.iter().cloned());
            ch.queue_declare(tier.as_str().into(), durable(), args(&a))
                .await?;
        }
    }
    Ok(())
}

/// Every queue name `declare` creates (for cleanup and inspection).
pub fn all_queues(names: &Names, settings: &Settings) -> Vec<String> {
    let mut out: Vec<String> = names.work_queues().to_vec();
    out.extend(names.dead_queues());
    for (queue, delays) in [
        (names.discord_sync(), &settings.sync.retry_delays),
        (names.webhooks(), &settings.webhooks.retry_delays),
        (names.emails(), &settings.email.retry_delays),
    ] {
        for d in delays.iter().filter(|d| !d.is_zero()) {
            let t = Names::retry(&queue, *d);
            if !out.contains(&t) {
                out.push(t);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The broker ceiling `deploy/rabbitmq/rabbitmq.conf` sets must let through every
    /// payment event guildgate accepts and the largest message it publishes itself (a
    /// bundle of grant webhooks, allowing 4 KiB per webhook), or the deployed broker
    /// would refuse guildgate's own outbox.
    #[test]
    fn the_deployed_broker_message_ceiling_fits_what_guildgate_sends() {
        let conf = include_str!("../../deploy/rabbitmq/rabbitmq.conf");
        let ceiling: usize = conf
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .find_map(|l| {
                let (k, v) = l.split_once('=')?;
                (k.trim() == "max_message_size").then(|| v.trim().parse().expect("a number"))
            })
            .expect("rabbitmq.conf sets max_message_size");
        let defaults = Settings::load_with_env(None, Some(Default::default())).unwrap();
        assert!(ceiling >= defaults.amqp.max_message_bytes, "{ceiling}");
        assert!(
            ceiling >= crate::outbox::produce::GRANT_EVENTS_PER_MESSAGE * 4096,
            "{ceiling}"
        );
    }

    #[test]
    fn names_follow_the_design() {
        let n = Names::new("guildgate", "payments");
        assert_eq!(n.payment_events(), "guildgate.payment-events");
        assert_eq!(
            Names::dead(&n.payment_events()),
            "guildgate.payment-events.dead"
        );
        assert_eq!(
            Names::retry(&n.discord_sync(), Duration::from_secs(30)),
            "guildgate.discord-sync.retry.30s"
        );
        assert_eq!(
            Names::retry(&n.webhooks(), Duration::from_secs(7200)),
            "guildgate.webhooks.retry.2h"
        );
    }
}
