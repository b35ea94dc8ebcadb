//! `/discord/…`: connecting Discord servers to a business and looking into them.
//!
//! A merchant connects a server by installing guildgate's bot: `GET /discord/install-url`
//! gives Discord's authorize URL (`scope=bot`, permissions 268435459 = Manage Roles, Kick
//! Members, Create Instant Invite) with a signed `state` naming the business; Discord
//! sends the browser back to `GET /discord/bot/callback`, which checks the state and
//! records the server for that business. Only the merchant holding a valid state can
//! connect a server to their business, and Discord only installs into servers the
//! person manages, so an entitlement can only target servers its merchant controls.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use chrono::{Duration, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::Items;
use super::auth::Merchant;
use crate::crypto::StateSigner;
use crate::discord::client::{Role, TokenGuild, TokenSet};
use crate::discord::validate::{GuildFacts, check, validate_discord_config};
use crate::discord::{DiscordClient, DiscordError, permissions};
use crate::domain::Snowflake;
use crate::grants::render::ts;
use crate::store::guilds as db;
use crate::store::holdings;
use crate::web::AppState;
use crate::web::error::{ApiError, ApiJson, ApiResult, ErrorBody, Problem};
use crate::web::pool::Caller;

/// `purpose` of bot-install states: a grant's OAuth state is never accepted here.
pub const INSTALL_PURPOSE: &str = "bot-install";
/// How long an install link stays valid. It is also single-use.
const INSTALL_TTL: Duration = Duration::minutes(10);
/// Scopes of the install: the bot, and `identify` to learn who installed it.
const INSTALL_SCOPES: &str = "bot identify";

/// Validates a guild/role configuration on the side budget; 422 with one problem per
/// misconfiguration, 503 if Discord could not be asked.
pub async fn validate(
    client: &DiscordClient,
    guild_id: &str,
    role_id: Option<&str>,
) -> Result<Option<String>, ApiError> {
    let problems = match validate_discord_config(client, guild_id, role_id).await {
        Ok(role_name) => return Ok(role_name),
        Err(p) => p,
    };
    let (transient, real): (Vec<_>, Vec<_>) = problems.into_iter().partition(|p| p.is_transient());
    if real.is_empty() {
        let message = transient
            .first()
            .map(|p| p.message.clone())
            .unwrap_or_else(|| "Discord could not be asked; try again shortly.".into());
        if transient.iter().any(|p| p.code == "discord_busy") {
            return Err(ApiError::DiscordBusy(message));
        }
        return Err(ApiError::Unavailable(message));
    }
    Err(ApiError::Invalid(
        real.into_iter()
            .map(|p| Problem::new(p.code, p.message))
            .collect(),
    ))
}

/// What an install state carries.
#[derive(Serialize, Deserialize)]
struct InstallState {
    /// Business id.
    b: String,
    /// The `bot_install_states` row this link consumes on its first use.
    n: String,
}

fn signer(state: &AppState) -> StateSigner {
    StateSigner::new(state.settings.secrets.state_signing_key.clone())
}

fn callback_uri(state: &AppState) -> String {
    format!(
        "{}/discord/bot/callback",
        state.settings.http.public_url.trim_end_matches('/')
    )
}

#[derive(Debug, Serialize, ToSchema)]
pub struct InstallUrl {
    /// Open in a browser: Discord asks which server to add the bot to.
    pub url: String,
    /// The link stops working after this, or after its first use.
    pub expires_at: String,
}

