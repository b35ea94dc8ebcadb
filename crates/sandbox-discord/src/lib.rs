//! # sandbox-discord
//!
//! An in-process, faithful stand-in for the parts of Discord's HTTP API v10
//! that guildgate uses, served over real HTTP on loopback so that the product
//! runs its ordinary HTTP client against it.
//!
//! What it serves:
//!
//! * Several Discord applications side by side, as on Discord: the default
//!   one from [`SandboxConfig`] and any added with
//!   [`Sandbox::add_application`]. Each has its own client id (equal to its
//!   bot user's id), client secret, bot user and bot token, OAuth2 codes and
//!   tokens, guild memberships, managed roles and global rate limit.
//! * `GET|POST /oauth2/authorize` — a self-contained HTML consent page
//!   (user login select, optional server select for `scope=bot`, Authorize and
//!   Cancel buttons) for any registered application's `client_id`, that
//!   redirects like Discord does; a bot install installs that application's
//!   bot.
//! * `POST /api/v10/oauth2/token` — `authorization_code` (single-use,
//!   short-lived codes, `redirect_uri` must match), `refresh_token`
//!   (rotating) and `client_credentials` (a token for the application's owner,
//!   accepted nowhere else: it proves the client secret) grants; form-encoded
//!   bodies only; client auth in the form or
//!   via HTTP Basic, and codes and refresh tokens only redeemable by the
//!   application they were issued for.
//! * `POST /api/v10/oauth2/token/revoke` — revokes the authorization an access
//!   or refresh token belongs to (all its tokens stop working); 200 with an
//!   empty body, also for an unknown token; 401 for bad client credentials.
//! * `GET /api/v10/users/@me`, `GET /api/v10/users/@me/guilds` (with a bot
//!   token: that bot's user and guilds).
//! * `GET /api/v10/guilds/{g}`, `/roles`, `/members` (needs the members
//!   intent), `GET|PUT|DELETE /members/{u}`,
//!   `PUT|DELETE /members/{u}/roles/{r}`, with Discord's permission and role
//!   hierarchy rules (for the calling bot) and JSON error bodies
//!   `{"code", "message"}`.
//! * Per-route buckets (`X-RateLimit-*` headers, fixed windows starting at the
//!   first request, keyed by route shape + guild id + caller, each bot being
//!   its own caller) and a global limit per bot/user token; 429 bodies and
//!   headers as documented by Discord.
//! * Fault injection: random 5xx, latency, forced shared/global 429s.
//! * Inspection: member state, a request log (naming the application of each
//!   bot request), and [`Stats`] — overall and per application
//!   ([`Sandbox::app_stats`]) — including *violations*: requests sent into a
//!   bucket the sandbox had already reported exhausted.
//!
//! ```no_run
//! use sandbox_discord::{Consent, GuildSpec, Sandbox, SandboxConfig, UserSpec, permissions};
//! # async fn demo() {
//! let sandbox = Sandbox::start(SandboxConfig::default()).await;
//! let ids = sandbox.add_guild(
//!     GuildSpec::new("Acme Community")
//!         .with_bot_permissions(permissions::CREATE_INSTANT_INVITE | permissions::MANAGE_ROLES)
//!         .with_role("Patrons", 1),
//! );
//! let alice = sandbox.add_user(UserSpec::new("alice"));
//! let url = format!(
//!     "{}?client_id={}&response_type=code&scope=identify+guilds.join&redirect_uri=http://app/cb&state=xyz",
//!     sandbox.authorize_url(),
//!     sandbox.client_id(),
//! );
//! let location = sandbox.consent(&url, alice, Consent::Authorize).await.unwrap();
//! assert!(location.starts_with("http://app/cb?code="));
//! # let _ = ids;
//! # }
//! ```
//!
//! A second application (a merchant's own bot) next to the default one:
//!
//! ```no_run
//! use sandbox_discord::{GuildSpec, Sandbox, SandboxConfig, UserSpec, permissions};
//! # async fn demo() {
//! let sandbox = Sandbox::start(SandboxConfig::default()).await;
//! let guild = sandbox.add_guild(GuildSpec::new("Acme Community")).guild_id;
//! let merchant = sandbox.add_application("Acme Bot");
//! sandbox.install_app_bot(guild, merchant.client_id, permissions::CREATE_INSTANT_INVITE);
//! let alice = sandbox.add_user(UserSpec::new("alice"));
//! // Only `merchant`'s bot (`Authorization: Bot {merchant.bot_token}`) may add
//! // alice with this token.
//! let grant = sandbox.issue_token_for(merchant.client_id, alice, &["identify", "guilds.join"]);
//! # let _ = grant;
//! # }
//! ```
//!
//! ## Decisions where Discord is ambiguous or undocumented
//!
//! * The methods without an application in their name (`bot_token`,
//!   `client_id`, `install_bot`, `issue_token`, `bot_permissions`, …) and
//!   [`GuildSpec`]'s bot mean the default application. An added application
//!   accepts any http(s) redirect URI. [`Stats`] from [`Sandbox::stats`]
//!   count every request; [`Sandbox::app_stats`] those carrying that
//!   application's bot token (whatever their route or answer; an unknown bot
//!   token belongs to no application). The members intent is one switch for
//!   every application.
//! * Unknown guild id → 404 `10004 Unknown Guild`; a guild that exists but
//!   the calling bot is not in → 403 `50001 Missing Access` (what Discord
//!   answers).
//! * A user id that is not a member → 404 `10007 Unknown Member` on the
//!   get/kick/role routes; on `PUT /members/{u}` a user id unknown to the
//!   sandbox → 404 `10013 Unknown User`.
//! * `PUT /members/{u}` check order: bot in guild → body → user exists →
//!   access token (must be live, belong to that user, carry `guilds.join` and
//!   have been issued to the calling bot's application, else 403 `50025`) → Create Instant Invite (403 `50013`) → already a
//!   member (204, other fields ignored) → banned (403 `40007`) → roles (each
//!   must exist: 404 `10011`; Manage Roles + not managed + strictly below the
//!   bot's highest role, else 403 `50013`) → `nick` needs Manage Nicknames →
//!   guild limit (400 `30001`, like Discord's other 30xxx limit errors).
//! * Role add/remove: Manage Roles (50013) → member (10007) → role (10011) →
//!   managed/`@everyone`/hierarchy (50013). Idempotent, always 204.
//! * Kick: Kick Members → member (10007) → owner can't be kicked, target's
//!   highest role must be strictly below the bot's (50013).
//! * Hierarchy compares positions only (no id tie-break); the owner and
//!   ADMINISTRATOR bypass permission checks, the owner also the hierarchy.
//! * The `@everyone` role of a new [`GuildSpec`] has no permissions.
//! * Bot install (`scope=bot`) places the bot's managed role (named after
//!   the bot) above every existing role; reinstalling updates that role's
//!   permissions. Several bots can be in one guild, each with its own role.
//! * Global limit: per bot token (each application's bot has its own window)
//!   and per user bearer token (per user, whichever application issued it);
//!   the token exchange is not subject to it (it is bucketed, keyed as
//!   anonymous, shared by all applications). Forced global 429s only hit
//!   bot-token requests: each hits the next one, of whichever application,
//!   and blocks that application's bot only.
//! * Injected 5xx happen before any processing (no side effect, no rate-limit
//!   accounting, no rate-limit headers).
//! * `Retry-After` header is whole seconds rounded up (at least 1), the body's
//!   `retry_after` and `X-RateLimit-Reset-After` carry millisecond precision.
//! * A shared-scope 429 (forced) blocks that bucket for its retry-after; a
//!   request arriving during any advertised wait (Remaining 0 until reset, or
//!   a 429's retry-after) counts as a violation, once the answer that advertised
//!   it could have been read: its latency plus [`ANSWER_TRANSIT`] after it was
//!   handled. Forced 429s themselves never
//!   do, and shared-scope 429s are excluded from `invalid_requests` as on
//!   Discord.
//! * Codes are consumed by any exchange attempt of their application that
//!   names them (also a failed one with a wrong `redirect_uri`). Refreshing
//!   rotates the refresh token; the previous access token stays valid until
//!   it expires.
//! * A code or refresh token presented with another application's (valid)
//!   credentials is unknown to that application: 400 `invalid_grant`, and it
//!   is neither consumed nor rotated. Revoking another application's token
//!   answers 200 and revokes nothing.
//! * A non-form token request is not understood, so it fails like a form
//!   without `grant_type`: 400 `unsupported_grant_type`.

