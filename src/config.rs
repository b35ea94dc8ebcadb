//! Configuration: one typed tree, read from `config/default.toml` (embedded in the
//! binary), then an optional file given with `--config`, then environment variables.
//!
//! Environment variables are `GUILDGATE_<SECTION>__<KEY>` (double underscore between
//! section and key), plus `GUILDGATE_ENV` (`development` or `production`). They are a
//! public contract: every key, its variable and its default is in the table of
//! `docs/configuration.md`, and a test keeps that table and [`Settings`] in step.
//!
//! Secrets are [`SecretString`]: their `Debug` prints `[REDACTED]`, so logging the
//! settings never leaks them.

use std::path::Path;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Deserializer};

/// The configuration shipped with the binary; a file and the environment override it.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

/// Development-only secret values from `config/default.toml`.
const DEV_SECRETS: &[&str] = &[
    "dev-client-secret",
    "dev-bot-token",
    "dev-state-signing-key-do-not-use-in-production",
    "ZGV2LXRva2VuLWtleS1kby1ub3QtdXNlLWluLXByb2Q=",
];

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration: {0}")]
    Load(#[from] config::ConfigError),
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Environment {
    Development,
    Production,
}

#[derive(Clone, Debug, Deserialize)]
pub struct Settings {
    pub env: Environment,
    pub database: DatabaseSettings,
    pub amqp: AmqpSettings,
    pub http: HttpSettings,
    pub api: ApiSettings,
    pub oauth: OAuthSettings,
    pub discord: DiscordSettings,
    pub secrets: SecretSettings,
    pub grants: GrantSettings,
    pub ingest: IngestSettings,
    pub outbox: OutboxSettings,
    pub sync: SyncSettings,
    pub webhooks: WebhookSettings,
    pub log: LogSettings,
    pub reconcile: ReconcileSettings,
    pub email: EmailSettings,
}

#[derive(Clone, Debug, Deserialize)]
pub struct DatabaseSettings {
    pub url: SecretString,
    /// The pool of ingest, the relay, the syncer, delivery and the timers.
    pub max_connections: u32,
    /// The HTTP handlers' own pool (the merchant API, the customers' pages), so that
    /// requests can never hold a connection the work above needs.
    pub http_max_connections: u32,
    /// Of those, the most one caller (a business, a client's network) holds at once;
    /// more than `http_max_connections` means all of them.
    pub http_max_connections_per_caller: u32,
    /// `statement_timeout` of the HTTP pool's connections: the longest one statement
    /// of a request may run (a deep page of a large list, a lock waited for).
    #[serde(deserialize_with = "duration")]
    pub http_statement_timeout: Duration,
}

#[derive(Clone, Debug, Deserialize)]
pub struct AmqpSettings {
    pub url: SecretString,
    /// The nodes of a RabbitMQ cluster, comma-separated URLs with credentials; when set,
    /// they win over `url` (read them with [`AmqpSettings::nodes`]). A TOML file may
    /// give an array instead.
    #[serde(deserialize_with = "secret_list")]
    pub urls: SecretString,
    /// Replicas of each quorum queue, declared when a queue is first created
    /// (`x-quorum-initial-group-size`); `None`: the broker's default.
    pub quorum_replicas: Option<u16>,
    /// Where a new quorum queue's leader goes (`x-queue-leader-locator`:
    /// `client-local` or `balanced`); `None`: the broker's default.
    pub leader_locator: Option<String>,
    /// The platform's topic exchange that carries every merchant's payment events.
    pub exchange: String,
    /// Prefix of every queue and exchange guildgate owns.
    pub queue_prefix: String,
    /// Unacknowledged deliveries each event consumer may hold.
    pub prefetch: u16,
    /// Event consumer tasks per process (each with its own channel).
    pub consumers: usize,
    /// Events applied in one database transaction at most.
    pub batch_size: usize,
    /// How long a consumer waits for a batch to fill before applying what it has.
    #[serde(deserialize_with = "duration")]
    pub batch_linger: Duration,
    /// Larger message bodies are dead-lettered unread.
    pub max_message_bytes: usize,
    /// Quorum-queue `x-delivery-limit`: a message redelivered this often is dead-lettered
    /// by the broker (guards against a message that crashes the process every time).
    pub delivery_limit: u32,
}

impl AmqpSettings {
    /// The node URLs to connect to, in order: those of `urls` when it names any, else
    /// `url` alone. Every item was checked when the settings loaded.
    pub fn nodes(&self) -> Vec<SecretString> {
        let listed: Vec<SecretString> = self
            .urls
            .expose_secret()
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(|u| SecretString::from(u.to_owned()))
            .collect();
        if listed.is_empty() {
            vec![self.url.clone()]
        } else {
            listed
        }
    }
}

/// Where a node URL points, for logs: `host:port`, never the credentials.
pub fn node_label(url: &SecretString) -> String {
    match url::Url::parse(url.expose_secret()) {
        Ok(u) => format!(
            "{}:{}",
            u.host_str().unwrap_or("?"),
            u.port()
                .unwrap_or(if u.scheme() == "amqps" { 5671 } else { 5672 })
        ),
        Err(_) => "an unparsable URL".into(),
    }
}

#[derive(Clone, Debug, Deserialize)]
pub struct HttpSettings {
    pub addr: String,
    /// Public base URL, used for the OAuth `redirect_uri`.
    pub public_url: String,
    pub max_body_bytes: usize,
    /// Every request is answered within this (503 when the handler takes longer).
    #[serde(deserialize_with = "duration")]
    pub request_timeout: Duration,
    /// Requests handled at once per process; more are refused at once with 503.
    pub max_concurrent_requests: usize,
    /// Peers whose `X-Forwarded-For` is believed: addresses or CIDR ranges (checked when
    /// the settings load; read them with [`HttpSettings::trusted_proxy_nets`]).
    #[serde(deserialize_with = "string_list")]
    pub trusted_proxies: Vec<String>,
}

impl HttpSettings {
    /// `trusted_proxies` parsed (each was checked when the settings loaded).
    pub fn trusted_proxy_nets(&self) -> Vec<ipnet::IpNet> {
        self.trusted_proxies
            .iter()
            .filter_map(|s| parse_net(s).ok())
            .collect()
    }
}

/// A listen address: `host:port` or `[v6]:port`, the host an IP address or a name
/// (resolved when the socket is bound), the port a number.
fn listen_address(s: &str) -> Result<(), String> {
    if s.parse::<std::net::SocketAddr>().is_ok() {
        return Ok(());
    }
    let bad = || format!("{s:?} is not host:port (for example 127.0.0.1:8080 or [::]:8080)");
    let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
    if host.is_empty() || host.contains([':', '[', ']', '/', ' ']) || port.parse::<u16>().is_err() {
        return Err(bad());
    }
    Ok(())
}

/// An address (`10.0.0.1`, a single host) or a CIDR range (`10.0.0.0/8`).
pub fn parse_net(s: &str) -> Result<ipnet::IpNet, String> {
    s.parse::<ipnet::IpNet>()
        .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        .map_err(|_| format!("{s:?} is not an IP address or CIDR range"))
}

/// Limits of the merchant API: per business (after authentication), and per client
/// address for reading keys the process does not know (before it).
#[derive(Clone, Debug, Deserialize)]
pub struct ApiSettings {
    /// Requests per second a business may make, sustained.
    pub requests_per_second: u32,
    /// Requests a business may make at once above that rate.
    pub burst: u32,
    /// API keys not known to the process (not read in the last 5 s) read from the
    /// database per client address and second; a burst of five times as many.
    pub key_reads_per_address_per_second: u32,
    /// Requests of one business handled at once per process; one more gets 429. Bounds
    /// how much of the shared database pool one business's slow requests can hold.
    pub max_in_flight_per_business: u32,
}

/// Limits of the customer's OAuth callback.
#[derive(Clone, Debug, Deserialize)]
pub struct OAuthSettings {
    /// Callbacks per link (OAuth `state`) per `callback_window`.
    pub callback_attempts: u32,
    #[serde(deserialize_with = "duration")]
    pub callback_window: Duration,
    /// Callbacks per client address per `callback_window`.
    pub address_attempts: u32,
}

#[derive(Clone, Debug, Deserialize)]
pub struct DiscordSettings {
    pub api_base: String,
    pub authorize_url: String,
    pub client_id: String,
    pub client_secret: SecretString,
    pub bot_token: SecretString,
    /// How long a grant's `oauth_url` stays valid.
    #[serde(deserialize_with = "duration")]
    pub oauth_link_ttl: Duration,
    /// Budget for Discord calls made outside the syncer (validation, role listing, the
    /// OAuth code exchange, reconcile reads), per process.
    pub side_requests_per_s: u32,
    /// The longest a call waits for a slot of the side budget before it gives up
    /// (the API answers 503, the OAuth callback a try-again page).
    #[serde(deserialize_with = "duration")]
    pub side_queue_timeout: Duration,
    /// 401/403/429 answers in a sliding 10 minutes after which guildgate stops calling.
    pub invalid_request_ceiling: u32,
    /// What one business's calls may collect of that ceiling before its own calls wait.
    pub invalid_request_ceiling_per_business: u32,
    #[serde(deserialize_with = "duration")]
    pub request_timeout: Duration,
}

#[derive(Clone, Debug, Deserialize)]
pub struct SecretSettings {
    /// HMAC key that signs OAuth `state` values.
    pub state_signing_key: SecretString,
    /// Base64 of 32 bytes; encrypts customers' Discord tokens at rest.
    pub token_encryption_key: SecretString,
    /// Earlier token encryption keys (comma-separated base64 of 32 bytes each; empty
    /// for none): they still decrypt tokens stored with them, never encrypt.
    pub previous_token_encryption_keys: SecretString,
}

#[derive(Clone, Debug, Deserialize)]
pub struct GrantSettings {
    /// A full refund of a subscription payment revokes that subscription's grants.
    pub revoke_on_subscription_refund: bool,
    /// Events stamped further in the future than this are dead-lettered: applied, they
    /// would make every later event of their subscription look stale.
    #[serde(deserialize_with = "duration")]
    pub max_future_skew: Duration,
    /// How often each process looks for grants whose due time has passed (the end of a
    /// grace period, a comp grant's expiry) and revokes them, and works through the
    /// backfills of newly attached entitlements.
    #[serde(deserialize_with = "duration")]
    pub timer_interval: Duration,
    /// Grants a process gives per second at most while backfilling: each may queue a
    /// Discord sync, and the sync queue is shared by every business, so a backfill of a
    /// large product leaves room for everyone's deliveries.
    pub backfill_per_second: f64,
    /// Grants a process queues per second at most for the syncer again after a save
    /// moved an entitlement to another server or role, or retries its grants failed for
    /// a configuration cause (beyond the first page the save queues itself): the sync
    /// queue is shared by every business.
    pub moves_per_second: f64,
}

#[derive(Clone, Debug, Deserialize)]
pub struct IngestSettings {
    /// How long an applied event's id is kept to recognise a duplicate of it; `None`
    /// (empty) = forever. Older ids are pruned every `prune_interval`.
    #[serde(default, deserialize_with = "optional_duration")]
    pub processed_retention: Option<Duration>,
    #[serde(deserialize_with = "duration")]
    pub prune_interval: Duration,
}

/// The shortest `ingest.processed_retention` accepted: the platform may republish an
/// event hours later, and one applied just before a crash is redelivered on restart.
pub const MIN_PROCESSED_RETENTION: Duration = Duration::from_secs(24 * 3600);

/// The longest `webhooks.record_linger`: what it saves is a statement per few
/// attempts, and what it costs is records (a message's state in the API) that late.
pub const MAX_RECORD_LINGER: Duration = Duration::from_millis(100);

#[derive(Clone, Debug, Deserialize)]
pub struct OutboxSettings {
    #[serde(deserialize_with = "duration")]
    pub sweep_interval: Duration,
    pub batch_size: i64,
    /// The least time between the starts of two drains woken by notifications.
    #[serde(deserialize_with = "duration")]
    pub linger: Duration,
}

#[derive(Clone, Debug, Deserialize)]
pub struct SyncSettings {
    #[serde(deserialize_with = "duration_list")]
    pub retry_delays: Vec<Duration>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct WebhookSettings {
    #[serde(deserialize_with = "duration_list")]
    pub retry_delays: Vec<Duration>,
    pub allow_private_targets: bool,
    #[serde(deserialize_with = "duration")]
    pub timeout: Duration,
    pub workers: usize,
    pub max_in_flight_per_endpoint: usize,
    /// How long the record of a parked message's attempt may wait for others to share
    /// its commit ([`crate::webhooks::recorder::Recorder::record_patient`]); at most
    /// [`MAX_RECORD_LINGER`].
    #[serde(deserialize_with = "duration")]
    pub record_linger: Duration,
    /// Messages one business may send again per hour and process, through
    /// `POST /webhooks/{id}/messages/{message_id}/retry` (one each) and
    /// `…/retry-failed` (its `limit` each).
    pub replays_per_hour: u32,
    /// How long a delivered or failed message (its body and attempts, for the API and
    /// replay) is kept; `None` (empty) = forever. Pruned every `ingest.prune_interval`.
    #[serde(default, deserialize_with = "optional_duration")]
    pub message_retention: Option<Duration>,
}

/// Delivery email ([`crate::email`]). Email is off when `smtp_url` is empty.
#[derive(Clone, Debug, Deserialize)]
pub struct EmailSettings {
    /// `smtp://host:port` (plain, or `?tls=required` for STARTTLS, `?tls=opportunistic`),
    /// `smtps://user:pass@host:465` (TLS from the start); user and password
    /// percent-encoded. A secret: it may carry the password.
    pub smtp_url: SecretString,
    /// `From` of every email, e.g. `Acme Access <access@example.com>`.
    pub from: String,
    /// A PEM file of CA certificates to trust for the SMTP server besides the system's
    /// (a private CA); empty: the system's only.
    pub ca_file: String,
    /// The wait before each retry of an email the server did not take.
    #[serde(deserialize_with = "duration_list")]
    pub retry_delays: Vec<Duration>,
    /// Emails one recipient is sent by one business per hour at most; the rest wait.
    pub per_recipient_per_hour: u32,
    /// Emails one business sends per hour at most, to all its recipients; the rest wait.
    pub per_business_per_hour: u32,
    /// The longest one SMTP conversation may take.
    #[serde(deserialize_with = "duration")]
    pub timeout: Duration,
    /// How long the access-page link in an email works.
    #[serde(deserialize_with = "duration")]
    pub access_link_ttl: Duration,
}

impl EmailSettings {
    /// Whether guildgate sends email at all.
    pub fn enabled(&self) -> bool {
        !self.smtp_url.expose_secret().trim().is_empty()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Debug, Deserialize)]
pub struct LogSettings {
    pub format: LogFormat,
}

/// What reconcile does about a delivered grant whose member lacks the role or left.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DriftPolicy {
    /// Queue a sync of the grant: the syncer gives back what the live grant says.
    Restore,
    /// Revoke the grant with `platform_external`, as the platform does.
    Revoke,
}

impl DriftPolicy {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "restore" => Some(DriftPolicy::Restore),
            "revoke" => Some(DriftPolicy::Revoke),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DriftPolicy::Restore => "restore",
            DriftPolicy::Revoke => "revoke",
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
pub struct ReconcileSettings {
    /// `serve` reconciles (and applies the fixes) this often; `None` (empty) = never.
    #[serde(default, deserialize_with = "optional_duration")]
    pub interval: Option<Duration>,
    pub policy: DriftPolicy,
}

impl Settings {
    /// Defaults, then `file` (if any), then `GUILDGATE_*` environment variables.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_with_env(file, None)
    }

    /// Like [`Settings::load`], with the environment given explicitly (tests).
    pub fn load_with_env(
        file: Option<&Path>,
        env: Option<std::collections::HashMap<String, String>>,
    ) -> Result<Self, ConfigError> {
        let mut builder = config::Config::builder().add_source(config::File::from_str(
            DEFAULT_TOML,
            config::FileFormat::Toml,
        ));
        if let Some(file) = file {
            builder = builder.add_source(config::File::from(file).required(true));
        }
        let environment = config::Environment::with_prefix("GUILDGATE")
            .prefix_separator("_")
            .separator("__")
            .source(env);
        let settings: Settings = builder.add_source(environment).build()?.try_deserialize()?;
        settings.validate()?;
        Ok(settings)
    }

    /// Refuses settings that cannot work, naming the setting and why.
    fn validate(&self) -> Result<(), ConfigError> {
        self.check_addresses()?;
        self.check_amqp()?;
        self.check_intervals()?;
        self.check_limits()?;
        self.check_email()?;
        self.check_secrets()
    }

    /// The public URL, Discord's endpoints and trusted proxies parse.
    fn check_addresses(&self) -> Result<(), ConfigError> {
        listen_address(&self.http.addr)
            .map_err(|e| ConfigError::Invalid(format!("http.addr: {e}")))?;
        url::Url::parse(&self.http.public_url)
            .map_err(|e| ConfigError::Invalid(format!("http.public_url: {e}")))?;
        let authorize = url::Url::parse(&self.discord.authorize_url)
            .map_err(|e| ConfigError::Invalid(format!("discord.authorize_url: {e}")))?;
        // RFC 6749 §3.1: an authorization endpoint has no fragment (the query is
        // appended to it).
        ensure(
            authorize.fragment().is_none(),
            "discord.authorize_url must not have a fragment (#...)",
        )?;
        url::Url::parse(&self.discord.api_base)
            .map_err(|e| ConfigError::Invalid(format!("discord.api_base: {e}")))?;
        for p in &self.http.trusted_proxies {
            parse_net(p).map_err(|e| ConfigError::Invalid(format!("http.trusted_proxies: {e}")))?;
        }
        Ok(())
    }

    /// The broker's nodes, names and queue arguments.
    fn check_amqp(&self) -> Result<(), ConfigError> {
        ensure(
            !self.amqp.queue_prefix.is_empty() && self.amqp.queue_prefix.len() <= 100,
            "amqp.queue_prefix must be 1 to 100 characters",
        )?;
        for node in self.amqp.nodes() {
            // The error never quotes the URL: it carries a password.
            let scheme = url::Url::parse(node.expose_secret())
                .map_err(|e| ConfigError::Invalid(format!("amqp.url(s): a node URL: {e}")))?
                .scheme()
                .to_owned();
            ensure(
                scheme == "amqp" || scheme == "amqps",
                format!("amqp.url(s): a node URL has the scheme {scheme:?}, not amqp or amqps"),
            )?;
        }
        ensure(
            self.amqp.quorum_replicas != Some(0),
            "amqp.quorum_replicas must be at least 1 (or unset for the broker's default)",
        )?;
        if let Some(l) = &self.amqp.leader_locator {
            ensure(
                l == "client-local" || l == "balanced",
                format!("amqp.leader_locator must be client-local or balanced, not {l:?}"),
            )?;
        }
        ensure(
            self.amqp.batch_size > 0 && self.amqp.consumers > 0,
            "amqp.batch_size and amqp.consumers must be at least 1",
        )
    }

    /// Retentions, timers and retry schedules.
    fn check_intervals(&self) -> Result<(), ConfigError> {
        let too_short = |r: Option<Duration>| r.is_some_and(|r| r < MIN_PROCESSED_RETENTION);
        ensure(
            !too_short(self.ingest.processed_retention),
            "ingest.processed_retention must be at least 24h (or empty to keep every id)",
        )?;
        ensure(
            !too_short(self.webhooks.message_retention),
            "webhooks.message_retention must be at least 24h (or empty to keep every message)",
        )?;
        ensure(
            !self.grants.timer_interval.is_zero(),
            "grants.timer_interval must be more than 0s",
        )?;
        ensure(
            !self.ingest.prune_interval.is_zero(),
            "ingest.prune_interval must be more than 0s",
        )?;
        ensure(
            self.webhooks.record_linger <= MAX_RECORD_LINGER,
            "webhooks.record_linger must be at most 100ms",
        )?;
        ensure(
            !(self.sync.retry_delays.is_empty()
                || self.webhooks.retry_delays.is_empty()
                || self.email.retry_delays.is_empty()),
            "retry_delays needs at least one delay",
        )
    }

    /// Rates, bursts and the limits of the HTTP server.
    fn check_limits(&self) -> Result<(), ConfigError> {
        ensure(
            self.database.max_connections > 0
                && self.database.http_max_connections > 0
                && self.database.http_max_connections_per_caller > 0,
            "database.max_connections, database.http_max_connections and \
             database.http_max_connections_per_caller must be at least 1",
        )?;
        ensure(
            self.database.http_statement_timeout >= Duration::from_millis(1)
                && self.database.http_statement_timeout <= Duration::from_secs(3600),
            "database.http_statement_timeout must be at least 1ms and at most 1h",
        )?;
        ensure(
            [
                self.grants.backfill_per_second,
                self.grants.moves_per_second,
            ]
            .iter()
            .all(|r| r.is_finite() && *r > 0.0),
            "grants.backfill_per_second and grants.moves_per_second must be more than 0",
        )?;
        ensure(
            !self.http.request_timeout.is_zero() && self.http.max_concurrent_requests > 0,
            "http.request_timeout and http.max_concurrent_requests must be more than 0",
        )?;
        // A share above the whole ceiling counts as the ceiling (so a deployment that
        // lowered the ceiling below the default share keeps starting).
        ensure(
            self.discord.invalid_request_ceiling_per_business > 0,
            "discord.invalid_request_ceiling_per_business must be more than 0",
        )?;
        ensure(
            self.api.requests_per_second > 0
                && self.api.burst > 0
                && self.api.key_reads_per_address_per_second > 0
                && self.api.max_in_flight_per_business > 0
                && self.webhooks.replays_per_hour > 0
                && self.oauth.callback_attempts > 0
                && self.oauth.address_attempts > 0
                && !self.oauth.callback_window.is_zero(),
            "api.requests_per_second, api.burst, api.key_reads_per_address_per_second, api.max_in_flight_per_business, webhooks.replays_per_hour, oauth.callback_attempts, oauth.address_attempts and oauth.callback_window must be more than 0",
        )
    }

    /// The email limits. The mail server's address and TLS files are the email
    /// module's to check ([`crate::email::transport::check`], run by the binary after
    /// loading).
    fn check_email(&self) -> Result<(), ConfigError> {
        ensure(
            self.email.per_recipient_per_hour > 0
                && self.email.per_business_per_hour > 0
                && !self.email.timeout.is_zero()
                && !self.email.access_link_ttl.is_zero(),
            "email.per_recipient_per_hour, email.per_business_per_hour, email.timeout and email.access_link_ttl must be more than 0",
        )
    }

    /// The keys are usable, and none has its public development value in production.
    fn check_secrets(&self) -> Result<(), ConfigError> {
        crate::crypto::TokenCipher::from_base64(&self.secrets.token_encryption_key)
            .map_err(|e| ConfigError::Invalid(format!("secrets.token_encryption_key: {e}")))?;
        self.token_cipher().map_err(|e| {
            ConfigError::Invalid(format!("secrets.previous_token_encryption_keys: {e}"))
        })?;
        ensure(
            self.secrets.state_signing_key.expose_secret().len() >= 32,
            "secrets.state_signing_key must be at least 32 characters",
        )?;
        if self.env == Environment::Production {
            let dev = self.secrets_named_dev();
            ensure(
                dev.is_empty(),
                format!(
                    "GUILDGATE_ENV=production but these secrets still have their public development values: {}",
                    dev.join(", ")
                ),
            )?;
        }
        Ok(())
    }

    /// The secret settings that still carry the public development values.
    pub fn secrets_named_dev(&self) -> Vec<&'static str> {
        let named: [(&'static str, &SecretString); 4] = [
            ("discord.client_secret", &self.discord.client_secret),
            ("discord.bot_token", &self.discord.bot_token),
            ("secrets.state_signing_key", &self.secrets.state_signing_key),
            (
                "secrets.token_encryption_key",
                &self.secrets.token_encryption_key,
            ),
        ];
        named
            .into_iter()
            .filter(|(_, s)| DEV_SECRETS.contains(&s.expose_secret()))
            .map(|(n, _)| n)
            .collect()
    }

    /// The cipher of customers' tokens: the current key, and the previous ones.
    pub fn token_cipher(&self) -> Result<crate::crypto::TokenCipher, String> {
        crate::crypto::TokenCipher::with_previous(
            &self.secrets.token_encryption_key,
            &self.secrets.previous_token_encryption_keys,
        )
    }

    /// The OAuth redirect target registered with Discord.
    pub fn oauth_redirect_uri(&self) -> String {
        format!(
            "{}/oauth/discord/callback",
            self.http.public_url.trim_end_matches('/')
        )
    }
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    parse_duration(&s).map_err(serde::de::Error::custom)
}

/// A duration, or nothing when empty (or `off`).
fn optional_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let s = String::deserialize(d)?;
    let s = s.trim();
    if s.is_empty() || s == "off" {
        return Ok(None);
    }
    let d = parse_duration(s).map_err(serde::de::Error::custom)?;
    if d.is_zero() {
        return Err(serde::de::Error::custom(
            "must be positive (leave it empty to turn it off)",
        ));
    }
    Ok(Some(d))
}