/// The bot-install link for this business: valid once, for 10 minutes.
#[utoipa::path(get, path = "/discord/install-url", tag = "discord",
    responses((status = 200, body = InstallUrl), (status = 401, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn install_url(
    merchant: Merchant,
    State(state): State<AppState>,
) -> ApiResult<ApiJson<InstallUrl>> {
    let now = Utc::now();
    let expires = now + INSTALL_TTL;
    let nonce = crate::domain::ids::mint("inst");
    {
        let mut conn = state.pool.acquire(merchant.caller()).await?;
        db::create_install_state(&mut conn, &nonce, merchant.business(), now, expires).await?;
    }
    let signed = signer(&state).sign(
        INSTALL_PURPOSE,
        InstallState {
            b: merchant.business().to_string(),
            n: nonce,
        },
        expires.timestamp(),
    );
    let mut url = url::Url::parse(&state.settings.discord.authorize_url)
        .map_err(|e| ApiError::Internal(format!("discord.authorize_url: {e}")))?;
    // The business's own bot, if it registered an application; else the shared one.
    let client_id = state
        .bots
        .directory()
        .client_id_of(merchant.business())
        .unwrap_or_else(|| state.settings.discord.client_id.clone());
    // A code grant: the callback exchanges the code, and Discord's answer names the
    // server the bot was added to. Only that answer is believed.
    url.query_pairs_mut()
        .append_pair("client_id", &client_id)
        .append_pair("response_type", "code")
        .append_pair("scope", INSTALL_SCOPES)
        .append_pair("permissions", &permissions::REQUIRED.to_string())
        .append_pair("redirect_uri", &callback_uri(&state))
        .append_pair("state", &signed);
    Ok(ApiJson(InstallUrl {
        url: url.into(),
        expires_at: ts(expires),
    }))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct CallbackQuery {
    pub state: Option<String>,
    /// The authorization code to exchange; the server is what Discord's answer names.
    pub code: Option<String>,
    /// Sent by Discord, shown nowhere and never trusted: the code exchange says which
    /// server it was.
    pub guild_id: Option<String>,
    /// The permissions granted to the bot (decimal bit set), as Discord reports them.
    pub permissions: Option<String>,
    /// Set by Discord when the person cancelled.
    pub error: Option<String>,
}

use crate::i18n::escape_html as escape;

fn page(status: StatusCode, title: &str, text: &str) -> Response {
    let body = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{t}</title>\
         <style>body{{font-family:sans-serif;max-width:32em;margin:4em auto;padding:0 1em}}</style>\
         </head><body><h1>{t}</h1><p>{x}</p></body></html>",
        t = escape(title),
        x = escape(text)
    );
    (status, Html(body)).into_response()
}

/// Where Discord sends the merchant's browser after a bot install. Consumes the
/// single-use state, exchanges the code, and connects the server Discord's answer names
/// to the business the state names, unless another business holds it.
#[utoipa::path(get, path = "/discord/bot/callback", tag = "discord",
    params(CallbackQuery),
    responses(
        (status = 200, description = "Server connected (HTML page)", content_type = "text/html"),
        (status = 400, description = "Cancelled, expired, used or altered link, or a code Discord did not confirm (HTML page)", content_type = "text/html"),
        (status = 409, description = "The server is connected to another business (HTML page)", content_type = "text/html"),
        (status = 503, description = "Discord could not be asked (HTML page)", content_type = "text/html"),
    ))]
pub async fn bot_callback(
    State(state): State<AppState>,
    query: Result<axum::extract::Query<CallbackQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(axum::extract::Query(q)) = query else {
        return page(
            StatusCode::BAD_REQUEST,
            "Link not understood",
            "This link is malformed. Start again from the install link.",
        );
    };
    let now = Utc::now();
    let (install, bot, tokens, guild) = match confirmed_install(&state, &q, now).await {
        Ok(x) => x,
        Err(refused) => return refused,
    };
    // Who installed it, for the record; the install stands without it.
    let installer = match bot.side.user(&tokens.access_token).await {
        Ok(u) => Some(u.id.to_string()),
        Err(e) => {
            tracing::warn!(error = %e, guild = %guild.id, "cannot read who installed the bot");
            None
        }
    };
    let granted = q.permissions.as_deref().and_then(|p| p.parse::<i64>().ok());
    let guild_id = guild.id.to_string();
    let saved = async {
        // A transaction, so that the store's own `BEGIN` is a savepoint (`web::pool`).
        let mut tx = state.pool.begin(Caller::Business(&install.b)).await?;
        let connected = db::connect(
            &mut tx,
            db::Install {
                business_id: &install.b,
                guild_id: &guild_id,
                name: &guild.name,
                permissions: granted,
                installed_by: installer.as_deref(),
                now,
            },
        )
        .await?;
        tx.commit().await?;
        Ok::<_, sqlx::Error>(connected)
    }
    .await;
    match saved {
        Ok(db::Connected::Connected(_)) => {
            tracing::info!(business = %install.b, guild = %guild_id, installed_by = ?installer, "Discord server connected");
            page(
                StatusCode::OK,
                "Server connected",
                &format!(
                    "{} is in \"{}\". You can close this window and create entitlements for it.",
                    if bot.own {
                        "Your bot"
                    } else {
                        "guildgate's bot"
                    },
                    guild.name
                ),
            )
        }
        Ok(db::Connected::HeldByAnother) => page(
            StatusCode::CONFLICT,
            "Server already connected",
            &format!(
                "\"{}\" is connected to another guildgate account, and a server belongs to one account at a time. Nothing changed. To move it, the account that holds it disconnects it first (DELETE /discord/guilds/{guild_id} in its API, once none of its entitlements use the server); then install the bot again with a new link from this account.",
                guild.name
            ),
        ),
        Err(e) => record_failed(e),
    }
}

