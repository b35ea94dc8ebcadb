//! Shared mutable state behind one mutex (never held across an `.await`).

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use rand::SeedableRng;
use rand::rngs::StdRng;
use tokio::time::Instant;

use crate::config::{FaultConfig, ForcedRateLimit, RateLimitConfig, SandboxConfig};
use crate::model::{Member, Snowflakes, User, World};
use crate::ratelimit::{Limiter, RateLimitScope};
use crate::util::random_token;

/// Counters over everything the sandbox answered.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Every HTTP request received (API, OAuth pages, unknown paths).
    pub total_requests: u64,
    /// All 429 answers (`rate_limited_forced + rate_limited_earned`).
    pub rate_limited: u64,
    /// 429s injected with [`Sandbox::force_rate_limit`](crate::Sandbox::force_rate_limit),
    /// and the 429s of the block each of them starts for requests sent before the
    /// client could know of it.
    pub rate_limited_forced: u64,
    /// 429s the client caused.
    pub rate_limited_earned: u64,
    /// 429s with `X-RateLimit-Global: true` (forced or earned).
    pub global_rate_limited: u64,
    /// Requests that arrived for a bucket while the sandbox had already told
    /// the client it was exhausted (`X-RateLimit-Remaining: 0` or a 429's
    /// retry-after, until that reset).
    pub bucket_violations: u64,
    /// Requests that arrived while a global 429's retry-after was running.
    pub global_violations: u64,
    /// 401 answers.
    pub unauthorized: u64,
    /// 403 answers.
    pub forbidden: u64,
    /// 401 + 403 + 429 answers, excluding `X-RateLimit-Scope: shared` 429s —
    /// what Discord counts toward its invalid-request (Cloudflare ban) limit.
    pub invalid_requests: u64,
    /// 5xx answers injected by the fault settings.
    pub injected_errors: u64,
}

impl Stats {
    /// `bucket_violations + global_violations`.
    pub fn violations(&self) -> u64 {
        self.bucket_violations + self.global_violations
    }
}

/// One logged request.
#[derive(Clone, Debug)]
pub struct RequestRecord {
    /// HTTP method.
    pub method: String,
    /// Path without query, e.g. `/api/v10/guilds/1/members/2`.
    pub path: String,
    /// Raw query string, if any.
    pub query: Option<String>,
    /// Answered status.
    pub status: u16,
    /// When the request arrived (tokio clock).
    pub at: Instant,
    /// When the request arrived (wall clock).
    pub time: SystemTime,
    /// `X-RateLimit-Bucket` of the route, if bucketed.
    pub bucket: Option<String>,
    /// Major parameter (guild id) of the bucket.
    pub major: Option<u64>,
    /// Scope of the 429, if the answer was one.
    pub rate_limit_scope: Option<RateLimitScope>,
    /// The answer was a forced 429.
    pub forced: bool,
    /// The request was sent into a bucket or global limit reported exhausted.
    pub violation: bool,
    /// The answer was an injected 5xx.
    pub injected_error: bool,
    /// The `X-Audit-Log-Reason` header, URL-decoded (Discord shows it in the server's
    /// audit log).
    pub audit_log_reason: Option<String>,
    /// The application whose bot token authenticated the request (`None` for user
    /// tokens, the OAuth2 token endpoints, the consent page and unauthenticated
    /// requests).
    pub client_id: Option<u64>,
}

/// Extra facts the request handler fills in for the log.
#[derive(Debug, Default)]
pub(crate) struct RecordInfo {
    /// The application whose bot token the request carries.
    pub client_id: Option<u64>,
    pub bucket: Option<String>,
    pub major: Option<u64>,
    pub scope: Option<RateLimitScope>,
    pub forced: bool,
    pub violation: bool,
    pub injected_error: bool,
    /// Injected latency of the answer.
    pub delay: std::time::Duration,
}

