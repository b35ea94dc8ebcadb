//! The Discord HTTP client: typed calls, each sent through a rate-limit [`Budget`] and
//! the invalid-request counter, each answer turned into a value or a [`DiscordError`].
//!
//! Tokens never reach a log: the bot token, the client secret and customers' tokens are
//! [`SecretString`]s, exposed only while a request is built; URLs carry none.

use std::sync::Arc;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use reqwest::header::{AUTHORIZATION, USER_AGENT};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use tokio::sync::{OnceCell, Semaphore};

use super::error::{DiscordError, HumanCode};
use super::invalid::InvalidRequests;
use super::ratelimit::{Budget, Observed, Verb};
use super::shared::SharedLimits;
use super::stops::{Remembered, StopKey};
use crate::config::DiscordSettings;
use crate::domain::Snowflake;
use crate::metrics::Metrics;

/// 429s asking for at most this long are waited out inline; longer ones go back to the
/// caller (the syncer moves the job to a delay tier instead of holding it).
const MAX_INLINE_WAIT: Duration = Duration::from_secs(10);
/// Tries per call for 429s and, for idempotent calls, 5xx and connection errors.
const TRIES: u32 = 3;

/// A guild as `GET /guilds/{g}` returns it (the fields guildgate reads).
#[derive(Clone, Debug, Deserialize)]
pub struct Guild {
    pub id: Snowflake,
    pub name: String,
    pub owner_id: Option<Snowflake>,
    #[serde(default)]
    pub roles: Vec<Role>,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct Role {
    pub id: Snowflake,
    pub name: String,
    pub position: i64,
    /// Discord sends the permission bit set as a decimal string.
    #[serde(deserialize_with = "permission_bits")]
    pub permissions: u64,
    #[serde(default)]
    pub managed: bool,
}

#[derive(Clone, Debug, Deserialize)]
pub struct User {
    pub id: Snowflake,
    pub username: String,
    #[serde(default)]
    pub global_name: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct Member {
    #[serde(default)]
    pub user: Option<User>,
    #[serde(default)]
    pub roles: Vec<Snowflake>,
    /// When the user joined the server, by Discord's clock.
    #[serde(default)]
    pub joined_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// OAuth tokens of a customer (or of a merchant installing the bot).
#[derive(Debug)]
pub struct TokenSet {
    pub access_token: SecretString,
    pub refresh_token: Option<SecretString>,
    pub expires_in: Duration,
    pub scope: String,
    /// The server the bot was added to, when the code came from a bot install: Discord's
    /// own word for which server it was, unlike the callback's query string.
    pub guild: Option<TokenGuild>,
}

/// The `guild` object of a bot-install token answer (the fields guildgate reads).
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct TokenGuild {
    pub id: Snowflake,
    pub name: String,
}

#[derive(Deserialize)]
struct RawTokens {
    access_token: String,
    refresh_token: Option<String>,
    expires_in: u64,
    #[serde(default)]
    scope: String,
    #[serde(default)]
    guild: Option<TokenGuild>,
}

/// `PUT /guilds/{g}/members/{u}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddMember {
    /// 201: added, with the roles asked for.
    Added,
    /// 204: already a member; nothing else was changed.
    AlreadyMember,
}

/// A role or membership change on a member.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemberChange {
    Done,
    /// The user is not (or no longer) in the guild.
    NotMember,
}

fn permission_bits<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        S(String),
        N(u64),
    }
    match Raw::deserialize(d)? {
        Raw::S(s) => s.parse().map_err(serde::de::Error::custom),
        Raw::N(n) => Ok(n),
    }
}

enum Auth<'a> {
    Bot,
    Bearer(&'a SecretString),
    /// Client credentials in the form (token endpoint).
    None,
}

enum Body {
    Empty,
    Json(serde_json::Value),
    Form(Vec<(&'static str, String)>),
}

struct Call<'a> {
    verb: Verb,
    /// Path below the API base, no leading slash.
    path: String,
    /// Rate-limit route: major parameter kept, minor ids replaced (see `Budget::acquire`).
    route: String,
    /// Metrics label: no ids at all.
    label: &'static str,
    auth: Auth<'a>,
    body: Body,
    /// Safe to send again after a 5xx or a lost answer.
    idempotent: bool,
    /// The role the call is about, if any (for [`StopKey::Role`]).
    role: Option<Snowflake>,
    /// Why the change is made, for the server's audit log (`X-Audit-Log-Reason`).
    reason: Option<&'a str>,
}

impl Call<'_> {
    /// The server a guild route is about.
    fn guild(&self) -> Option<Snowflake> {
        let mut parts = self.path.split(['/', '?']);
        match (parts.next(), parts.next()) {
            (Some("guilds"), Some(id)) => Snowflake::parse(id),
            _ => None,
        }
    }
}

