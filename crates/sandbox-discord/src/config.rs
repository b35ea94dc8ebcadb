//! Configuration of a [`Sandbox`](crate::Sandbox): credentials, rate limits,
//! token lifetimes and fault injection.

use std::collections::HashMap;
use std::time::Duration;

/// Default bot token accepted as `Authorization: Bot <token>`.
pub const DEFAULT_BOT_TOKEN: &str = "sandbox-bot-token";
/// Default bot user id (also the default OAuth2 client/application id, as on
/// Discord where an application's id equals its bot user's id).
pub const DEFAULT_BOT_USER_ID: u64 = 1_300_000_000_000_000_001;
/// Default OAuth2 client secret.
pub const DEFAULT_CLIENT_SECRET: &str = "sandbox-client-secret";

/// Everything a sandbox needs to know up front. All fields are public; the
/// `with_*` methods are shortcuts for the common tweaks.
///
/// Parts that can also be changed while the sandbox is serving (faults, rate
/// limits, members intent) are copied into the live state at start; change
/// them afterwards through the [`Sandbox`](crate::Sandbox) methods.
#[derive(Clone, Debug)]
pub struct SandboxConfig {
    /// Token expected in `Authorization: Bot <token>` from the default
    /// application's bot (more applications: [`Sandbox::add_application`](crate::Sandbox::add_application)).
    pub bot_token: String,
    /// Snowflake of the default application's bot user.
    pub bot_user_id: u64,
    /// Username of the default application's bot user; also the name of the
    /// managed role created when the bot is installed into a guild.
    pub bot_username: String,
    /// OAuth2 client (application) id of the default application.
    pub client_id: u64,
    /// OAuth2 client secret of the default application.
    pub client_secret: String,
    /// Redirect URIs registered for the default application. Empty means
    /// "accept any http(s) URI" (what added applications always accept).
    pub redirect_uris: Vec<String>,
    /// Per-route and global rate limits.
    pub rate_limits: RateLimitConfig,
    /// How long an authorization code can be exchanged (Discord: 10 minutes).
    pub code_lifetime: Duration,
    /// Lifetime of issued access tokens (Discord: 7 days).
    pub access_token_lifetime: Duration,
    /// Whether the privileged GUILD_MEMBERS intent is enabled for the bots
    /// (one switch for every application), which `GET /guilds/{g}/members`
    /// requires.
    pub members_intent: bool,
    /// Initial fault injection settings.
    pub faults: FaultConfig,
    /// Seed for the random generator used for faults and tokens; `None`
    /// seeds from the OS.
    pub seed: Option<u64>,
    /// Maximum number of entries kept in the request log (oldest dropped
    /// first; default 100 000; 0 = unlimited). Counters are unaffected.
    pub request_log_limit: usize,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        Self {
            bot_token: DEFAULT_BOT_TOKEN.to_owned(),
            bot_user_id: DEFAULT_BOT_USER_ID,
            bot_username: "Guildgate Bot".to_owned(),
            client_id: DEFAULT_BOT_USER_ID,
            client_secret: DEFAULT_CLIENT_SECRET.to_owned(),
            redirect_uris: Vec::new(),
            rate_limits: RateLimitConfig::default(),
            code_lifetime: Duration::from_secs(10 * 60),
            access_token_lifetime: Duration::from_secs(7 * 24 * 3600),
            members_intent: false,
            faults: FaultConfig::default(),
            seed: None,
            request_log_limit: 100_000,
        }
    }
}

impl SandboxConfig {
    /// Replaces the rate-limit configuration.
    pub fn with_rate_limits(mut self, rate_limits: RateLimitConfig) -> Self {
        self.rate_limits = rate_limits;
        self
    }

    /// Sets the bucket limit for one route kind.
    pub fn with_route_limit(mut self, route: RouteKind, limit: u32, window: Duration) -> Self {
        self.rate_limits = self.rate_limits.with_route(route, limit, window);
        self
    }

    /// Sets the global (per bot / per user) limit.
    pub fn with_global_limit(mut self, limit: u32, window: Duration) -> Self {
        self.rate_limits = self.rate_limits.with_global(limit, window);
        self
    }

    /// Sets the lifetime of authorization codes.
    pub fn with_code_lifetime(mut self, lifetime: Duration) -> Self {
        self.code_lifetime = lifetime;
        self
    }

    /// Sets the lifetime of access tokens.
    pub fn with_access_token_lifetime(mut self, lifetime: Duration) -> Self {
        self.access_token_lifetime = lifetime;
        self
    }

    /// Enables or disables the privileged members intent.
    pub fn with_members_intent(mut self, on: bool) -> Self {
        self.members_intent = on;
        self
    }

