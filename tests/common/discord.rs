//! Helpers for the Discord tests: a sandbox Discord in-process, a guildgate pointed at
//! it, and the customer's side of the OAuth flow played through real HTTP.
#![allow(dead_code)]

use guildgate::domain::Grant;
use guildgate::grants::link::LinkBuilder;
use sandbox_discord::{
    Consent, GuildIds, GuildSpec, Sandbox, SandboxConfig, UserSpec, permissions,
};

use crate::common::{TestApp, TestConfig, wait_for};

/// What the bot needs: Manage Roles, Kick Members, Create Instant Invite.
pub const BOT_PERMISSIONS: u64 =
    permissions::MANAGE_ROLES | permissions::KICK_MEMBERS | permissions::CREATE_INSTANT_INVITE;

pub struct World {
    pub sandbox: Sandbox,
    pub app: TestApp,
    pub links: LinkBuilder,
    pub http: reqwest::Client,
}

/// guildgate settings that point at `sandbox`.
pub fn sandbox_env(sandbox: &Sandbox, cfg: TestConfig) -> TestConfig {
    crate::common::world::sandbox_env(sandbox)
        .into_iter()
        .fold(cfg, |cfg, (k, v)| cfg.env(k, &v))
}

impl World {
    pub async fn start() -> Self {
        Self::configured(TestConfig::default()).await
    }

    /// A world on the default sandbox, its guildgate configured by `cfg`.
    pub async fn configured(cfg: TestConfig) -> Self {
        Self::start_with(SandboxConfig::default(), cfg).await
    }

    pub async fn start_with(sandbox: SandboxConfig, cfg: TestConfig) -> Self {
        let sandbox = Sandbox::start(sandbox).await;
        let app = TestApp::spawn_with(sandbox_env(&sandbox, cfg)).await;
        Self {
            links: LinkBuilder::from_settings(&app.settings).with_directory(app.bots.directory()),
            sandbox,
            app,
            http: reqwest::Client::new(),
        }
    }

    /// A guild the bot is installed in (with the right permissions) with one role
    /// below the bot's.
    pub fn guild(&self, name: &str) -> GuildIds {
        self.sandbox.add_guild(
            GuildSpec::new(name)
                .with_bot_permissions(BOT_PERMISSIONS)
                .with_role("Patrons", 1),
        )
    }

    pub fn user(&self, name: &str) -> u64 {
        self.sandbox.add_user(UserSpec::new(name))
    }

    /// The grant's current `oauth_url`.
    pub fn oauth_url(&self, g: &Grant) -> String {
        self.links
            .url(&g.business_id, &g.id, &g.oauth_nonce, g.oauth_expires_at)
    }

    /// Plays the customer: opens `url` on the sandbox consent page as `user`, presses
    /// the button, follows the redirect to guildgate's callback. Returns the callback
    /// URL and guildgate's (status, page).
    pub async fn consent(&self, url: &str, user: u64, consent: Consent) -> (String, u16, String) {
        let callback = self
            .sandbox
            .consent(url, user, consent)
            .await
            .expect("consent page works");
        let (status, body) = self.get(&callback).await;
        (callback, status, body)
    }

    pub async fn authorize(&self, g: &Grant, user: u64) -> (u16, String) {
        let (_, status, body) = self
            .consent(&self.oauth_url(g), user, Consent::Authorize)
            .await;
        (status, body)
    }

    pub async fn get(&self, url: &str) -> (u16, String) {
        let r = self.http.get(url).send().await.expect("guildgate answers");
        let status = r.status().as_u16();
        (status, r.text().await.unwrap_or_default())
    }

    /// The customer's only grant once it exists.
    pub async fn grant_of(&self, customer: &str) -> Grant {
        wait_for(&format!("a grant for {customer}"), || async {
            self.app.grants_of(customer).await.into_iter().next()
        })
        .await
    }

    /// Waits until grant `id` satisfies `pred`.
    pub async fn wait_grant(&self, id: &str, what: &str, pred: impl Fn(&Grant) -> bool) -> Grant {
        wait_for(what, || async {
            let g: Option<Grant> = sqlx::query_as("SELECT * FROM grants WHERE id = $1")
                .bind(id)
                .fetch_optional(&self.app.pool)
                .await
                .unwrap();
            g.filter(|g| pred(g))
        })
        .await
    }

    pub async fn wait_status(&self, id: &str, status: &str) -> Grant {
        self.wait_grant(id, &format!("grant {id} {status}"), |g| g.status == status)
            .await
    }