/// Discord shows at most 512 characters of a reason.
const MAX_AUDIT_LOG_REASON: usize = 512;

/// `X-Audit-Log-Reason`: URL-encoded (Discord's rule for anything beyond plain ASCII),
/// cut to what Discord shows.
fn audit_log_reason(reason: &str) -> String {
    let cut: String = reason.chars().take(MAX_AUDIT_LOG_REASON).collect();
    percent_encoding::utf8_percent_encode(&cut, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// An answer that was not a 429 (those are handled inside [`DiscordClient::send`]).
struct Answer {
    status: u16,
    code: Option<u64>,
    message: String,
    bytes: Vec<u8>,
}

impl Answer {
    fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, DiscordError> {
        serde_json::from_slice(&self.bytes).map_err(|e| DiscordError::Unexpected {
            status: self.status,
            code: None,
            message: format!("cannot read Discord's answer: {e}"),
        })
    }

    fn unexpected(&self) -> DiscordError {
        if self.status >= 500 {
            return DiscordError::Retriable(format!("Discord answered {}", self.status));
        }
        DiscordError::Unexpected {
            status: self.status,
            code: self.code,
            message: self.message.clone(),
        }
    }

    /// Errors every guild route shares; `None` if the caller must look closer.
    fn guild_error(&self, guild: Snowflake) -> Option<DiscordError> {
        match (self.status, self.code) {
            (404, Some(10004)) => Some(DiscordError::human(
                HumanCode::UnknownGuild,
                format!(
                    "Discord server {guild} does not exist (it was deleted, or the entitlement names the wrong server id)."
                ),
            )),
            (403, Some(50001)) => Some(DiscordError::human(
                HumanCode::UnknownGuild,
                format!(
                    "guildgate's bot is not in Discord server {guild}: it was removed or never added. Add the bot to the server again."
                ),
            )),
            (403, Some(50013)) => Some(DiscordError::human(
                HumanCode::MissingPermissions,
                format!(
                    "guildgate's bot lacks a permission it needs in Discord server {guild} (Manage Roles, Kick Members, Create Instant Invite), or the role is not below the bot's highest role."
                ),
            )),
            (404, Some(10011)) => Some(DiscordError::human(
                HumanCode::UnknownRole,
                format!(
                    "The role configured for Discord server {guild} no longer exists. Choose an existing role for the entitlement."
                ),
            )),
            (401, _) => Some(DiscordError::Unexpected {
                status: 401,
                code: self.code,
                message: "Discord refused the bot token (check GUILDGATE_DISCORD__BOT_TOKEN)"
                    .into(),
            }),
            _ => None,
        }
    }
}

/// The credentials of one Discord application: its OAuth client and its bot.
#[derive(Clone)]
pub struct AppKeys {
    /// The application's id, which is also its bot user's id.
    pub client_id: String,
    pub client_secret: SecretString,
    pub bot_token: SecretString,
}

impl std::fmt::Debug for AppKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppKeys")
            .field("client_id", &self.client_id)
            .finish_non_exhaustive()
    }
}

impl AppKeys {
    /// The shared application of the configuration.
    pub fn of_settings(s: &DiscordSettings) -> Self {
        Self {
            client_id: s.client_id.clone(),
            client_secret: s.client_secret.clone(),
            bot_token: s.bot_token.clone(),
        }
    }
}

/// A try of a call that did not end in an answer to return.
enum Unsettled {
    /// No further try: this is the outcome.
    Done(DiscordError),
    /// Worth another try, after Discord's `wait` or the backoff's pause; `last` is the
    /// outcome if none is left.
    Again {
        last: Result<Answer, DiscordError>,
        wait: Option<Duration>,
    },
}

impl Unsettled {
    fn again(&self) -> bool {
        matches!(self, Unsettled::Again { .. })
    }
}

/// A slot of the bot's shared budget is leased for the request timeout and this: the
/// time between the slot and the request, and between the answer and the slot's
/// release, on a busy machine.
const LEASE_BEYOND_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a bot's calls are held back after Discord refused its token (401): every
/// call in between would earn another invalid answer. A new token means a new client
/// (a business registers its application again; the shared bot's token is settings).
pub const TOKEN_REFUSED_FOR: Duration = Duration::from_secs(60);