mod config;
mod consent;
mod model;
mod oauth;
mod ratelimit;
mod server;
mod state;
mod util;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use config::{
    BucketLimit, DEFAULT_BOT_TOKEN, DEFAULT_BOT_USER_ID, DEFAULT_CLIENT_SECRET, FaultConfig,
    ForcedRateLimit, ForcedScope, Latency, RateLimitConfig, RouteKind, SandboxConfig,
};
pub use consent::{Consent, ConsentError};
pub use model::{GuildIds, GuildSpec, MemberView, RoleSpec, RoleView, UserSpec, permissions};
pub use ratelimit::{ANSWER_TRANSIT, RateLimitScope};
pub use state::{AppCredentials, RequestRecord, Stats, TokenGrant};

use model::{Guild, Member, Role, User};
use state::{Shared, State};

/// A running sandbox. Stops serving when dropped or on [`Sandbox::shutdown`].
///
/// All methods take `&self` and are safe to call while requests are served.
pub struct Sandbox {
    shared: Arc<Shared>,
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandbox").field("addr", &self.addr).finish()
    }
}

impl Sandbox {
    /// Starts serving on `127.0.0.1:<random port>`.
    ///
    /// # Panics
    /// If no loopback port can be bound.
    pub async fn start(config: SandboxConfig) -> Sandbox {
        let addr = SocketAddr::from(([127, 0, 0, 1], 0));
        Self::start_on(config, addr)
            .await
            .expect("sandbox-discord: cannot bind a loopback port")
    }