#[derive(Clone, Debug)]
pub(crate) struct CodeGrant {
    /// The application the code was issued for.
    pub client_id: u64,
    pub user_id: u64,
    pub redirect_uri: Option<String>,
    pub scopes: Vec<String>,
    pub expires_at: Instant,
    pub guild_id: Option<u64>,
}

#[derive(Clone, Debug)]
pub(crate) struct AccessGrant {
    /// The application the token was issued to.
    pub client_id: u64,
    pub user_id: u64,
    /// The authorization the token belongs to: the code exchange that started it and
    /// every refresh since. Revoking any of its tokens revokes them all.
    pub authorization: u64,
    pub scopes: Vec<String>,
    pub expires_at: Instant,
}

#[derive(Clone, Debug)]
pub(crate) struct RefreshGrant {
    pub client_id: u64,
    pub user_id: u64,
    pub authorization: u64,
    pub scopes: Vec<String>,
}

#[derive(Debug, Default)]
pub(crate) struct OAuthState {
    pub codes: HashMap<String, CodeGrant>,
    pub access: HashMap<String, AccessGrant>,
    pub refresh: HashMap<String, RefreshGrant>,
}

/// One application registered with the sandbox: its OAuth2 client and its bot user.
#[derive(Clone, Debug)]
pub(crate) struct App {
    pub client_id: u64,
    pub bot_user_id: u64,
    pub bot_token: String,
    pub bot_username: String,
    pub client_secret: String,
    /// Registered redirect URIs; empty accepts any http(s) URI.
    pub redirect_uris: Vec<String>,
}

/// Who a bot-token request comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Bot {
    pub client_id: u64,
    pub user_id: u64,
}

impl App {
    pub(crate) fn bot(&self) -> Bot {
        Bot {
            client_id: self.client_id,
            user_id: self.bot_user_id,
        }
    }
}

/// Credentials of one application registered with the sandbox.
#[derive(Clone, Debug)]
pub struct AppCredentials {
    /// OAuth2 client (application) id, which is also the bot user's id, as on
    /// Discord.
    pub client_id: u64,
    /// OAuth2 client secret.
    pub client_secret: String,
    /// Token for `Authorization: Bot <token>`.
    pub bot_token: String,
    /// Username of the bot user (and name of its managed role in guilds).
    pub bot_username: String,
}

/// Tokens issued to a user, as returned by the token endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenGrant {
    /// Bearer access token.
    pub access_token: String,
    /// Refresh token (rotates on use).
    pub refresh_token: String,
    /// Lifetime of the access token.
    pub expires_in: Duration,
    /// Granted scopes, space separated.
    pub scope: String,
}

pub(crate) struct State {
    /// Registered applications; the first is the default one from the config.
    pub apps: Vec<App>,
    pub world: World,
    pub oauth: OAuthState,
    pub limiter: Limiter,
    pub rate_limits: RateLimitConfig,
    pub forced: VecDeque<ForcedRateLimit>,
    pub faults: FaultConfig,
    pub members_intent: bool,
    pub stats: Stats,
    /// Counters of the requests made with each application's bot token.
    pub app_stats: HashMap<u64, Stats>,
    pub log: VecDeque<RequestRecord>,
    pub log_limit: usize,
    pub rng: StdRng,
    pub ids: Snowflakes,
}