/// A Discord client on one budget. Cheap to clone; clones share the budget, the
/// invalid-request counter and the connection pool.
#[derive(Clone)]
pub struct DiscordClient {
    http: reqwest::Client,
    base: Arc<str>,
    bot_token: SecretString,
    client_id: Arc<str>,
    client_secret: SecretString,
    budget: Budget,
    invalid: InvalidRequests,
    shared: Option<SharedLimits>,
    /// How long a slot of the shared budget is leased: longer than a request may take.
    lease: Duration,
    /// The syncer's: where the bot just lost access (see [`crate::discord::stops`]).
    stops: Option<Arc<Remembered>>,
    /// The seats of the one business this client calls for, on a bot it shares with
    /// other businesses (see [`DiscordClient::seated`]).
    seats: Option<Arc<Semaphore>>,
    metrics: Arc<Metrics>,
    bot_id: Arc<OnceCell<Snowflake>>,
    /// When Discord last refused the bot's token (401), shared by the bot's side and
    /// syncer clients ([`TOKEN_REFUSED_FOR`]).
    token_refused: Arc<std::sync::Mutex<Option<tokio::time::Instant>>>,
}

impl std::fmt::Debug for DiscordClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiscordClient")
            .field("base", &self.base)
            .field("budget", &self.budget.name())
            .finish_non_exhaustive()
    }
}

impl DiscordClient {
    /// The side client of a process: the small `side_requests_per_s` budget. Spawns the
    /// bucket actor, so call it inside a tokio runtime.
    pub fn side(settings: &DiscordSettings, metrics: Arc<Metrics>) -> Self {
        Self::side_of(settings, &AppKeys::of_settings(settings), metrics)
    }

    /// The side client of one application (a business's own, or the shared one).
    pub fn side_of(settings: &DiscordSettings, app: &AppKeys, metrics: Arc<Metrics>) -> Self {
        let http = reqwest::Client::builder()
            .timeout(settings.request_timeout)
            .build()
            .expect("an HTTP client with default TLS settings builds");
        Self {
            http,
            base: settings.api_base.trim_end_matches('/').into(),
            bot_token: app.bot_token.clone(),
            client_id: app.client_id.as_str().into(),
            client_secret: app.client_secret.clone(),
            // Bounded: customers and merchants wait on it, and can ask more of it than it
            // carries; a caller told "busy" can try again, one left waiting holds a request.
            budget: Budget::new("side", settings.side_requests_per_s)
                .with_max_wait(settings.side_queue_timeout),
            invalid: InvalidRequests::new(
                settings.invalid_request_ceiling,
                settings.invalid_request_ceiling_per_business,
            ),
            shared: None,
            lease: settings.request_timeout + LEASE_BEYOND_TIMEOUT,
            stops: None,
            seats: None,
            metrics,
            bot_id: Arc::default(),
            token_refused: Arc::default(),
        }
    }

    /// The same client counting against the bot's limits shared by every process: its
    /// budget's requests made with the bot token, a global 429 and the invalid-request
    /// count. Every production client is shared; a client without it keeps the limits
    /// of this process only.
    pub fn shared(mut self, limits: SharedLimits) -> Self {
        self.budget = self.budget.shared(limits.clone(), self.lease);
        self.invalid = self.invalid.shared(limits.clone());
        self.shared = Some(limits);
        self
    }

    /// The same client remembering where the bot just lost access: a request to a server
    /// the bot is not in, or about a role it may not manage, fails with
    /// [`DiscordError::Stopped`] without being sent for a short while after the first
    /// answer saying so. The syncer's; calls that check a configuration (validation)
    /// must always ask Discord.
    pub fn with_stops(self) -> Self {
        Self {
            stops: Some(Arc::default()),
            ..self
        }
    }

    /// The same client calling for one business on a bot other businesses share: each
    /// of its calls first takes one of `seats` (the business's, in this process), held
    /// until its answer, so one business has at most that many calls waiting for or
    /// using the budget and the budget's line (first come, first served) never holds
    /// more than that of one business ahead of another's. A business asking more waits
    /// on its own seats; what it waited there counts against the budget's wait, so a
    /// try is told busy after the budget's `max_wait` in all.
    pub fn seated(&self, seats: Arc<Semaphore>) -> Self {
        Self {
            seats: Some(seats),
            ..self.clone()
        }
    }

    /// No stop is recorded for `guild` and `role` any more (a resume): forget what this
    /// client remembers of one, unless remembered less than `settled` ago (see
    /// [`Remembered::forget`]).
    pub fn forget_stop(&self, guild: Snowflake, role: Option<Snowflake>, settled: Duration) {
        if let Some(stops) = &self.stops {
            stops.forget(guild, role, settled);
        }
    }

    /// The id of the application this client speaks for.
    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    fn stopped(&self, call: &Call<'_>) -> Option<StopKey> {
        let stops = self.stops.as_ref()?;
        stops.covering(call.guild()?, call.role)
    }

