//! Signed `entitlement_grant.*` webhooks to merchants (Standard Webhooks), never losing
//! one.
//!
//! ```text
//! <prefix>.grant-events ─► fanout ─► one message per endpoint + outbox job (one statement per batch)
//!                                          │ outbox relay (confirms)
//!                                          ▼
//!                          <prefix>.webhooks ─► deliver ─► POST, record attempt
//!                                ▲                 │ failure
//!                                └── .retry.<delay> ┘ … after the last: .dead
//! ```
//!
//! - [`endpoints`]: endpoints per business (at most 5), secrets and their rotation.
//! - [`ssrf`]: only public `https` targets, checked on save and at connect time.
//! - [`fanout`]: grant events into messages; the message id is the stable `webhook-id`,
//!   derived from (grant, event type, endpoint), so each grant sends each event type at
//!   most once per endpoint however often its grant event is delivered.
//! - [`deliver`]: competing workers; [`schedule`] decides retries, [`isolation`] keeps
//!   a slow or dead endpoint from taking the workers of the others; the messages of an
//!   endpoint at its in-flight cap are parked in PostgreSQL and pulled in order as its
//!   requests finish ([`parking`]); those of an endpoint that hangs or whose circuit is
//!   open are held there, and [`holds`] sends them again when their time comes (or
//!   parks them when the endpoint answers); [`pacing`] keeps an endpoint's deliveries
//!   within its `rate_limit`; [`crate::shares`] keeps one business's endpoints from taking the
//!   workers of other businesses.
//! - [`replay`]: send a message, or an endpoint's failed messages, again.
//! - [`signing`]: `webhook-signature` values.

pub mod deliver;
pub mod endpoints;
pub mod fanout;
pub mod holds;
pub mod isolation;

pub mod pacing;
pub mod parking;
pub mod reader;
pub mod recorder;
pub mod replay;
pub mod schedule;
pub mod signing;
pub mod ssrf;

use std::sync::Arc;

use sqlx::PgPool;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::amqp::Broker;
use crate::config::Settings;
use crate::metrics::Metrics;

/// Spawns the fan-out consumers (`amqp.consumers` of them), the delivery workers and the
/// hold releaser.
pub fn spawn(
    tasks: &mut JoinSet<&'static str>,
    pool: &PgPool,
    broker: &Broker,
    settings: &Settings,
    metrics: &Arc<Metrics>,
    shutdown: &CancellationToken,
) {
    let deliverer = deliver::Deliverer::new(
        pool.clone(),
        broker.clone(),
        &settings.webhooks,
        metrics.clone(),
    );
    let fanout_holds = deliverer.as_ref().ok().cloned();
    let fanout = fanout::Fanout {
        pool: pool.clone(),
        broker: broker.clone(),
        prefetch: settings.amqp.prefetch,
        batch_size: settings.amqp.batch_size,
        batch_linger: settings.amqp.batch_linger,
        metrics: metrics.clone(),
        holds: fanout_holds,
    };
    for _ in 0..settings.amqp.consumers {
        let (f, s) = (fanout.clone(), shutdown.clone());
        tasks.spawn(async move {
            f.run(s).await;
            "webhook fan-out"
        });
    }
    let (p, s) = (pool.clone(), shutdown.clone());
    tasks.spawn(async move {
        holds::run(p, s).await;
        "webhook hold releaser"
    });
    match deliverer {
        Ok(d) => {
            let s = shutdown.clone();
            tasks.spawn(async move {
                d.run(s).await;
                "webhook delivery"
            });
        }
        Err(e) => {
            // Without a client nothing can be delivered: end the task, which stops the
            // app with this reason rather than run without webhooks.
            tracing::error!(error = %e, "cannot build the webhook HTTP client");
            tasks.spawn(async { "webhook delivery (no HTTP client)" });
        }
    }
}