/// The install a bot-install callback proves: its single-use state (spent here, whatever
/// follows), and the server Discord's token answer names, with the business's bot and
/// the installer's tokens. Any other outcome is the page that says why.
async fn confirmed_install(
    state: &AppState,
    q: &CallbackQuery,
    now: chrono::DateTime<Utc>,
) -> Result<(InstallState, crate::discord::Bot, TokenSet, TokenGuild), Response> {
    if q.error.is_some() {
        return Err(page(
            StatusCode::BAD_REQUEST,
            "Not installed",
            "The bot was not added: the authorization was cancelled. Nothing changed.",
        ));
    }
    let verified = q
        .state
        .as_deref()
        .ok_or(crate::crypto::StateError::Tampered)
        .and_then(|s| signer(state).verify::<InstallState>(INSTALL_PURPOSE, s, now.timestamp()));
    let install = match verified {
        Ok(s) => s,
        Err(e) => {
            return Err(page(
                StatusCode::BAD_REQUEST,
                "Link not valid",
                &format!(
                    "{}. Ask for a new install link and try again.",
                    capitalise(&e.to_string())
                ),
            ));
        }
    };
    let Some(code) = q.code.as_deref().filter(|c| !c.is_empty()) else {
        return Err(page(
            StatusCode::BAD_REQUEST,
            "Not installed",
            "Discord sent no authorization code, so there is no proof of which server the bot was added to. Nothing changed. Start again from a new install link.",
        ));
    };
    // The state is spent before anything else happens: a link works once, whatever
    // follows.
    let taken = async {
        let mut conn = state.pool.acquire(Caller::Business(&install.b)).await?;
        db::take_install_state(&mut conn, &install.n, &install.b, now).await
    }
    .await;
    match taken {
        Ok(true) => {}
        Ok(false) => {
            return Err(page(
                StatusCode::BAD_REQUEST,
                "Link already used",
                "This install link was already used or has expired. Ask for a new install link and try again.",
            ));
        }
        Err(e) => return Err(record_failed(e)),
    }
    let bot = match state.bots.of_business(&install.b).await {
        Ok(bot) => bot,
        Err(e) => {
            tracing::error!(error = %e, "cannot use the business's bot for a bot install");
            return Err(page(
                StatusCode::SERVICE_UNAVAILABLE,
                "Something went wrong",
                "The install could not be checked just now. Nothing was recorded. Start again from a new install link in a moment.",
            ));
        }
    };
    let tokens = match bot.side.exchange_code(code, &callback_uri(state)).await {
        Ok(t) => t,
        Err(DiscordError::BadUserToken) => {
            return Err(page(
                StatusCode::BAD_REQUEST,
                "Not installed",
                "Discord did not confirm this authorization (the code was already used or has expired). Nothing changed. Start again from a new install link.",
            ));
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot exchange a bot-install code");
            return Err(page(
                StatusCode::SERVICE_UNAVAILABLE,
                "Discord could not be reached",
                "The bot may have been added, but Discord could not confirm it just now. Nothing was recorded. Start again from a new install link in a moment.",
            ));
        }
    };
    let Some(guild) = tokens.guild.clone() else {
        return Err(page(
            StatusCode::BAD_REQUEST,
            "No server chosen",
            "Discord did not say which server the bot was added to. Nothing changed. Start again from a new install link.",
        ));
    };
    Ok((install, bot, tokens, guild))
}