    /// The same client, its calls made for `business`: their invalid answers count as
    /// the business's too, and its calls wait while the business holds its share of the
    /// ceiling ([`InvalidRequests::for_business`]).
    pub fn for_business(&self, business: &str) -> Self {
        Self {
            invalid: self.invalid.for_business(business),
            ..self.clone()
        }
    }

    /// The same client on another budget (the syncer's), sharing the invalid-request
    /// counter, which Discord keeps per IP (and the bot's shared budget, if any).
    pub fn with_budget(&self, budget: Budget) -> Self {
        let budget = match &self.shared {
            Some(limits) => budget.shared(limits.clone(), self.lease),
            None => budget,
        };
        Self {
            budget,
            ..self.clone()
        }
    }

    /// Sends a call through the budget: tried up to [`TRIES`] times, waiting out a
    /// short 429 as Discord asks and pausing 100 ms, then 400 ms, after a 5xx or a lost
    /// answer of an idempotent call ([`backon`]). The last answer or error is returned.
    async fn send(&self, call: Call<'_>) -> Result<Answer, DiscordError> {
        let url = format!("{}/{}", self.base, call.path);
        let tried = (|| self.try_once(&call, &url))
            .retry(
                ExponentialBuilder::default()
                    .with_min_delay(Duration::from_millis(100))
                    .with_factor(4.0)
                    .with_max_times(TRIES as usize - 1),
            )
            .when(Unsettled::again)
            // Discord's own wait replaces the pause, within the same number of tries.
            .adjust(|u, pause| match u {
                Unsettled::Again { wait: Some(w), .. } => pause.map(|_| *w),
                _ => pause,
            })
            .await;
        match tried {
            Ok(answer) => Ok(answer),
            Err(Unsettled::Done(e)) => Err(e),
            Err(Unsettled::Again { last, .. }) => last,
        }
    }

    /// The HTTP request of a call: its verb and URL, the bot's or the customer's token,
    /// the audit-log reason and the body.
    fn request(&self, call: &Call<'_>, url: &str) -> reqwest::RequestBuilder {
        let req = match call.verb {
            Verb::Get => self.http.get(url),
            Verb::Put => self.http.put(url),
            Verb::Post => self.http.post(url),
            Verb::Delete => self.http.delete(url),
        }
        .header(
            USER_AGENT,
            "DiscordBot (https://github.com/guildgate/guildgate, 0.1)",
        );
        let mut req = match &call.auth {
            Auth::Bot => req.header(
                AUTHORIZATION,
                format!("Bot {}", self.bot_token.expose_secret()),
            ),
            Auth::Bearer(t) => req.header(AUTHORIZATION, format!("Bearer {}", t.expose_secret())),
            Auth::None => req,
        };
        if let Some(reason) = call.reason {
            req = req.header("X-Audit-Log-Reason", audit_log_reason(reason));
        }
        match &call.body {
            Body::Empty => req,
            Body::Json(v) => req.json(v),
            Body::Form(f) => req.form(f),
        }
    }