impl State {
    pub(crate) fn new(cfg: &SandboxConfig) -> Self {
        let rng = match cfg.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        let mut ids = Snowflakes::default();
        ids.observe(cfg.bot_user_id);
        ids.observe(cfg.client_id);
        let mut world = World::default();
        world.users.insert(
            cfg.bot_user_id,
            User {
                id: cfg.bot_user_id,
                username: cfg.bot_username.clone(),
                global_name: None,
                bot: true,
                at_guild_limit: false,
            },
        );
        let default_app = App {
            client_id: cfg.client_id,
            bot_user_id: cfg.bot_user_id,
            bot_token: cfg.bot_token.clone(),
            bot_username: cfg.bot_username.clone(),
            client_secret: cfg.client_secret.clone(),
            redirect_uris: cfg.redirect_uris.clone(),
        };
        Self {
            apps: vec![default_app],
            world,
            oauth: OAuthState::default(),
            limiter: Limiter::default(),
            rate_limits: cfg.rate_limits.clone(),
            forced: VecDeque::new(),
            faults: cfg.faults.clone(),
            members_intent: cfg.members_intent,
            stats: Stats::default(),
            app_stats: HashMap::new(),
            log: VecDeque::new(),
            log_limit: cfg.request_log_limit,
            rng,
            ids,
        }
    }

    /// Tokens of a new authorization.
    pub(crate) fn issue_tokens(
        &mut self,
        cfg: &SandboxConfig,
        client_id: u64,
        user_id: u64,
        scopes: Vec<String>,
    ) -> TokenGrant {
        let authorization = rand::Rng::random(&mut self.rng);
        self.issue_tokens_of(cfg, client_id, user_id, scopes, authorization)
    }

    /// Tokens of an existing authorization (a refresh).
    pub(crate) fn issue_tokens_of(
        &mut self,
        cfg: &SandboxConfig,
        client_id: u64,
        user_id: u64,
        scopes: Vec<String>,
        authorization: u64,
    ) -> TokenGrant {
        let access_token = random_token(&mut self.rng, 30);
        let refresh_token = random_token(&mut self.rng, 30);
        self.oauth.access.insert(
            access_token.clone(),
            AccessGrant {
                client_id,
                user_id,
                authorization,
                scopes: scopes.clone(),
                expires_at: Instant::now() + cfg.access_token_lifetime,
            },
        );
        self.oauth.refresh.insert(
            refresh_token.clone(),
            RefreshGrant {
                client_id,
                user_id,
                authorization,
                scopes: scopes.clone(),
            },
        );
        TokenGrant {
            access_token,
            refresh_token,
            expires_in: cfg.access_token_lifetime,
            scope: scopes.join(" "),
        }
    }

    /// Revokes the authorization `token` (an access or refresh token of application
    /// `client_id`) belongs to: every access and refresh token of it stops working. An
    /// unknown token, or one of another application, changes nothing.
    pub(crate) fn revoke(&mut self, client_id: u64, token: &str) {
        let authorization = self
            .oauth
            .access
            .get(token)
            .map(|g| (g.client_id, g.authorization))
            .or_else(|| {
                self.oauth
                    .refresh
                    .get(token)
                    .map(|g| (g.client_id, g.authorization))
            })
            .filter(|(c, _)| *c == client_id)
            .map(|(_, a)| a);
        if let Some(a) = authorization {
            self.oauth.access.retain(|_, g| g.authorization != a);
            self.oauth.refresh.retain(|_, g| g.authorization != a);
        }
    }

    /// A live (unexpired) access token.
    pub(crate) fn access_grant(&self, token: &str) -> Option<&AccessGrant> {
        self.oauth
            .access
            .get(token)
            .filter(|g| Instant::now() < g.expires_at)
    }

    /// The application with this client id.
    pub(crate) fn app(&self, client_id: u64) -> Option<&App> {
        self.apps.iter().find(|a| a.client_id == client_id)
    }

    /// The application whose bot token this is.
    pub(crate) fn app_by_token(&self, token: &str) -> Option<&App> {
        self.apps.iter().find(|a| a.bot_token == token)
    }

    /// Counts rate-limit violations, overall and for the bot that made the request.
    pub(crate) fn count_violations(&mut self, client_id: Option<u64>, bucket: bool, global: bool) {
        let app = client_id.map(|c| self.app_stats.entry(c).or_default());
        for s in std::iter::once(&mut self.stats).chain(app) {
            if bucket {
                s.bucket_violations += 1;
            }
            if global {
                s.global_violations += 1;
            }
        }
    }