    /// Starts serving on `addr` (e.g. `0.0.0.0:8081` in a container).
    pub async fn start_on(config: SandboxConfig, addr: SocketAddr) -> std::io::Result<Sandbox> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State::new(&config)),
            cfg: config,
        });
        let app = server::router(shared.clone());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await;
            if let Err(e) = served {
                tracing::warn!(error = %e, "sandbox-discord server stopped");
            }
        });
        tracing::debug!(%addr, "sandbox-discord listening");
        Ok(Sandbox {
            shared,
            addr,
            stop: Some(stop),
            task: Some(task),
        })
    }

    /// Stops serving and waits for in-flight requests to finish.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }

    // -- addresses and credentials ------------------------------------------

    /// The bound socket address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT` (an unspecified bind address is shown as
    /// `127.0.0.1`).
    pub fn base_url(&self) -> String {
        let mut addr = self.addr;
        if addr.ip().is_unspecified() {
            addr.set_ip([127, 0, 0, 1].into());
        }
        format!("http://{addr}")
    }

    /// `http://127.0.0.1:PORT/api/v10`.
    pub fn api_base(&self) -> String {
        format!("{}/api/v10", self.base_url())
    }

    /// `http://127.0.0.1:PORT/oauth2/authorize`.
    pub fn authorize_url(&self) -> String {
        format!("{}/oauth2/authorize", self.base_url())
    }

    /// The configuration the sandbox was started with.
    pub fn config(&self) -> &SandboxConfig {
        &self.shared.cfg
    }

    /// The default application's bot token (`Authorization: Bot <token>`).
    pub fn bot_token(&self) -> &str {
        &self.shared.cfg.bot_token
    }

    /// The default application's bot user id.
    pub fn bot_user_id(&self) -> u64 {
        self.shared.cfg.bot_user_id
    }

    /// The default application's OAuth2 client id.
    pub fn client_id(&self) -> u64 {
        self.shared.cfg.client_id
    }

    /// The default application's OAuth2 client secret.
    pub fn client_secret(&self) -> &str {
        &self.shared.cfg.client_secret
    }

    // -- world setup ----------------------------------------------------------

    fn with_state<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        f(&mut self.shared.lock())
    }

    fn with_guild<R>(&self, guild_id: u64, f: impl FnOnce(&mut Guild) -> R) -> R {
        self.with_state(|st| {
            let guild = st
                .world
                .guilds
                .get_mut(&guild_id)
                .unwrap_or_else(|| panic!("sandbox-discord: unknown guild {guild_id}"));
            f(guild)
        })
    }

    /// Creates a user and returns its id.
    pub fn add_user(&self, spec: UserSpec) -> u64 {
        self.with_state(|st| {
            let id = spec.id.unwrap_or_else(|| st.ids.next());
            st.ids.observe(id);
            st.world.users.insert(
                id,
                User {
                    id,
                    username: spec.username,
                    global_name: spec.global_name,
                    bot: false,
                    at_guild_limit: spec.at_guild_limit,
                },
            );
            for g in spec.banned_from {
                if let Some(guild) = st.world.guilds.get_mut(&g) {
                    guild.bans.insert(id);
                    guild.members.remove(&id);
                }
            }
            id
        })
    }

    /// Creates a guild (with its owner, `@everyone`, the spec roles and —
    /// unless [`GuildSpec::without_bot`] — the bot and its managed role).
    ///
    /// # Panics
    /// If [`GuildSpec::with_owner`] names an unknown user.
    pub fn add_guild(&self, spec: GuildSpec) -> GuildIds {
        let cfg = &self.shared.cfg;
        self.with_state(|st| {
            let guild_id = spec.id.unwrap_or_else(|| st.ids.next());
            st.ids.observe(guild_id);
            let owner_id = match spec.owner {
                Some(o) => {
                    assert!(
                        st.world.users.contains_key(&o),
                        "sandbox-discord: unknown owner user {o}"
                    );
                    o
                }
                None => {
                    let id = st.ids.next();
                    st.world.users.insert(
                        id,
                        User {
                            id,
                            username: format!("owner-{id}"),
                            global_name: Some(format!("Owner of {}", spec.name)),
                            bot: false,
                            at_guild_limit: false,
                        },
                    );
                    id
                }
            };
            let mut guild = Guild {
                id: guild_id,
                name: spec.name,
                owner_id,
                roles: Default::default(),
                members: Default::default(),
                bans: Default::default(),
            };
            guild.roles.insert(
                guild_id,
                Role {
                    id: guild_id,
                    name: "@everyone".into(),
                    position: 0,
                    permissions: spec.everyone_permissions,
                    managed: false,
                    bot_id: None,
                },
            );
            let mut roles = Vec::new();
            for r in spec.roles {
                let id = r.id.unwrap_or_else(|| st.ids.next());
                st.ids.observe(id);
                guild.roles.insert(
                    id,
                    Role {
                        id,
                        name: r.name.clone(),
                        position: r.position,
                        permissions: r.permissions,
                        managed: r.managed,
                        bot_id: None,
                    },
                );
                roles.push((r.name, id));
            }
            guild.members.insert(
                owner_id,
                Member {
                    user_id: owner_id,
                    roles: BTreeSet::new(),
                    nick: None,
                    joined_at: SystemTime::now(),
                },
            );
            st.world.guilds.insert(guild_id, guild);
            let bot_role_id = if spec.bot {
                st.install_bot(
                    cfg.client_id,
                    guild_id,
                    spec.bot_permissions,
                    spec.bot_role_position,
                )
            } else {
                None
            };
            GuildIds {
                guild_id,
                everyone_role_id: guild_id,
                owner_id,
                bot_role_id,
                roles,
            }
        })
    }

    /// Adds a role to a guild and returns its id.
    ///
    /// # Panics
    /// If the guild is unknown.
    pub fn add_role(&self, guild_id: u64, spec: RoleSpec) -> u64 {
        self.with_state(|st| {
            let id = spec.id.unwrap_or_else(|| st.ids.next());
            st.ids.observe(id);
            let guild = st
                .world
                .guilds
                .get_mut(&guild_id)
                .unwrap_or_else(|| panic!("sandbox-discord: unknown guild {guild_id}"));
            guild.roles.insert(
                id,
                Role {
                    id,
                    name: spec.name,
                    position: spec.position,
                    permissions: spec.permissions,
                    managed: spec.managed,
                    bot_id: None,
                },
            );
            id
        })
    }

    /// Moves a role in the hierarchy.
    ///
    /// # Panics
    /// If the guild or role is unknown.
    pub fn set_role_position(&self, guild_id: u64, role_id: u64, position: i64) {
        self.with_guild(guild_id, |g| {
            g.roles
                .get_mut(&role_id)
                .unwrap_or_else(|| panic!("sandbox-discord: unknown role {role_id}"))
                .position = position;
        });
    }

    /// Changes a role's permissions.
    ///
    /// # Panics
    /// If the guild or role is unknown.
    pub fn set_role_permissions(&self, guild_id: u64, role_id: u64, permissions: u64) {
        self.with_guild(guild_id, |g| {
            g.roles
                .get_mut(&role_id)
                .unwrap_or_else(|| panic!("sandbox-discord: unknown role {role_id}"))
                .permissions = permissions;
        });
    }

    /// Deletes a role (and removes it from every member).
    ///
    /// # Panics
    /// If the guild is unknown.
    pub fn delete_role(&self, guild_id: u64, role_id: u64) {
        self.with_guild(guild_id, |g| {
            g.roles.remove(&role_id);
            for m in g.members.values_mut() {
                m.roles.remove(&role_id);
            }
        });
    }

    /// Puts the default application's bot into the guild (if absent) and sets
    /// its managed role's permissions, like a bot install. Returns the bot role
    /// id.
    ///
    /// # Panics
    /// If the guild is unknown.
    pub fn install_bot(&self, guild_id: u64, permissions: u64) -> u64 {
        self.install_app_bot(guild_id, self.client_id(), permissions)
    }

    /// Removes the default application's bot (and its managed role) from a
    /// guild.
    ///
    /// # Panics
    /// If the guild is unknown.
    pub fn remove_bot(&self, guild_id: u64) {
        self.remove_app_bot(guild_id, self.client_id());
    }

    // -- applications -----------------------------------------------------------

    /// Registers another application with its own bot user (username
    /// `bot_username`, also the name of its managed role in guilds). Its client
    /// id — equal to the bot user's id, as on Discord — is a fresh snowflake;
    /// its client secret and bot token are random and distinct from every
    /// other application's. It accepts any http(s) redirect URI and is in no
    /// guild until [`Sandbox::install_app_bot`] or a bot install on the consent
    /// page.
    pub fn add_application(&self, bot_username: &str) -> AppCredentials {
        self.with_state(|st| st.add_application(bot_username))
    }

    /// Resets application `client_id`'s bot token, as Discord's developer portal does:
    /// requests with the old token are answered 401 from now on. Returns the new
    /// token.
    ///
    /// # Panics
    /// If the application is unknown.
    pub fn reset_app_bot_token(&self, client_id: u64) -> String {
        self.with_state(|st| st.reset_bot_token(client_id))
            .unwrap_or_else(|| panic!("sandbox-discord: unknown application {client_id}"))
    }

    /// The bot user id of application `client_id`.
    fn app_bot_user_id(st: &State, client_id: u64) -> u64 {
        st.app(client_id)
            .unwrap_or_else(|| panic!("sandbox-discord: unknown application {client_id}"))
            .bot_user_id
    }

    /// Installs application `client_id`'s bot into a guild with `permissions`,
    /// as a bot install through the consent page would: the bot becomes a
    /// member holding its managed role (named after the bot, placed above
    /// every existing role); reinstalling only updates that role's
    /// permissions. Returns the managed role's id.
    ///
    /// # Panics
    /// If the guild or the application is unknown.
    pub fn install_app_bot(&self, guild_id: u64, client_id: u64, permissions: u64) -> u64 {
        self.with_state(|st| {
            Self::app_bot_user_id(st, client_id);
            st.install_bot(client_id, guild_id, permissions, None)
        })
        .unwrap_or_else(|| panic!("sandbox-discord: unknown guild {guild_id}"))
    }

    /// Removes application `client_id`'s bot (and its managed role) from a
    /// guild; no-op if the bot is not in it.
    ///
    /// # Panics
    /// If the guild or the application is unknown.
    pub fn remove_app_bot(&self, guild_id: u64, client_id: u64) {
        self.with_state(|st| {
            let bot = Self::app_bot_user_id(st, client_id);
            let g = st
                .world
                .guilds
                .get_mut(&guild_id)
                .unwrap_or_else(|| panic!("sandbox-discord: unknown guild {guild_id}"));
            g.members.remove(&bot);
            g.roles.retain(|_, r| r.bot_id != Some(bot));
        });
    }

    /// Adds (or replaces) a member with the given roles.
    ///
    /// # Panics
    /// If the guild or user is unknown.
    pub fn add_member(&self, guild_id: u64, user_id: u64, roles: &[u64]) {
        self.add_member_since(guild_id, user_id, roles, SystemTime::now());
    }

    /// Adds a member who joined at `joined_at` (a member who was in the server long
    /// before anything else happened, say), with roles.
    ///
    /// # Panics
    /// If the user or guild is unknown.
    pub fn add_member_since(
        &self,
        guild_id: u64,
        user_id: u64,
        roles: &[u64],
        joined_at: SystemTime,
    ) {
        self.with_state(|st| {
            assert!(
                st.world.users.contains_key(&user_id),
                "sandbox-discord: unknown user {user_id}"
            );
            let g = st
                .world
                .guilds
                .get_mut(&guild_id)
                .unwrap_or_else(|| panic!("sandbox-discord: unknown guild {guild_id}"));
            g.members.insert(
                user_id,
                Member {
                    user_id,
                    roles: roles.iter().copied().filter(|r| *r != guild_id).collect(),
                    nick: None,
                    joined_at,
                },
            );
        });
    }

    /// Fills a guild with `n` new users as members (a large server, for listing at
    /// scale), member `i` holding the roles `roles(i)`; returns their ids in order.
    /// One lock for the lot: a hundred thousand members take a fraction of a second.
    ///
    /// # Panics
    /// If the guild is unknown.
    pub fn add_crowd(
        &self,
        guild_id: u64,
        n: usize,
        roles: impl Fn(usize) -> Vec<u64>,
    ) -> Vec<u64> {
        self.with_state(|st| {
            assert!(
                st.world.guilds.contains_key(&guild_id),
                "sandbox-discord: unknown guild {guild_id}"
            );
            let joined_at = SystemTime::now();
            let mut ids = Vec::with_capacity(n);
            for i in 0..n {
                let id = st.ids.next();
                st.world.users.insert(
                    id,
                    User {
                        id,
                        username: format!("crowd{i}"),
                        global_name: None,
                        bot: false,
                        at_guild_limit: false,
                    },
                );
                let g = st.world.guilds.get_mut(&guild_id).expect("checked");
                g.members.insert(
                    id,
                    Member {
                        user_id: id,
                        roles: roles(i).into_iter().filter(|r| *r != guild_id).collect(),
                        nick: None,
                        joined_at,
                    },
                );
                ids.push(id);
            }
            ids
        })
    }

    /// Removes a member (no-op if absent).
    ///
    /// # Panics
    /// If the guild is unknown.
    pub fn remove_member(&self, guild_id: u64, user_id: u64) {
        self.with_guild(guild_id, |g| {
            g.members.remove(&user_id);
        });
    }

    /// Bans a user from a guild (removing their membership).
    ///
    /// # Panics
    /// If the guild is unknown.
    pub fn ban(&self, guild_id: u64, user_id: u64) {
        self.with_guild(guild_id, |g| {
            g.bans.insert(user_id);
            g.members.remove(&user_id);
        });
    }

    /// Marks a user as being in the maximum number of guilds (or not).
    pub fn set_at_guild_limit(&self, user_id: u64, at_limit: bool) {
        self.with_state(|st| {
            if let Some(u) = st.world.users.get_mut(&user_id) {
                u.at_guild_limit = at_limit;
            }
        });
    }

    /// Switches the privileged members intent.
    pub fn set_members_intent(&self, on: bool) {
        self.with_state(|st| st.members_intent = on);
    }

    /// Issues tokens of the default application for a user directly, skipping
    /// the consent flow.
    ///
    /// # Panics
    /// If the user is unknown.
    pub fn issue_token(&self, user_id: u64, scopes: &[&str]) -> TokenGrant {
        self.issue_token_for(self.client_id(), user_id, scopes)
    }

    /// Issues tokens of application `client_id` for a user directly, skipping
    /// the consent flow.
    ///
    /// # Panics
    /// If the application or the user is unknown.
    pub fn issue_token_for(&self, client_id: u64, user_id: u64, scopes: &[&str]) -> TokenGrant {
        let cfg = &self.shared.cfg;
        self.with_state(|st| {
            Self::app_bot_user_id(st, client_id);
            assert!(
                st.world.users.contains_key(&user_id),
                "sandbox-discord: unknown user {user_id}"
            );
            st.issue_tokens(
                cfg,
                client_id,
                user_id,
                scopes.iter().map(|s| (*s).to_owned()).collect(),
            )
        })
    }

    /// Revokes every access and refresh token of a user (of every application).
    pub fn revoke_tokens(&self, user_id: u64) {
        self.with_state(|st| {
            st.oauth.access.retain(|_, g| g.user_id != user_id);
            st.oauth.refresh.retain(|_, g| g.user_id != user_id);
        });
    }

    // -- inspection -----------------------------------------------------------

    /// The member, if `user_id` is in the guild.
    pub fn member(&self, guild_id: u64, user_id: u64) -> Option<MemberView> {
        self.with_state(|st| {
            let g = st.world.guilds.get(&guild_id)?;
            g.members.get(&user_id).map(|m| g.member_view(m))
        })
    }

    /// Every member of a guild, by user id.
    pub fn members(&self, guild_id: u64) -> Vec<MemberView> {
        self.with_state(|st| {
            st.world.guilds.get(&guild_id).map_or_else(Vec::new, |g| {
                g.members.values().map(|m| g.member_view(m)).collect()
            })
        })
    }

    /// The roles of a guild, by position.
    pub fn roles(&self, guild_id: u64) -> Vec<RoleView> {
        self.with_state(|st| {
            st.world
                .guilds
                .get(&guild_id)
                .map_or_else(Vec::new, Guild::role_views)
        })
    }

    /// The default application's bot's computed guild permissions (`None` if
    /// the bot is not in the guild or the guild is unknown).
    pub fn bot_permissions(&self, guild_id: u64) -> Option<u64> {
        self.app_bot_permissions(guild_id, self.client_id())
    }

    /// Application `client_id`'s bot's computed guild permissions (`None` if
    /// the bot is not in the guild, or the guild or application is unknown).
    pub fn app_bot_permissions(&self, guild_id: u64, client_id: u64) -> Option<u64> {
        self.with_state(|st| {
            let bot = st.app(client_id)?.bot_user_id;
            let g = st.world.guilds.get(&guild_id)?;
            g.members.contains_key(&bot).then(|| g.permissions_of(bot))
        })
    }

    /// The logged requests (oldest first, ordered by completion; at most
    /// [`SandboxConfig::request_log_limit`] entries).
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.with_state(|st| st.log.iter().cloned().collect())
    }

    /// The counters over every request (all applications, user tokens, OAuth2
    /// pages and endpoints).
    pub fn stats(&self) -> Stats {
        self.with_state(|st| st.stats.clone())
    }

    /// The counters over the requests made with application `client_id`'s bot
    /// token only (all zero for an application that made none, or an unknown
    /// one). Requests with an unknown bot token (401) belong to no
    /// application.
    pub fn app_stats(&self, client_id: u64) -> Stats {
        self.with_state(|st| st.app_stats.get(&client_id).cloned().unwrap_or_default())
    }

    /// Clears the request log and the counters, overall and per application
    /// (not the rate-limit state).
    pub fn reset_stats(&self) {
        self.with_state(|st| {
            st.log.clear();
            st.stats = Stats::default();
            st.app_stats.clear();
        });
    }

    // -- faults and limits ------------------------------------------------------

    /// The current fault settings.
    pub fn faults(&self) -> FaultConfig {
        self.with_state(|st| st.faults.clone())
    }

    /// Replaces the fault settings.
    pub fn set_faults(&self, faults: FaultConfig) {
        self.with_state(|st| st.faults = faults);
    }

    /// Sets the share of API requests answered with an injected 5xx.
    pub fn set_error_rate(&self, rate: f64) {
        self.with_state(|st| st.faults.error_rate = rate);
    }

    /// Sets the added latency.
    pub fn set_latency(&self, latency: Latency) {
        self.with_state(|st| st.faults.latency = latency);
    }

    /// Queues forced 429s (applied before the earned limits, in queue order).
    pub fn force_rate_limit(&self, forced: ForcedRateLimit) {
        if forced.count > 0 {
            self.with_state(|st| st.forced.push_back(forced));
        }
    }

    /// Forced 429s still queued.
    pub fn pending_forced_rate_limits(&self) -> u32 {
        self.with_state(|st| st.forced.iter().map(|f| f.count).sum())
    }

    /// Replaces the rate-limit settings (existing windows keep running).
    pub fn set_rate_limits(&self, limits: RateLimitConfig) {
        self.with_state(|st| st.rate_limits = limits);
    }

    // -- consent --------------------------------------------------------------

    /// Plays the customer on the consent page through real HTTP: GETs
    /// `authorize_url` (with `login=<user_id>`, i.e. a browser logged in as
    /// that user), fills in the form like a browser (the user in the login
    /// select; for [`Consent::InstallBot`] the server select), presses the
    /// button and returns the redirect `Location`.
    pub async fn consent(
        &self,
        authorize_url: &str,
        user_id: u64,
        consent: Consent,
    ) -> Result<String, ConsentError> {
        consent::perform(authorize_url, user_id, consent).await
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}