    /// One try of a call.
    async fn try_once(&self, call: &Call<'_>, url: &str) -> Result<Answer, Unsettled> {
        if let Err(wait) = self.invalid.check().await {
            return Err(Unsettled::Done(DiscordError::CeilingReached {
                retry_after: wait,
            }));
        }
        if let Some(key) = self.stopped(call) {
            return Err(Unsettled::Done(DiscordError::Stopped { key }));
        }
        let bot = matches!(call.auth, Auth::Bot);
        if let Some(refused) = self.token_refusal(call) {
            return Err(Unsettled::Done(refused));
        }
        let started = tokio::time::Instant::now();
        let _seat = match &self.seats {
            None => None,
            Some(seats) => {
                let seat = seats.clone().acquire_owned();
                let seat = match self.budget.max_wait() {
                    None => Ok(seat.await),
                    Some(waited) => tokio::time::timeout(waited, seat).await.map_err(|_| waited),
                };
                match seat {
                    Ok(seat) => Some(seat.expect("seats are never closed")),
                    Err(waited) => {
                        self.count(call.label, "busy");
                        tracing::warn!(route = call.label, waited = ?waited, "this business's calls filled its seats on the shared bot");
                        return Err(Unsettled::Done(DiscordError::Busy { waited }));
                    }
                }
            }
        };
        // The seat's wait counts against the budget's: busy after `max_wait` in all.
        let mut ticket = match self
            .budget
            .acquire_after(call.verb, &call.route, bot, started.elapsed())
            .await
        {
            Ok(t) => t,
            Err(e) => {
                self.count(call.label, "busy");
                tracing::warn!(route = call.label, budget = e.budget, waited = ?e.waited, "no Discord request slot came free in time");
                return Err(Unsettled::Done(DiscordError::Busy { waited: e.waited }));
            }
        };
        // Waiting in a bucket's line behind the request that found the bot without
        // access: not sent (the slot stays spent, the bucket's line moves on).
        if let Some(key) = self.stopped(call) {
            ticket.abandon().await;
            self.count(call.label, "stopped");
            return Err(Unsettled::Done(DiscordError::Stopped { key }));
        }
        // Likewise behind the request whose answer refused the bot's token.
        if let Some(refused) = self.token_refusal(call) {
            ticket.abandon().await;
            return Err(Unsettled::Done(refused));
        }
        let req = self.request(call, url);
        // The last look before the request leaves: a global 429 that another request
        // got while this one was being built holds it back.
        ticket.wait_unblocked().await;
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => {
                // No answer: the bucket's queue moves on.
                ticket.abandon().await;
                self.count(call.label, "error");
                let err = DiscordError::Retriable(describe(&e));
                if call.idempotent {
                    return Err(Unsettled::Again {
                        last: Err(err),
                        wait: None,
                    });
                }
                return Err(Unsettled::Done(err));
            }
        };
        let status = resp.status().as_u16();
        // Before the bucket's line moves on (the answer completes the ticket below), so
        // the calls waiting behind this one see the refusal and are not sent.
        if status == 401 && bot {
            *self.token_refused.lock().expect("token refusal") = Some(tokio::time::Instant::now());
            tracing::warn!(bot = %self.client_id, route = call.label, "Discord refused the bot's token; its calls wait before trying it again");
        }
        let headers = resp.headers().clone();
        let observed = Observed::parse(status, |name| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        });
        let bytes = match resp.bytes().await {
            Ok(b) => b.to_vec(),
            Err(e) => {
                ticket.complete(&observed).wait().await;
                self.count(call.label, "error");
                return Err(Unsettled::Done(DiscordError::Retriable(describe(&e))));
            }
        };
        #[derive(Deserialize, Default)]
        struct ErrorBody {
            code: Option<u64>,
            #[serde(default)]
            message: Option<String>,
            retry_after: Option<f64>,
            global: Option<bool>,
            /// OAuth errors: `{"error": "invalid_grant", ...}`.
            error: Option<String>,
        }
        let body: ErrorBody = if status >= 300 {
            serde_json::from_slice(&bytes).unwrap_or_default()
        } else {
            ErrorBody::default()
        };
        let observed = observed.with_body_retry_after(body.retry_after, body.global);
        // What the answer says of the limits applies before anything else is awaited:
        // a global 429 holds back every request of this process at once, not after
        // the invalid answer is counted in the database.
        ticket.complete(&observed).wait().await;
        if let (Some(stops), Some(guild)) = (&self.stops, call.guild()) {
            match (status, body.code) {
                (403, Some(50001)) | (404, Some(10004)) => {
                    stops.remember(StopKey::Server(guild));
                }
                (403, Some(50013)) => stops.remember(StopKey::Role(guild, call.role)),
                _ => {}
            }
        }
        // Set on every answer, so the gauge also falls as old answers age out.
        let n = if observed.counts_as_invalid() {
            self.invalid.record().await
        } else {
            self.invalid.count().await
        };
        self.metrics.discord_invalid_requests.set(n as i64);
        self.count(call.label, &status.to_string());
        if status == 429 {
            let wait = observed.retry_after.unwrap_or(Duration::from_secs(1));
            tracing::info!(route = call.label, retry_after = ?wait, global = observed.is_global_limit(), scope = ?observed.scope, "Discord rate limit hit");
            let limited = DiscordError::RateLimited { retry_after: wait };
            if wait <= MAX_INLINE_WAIT {
                // The budget already holds the bucket (or everything, if global) for
                // `wait`; waiting it out too covers a 429 without bucket headers.
                return Err(Unsettled::Again {
                    last: Err(limited),
                    wait: Some(wait),
                });
            }
            return Err(Unsettled::Done(limited));
        }
        let answer = Answer {
            status,
            code: body.code,
            message: body.message.or(body.error).unwrap_or_default(),
            bytes,
        };
        if status >= 500 && call.idempotent {
            return Err(Unsettled::Again {
                last: Ok(answer),
                wait: None,
            });
        }
        Ok(answer)
    }

    /// The refusal of a call with the bot's token while it is held back after Discord
    /// refused that token ([`TOKEN_REFUSED_FOR`]), counted; `None` for other calls.
    fn token_refusal(&self, call: &Call<'_>) -> Option<DiscordError> {
        if !matches!(call.auth, Auth::Bot) {
            return None;
        }
        let at = (*self.token_refused.lock().expect("token refusal"))?;
        let retry_after = TOKEN_REFUSED_FOR
            .checked_sub(at.elapsed())
            .filter(|d| !d.is_zero())?;
        self.count(call.label, "token_refused");
        Some(DiscordError::TokenRefused { retry_after })
    }

    fn count(&self, route: &'static str, status: &str) {
        self.metrics
            .discord_requests
            .get_or_create(&vec![
                ("route", route.to_string()),
                ("status", status.to_string()),
            ])
            .inc();
    }

    /// A form posted to an OAuth endpoint with the client credentials (no bot token).
    fn form_call(
        path: &'static str,
        label: &'static str,
        form: Vec<(&'static str, String)>,
        idempotent: bool,
    ) -> Call<'static> {
        Call {
            verb: Verb::Post,
            path: path.into(),
            route: path.into(),
            label,
            auth: Auth::None,
            body: Body::Form(form),
            idempotent,
            role: None,
            reason: None,
        }
    }

    fn bot_call(verb: Verb, path: String, route: String, label: &'static str) -> Call<'static> {
        Call {
            verb,
            path,
            route,
            label,
            auth: Auth::Bot,
            body: Body::Empty,
            idempotent: true,
            role: None,
            reason: None,
        }
    }

    /// `GET /guilds/{g}` (includes the roles).
    pub async fn guild(&self, g: Snowflake) -> Result<Guild, DiscordError> {
        let a = self
            .send(Self::bot_call(
                Verb::Get,
                format!("guilds/{g}"),
                format!("guilds/{g}"),
                "GET /guilds/:guild",
            ))
            .await?;
        match a.status {
            200 => a.json(),
            _ => Err(a.guild_error(g).unwrap_or_else(|| a.unexpected())),
        }
    }

    /// `GET /guilds/{g}/roles`.
    pub async fn roles(&self, g: Snowflake) -> Result<Vec<Role>, DiscordError> {
        let a = self
            .send(Self::bot_call(
                Verb::Get,
                format!("guilds/{g}/roles"),
                format!("guilds/{g}/roles"),
                "GET /guilds/:guild/roles",
            ))
            .await?;
        match a.status {
            200 => a.json(),
            _ => Err(a.guild_error(g).unwrap_or_else(|| a.unexpected())),
        }
    }

    /// `GET /guilds/{g}/members/{u}`; `None` if the user is not a member.
    pub async fn member(&self, g: Snowflake, u: Snowflake) -> Result<Option<Member>, DiscordError> {
        let a = self
            .send(Self::bot_call(
                Verb::Get,
                format!("guilds/{g}/members/{u}"),
                format!("guilds/{g}/members/:user"),
                "GET /guilds/:guild/members/:user",
            ))
            .await?;
        match (a.status, a.code) {
            (200, _) => a.json().map(Some),
            (404, Some(10007 | 10013)) => Ok(None),
            _ => Err(a.guild_error(g).unwrap_or_else(|| a.unexpected())),
        }
    }

    /// `GET /guilds/{g}/members?limit=&after=`: one page of members by user id. `None`
    /// when Discord answers 403 50001: the bot lacks the privileged members intent (or
    /// is not in the guild).
    pub async fn members_page(
        &self,
        g: Snowflake,
        limit: u16,
        after: Option<Snowflake>,
    ) -> Result<Option<Vec<Member>>, DiscordError> {
        let after = after.map_or(0, Snowflake::get);
        let a = self
            .send(Self::bot_call(
                Verb::Get,
                format!("guilds/{g}/members?limit={limit}&after={after}"),
                format!("guilds/{g}/members"),
                "GET /guilds/:guild/members",
            ))
            .await?;
        match (a.status, a.code) {
            (200, _) => a.json().map(Some),
            (403, Some(50001)) => Ok(None),
            _ => Err(a.guild_error(g).unwrap_or_else(|| a.unexpected())),
        }
    }

    /// The bot's own user (`GET /users/@me` with the bot token), asked every time:
    /// checks a bot token before it is stored.
    pub async fn bot_user(&self) -> Result<User, DiscordError> {
        let a = self
            .send(Self::bot_call(
                Verb::Get,
                "users/@me".into(),
                "users/@me".into(),
                "GET /users/@me",
            ))
            .await?;
        match a.status {
            200 => a.json::<User>(),
            401 => Err(DiscordError::BadCredentials),
            _ => Err(a.unexpected()),
        }
    }

    /// Checks the client id and secret with a client-credentials grant (`POST
    /// /oauth2/token`, `grant_type=client_credentials`, scope `identify`). The token it
    /// returns is the application owner's, and is dropped unused.
    pub async fn check_client(&self) -> Result<(), DiscordError> {
        let form = self.with_client(vec![
            ("grant_type", "client_credentials".to_string()),
            ("scope", "identify".to_string()),
        ]);
        let a = self
            .send(Self::form_call(
                "oauth2/token",
                "POST /oauth2/token",
                form,
                true,
            ))
            .await?;
        match a.status {
            200 => Ok(()),
            400 | 401 => Err(DiscordError::BadCredentials),
            _ => Err(a.unexpected()),
        }
    }

    /// The bot's own user id (`GET /users/@me` once, then remembered).
    pub async fn bot_user_id(&self) -> Result<Snowflake, DiscordError> {
        self.bot_id
            .get_or_try_init(|| async { self.bot_user().await.map(|u| u.id) })
            .await
            .copied()
    }

    /// The bot's member in a guild; `None` if the bot is not in it.
    pub async fn bot_member(&self, g: Snowflake) -> Result<Option<Member>, DiscordError> {
        let bot = self.bot_user_id().await?;
        match self.member(g, bot).await {
            // Discord answers 50001 to a bot asking about a guild it is not in.
            Err(DiscordError::NeedsHuman {
                code: HumanCode::UnknownGuild,
                message,
            }) if message.contains("not in") => Ok(None),
            other => other,
        }
    }

    /// `PUT /guilds/{g}/members/{u}` with the user's token and the roles to give.
    pub async fn add_member(
        &self,
        g: Snowflake,
        u: Snowflake,
        access_token: &SecretString,
        roles: &[Snowflake],
        reason: &str,
    ) -> Result<AddMember, DiscordError> {
        let body = serde_json::json!({
            "access_token": access_token.expose_secret(),
            "roles": roles.iter().map(|r| r.to_string()).collect::<Vec<_>>(),
        });
        let a = self
            .send(Call {
                body: Body::Json(body),
                role: roles.first().copied(),
                reason: Some(reason),
                ..Self::bot_call(
                    Verb::Put,
                    format!("guilds/{g}/members/{u}"),
                    format!("guilds/{g}/members/:user"),
                    "PUT /guilds/:guild/members/:user",
                )
            })
            .await?;
        match (a.status, a.code) {
            (201, _) | (200, _) => Ok(AddMember::Added),
            (204, _) => Ok(AddMember::AlreadyMember),
            (403, Some(50025)) | (404, Some(10013)) => Err(DiscordError::BadUserToken),
            (403, Some(40007)) => Err(DiscordError::human(
                HumanCode::UserBanned,
                format!(
                    "The customer's Discord account is banned from server {g}. Unban them in Discord, then retry the grant."
                ),
            )),
            (400, Some(30001)) => Err(DiscordError::human(
                HumanCode::TooManyGuilds,
                "The customer's Discord account is in the maximum number of servers. They must leave one, then authorize again.",
            )),
            _ => Err(a.guild_error(g).unwrap_or_else(|| a.unexpected())),
        }
    }

    async fn member_role(
        &self,
        verb: Verb,
        g: Snowflake,
        u: Snowflake,
        r: Snowflake,
        reason: &str,
    ) -> Result<Answer, DiscordError> {
        let label = if verb == Verb::Put {
            "PUT /guilds/:guild/members/:user/roles/:role"
        } else {
            "DELETE /guilds/:guild/members/:user/roles/:role"
        };
        self.send(Call {
            role: Some(r),
            reason: Some(reason),
            ..Self::bot_call(
                verb,
                format!("guilds/{g}/members/{u}/roles/{r}"),
                format!("guilds/{g}/members/:user/roles/:role"),
                label,
            )
        })
        .await
    }

    /// `PUT /guilds/{g}/members/{u}/roles/{r}`.
    pub async fn add_role(
        &self,
        g: Snowflake,
        u: Snowflake,
        r: Snowflake,
        reason: &str,
    ) -> Result<MemberChange, DiscordError> {
        let a = self.member_role(Verb::Put, g, u, r, reason).await?;
        match (a.status, a.code) {
            (204, _) | (200, _) => Ok(MemberChange::Done),
            (404, Some(10007)) => Ok(MemberChange::NotMember),
            _ => Err(a.guild_error(g).unwrap_or_else(|| a.unexpected())),
        }
    }

    /// `DELETE /guilds/{g}/members/{u}/roles/{r}`; a member or role already gone is done.
    pub async fn remove_role(
        &self,
        g: Snowflake,
        u: Snowflake,
        r: Snowflake,
        reason: &str,
    ) -> Result<MemberChange, DiscordError> {
        let a = self.member_role(Verb::Delete, g, u, r, reason).await?;
        match (a.status, a.code) {
            (204, _) | (200, _) | (404, Some(10011)) => Ok(MemberChange::Done),
            (404, Some(10007)) => Ok(MemberChange::NotMember),
            _ => Err(a.guild_error(g).unwrap_or_else(|| a.unexpected())),
        }
    }

    /// `DELETE /guilds/{g}/members/{u}` (kick); a member already gone is done.
    pub async fn remove_member(
        &self,
        g: Snowflake,
        u: Snowflake,
        reason: &str,
    ) -> Result<MemberChange, DiscordError> {
        let a = self
            .send(Call {
                reason: Some(reason),
                ..Self::bot_call(
                    Verb::Delete,
                    format!("guilds/{g}/members/{u}"),
                    format!("guilds/{g}/members/:user"),
                    "DELETE /guilds/:guild/members/:user",
                )
            })
            .await?;
        match (a.status, a.code) {
            (204, _) | (200, _) => Ok(MemberChange::Done),
            (404, Some(10007)) => Ok(MemberChange::NotMember),
            _ => Err(a.guild_error(g).unwrap_or_else(|| a.unexpected())),
        }
    }

    /// `form` with the application's client credentials.
    fn with_client(&self, mut form: Vec<(&'static str, String)>) -> Vec<(&'static str, String)> {
        form.push(("client_id", self.client_id.to_string()));
        form.push((
            "client_secret",
            self.client_secret.expose_secret().to_string(),
        ));
        form
    }

    async fn token(&self, form: Vec<(&'static str, String)>) -> Result<TokenSet, DiscordError> {
        let form = self.with_client(form);
        // A code is single-use and a refresh token rotates: never resend.
        let a = self
            .send(Self::form_call(
                "oauth2/token",
                "POST /oauth2/token",
                form,
                false,
            ))
            .await?;
        match a.status {
            200 => {
                let raw: RawTokens = a.json()?;
                Ok(TokenSet {
                    access_token: SecretString::from(raw.access_token),
                    refresh_token: raw.refresh_token.map(SecretString::from),
                    expires_in: Duration::from_secs(raw.expires_in),
                    scope: raw.scope,
                    guild: raw.guild,
                })
            }
            400 | 401 if a.message == "invalid_grant" => Err(DiscordError::BadUserToken),
            _ => Err(a.unexpected()),
        }
    }

    /// Exchanges an authorization code (`POST /oauth2/token`, form-encoded).
    pub async fn exchange_code(
        &self,
        code: &str,
        redirect_uri: &str,
    ) -> Result<TokenSet, DiscordError> {
        self.token(vec![
            ("grant_type", "authorization_code".into()),
            ("code", code.to_string()),
            ("redirect_uri", redirect_uri.to_string()),
        ])
        .await
    }

    /// Refreshes a customer's tokens (the refresh token rotates).
    pub async fn refresh(&self, refresh_token: &SecretString) -> Result<TokenSet, DiscordError> {
        self.token(vec![
            ("grant_type", "refresh_token".into()),
            ("refresh_token", refresh_token.expose_secret().to_string()),
        ])
        .await
    }

    /// Revokes a customer's token (`POST /oauth2/token/revoke`, form-encoded with the
    /// client credentials). `hint` is `access_token` or `refresh_token`. Discord answers
    /// 200 also for a token it no longer knows, so a repeat is harmless.
    pub async fn revoke_token(
        &self,
        token: &SecretString,
        hint: &'static str,
    ) -> Result<(), DiscordError> {
        let form = self.with_client(vec![
            ("token", token.expose_secret().to_string()),
            ("token_type_hint", hint.to_string()),
        ]);
        let a = self
            .send(Self::form_call(
                "oauth2/token/revoke",
                "POST /oauth2/token/revoke",
                form,
                true,
            ))
            .await?;
        match a.status {
            200 | 204 => Ok(()),
            _ => Err(a.unexpected()),
        }
    }

    /// `GET /users/@me` with a customer's token.
    pub async fn user(&self, access_token: &SecretString) -> Result<User, DiscordError> {
        let a = self
            .send(Call {
                auth: Auth::Bearer(access_token),
                // Customers' calls are limited per customer on Discord; they get their own
                // queue so they never wait behind the bot's.
                ..Self::bot_call(
                    Verb::Get,
                    "users/@me".into(),
                    "users/@me/bearer".into(),
                    "GET /users/@me (customer)",
                )
            })
            .await?;
        match a.status {
            200 => a.json(),
            401 | 403 => Err(DiscordError::BadUserToken),
            _ => Err(a.unexpected()),
        }
    }
}

/// A reqwest error without its URL (which carries no secret, but is noise).
fn describe(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "timed out".into()
    } else if e.is_connect() {
        "cannot connect".into()
    } else {
        e.to_string()
    }
}
