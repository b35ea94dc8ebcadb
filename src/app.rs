//! Start-up and shutdown. [`App::build`] connects, migrates, declares and binds (port 0
//! in tests); [`App::run_until_stopped`] runs every task until the shutdown token fires,
//! lets each finish what it holds, and reports which task ended and why.

use std::net::SocketAddr;
use std::sync::Arc;

use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::amqp::Broker;
use crate::config::Settings;
use crate::crypto::TokenCipher;
use crate::discord::Bots;
use crate::domain::decide::Policy;
use crate::events::apply::Applier;
use crate::events::consumer::EventConsumer;
use crate::events::decode::DecodeLimits;
use crate::grants::link::LinkBuilder;
use crate::metrics::Metrics;
use crate::outbox::Relay;
use crate::store;
use crate::sync::SyncWorker;
use crate::web::{self, AppState};

/// What `serve` should run.
#[derive(Clone, Debug)]
pub struct Options {
    pub migrate: bool,
    pub declare: bool,
    pub consumers: bool,
    pub relay: bool,
    /// The Discord syncer (`<prefix>.discord-sync`).
    pub sync: bool,
    /// Webhook fan-out (`<prefix>.grant-events`) and delivery (`<prefix>.webhooks`).
    pub webhooks: bool,
    /// The email worker (`<prefix>.emails`), when `email.smtp_url` is set.
    pub email: bool,
    /// Where the relay and the syncer fail on purpose: none, except in tests.
    pub faults: crate::faults::SharedFaults,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            migrate: true,
            declare: true,
            consumers: true,
            relay: true,
            sync: true,
            webhooks: true,
            email: true,
            faults: crate::faults::none(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("schema: {0}")]
    Schema(#[from] store::SchemaError),
    #[error("broker: {0}")]
    Broker(#[from] lapin::Error),
    #[error("cannot bind {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
}

/// A built, not yet running, guildgate.
pub struct App {
    pub settings: Arc<Settings>,
    /// The pool of ingest, the relay, the syncer, delivery and the timers.
    pub pool: PgPool,
    /// The HTTP handlers' pool ([`store::http_pool`]), shared out among callers
    /// ([`web::pool`]).
    pub http_pool: web::pool::HttpPool,
    /// Readiness's question to the database, on `pool`.
    probe: Arc<store::Probe>,
    pub broker: Broker,
    pub metrics: Arc<Metrics>,
    pub links: LinkBuilder,
    pub relay: Relay,
    /// The bots, each with a side budget (HTTP handlers) and the syncer's.
    pub bots: Bots,
    pub cipher: TokenCipher,
    /// The HTTP rate limits (per business, per OAuth link and client address).
    pub limits: Arc<web::limits::Limits>,
    /// The API keys that authenticated recently.
    pub keys: web::api::auth::KnownKeys,
    listener: TcpListener,
    options: Options,
}

impl App {
    pub async fn build(settings: Settings, options: Options) -> Result<Self, StartError> {
        let listener = TcpListener::bind(&settings.http.addr)
            .await
            .map_err(|source| StartError::Bind {
                addr: settings.http.addr.clone(),
                source,
            })?;
        Self::build_with_listener(settings, options, listener).await
    }

    /// Like [`App::build`] on a socket bound by the caller (tests bind first to learn the
    /// port that `http.public_url` must name).
    pub async fn build_with_listener(
        settings: Settings,
        options: Options,
        listener: TcpListener,
    ) -> Result<Self, StartError> {
        if options.migrate {
            store::ensure_database(&settings.database).await?;
        }
        let pool = store::pool(&settings.database)?;
        let http_pool = store::http_pool(&settings.database)?;
        if options.migrate {
            store::migrate(&pool).await?;
        } else {
            // Another step migrates: refuse a schema this release was not built for. A
            // database that cannot be read now is waited out like any outage later.
            match store::check_schema(&pool).await {
                Err(store::SchemaError::Db(e)) if store::is_transient(&e) => {
                    tracing::warn!(error = %e, "cannot read the applied migrations; starting without checking them")
                }
                r => r?,
            }
        }
        let broker = if options.declare {
            Broker::new(&settings, "guildgate")
        } else {
            Broker::without_declare(&settings, "guildgate")
        };
        // Connect (and declare) now, so a misconfigured broker fails the start.
        broker
            .try_channel()
            .await?
            .close(200, "declared".into())
            .await?;
        let metrics = Metrics::new();
        let http_pool = web::pool::HttpPool::new(
            http_pool,
            &settings.database,
            metrics.http_database_waiting.clone(),
        );
        let relay = Relay {
            pool: pool.clone(),
            broker: broker.clone(),
            batch_size: settings.outbox.batch_size,
            sweep_interval: settings.outbox.sweep_interval,
            linger: settings.outbox.linger,
            metrics: metrics.clone(),
            faults: options.faults.clone(),
        };
        let cipher = settings
            .token_cipher()
            .expect("validated when the settings were loaded");
        let bots = Bots::new(
            pool.clone(),
            cipher.clone(),
            &settings.discord,
            metrics.clone(),
        );
        // Which business speaks through its own bot, before the first request needs it.
        if let Err(e) = bots.refresh().await {
            if !store::is_transient(&e) {
                return Err(e.into());
            }
            tracing::warn!(error = %e, "cannot read the businesses' Discord applications yet; reading them again shortly");
        }
        Ok(Self {
            links: LinkBuilder::from_settings(&settings).with_directory(bots.directory()),
            bots,
            cipher,
            limits: Arc::new(web::limits::Limits::from_settings(&settings)),
            keys: web::api::auth::KnownKeys::default(),
            settings: Arc::new(settings),
            probe: Arc::new(store::Probe::new(pool.clone())),
            http_pool,
            pool,
            broker,
            metrics,
            relay,
            listener,
            options,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("bound")
    }

    pub fn state(&self) -> AppState {
        AppState {
            settings: self.settings.clone(),
            pool: self.http_pool.clone(),
            database: self.probe.clone(),
            broker: self.broker.clone(),
            links: self.links.clone(),
            metrics: self.metrics.clone(),
            bots: self.bots.clone(),
            cipher: self.cipher.clone(),
            limits: self.limits.clone(),
            keys: self.keys.clone(),
        }
    }

    /// The Discord syncer, on the syncer's budget: Discord's global limit minus the
    /// side budget. Run one per process; the queue's single active consumer makes one
    /// of them the owner of the rate limit.
    pub fn sync_worker(&self) -> SyncWorker {
        SyncWorker::new(
            self.pool.clone(),
            self.broker.clone(),
            self.bots.clone(),
            self.cipher.clone(),
            self.links.clone(),
            self.settings.sync.retry_delays.clone(),
            self.metrics.clone(),
        )
        .with_faults(self.options.faults.clone())
    }

    /// The email worker (`email.smtp_url` must be set).
    pub fn email_worker(&self) -> Result<crate::email::worker::EmailWorker, String> {
        let s = &self.settings.email;
        Ok(crate::email::worker::EmailWorker {
            pool: self.pool.clone(),
            broker: self.broker.clone(),
            mailer: crate::email::transport::Mailer::from_settings(s)?,
            from: s.from.parse().map_err(|e| format!("email.from: {e}"))?,
            links: self.links.clone(),
            retry_delays: s.retry_delays.clone(),
            per_recipient_per_hour: s.per_recipient_per_hour,
            per_business_per_hour: s.per_business_per_hour,
            recipient_secret: self.settings.secrets.state_signing_key.clone(),
            metrics: self.metrics.clone(),
        })
    }

    pub fn event_consumer(&self) -> EventConsumer {
        let s = &self.settings;
        EventConsumer {
            pool: self.pool.clone(),
            broker: self.broker.clone(),
            applier: Applier {
                links: self.links.clone(),
                policy: Policy {
                    revoke_on_subscription_refund: s.grants.revoke_on_subscription_refund,
                },
                processed_retention: s.ingest.processed_retention,
                email: s.email.enabled(),
            },
            limits: DecodeLimits::from_settings(s),
            prefetch: s.amqp.prefetch,
            batch_size: s.amqp.batch_size,
            batch_linger: s.amqp.batch_linger,
            metrics: self.metrics.clone(),
        }
    }

    /// Runs until `shutdown` fires, then waits for every task to finish what it holds.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> Result<(), String> {
        let mut tasks: JoinSet<&'static str> = JoinSet::new();
        let router = web::app(self.state());
        self.spawn_workers(&mut tasks, &shutdown)?;
        self.spawn_periodic(&mut tasks, &shutdown);
        let http_shutdown = shutdown.clone();
        let listener = self.listener;
        tasks.spawn(async move {
            // With the peer's address: the OAuth callback limits per client address.
            let service = router.into_make_service_with_connect_info::<SocketAddr>();
            let r = axum::serve(listener, service)
                .with_graceful_shutdown(async move { http_shutdown.cancelled().await })
                .await;
            if let Err(e) = r {
                tracing::error!(error = %e, "HTTP server failed");
            }
            "http"
        });
        let first_exit = supervise(tasks, &shutdown).await;
        self.broker.close().await;
        self.http_pool.close().await;
        self.pool.close().await;
        match first_exit {
            Some(name) => Err(format!("task '{name}' ended unexpectedly")),
            None => Ok(()),
        }
    }

    /// The queue consumers and the relay, as `options` asks.
    fn spawn_workers(
        &self,
        tasks: &mut JoinSet<&'static str>,
        shutdown: &CancellationToken,
    ) -> Result<(), String> {
        let consumer = self.event_consumer();
        let syncer = self.sync_worker();
        let mailer = if self.options.email && self.settings.email.enabled() {
            Some(self.email_worker()?)
        } else {
            None
        };
        if self.options.consumers {
            for _ in 0..self.settings.amqp.consumers {
                let c = consumer.clone();
                let s = shutdown.clone();
                tasks.spawn(async move {
                    c.run(s).await;
                    "event consumer"
                });
            }
        }
        if self.options.webhooks {
            crate::webhooks::spawn(
                tasks,
                &self.pool,
                &self.broker,
                &self.settings,
                &self.metrics,
                shutdown,
            );
        }
        if let Some(worker) = mailer {
            let s = shutdown.clone();
            tasks.spawn(async move {
                worker.run(s).await;
                "email worker"
            });
        }
        if self.options.sync {
            let s = shutdown.clone();
            tasks.spawn(async move {
                syncer.run(s).await;
                "discord syncer"
            });
        }
        if self.options.relay {
            let relay = self.relay.clone();
            let s = shutdown.clone();
            tasks.spawn(async move {
                relay.run(s).await;
                "outbox relay"
            });
        }
        Ok(())
    }

    /// What runs every so often: the bots' directory, limits upkeep, pruners, timers,
    /// backfills, email upkeep, the drift reconcile, the queue-depth sampler.
    fn spawn_periodic(&self, tasks: &mut JoinSet<&'static str>, shutdown: &CancellationToken) {
        {
            let (bots, s) = (self.bots.clone(), shutdown.clone());
            tasks.spawn(async move {
                bots.keep_fresh(s).await;
                "discord applications"
            });
        }
        {
            let (limits, s) = (self.limits.clone(), shutdown.clone());
            tasks.spawn(async move {
                limits
                    .forget_idle_every(std::time::Duration::from_secs(60), s)
                    .await;
                "rate limit upkeep"
            });
        }
        use crate::events::retention::{Pruner, Target};
        for (retention, target, name) in [
            (
                self.settings.ingest.processed_retention,
                Target::EventIds,
                "event id pruner",
            ),
            (
                self.settings.webhooks.message_retention,
                Target::WebhookMessages,
                "webhook message pruner",
            ),
        ] {
            let Some(retention) = retention else { continue };
            let pruner = Pruner {
                pool: self.pool.clone(),
                retention,
                metrics: self.metrics.clone(),
                target,
            };
            let (every, s) = (self.settings.ingest.prune_interval, shutdown.clone());
            tasks.spawn(async move {
                pruner.run_every(every, s).await;
                name
            });
        }
        {
            let timers = crate::lifecycle::timers::Timers {
                pool: self.pool.clone(),
                links: self.links.clone(),
                metrics: self.metrics.clone(),
            };
            let (every, s) = (self.settings.grants.timer_interval, shutdown.clone());
            tasks.spawn(async move {
                timers.run_every(every, s).await;
                "grant timers"
            });
            let backfiller = crate::lifecycle::backfill::Backfiller {
                pool: self.pool.clone(),
                links: self.links.clone(),
                per_second: self.settings.grants.backfill_per_second,
                email: self.settings.email.enabled(),
            };
            let s = shutdown.clone();
            tasks.spawn(async move {
                backfiller.run_every(every, s).await;
                "backfill"
            });
            let mover = crate::lifecycle::moves::Mover {
                pool: self.pool.clone(),
                metrics: self.metrics.clone(),
                per_second: self.settings.grants.moves_per_second,
            };
            let s = shutdown.clone();
            tasks.spawn(async move {
                mover.run_every(every, s).await;
                "entitlement moves"
            });
            let upkeep = crate::email::upkeep::Upkeep {
                pool: self.pool.clone(),
                send: self.settings.email.enabled(),
                prune_every: self.settings.ingest.prune_interval,
                per_business_per_hour: self.settings.email.per_business_per_hour,
            };
            let s = shutdown.clone();
            tasks.spawn(async move {
                upkeep.run_every(every, s).await;
                "email upkeep"
            });
        }
        if let Some(every) = self.settings.reconcile.interval {
            // Discord reads on the side budget, never the syncer's.
            let reconciler = crate::reconcile::Reconciler {
                pool: self.pool.clone(),
                bots: self.bots.clone(),
                links: self.links.clone(),
            };
            let policy = self.settings.reconcile.policy;
            let s = shutdown.clone();
            tasks.spawn(async move {
                reconciler.run_every(every, policy, s).await;
                "drift reconcile"
            });
        }
        {
            let (broker, metrics, s) =
                (self.broker.clone(), self.metrics.clone(), shutdown.clone());
            tasks.spawn(async move {
                crate::amqp::depths::sample_queue_depths(
                    broker,
                    metrics,
                    crate::amqp::depths::QUEUE_DEPTH_INTERVAL,
                    s,
                )
                .await;
                "queue depth sampler"
            });
        }
    }
}

/// Waits for every task until `shutdown` and then until each finished what it holds;
/// a task that ends before `shutdown` stops everything. Returns that task's name.
async fn supervise(
    mut tasks: JoinSet<&'static str>,
    shutdown: &CancellationToken,
) -> Option<&'static str> {
    let mut first_exit: Option<&'static str> = None;
    loop {
        let done = if shutdown.is_cancelled() {
            // Say what is still finishing its work, rather than hang silently.
            match tokio::time::timeout(std::time::Duration::from_secs(10), tasks.join_next()).await
            {
                Ok(Some(done)) => done,
                Ok(None) => break,
                Err(_) => {
                    tracing::warn!(
                        tasks = tasks.len(),
                        "still waiting for tasks to finish after shutdown"
                    );
                    continue;
                }
            }
        } else {
            match tasks.join_next().await {
                Some(done) => done,
                None => break,
            }
        };
        let name = match done {
            Ok(name) => name,
            Err(e) => {
                tracing::error!(error = %e, "task panicked");
                "a task (panicked)"
            }
        };
        if !shutdown.is_cancelled() {
            tracing::error!(
                task = name,
                "task ended before shutdown; stopping everything"
            );
            first_exit.get_or_insert(name);
            shutdown.cancel();
        } else {
            tracing::info!(task = name, "task stopped");
        }
    }
    first_exit
}

/// `guildgate serve`: builds everything and runs it until SIGTERM or Ctrl-C, then lets
/// each task finish what it holds.
pub async fn serve(settings: Settings, options: Options) -> Result<(), String> {
    let app = App::build(settings, options)
        .await
        .map_err(|e| e.to_string())?;
    tracing::info!(addr = %app.local_addr(), "guildgate serving");
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown requested: finishing work in hand");
        signal.cancel();
    });
    app.run_until_stopped(shutdown).await
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