fn record_failed(e: sqlx::Error) -> Response {
    tracing::error!(error = %e, "cannot record a bot install");
    page(
        StatusCode::INTERNAL_SERVER_ERROR,
        "Something went wrong",
        "The server could not be recorded. Ask for a new install link and try again in a moment.",
    )
}

fn capitalise(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map(|f| f.to_uppercase().collect::<String>() + c.as_str())
        .unwrap_or_default()
}

/// A connected Discord server.
#[derive(Debug, Serialize, ToSchema)]
pub struct GuildView {
    pub guild_id: String,
    pub name: Option<String>,
    /// The permissions granted at install (decimal bit set), if Discord said.
    pub permissions: Option<String>,
    /// When the bot was (last) installed.
    pub installed_at: String,
    /// Discord user id of who installed it, when known.
    pub installed_by: Option<String>,
    /// `connected`, or `needs_reinstall`: the connection was never proven and another
    /// business claimed the same server, so entitlements for it are refused until this
    /// business installs the bot again.
    pub status: &'static str,
}

impl From<db::GuildRow> for GuildView {
    fn from(g: db::GuildRow) -> Self {
        GuildView {
            guild_id: g.guild_id,
            name: g.name,
            permissions: g.permissions.map(|p| p.to_string()),
            installed_at: ts(g.installed_at),
            installed_by: g.installed_by,
            status: if g.needs_reinstall {
                "needs_reinstall"
            } else {
                "connected"
            },
        }
    }
}

/// The Discord servers connected to this business.
#[utoipa::path(get, path = "/discord/guilds", tag = "discord",
    responses((status = 200, body = Items<GuildView>), (status = 401, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn guilds(
    merchant: Merchant,
    State(state): State<AppState>,
) -> ApiResult<ApiJson<Items<GuildView>>> {
    let mut conn = state.pool.acquire(merchant.caller()).await?;
    let rows = db::list(&mut conn, merchant.business()).await?;
    Ok(ApiJson(Items {
        items: rows.into_iter().map(GuildView::from).collect(),
    }))
}

/// Disconnects a server from this business. Refused (409) while entitlements of the
/// business use it; grants of deleted entitlements keep what they hold until their own
/// revocation. The bot stays in the server until someone removes it there.
#[utoipa::path(delete, path = "/discord/guilds/{guild_id}", tag = "discord",
    params(("guild_id" = String, Path, description = "A connected server's id")),
    responses(
        (status = 204, description = "Disconnected"), (status = 401, body = ErrorBody),
        (status = 404, description = "Not a server connected to this business", body = ErrorBody),
        (status = 409, description = "Entitlements still use the server (named in the message)", body = ErrorBody),
    ),
    security(("api_key" = [])))]