    /// Restricts accepted redirect URIs to exactly this list.
    pub fn with_redirect_uris<I, S>(mut self, uris: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.redirect_uris = uris.into_iter().map(Into::into).collect();
        self
    }

    /// Sets the initial fault injection settings.
    pub fn with_faults(mut self, faults: FaultConfig) -> Self {
        self.faults = faults;
        self
    }

    /// Seeds the random generator (deterministic faults and tokens).
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }
}

/// The route shapes the sandbox serves. Each kind is one rate-limit bucket
/// shape (`X-RateLimit-Bucket`); the bucket *state* is additionally keyed by
/// the major parameter (guild id) and by who is calling.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RouteKind {
    /// `GET /guilds/{guild}`
    GetGuild,
    /// `GET /guilds/{guild}/roles`
    GetGuildRoles,
    /// `GET /guilds/{guild}/members/{user}`
    GetMember,
    /// `GET /guilds/{guild}/members`
    ListMembers,
    /// `PUT /guilds/{guild}/members/{user}`
    AddMember,
    /// `DELETE /guilds/{guild}/members/{user}`
    RemoveMember,
    /// `PUT` and `DELETE /guilds/{guild}/members/{user}/roles/{role}` (one shared bucket)
    MemberRole,
    /// `GET /users/@me`
    CurrentUser,
    /// `GET /users/@me/guilds`
    CurrentUserGuilds,
    /// `POST /oauth2/token`
    TokenExchange,
    /// `POST /oauth2/token/revoke`
    TokenRevoke,
}

impl RouteKind {
    /// All route kinds.
    pub const ALL: [RouteKind; 11] = [
        RouteKind::GetGuild,
        RouteKind::GetGuildRoles,
        RouteKind::GetMember,
        RouteKind::ListMembers,
        RouteKind::AddMember,
        RouteKind::RemoveMember,
        RouteKind::MemberRole,
        RouteKind::CurrentUser,
        RouteKind::CurrentUserGuilds,
        RouteKind::TokenExchange,
        RouteKind::TokenRevoke,
    ];

    /// The route shape, e.g. `"PUT /guilds/{guild_id}/members/{user_id}"`.
    pub fn shape(self) -> &'static str {
        match self {
            RouteKind::GetGuild => "GET /guilds/{guild_id}",
            RouteKind::GetGuildRoles => "GET /guilds/{guild_id}/roles",
            RouteKind::GetMember => "GET /guilds/{guild_id}/members/{user_id}",
            RouteKind::ListMembers => "GET /guilds/{guild_id}/members",
            RouteKind::AddMember => "PUT /guilds/{guild_id}/members/{user_id}",
            RouteKind::RemoveMember => "DELETE /guilds/{guild_id}/members/{user_id}",
            RouteKind::MemberRole => {
                "PUT|DELETE /guilds/{guild_id}/members/{user_id}/roles/{role_id}"
            }
            RouteKind::CurrentUser => "GET /users/@me",
            RouteKind::CurrentUserGuilds => "GET /users/@me/guilds",
            RouteKind::TokenExchange => "POST /oauth2/token",
            RouteKind::TokenRevoke => "POST /oauth2/token/revoke",
        }
    }

    /// The opaque `X-RateLimit-Bucket` value for this shape (32 hex digits,
    /// stable across runs, independent of the major parameter like on Discord).
    pub fn bucket_hash(self) -> String {
        let shape = self.shape().as_bytes();
        let a = fnv1a(shape, 0xcbf2_9ce4_8422_2325);
        let b = fnv1a(shape, a ^ 0x9e37_79b9_7f4a_7c15);
        format!("{a:016x}{b:016x}")
    }
}

fn fnv1a(bytes: &[u8], mut hash: u64) -> u64 {
    for b in bytes {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// `limit` requests per fixed `window` (the window starts with the first
/// request after the previous one reset).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BucketLimit {
    /// Requests allowed per window.
    pub limit: u32,
    /// Window length.
    pub window: Duration,
}

impl BucketLimit {
    /// `limit` requests per `window`.
    pub fn new(limit: u32, window: Duration) -> Self {
        Self { limit, window }
    }
}

/// Rate-limit settings.
#[derive(Clone, Debug)]
pub struct RateLimitConfig {
    /// When false, no earned 429s are produced and no rate-limit headers are
    /// sent (forced 429s still apply).
    pub enabled: bool,
    /// Limit for every route kind not listed in `routes` (default 5 per 1 s).
    pub default_bucket: BucketLimit,
    /// Per route kind overrides.
    pub routes: HashMap<RouteKind, BucketLimit>,
    /// Global limit per bot token (each application's bot has its own window)
    /// and per user token (default 50 per 1 s).
    pub global: BucketLimit,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            default_bucket: BucketLimit::new(5, Duration::from_secs(1)),
            routes: HashMap::new(),
            global: BucketLimit::new(50, Duration::from_secs(1)),
        }
    }
}