    /// A new bot token for `client_id`, Discord-shaped: base64 of the bot id, a
    /// timestamp part, an HMAC part.
    fn new_bot_token(&mut self, client_id: u64) -> String {
        let id_part = base64::Engine::encode(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            client_id.to_string(),
        );
        format!(
            "{id_part}.{}.{}",
            random_token(&mut self.rng, 6),
            random_token(&mut self.rng, 38)
        )
    }

    /// Resets application `client_id`'s bot token, as the developer portal's "Reset
    /// Token" does: the old token is refused (401) from now on. `None` for an unknown
    /// application.
    pub(crate) fn reset_bot_token(&mut self, client_id: u64) -> Option<String> {
        let token = self.new_bot_token(client_id);
        let app = self.apps.iter_mut().find(|a| a.client_id == client_id)?;
        app.bot_token = token.clone();
        Some(token)
    }

    /// Registers a new application with its own bot user.
    pub(crate) fn add_application(&mut self, bot_username: &str) -> AppCredentials {
        let client_id = self.ids.next();
        let bot_token = self.new_bot_token(client_id);
        let client_secret = loop {
            let secret = random_token(&mut self.rng, 32);
            if self.apps.iter().all(|a| a.client_secret != secret) {
                break secret;
            }
        };
        self.world.users.insert(
            client_id,
            User {
                id: client_id,
                username: bot_username.to_owned(),
                global_name: None,
                bot: true,
                at_guild_limit: false,
            },
        );
        let app = App {
            client_id,
            bot_user_id: client_id,
            bot_token,
            bot_username: bot_username.to_owned(),
            client_secret,
            redirect_uris: Vec::new(),
        };
        let creds = AppCredentials {
            client_id,
            client_secret: app.client_secret.clone(),
            bot_token: app.bot_token.clone(),
            bot_username: app.bot_username.clone(),
        };
        self.apps.push(app);
        creds
    }

    /// Adds application `client_id`'s bot to a guild (or updates its integration
    /// role) with exactly `permissions`, as the bot-install OAuth flow does. Returns
    /// the role id; `None` if the guild or the application is unknown.
    pub(crate) fn install_bot(
        &mut self,
        client_id: u64,
        guild_id: u64,
        permissions: u64,
        position: Option<i64>,
    ) -> Option<u64> {
        let app = self.app(client_id)?;
        let (bot_id, bot_name) = (app.bot_user_id, app.bot_username.clone());
        if !self.world.guilds.contains_key(&guild_id) {
            return None;
        }
        let role_id = self.ids.next();
        let guild = self.world.guilds.get_mut(&guild_id)?;
        let existing = guild
            .roles
            .values()
            .find(|r| r.bot_id == Some(bot_id))
            .map(|r| r.id);
        let role_id = match existing {
            Some(id) => {
                if let Some(role) = guild.roles.get_mut(&id) {
                    role.permissions = permissions;
                    if let Some(p) = position {
                        role.position = p;
                    }
                }
                id
            }
            None => {
                let position = position.unwrap_or_else(|| guild.top_position() + 1);
                guild.roles.insert(
                    role_id,
                    crate::model::Role {
                        id: role_id,
                        name: bot_name,
                        position,
                        permissions,
                        managed: true,
                        bot_id: Some(bot_id),
                    },
                );
                role_id
            }
        };
        let member = guild.members.entry(bot_id).or_insert_with(|| Member {
            user_id: bot_id,
            roles: Default::default(),
            nick: None,
            joined_at: SystemTime::now(),
        });
        member.roles.insert(role_id);
        Some(role_id)
    }
}

/// What the server and the [`Sandbox`](crate::Sandbox) handle share.
pub(crate) struct Shared {
    pub cfg: SandboxConfig,
    pub state: Mutex<State>,
}

impl Shared {
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}