/// The items of a comma-separated list (`a,b`) or, in a TOML file, of an array of
/// strings, as written.
fn list_items<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        One(String),
        Many(Vec<String>),
    }
    Ok(match Raw::deserialize(d)? {
        Raw::One(s) => s.split(',').map(str::to_owned).collect(),
        Raw::Many(v) => v,
    })
}

/// A list of secrets (a comma-separated list or an array), held as one secret with
/// its items joined by commas.
fn secret_list<'de, D: Deserializer<'de>>(d: D) -> Result<SecretString, D::Error> {
    Ok(SecretString::from(list_items(d)?.join(",")))
}

/// A list of durations; every item must parse.
fn duration_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Duration>, D::Error> {
    list_items(d)?
        .iter()
        .map(|s| parse_duration(s.trim()))
        .collect::<Result<_, _>>()
        .map_err(serde::de::Error::custom)
}

/// A list of strings; empty entries are dropped, so `""` is the empty list.
fn string_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    Ok(list_items(d)?
        .into_iter()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect())
}

/// Parses `250ms`, `5s`, `30m`, `2h`, `7d` (and `0` or `0s` for "immediately").
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(s).map_err(|e| format!("invalid duration {s:?}: {e}"))
}

/// A duration written as a queue-name suffix: `5s`, `30m`, `2h`, `500ms`.
pub fn format_duration_short(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(3_600_000) && ms > 0 {
        format!("{}h", ms / 3_600_000)
    } else if ms.is_multiple_of(60_000) && ms > 0 {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// `Ok` when `ok`, else the setting error `why`.
fn ensure(ok: bool, why: impl Into<String>) -> Result<(), ConfigError> {
    if ok {
        Ok(())
    } else {
        Err(ConfigError::Invalid(why.into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn cluster_nodes_win_over_the_single_url_and_never_show_their_passwords() {
        let one = Settings::load_with_env(None, Some(env(&[]))).unwrap();
        let nodes = one.amqp.nodes();
        assert_eq!(nodes.len(), 1);
        assert_eq!(nodes[0].expose_secret(), one.amqp.url.expose_secret());
        assert_eq!(one.amqp.quorum_replicas, None);
        assert_eq!(one.amqp.leader_locator, None);

        let three = Settings::load_with_env(
            None,
            Some(env(&[
                (
                    "GUILDGATE_AMQP__URLS",
                    "amqp://u:pw1@mq-a:5672/%2f, amqp://u:pw2@mq-b:5673/%2f,amqps://u:pw3@mq-c/%2f",
                ),
                ("GUILDGATE_AMQP__QUORUM_REPLICAS", "3"),
                ("GUILDGATE_AMQP__LEADER_LOCATOR", "balanced"),
            ])),
        )
        .unwrap();
        let labels: Vec<String> = three.amqp.nodes().iter().map(node_label).collect();
        assert_eq!(labels, ["mq-a:5672", "mq-b:5673", "mq-c:5671"]);
        assert_eq!(three.amqp.quorum_replicas, Some(3));
        assert_eq!(three.amqp.leader_locator.as_deref(), Some("balanced"));
        assert!(!format!("{:?}", three.amqp).contains("pw"));

        let bad = |pairs: &[(&str, &str)]| {
            Settings::load_with_env(None, Some(env(pairs)))
                .unwrap_err()
                .to_string()
        };
        let e = bad(&[(
            "GUILDGATE_AMQP__URLS",
            "amqp://u:secretpw@a/%2f,http://u:secretpw@b/",
        )]);
        assert!(e.contains("\"http\""), "{e}");
        assert!(!e.contains("secretpw"), "{e}");
        let e = bad(&[("GUILDGATE_AMQP__URLS", "amqp://u:secretpw@a/%2f,not a url")]);
        assert!(e.contains("amqp.url(s)") && !e.contains("secretpw"), "{e}");
        let e = bad(&[("GUILDGATE_AMQP__LEADER_LOCATOR", "random")]);
        assert!(e.contains("client-local or balanced"), "{e}");
        let e = bad(&[("GUILDGATE_AMQP__QUORUM_REPLICAS", "0")]);
        assert!(e.contains("at least 1"), "{e}");
    }

    #[test]
    fn defaults_load_and_env_overrides() {
        let s = Settings::load_with_env(
            None,
            Some(env(&[
                ("GUILDGATE_AMQP__QUEUE_PREFIX", "t1"),
                ("GUILDGATE_DATABASE__URL", "postgres://x@y/z"),
                ("GUILDGATE_SYNC__RETRY_DELAYS", "1s,2s"),
                ("GUILDGATE_AMQP__PREFETCH", "7"),
            ])),
        )
        .unwrap();
        assert_eq!(s.amqp.queue_prefix, "t1");
        assert_eq!(s.amqp.exchange, "payments");
        assert_eq!(s.amqp.prefetch, 7);
        assert_eq!(s.database.url.expose_secret(), "postgres://x@y/z");
        assert_eq!(
            s.sync.retry_delays,
            vec![Duration::from_secs(1), Duration::from_secs(2)]
        );
        assert_eq!(s.webhooks.retry_delays[0], Duration::ZERO);
        assert_eq!(s.discord.oauth_link_ttl, Duration::from_secs(7 * 86400));
        assert_eq!(s.reconcile.interval, None);
        assert_eq!(s.reconcile.policy, DriftPolicy::Restore);
    }

    #[test]
    fn reconcile_interval_and_policy() {
        let s = Settings::load_with_env(
            None,
            Some(env(&[
                ("GUILDGATE_RECONCILE__INTERVAL", "24h"),
                ("GUILDGATE_RECONCILE__POLICY", "revoke"),
            ])),
        )
        .unwrap();
        assert_eq!(s.reconcile.interval, Some(Duration::from_secs(86400)));
        assert_eq!(s.reconcile.policy, DriftPolicy::Revoke);
        assert!(
            Settings::load_with_env(
                None,
                Some(env(&[("GUILDGATE_RECONCILE__POLICY", "delete")]))
            )
            .is_err()
        );
    }

    #[test]
    fn a_business_share_of_the_invalid_ceiling_is_checked_on_load() {
        let load = |share: &str| {
            Settings::load_with_env(
                None,
                Some(env(&[
                    ("GUILDGATE_DISCORD__INVALID_REQUEST_CEILING", "1000"),
                    (
                        "GUILDGATE_DISCORD__INVALID_REQUEST_CEILING_PER_BUSINESS",
                        share,
                    ),
                ])),
            )
        };
        assert_eq!(
            load("1000")
                .unwrap()
                .discord
                .invalid_request_ceiling_per_business,
            1000
        );
        // Above the ceiling it counts as the ceiling (InvalidRequests::new).
        assert!(load("1001").is_ok());
        let err = load("0").expect_err("0").to_string();
        assert!(
            err.contains("invalid_request_ceiling_per_business"),
            "{err}"
        );
        // A lowered ceiling with the default share still loads.
        assert!(
            Settings::load_with_env(
                None,
                Some(env(&[(
                    "GUILDGATE_DISCORD__INVALID_REQUEST_CEILING",
                    "100"
                )]))
            )
            .is_ok()
        );
    }

    #[test]
    fn the_listen_address_is_checked_on_load() {
        let load =
            |v: &str| Settings::load_with_env(None, Some(env(&[("GUILDGATE_HTTP__ADDR", v)])));
        for good in [
            "127.0.0.1:8080",
            "0.0.0.0:0",
            "[::]:8080",
            "[::1]:80",
            "localhost:8080",
        ] {
            assert!(load(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "8080",
            "127.0.0.1",
            "127.0.0.1:http",
            "127.0.0.1:70000",
            ":8080",
            "::1:80",
            "a b:80",
        ] {
            let err = load(bad).expect_err(bad).to_string();
            assert!(err.contains("http.addr"), "{bad}: {err}");
        }
    }

    #[test]
    fn grant_timers_and_backfill_pace_must_be_positive() {
        let load = |k: &str, v: &str| Settings::load_with_env(None, Some(env(&[(k, v)])));
        let defaults = Settings::load_with_env(None, Some(env(&[]))).unwrap();
        assert_eq!(defaults.grants.timer_interval, Duration::from_secs(30));
        assert_eq!(defaults.grants.backfill_per_second, 20.0);
        assert_eq!(defaults.grants.moves_per_second, 40.0);
        assert_eq!(
            load("GUILDGATE_GRANTS__BACKFILL_PER_SECOND", "2.5")
                .unwrap()
                .grants
                .backfill_per_second,
            2.5
        );
        for (k, v) in [
            ("GUILDGATE_GRANTS__MOVES_PER_SECOND", "0"),
            ("GUILDGATE_GRANTS__MOVES_PER_SECOND", "NaN"),
            ("GUILDGATE_GRANTS__BACKFILL_PER_SECOND", "0"),
            ("GUILDGATE_GRANTS__BACKFILL_PER_SECOND", "-1"),
            ("GUILDGATE_GRANTS__TIMER_INTERVAL", "0s"),
        ] {
            let err = load(k, v).unwrap_err().to_string();
            assert!(err.contains("grants."), "{k}={v}: {err}");
        }
    }

    #[test]
    fn both_pools_need_a_connection_and_requests_a_statement_timeout() {
        let defaults = Settings::load_with_env(None, Some(env(&[]))).unwrap();
        assert_eq!(
            (
                defaults.database.max_connections,
                defaults.database.http_max_connections,
                defaults.database.http_max_connections_per_caller,
                defaults.database.http_statement_timeout,
            ),
            (16, 12, 6, Duration::from_secs(5))
        );
        for (k, v, key) in [
            ("MAX_CONNECTIONS", "0", "database.max_connections"),
            ("HTTP_MAX_CONNECTIONS", "0", "database.http_max_connections"),
            (
                "HTTP_MAX_CONNECTIONS_PER_CALLER",
                "0",
                "database.http_max_connections_per_caller",
            ),
            (
                "HTTP_STATEMENT_TIMEOUT",
                "0s",
                "database.http_statement_timeout",
            ),
            (
                "HTTP_STATEMENT_TIMEOUT",
                "61m",
                "database.http_statement_timeout",
            ),
        ] {
            let k = format!("GUILDGATE_DATABASE__{k}");
            let err = Settings::load_with_env(None, Some(env(&[(&k, v)])))
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{k}={v}: {err}");
        }
        let longest = env(&[("GUILDGATE_DATABASE__HTTP_STATEMENT_TIMEOUT", "1h")]);
        assert!(Settings::load_with_env(None, Some(longest)).is_ok());
    }

    #[test]
    fn the_record_linger_is_a_tenth_of_a_second_at_most() {
        let load = |v: &str| {
            Settings::load_with_env(None, Some(env(&[("GUILDGATE_WEBHOOKS__RECORD_LINGER", v)])))
        };
        let defaults = Settings::load_with_env(None, Some(env(&[]))).unwrap();
        assert_eq!(defaults.webhooks.record_linger, Duration::from_millis(20));
        assert_eq!(load("0s").unwrap().webhooks.record_linger, Duration::ZERO);
        assert_eq!(
            load("100ms").unwrap().webhooks.record_linger,
            MAX_RECORD_LINGER
        );
        let err = load("101ms").unwrap_err().to_string();
        assert!(err.contains("webhooks.record_linger"), "{err}");
    }

    #[test]
    fn processed_retention_is_a_day_or_more_or_off() {
        let load = |v: &str| {
            Settings::load_with_env(
                None,
                Some(env(&[("GUILDGATE_INGEST__PROCESSED_RETENTION", v)])),
            )
        };
        let defaults = Settings::load_with_env(None, Some(env(&[]))).unwrap();
        assert_eq!(
            defaults.ingest.processed_retention,
            Some(Duration::from_secs(30 * 86400))
        );
        assert_eq!(defaults.ingest.prune_interval, Duration::from_secs(3600));
        assert_eq!(
            load("90d").unwrap().ingest.processed_retention,
            Some(Duration::from_secs(90 * 86400))
        );
        assert_eq!(load("").unwrap().ingest.processed_retention, None);
        assert_eq!(load("off").unwrap().ingest.processed_retention, None);
        let err = load("12h").unwrap_err().to_string();
        assert!(err.contains("ingest.processed_retention"), "{err}");
        assert!(
            Settings::load_with_env(
                None,
                Some(env(&[("GUILDGATE_INGEST__PRUNE_INTERVAL", "0s")]))
            )
            .is_err()
        );
    }

    #[test]
    fn authorize_url_must_parse_and_have_no_fragment() {
        let load = |v: &str| {
            Settings::load_with_env(None, Some(env(&[("GUILDGATE_DISCORD__AUTHORIZE_URL", v)])))
        };
        assert!(load("https://discord.com/oauth2/authorize?prompt=none").is_ok());
        let err = load("https://discord.com/oauth2/authorize#x")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("discord.authorize_url must not have a fragment"),
            "{err}"
        );
        let err = load("not a url").unwrap_err().to_string();
        assert!(err.contains("discord.authorize_url"), "{err}");
    }

    #[test]
    fn production_refuses_development_secrets() {
        let err = Settings::load_with_env(None, Some(env(&[("GUILDGATE_ENV", "production")])))
            .unwrap_err()
            .to_string();
        assert!(err.contains("secrets.state_signing_key"), "{err}");
        assert!(err.contains("discord.bot_token"), "{err}");
    }

    #[test]
    fn production_starts_with_real_secrets() {
        let s = Settings::load_with_env(
            None,
            Some(env(&[
                ("GUILDGATE_ENV", "production"),
                ("GUILDGATE_DISCORD__CLIENT_SECRET", "real-secret"),
                ("GUILDGATE_DISCORD__BOT_TOKEN", "real-bot-token"),
                (
                    "GUILDGATE_SECRETS__STATE_SIGNING_KEY",
                    "a-real-signing-key-of-enough-length-0123",
                ),
                (
                    "GUILDGATE_SECRETS__TOKEN_ENCRYPTION_KEY",
                    "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=",
                ),
            ])),
        )
        .unwrap();
        assert!(s.secrets_named_dev().is_empty());
    }

    #[test]
    fn debug_redacts_secrets() {
        let s = Settings::load_with_env(None, Some(HashMap::new())).unwrap();
        let dbg = format!("{s:?}");
        assert!(!dbg.contains("dev-bot-token"));
        assert!(!dbg.contains("dev-state-signing-key"));
        assert!(!dbg.contains("guest:guest"));
    }

    #[test]
    fn trusted_proxies_are_addresses_or_ranges() {
        let load = |v: &str| {
            Settings::load_with_env(None, Some(env(&[("GUILDGATE_HTTP__TRUSTED_PROXIES", v)])))
        };
        let defaults = Settings::load_with_env(None, Some(env(&[]))).unwrap();
        assert!(defaults.http.trusted_proxy_nets().is_empty());
        let s = load("10.0.0.0/8, 127.0.0.1,::1").unwrap();
        let nets = s.http.trusted_proxy_nets();
        assert_eq!(nets.len(), 3);
        assert!(nets[0].contains(&"10.1.2.3".parse::<std::net::IpAddr>().unwrap()));
        assert!(nets[1].contains(&"127.0.0.1".parse::<std::net::IpAddr>().unwrap()));
        let err = load("10.0.0.0/8,proxy.internal").unwrap_err().to_string();
        assert!(err.contains("http.trusted_proxies"), "{err}");
    }

    #[test]
    fn duration_names() {
        assert_eq!(format_duration_short(Duration::from_secs(5)), "5s");
        assert_eq!(format_duration_short(Duration::from_secs(300)), "5m");
        assert_eq!(format_duration_short(Duration::from_secs(7200)), "2h");
        assert_eq!(format_duration_short(Duration::from_millis(250)), "250ms");
        assert_eq!(format_duration_short(Duration::ZERO), "0s");
    }
}

/// `docs/configuration.md` documents every setting: its one table and the typed settings
/// above must name the same keys, with the environment variable each is read from and the
/// default `config/default.toml` gives it.
#[cfg(test)]
mod documented {
    use std::cell::RefCell;
    use std::collections::{BTreeMap, BTreeSet};

    use serde::Deserialize;
    use serde::de::value::{MapDeserializer, SeqDeserializer, StrDeserializer};
    use serde::de::{self, DeserializeSeed, IntoDeserializer, MapAccess, Visitor};

    use super::{DEFAULT_TOML, Settings};

    /// Walks a type's `Deserialize` and records the dotted path of every leaf field, also
    /// the optional ones that the shipped defaults leave out. Leaves get a harmless value
    /// (`"1s"` parses as a string and as a duration; numbers are 1; enums their first
    /// variant) so that custom field parsers run to the end.
    struct Recorder<'a> {
        path: String,
        leaves: &'a RefCell<BTreeSet<String>>,
    }

    impl Recorder<'_> {
        fn leaf(&self) {
            self.leaves.borrow_mut().insert(self.path.clone());
        }
    }

    type E = de::value::Error;

    /// Number leaves: each method records its path and visits the given value.
    macro_rules! numbers {
        ($($($method:ident)+ => $visit:ident($value:expr);)+) => {
            $($(
                fn $method<V: Visitor<'de>>(self, v: V) -> Result<V::Value, E> {
                    self.leaf();
                    v.$visit($value)
                }
            )+)+
        };
    }

    impl<'de> de::Deserializer<'de> for Recorder<'_> {
        type Error = E;

        fn deserialize_any<V: Visitor<'de>>(self, v: V) -> Result<V::Value, E> {
            self.leaf();
            v.visit_str("1s")
        }
        fn deserialize_bool<V: Visitor<'de>>(self, v: V) -> Result<V::Value, E> {
            self.leaf();
            v.visit_bool(false)
        }
        numbers! {
            deserialize_i8 deserialize_i16 deserialize_i32 deserialize_i64 deserialize_i128
            => visit_i64(1);
            deserialize_u8 deserialize_u16 deserialize_u32 deserialize_u64 deserialize_u128
            => visit_u64(1);
            deserialize_f32 deserialize_f64 => visit_f64(1.0);
        }
        fn deserialize_option<V: Visitor<'de>>(self, v: V) -> Result<V::Value, E> {
            self.leaf();
            v.visit_none()
        }
        fn deserialize_seq<V: Visitor<'de>>(self, v: V) -> Result<V::Value, E> {
            self.leaf();
            v.visit_seq(SeqDeserializer::new(std::iter::once("1s")))
        }
        fn deserialize_map<V: Visitor<'de>>(self, v: V) -> Result<V::Value, E> {
            self.leaf();
            v.visit_map(MapDeserializer::new(std::iter::empty::<(&str, &str)>()))
        }
        fn deserialize_enum<V: Visitor<'de>>(
            self,
            _name: &'static str,
            variants: &'static [&'static str],
            v: V,
        ) -> Result<V::Value, E> {
            self.leaf();
            v.visit_enum(StrDeserializer::<E>::new(variants[0]))
        }
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _name: &'static str,
            fields: &'static [&'static str],
            v: V,
        ) -> Result<V::Value, E> {
            v.visit_map(Fields {
                parent: self,
                fields: fields.iter(),
                current: "",
            })
        }
        fn deserialize_newtype_struct<V: Visitor<'de>>(
            self,
            _name: &'static str,
            v: V,
        ) -> Result<V::Value, E> {
            v.visit_newtype_struct(self)
        }

        serde::forward_to_deserialize_any! {
            char str string bytes byte_buf unit unit_struct tuple tuple_struct identifier
            ignored_any
        }
    }

    /// The fields of one struct, each deserialized by a [`Recorder`] one level deeper.
    struct Fields<'a> {
        parent: Recorder<'a>,
        fields: std::slice::Iter<'static, &'static str>,
        current: &'static str,
    }

    impl<'de> MapAccess<'de> for Fields<'_> {
        type Error = E;

        fn next_key_seed<K: DeserializeSeed<'de>>(
            &mut self,
            seed: K,
        ) -> Result<Option<K::Value>, E> {
            let Some(field) = self.fields.next() else {
                return Ok(None);
            };
            self.current = field;
            seed.deserialize((*field).into_deserializer()).map(Some)
        }

        fn next_value_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<T::Value, E> {
            let path = if self.parent.path.is_empty() {
                self.current.to_string()
            } else {
                format!("{}.{}", self.parent.path, self.current)
            };
            seed.deserialize(Recorder {
                path,
                leaves: self.parent.leaves,
            })
        }
    }

    /// Every leaf setting of [`Settings`], as dotted keys (`amqp.batch_linger`).
    fn typed_keys() -> BTreeSet<String> {
        let leaves = RefCell::new(BTreeSet::new());
        Settings::deserialize(Recorder {
            path: String::new(),
            leaves: &leaves,
        })
        .expect("the recorder satisfies every field parser");
        leaves.into_inner()
    }

    /// The rows of the table in `docs/configuration.md`: key → (variable, default).
    fn documented_rows() -> BTreeMap<String, (String, String)> {
        let doc = include_str!("../docs/configuration.md");
        let mut rows = BTreeMap::new();
        for line in doc.lines().filter(|l| l.starts_with("| `")) {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            assert!(cells.len() >= 5, "a settings row has four cells: {line}");
            let unquote = |c: &str| c.trim_matches('`').to_string();
            let key = unquote(cells[1]);
            let previous = rows.insert(key.clone(), (unquote(cells[2]), cells[3].to_string()));
            assert!(previous.is_none(), "{key} is documented twice");
        }
        rows
    }

    /// The environment variable the `config` source maps to `key`.
    fn variable(key: &str) -> String {
        format!("GUILDGATE_{}", key.replace('.', "__").to_uppercase())
    }

    #[test]
    fn every_setting_is_documented_and_nothing_else() {
        let typed = typed_keys();
        assert!(typed.contains("amqp.batch_linger") && typed.contains("env"));
        assert!(
            typed.contains("reconcile.interval"),
            "optional settings are found"
        );
        let documented: BTreeSet<String> = documented_rows().into_keys().collect();
        let undocumented: Vec<_> = typed.difference(&documented).collect();
        let unknown: Vec<_> = documented.difference(&typed).collect();
        assert!(
            undocumented.is_empty() && unknown.is_empty(),
            "docs/configuration.md lacks {undocumented:?} and names settings that do not exist: {unknown:?}"
        );
    }

    #[test]
    fn documented_variables_and_defaults_are_the_real_ones() {
        let defaults = config::Config::builder()
            .add_source(config::File::from_str(
                DEFAULT_TOML,
                config::FileFormat::Toml,
            ))
            .build()
            .unwrap();
        for (key, (var, default)) in documented_rows() {
            assert_eq!(var, variable(&key), "the variable of {key}");
            let default = default.trim_matches('`').trim_matches('"');
            match defaults.get_string(&key) {
                Ok(value) if value.is_empty() => assert!(
                    default.starts_with("empty"),
                    "{key} defaults to the empty string, documented as {default:?}"
                ),
                Ok(value) => assert_eq!(default, value, "the default of {key}"),
                Err(_) => assert_eq!(default, "none", "{key} has no default"),
            }
        }
    }

    #[test]
    fn variables_follow_the_config_sources_naming() {
        assert_eq!(variable("env"), "GUILDGATE_ENV");
        assert_eq!(
            variable("amqp.batch_linger"),
            "GUILDGATE_AMQP__BATCH_LINGER"
        );
        let s = super::Settings::load_with_env(
            None,
            Some(
                [(variable("amqp.batch_linger"), "7ms".to_string())]
                    .into_iter()
                    .collect(),
            ),
        )
        .unwrap();
        assert_eq!(s.amqp.batch_linger, std::time::Duration::from_millis(7));
    }
}