impl RateLimitConfig {
    /// Rate limiting switched off (no headers, no earned 429s).
    pub fn disabled() -> Self {
        Self {
            enabled: false,
            ..Self::default()
        }
    }

    /// The limit applying to `route`.
    pub fn bucket_for(&self, route: RouteKind) -> BucketLimit {
        self.routes
            .get(&route)
            .copied()
            .unwrap_or(self.default_bucket)
    }

    /// Overrides the limit of one route kind.
    pub fn with_route(mut self, route: RouteKind, limit: u32, window: Duration) -> Self {
        self.routes.insert(route, BucketLimit::new(limit, window));
        self
    }

    /// Sets the limit used for every route kind without an override.
    pub fn with_default_bucket(mut self, limit: u32, window: Duration) -> Self {
        self.default_bucket = BucketLimit::new(limit, window);
        self
    }

    /// Sets the global limit.
    pub fn with_global(mut self, limit: u32, window: Duration) -> Self {
        self.global = BucketLimit::new(limit, window);
        self
    }
}

/// Added latency of each API answer: the request is handled (and counted against
/// its rate limits) on arrival, and the answer leaves this much later.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Latency {
    /// No added latency.
    #[default]
    None,
    /// Always this long.
    Fixed(Duration),
    /// Uniformly random between the two bounds (inclusive).
    Range(Duration, Duration),
}

/// Randomised faults applied to `/api/v10` requests. Forced 429s are queued
/// separately with [`Sandbox::force_rate_limit`](crate::Sandbox::force_rate_limit).
#[derive(Clone, Debug, PartialEq)]
pub struct FaultConfig {
    /// Share (0.0..=1.0) of API requests answered with a random status from
    /// `error_statuses` *before* they are processed (no side effects, no
    /// rate-limit accounting).
    pub error_rate: f64,
    /// Statuses picked from for injected errors (default 500, 502, 503).
    pub error_statuses: Vec<u16>,
    /// Latency added to each answer (after processing).
    pub latency: Latency,
}

impl Default for FaultConfig {
    fn default() -> Self {
        Self {
            error_rate: 0.0,
            error_statuses: vec![500, 502, 503],
            latency: Latency::None,
        }
    }
}

impl FaultConfig {
    /// No faults.
    pub fn none() -> Self {
        Self::default()
    }

    /// Sets the error share.
    pub fn with_error_rate(mut self, rate: f64) -> Self {
        self.error_rate = rate;
        self
    }

    /// Sets the latency.
    pub fn with_latency(mut self, latency: Latency) -> Self {
        self.latency = latency;
        self
    }
}

/// Which requests a forced 429 hits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ForcedScope {
    /// A per-resource ("shared") limit on the next matching bucketed request;
    /// `None` matches any route kind.
    Shared(Option<RouteKind>),
    /// The global limit on the next bot-token request, whichever application's
    /// bot sends it; the block it starts applies to that application's bot only.
    Global,
}

/// A queued artificial 429. Forced 429s are counted separately and never as
/// client violations; but they block the bucket (or the whole bot, for the
/// global kind) for `retry_after`, and requests ignoring that are violations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ForcedRateLimit {
    /// How many requests to answer with 429.
    pub count: u32,
    /// What is hit.
    pub scope: ForcedScope,
    /// The advertised wait (default 1 s).
    pub retry_after: Duration,
}

impl ForcedRateLimit {
    /// `count` shared-scope 429s on any bucketed route.
    pub fn shared(count: u32) -> Self {
        Self {
            count,
            scope: ForcedScope::Shared(None),
            retry_after: Duration::from_secs(1),
        }
    }

    /// `count` global 429s on bot-token requests (of any application).
    pub fn global(count: u32) -> Self {
        Self {
            count,
            scope: ForcedScope::Global,
            retry_after: Duration::from_secs(1),
        }
    }

    /// Restricts a shared forced 429 to one route kind.
    pub fn on_route(mut self, route: RouteKind) -> Self {
        if let ForcedScope::Shared(_) = self.scope {
            self.scope = ForcedScope::Shared(Some(route));
        }
        self
    }

    /// Sets the advertised wait.
    pub fn retry_after(mut self, retry_after: Duration) -> Self {
        self.retry_after = retry_after;
        self
    }
}