pub async fn disconnect(
    merchant: Merchant,
    State(state): State<AppState>,
    Path(guild_id): Path<String>,
) -> ApiResult<StatusCode> {
    // A transaction, so that the store's own `BEGIN` is a savepoint (`web::pool`).
    let mut tx = state.pool.begin(merchant.caller()).await?;
    let disconnected = db::disconnect(&mut tx, merchant.business(), &guild_id).await?;
    tx.commit().await?;
    match disconnected {
        db::Disconnected::Done => Ok(StatusCode::NO_CONTENT),
        db::Disconnected::NotFound => Err(ApiError::NotFound("Discord server")),
        db::Disconnected::InUse(users) => Err(ApiError::Conflict {
            code: "discord_guild_in_use",
            message: format!(
                "Discord server {guild_id} is used by {}: delete them or move them to another server first.",
                users
                    .iter()
                    .map(|(id, name)| format!("{id} ({name:?})"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }),
    }
}

/// The connection of `guild_id` to the business, if it counts: 404 when there is none,
/// 409 when it must be installed again first.
pub(super) async fn connected(
    conn: &mut sqlx::PgConnection,
    business_id: &str,
    guild_id: &str,
) -> Result<db::GuildRow, ApiError> {
    let row = db::get(conn, business_id, guild_id)
        .await?
        .ok_or(ApiError::NotFound("Discord server"))?;
    if row.needs_reinstall {
        return Err(needs_reinstall(guild_id));
    }
    Ok(row)
}

/// The error for a server whose connection was never proven.
pub(super) fn needs_reinstall(guild_id: &str) -> ApiError {
    ApiError::Conflict {
        code: "discord_guild_needs_reinstall",
        message: format!(
            "Discord server {guild_id} must be connected again: install guildgate's bot with a new link from GET /discord/install-url to prove this account manages it."
        ),
    }
}

/// A role of a connected server, and whether guildgate can give it.
#[derive(Debug, Serialize, ToSchema)]
pub struct RoleView {
    pub id: String,
    pub name: String,
    pub position: i64,
    pub managed: bool,
    /// The bot can give this role (an entitlement with it will save).
    pub assignable: bool,
    /// Why not, when it cannot.
    pub problem: Option<Problem>,
}

/// What one Discord account holds in a server through guildgate (a guildgate
/// extension, for support).
#[derive(Debug, Serialize, ToSchema)]
pub struct AccessView {
    pub guild_id: String,
    pub discord_user_id: String,
    /// This business's grants that give (or are giving, or are taking back) this account
    /// something in the server.
    pub grants: Vec<AccessGrant>,
    /// What guildgate gave this account in the server (`role_id` null: the membership),
    /// and whether it `added` it or `found` it already there (then it never removes it).
    pub holdings: Vec<AccessHolding>,
    /// Live grants of other businesses holding something of this account in the server
    /// (a server that changed hands): counted only, never named.
    pub other_businesses_grants: i64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AccessGrant {
    pub grant_id: String,
    pub entitlement_id: String,
    pub customer_id: String,
    pub status: String,
    /// The role it gives; null: the membership only.
    pub role_id: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AccessHolding {
    pub role_id: Option<String>,
    /// `added` or `found`.
    pub origin: String,
    /// RFC 3339, UTC.
    pub since: String,
}

/// What a Discord account holds in a connected server through guildgate: which of this
/// business's grants give it what, what guildgate added versus found already there,
/// and how many grants of other businesses hold something there too.
#[utoipa::path(get, path = "/discord/guilds/{guild_id}/members/{user_id}/access", tag = "discord",
    params(
        ("guild_id" = String, Path, description = "A connected server's id"),
        ("user_id" = String, Path, description = "A Discord user id"),
    ),
    responses(
        (status = 200, body = AccessView), (status = 401, body = ErrorBody),
        (status = 404, description = "Not a server connected to this business", body = ErrorBody),
        (status = 409, description = "The server must be connected again first (`discord_guild_needs_reinstall`)", body = ErrorBody),
        (status = 422, description = "`user_id` is not a Discord id", body = ErrorBody),
    ),
    security(("api_key" = [])))]
pub async fn member_access(
    merchant: Merchant,
    State(state): State<AppState>,
    Path((guild_id, user_id)): Path<(String, String)>,
) -> ApiResult<ApiJson<AccessView>> {
    let business = merchant.business();
    let mut conn = state.pool.acquire(merchant.caller()).await?;
    // A connection never proven (one several businesses claimed) shows nothing of the
    // server until this business installs the bot again.
    connected(&mut conn, business, &guild_id).await?;
    if Snowflake::parse(&user_id).is_none() {
        return Err(ApiError::Invalid(vec![Problem::new(
            "invalid_field",
            "user_id: must be a Discord id",
        )]));
    }
    let grants = holdings::grants_of_account(&mut conn, business, &guild_id, &user_id).await?;
    let held = holdings::of_account(&mut conn, &guild_id, &user_id).await?;
    let other_businesses_grants =
        holdings::other_businesses_holding(&mut conn, business, &guild_id, &user_id).await?;
    Ok(ApiJson(AccessView {
        guild_id,
        discord_user_id: user_id,
        grants: grants
            .into_iter()
            .map(|g| AccessGrant {
                grant_id: g.grant_id,
                entitlement_id: g.entitlement_id,
                customer_id: g.customer_id,
                status: g.status.as_str().into(),
                role_id: g.role_id,
            })
            .collect(),
        holdings: held
            .into_iter()
            .map(|(role, found, since)| AccessHolding {
                role_id: (!role.is_empty()).then_some(role),
                origin: if found { "found" } else { "added" }.into(),
                since: crate::grants::render::ts(since),
            })
            .collect(),
        other_businesses_grants,
    }))
}

/// The roles of a connected server, highest first: those the bot can assign, and for the
/// others why not.
#[utoipa::path(get, path = "/discord/guilds/{guild_id}/roles", tag = "discord",
    params(("guild_id" = String, Path, description = "A connected server's id")),
    responses(
        (status = 200, body = Items<RoleView>), (status = 401, body = ErrorBody),
        (status = 404, description = "Not a server connected to this business", body = ErrorBody),
        (status = 409, description = "The server must be connected again first (`discord_guild_needs_reinstall`)", body = ErrorBody),
        (status = 422, description = "Discord does not know the server, or the bot is no longer in it (`discord_unknown_guild`)", body = ErrorBody),
        (status = 503, body = ErrorBody),
    ),
    security(("api_key" = [])))]
pub async fn roles(
    merchant: Merchant,
    State(state): State<AppState>,
    Path(guild_id): Path<String>,
) -> ApiResult<ApiJson<Items<RoleView>>> {
    let guild = Snowflake::parse(&guild_id).ok_or(ApiError::NotFound("Discord server"))?;
    {
        let mut conn = state.pool.acquire(merchant.caller()).await?;
        connected(&mut conn, merchant.business(), &guild_id).await?;
    }
    let bot = state.bots.of_business(merchant.business()).await?;
    let facts = gather(&bot.side, guild).await?;
    let mut roles: Vec<&Role> = facts.roles.iter().collect();
    roles.sort_by(|a, b| b.position.cmp(&a.position).then(a.id.cmp(&b.id)));
    let bot_roles = facts.bot_roles.as_deref();
    let items = roles
        .into_iter()
        .map(|r| {
            let problem = check(
                &GuildFacts {
                    guild_id: guild,
                    guild_name: &facts.name,
                    roles: &facts.roles,
                    bot_roles,
                },
                Some(r.id),
            )
            .into_iter()
            .next()
            .map(|p| Problem::new(p.code, p.message));
            RoleView {
                id: r.id.to_string(),
                name: r.name.clone(),
                position: r.position,
                managed: r.managed,
                assignable: problem.is_none(),
                problem,
            }
        })
        .collect();
    Ok(ApiJson(Items { items }))
}

struct Facts {
    name: String,
    roles: Vec<Role>,
    bot_roles: Option<Vec<Snowflake>>,
}

async fn gather(client: &DiscordClient, guild: Snowflake) -> Result<Facts, ApiError> {
    let unavailable = |e: DiscordError| match e {
        DiscordError::NeedsHuman { message, .. } => {
            ApiError::Invalid(vec![Problem::new("discord_unknown_guild", message)])
        }
        e @ DiscordError::Busy { .. } => ApiError::DiscordBusy(format!(
            "Discord could not be asked: {e}. Try again in a few seconds."
        )),
        other => ApiError::Unavailable(format!(
            "Discord could not be asked ({other}); try again shortly."
        )),
    };
    let g = client.guild(guild).await.map_err(unavailable)?;
    let roles = if g.roles.is_empty() {
        client.roles(guild).await.map_err(unavailable)?
    } else {
        g.roles
    };
    let bot = client.bot_member(guild).await.map_err(unavailable)?;
    Ok(Facts {
        name: g.name,
        roles,
        bot_roles: bot.map(|m| m.roles),
    })
}