    /// Links a customer to a Discord user directly (tokens from the sandbox), as if
    /// they had authorized before.
    pub async fn link(&self, customer: &str, user: u64) {
        crate::common::link_sandbox_user(
            &self.app.pool,
            &self.app.settings,
            &self.sandbox,
            &self.app.business(),
            customer,
            user,
        )
        .await;
    }

    /// Queues a sync job for a grant (what re-saving an entitlement does).
    pub async fn resync(&self, grant_id: &str) {
        let mut tx = self.app.pool.begin().await.unwrap();
        guildgate::outbox::queue_sync(&mut tx, grant_id)
            .await
            .unwrap();
        tx.commit().await.unwrap();
    }

    /// Whether `user` is in `guild` holding `role`.
    pub fn has_role(&self, guild: u64, user: u64, role: u64) -> bool {
        self.sandbox
            .member(guild, user)
            .is_some_and(|m| m.roles.contains(&role))
    }

    pub async fn stop(self) {
        self.app.stop().await;
        self.sandbox.shutdown().await;
    }
}

/// A stand-in in front of the sandbox's HTTP API that can hold every request until
/// released: a Discord exactly as slow as a test needs, with the number of requests it
/// holds in view, so tests wait on that instead of on time.
pub struct Gate {
    /// The address to give guildgate as `discord.api_base`.
    pub api_base: String,
    held: tokio::sync::watch::Sender<bool>,
    waiting: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Gate {
    /// A gate forwarding to `sandbox`, open.
    pub async fn start(sandbox: &Sandbox) -> Self {
        use axum::body::{Body, to_bytes};
        use axum::extract::Request;
        use axum::response::Response;
        use std::sync::Arc;
        use std::sync::atomic::{AtomicUsize, Ordering};

        let _ = rustls::crypto::ring::default_provider().install_default();
        let (held, _) = tokio::sync::watch::channel(false);
        let waiting = Arc::new(AtomicUsize::new(0));
        let target = sandbox.base_url();
        let http = reqwest::Client::new();
        let (h, w) = (held.clone(), waiting.clone());
        let forward = move |req: Request| {
            let (mut rx, waiting, http, target) =
                (h.subscribe(), w.clone(), http.clone(), target.clone());
            async move {
                if *rx.borrow_and_update() {
                    waiting.fetch_add(1, Ordering::SeqCst);
                    let _ = rx.wait_for(|held| !*held).await;
                    waiting.fetch_sub(1, Ordering::SeqCst);
                }
                let (parts, body) = req.into_parts();
                let body = to_bytes(body, 1 << 20).await.unwrap_or_default();
                let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
                let mut headers = parts.headers.clone();
                headers.remove(axum::http::header::HOST);
                headers.remove(axum::http::header::CONTENT_LENGTH);
                let answer = http
                    .request(parts.method, format!("{target}{path}"))
                    .headers(headers)
                    .body(body)
                    .send()
                    .await
                    .expect("the sandbox answers");
                let mut out = Response::builder().status(answer.status());
                for (k, v) in answer.headers() {
                    if k != axum::http::header::CONTENT_LENGTH
                        && k != axum::http::header::TRANSFER_ENCODING
                    {
                        out = out.header(k, v);
                    }
                }
                let bytes = answer.bytes().await.unwrap_or_default();
                out.body(Body::from(bytes)).unwrap()
            }
        };
        let app = axum::Router::new().fallback(forward);
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let api_base = format!("http://{}/api/v10", l.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
        Self {
            api_base,
            held,
            waiting,
        }
    }

    /// Holds every request from now on until [`Gate::release`].
    pub fn hold(&self) {
        self.held.send_replace(true);
    }

    /// Lets every held request (and every later one) through.
    pub fn release(&self) {
        self.held.send_replace(false);
    }

    /// Requests being held now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Waits until at least `n` requests are held.
    pub async fn wait_holding(&self, n: usize) {
        wait_for(&format!("{n} Discord requests held"), || async {
            (self.waiting() >= n).then_some(())
        })
        .await
    }
}

impl World {
    /// A world whose guildgate reaches the sandbox's API through a [`Gate`].
    pub async fn start_gated(sandbox: SandboxConfig, cfg: TestConfig) -> (Self, Gate) {
        let sandbox = Sandbox::start(sandbox).await;
        let gate = Gate::start(&sandbox).await;
        let cfg = sandbox_env(&sandbox, cfg).env("GUILDGATE_DISCORD__API_BASE", &gate.api_base);
        let app = TestApp::spawn_with(cfg).await;
        let world = Self {
            links: LinkBuilder::from_settings(&app.settings).with_directory(app.bots.directory()),
            sandbox,
            app,
            http: reqwest::Client::new(),
        };
        (world, gate)
    }
}
