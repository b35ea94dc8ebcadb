//! `/discord/application`: a business's own Discord application (bring your own bot).
//!
//! Without one, the shared bot of the installation serves every business. With one,
//! every Discord call for the business goes through its own bot (its own global limit
//! and buckets), its customers authorize its own OAuth client, and its servers are
//! connected by installing its own bot. The client secret and the bot token are checked
//! with Discord, sealed at rest like customers' tokens, and never shown again.
//!
//! After a change, the business installs the new bot in its servers (`GET
//! /discord/install-url` now names it); until then the syncer finds the bot missing and
//! holds the server's grants as it does whenever a bot is removed. Customers linked
//! through the previous application authorize again when the new bot must add them to a
//! server (Discord lets a bot add only users who authorized its own application).

use axum::extract::State;
use axum::http::StatusCode;
use chrono::Utc;
use secrecy::SecretString;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::auth::Merchant;
use crate::discord::DiscordError;
use crate::discord::bots;
use crate::discord::client::AppKeys;
use crate::domain::Snowflake;
use crate::grants::render::ts;
use crate::store::applications::{self, AppRow, NewApp, Saved};
use crate::web::AppState;
use crate::web::error::{ApiError, ApiJson, ApiResult, ErrorBody, Problem};

/// The credentials of a Discord application (Discord's developer portal, "OAuth2" and
/// "Bot" pages).
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ApplicationBody {
    /// The application's id ("Client ID"), also its bot user's id.
    #[schema(pattern = "^[0-9]{1,19}$", example = "1234567890123456789")]
    pub client_id: String,
    /// The OAuth2 client secret. Stored encrypted; never returned.
    #[schema(value_type = String, pattern = "^[!-~]{1,512}$")]
    pub client_secret: SecretString,
    /// The bot's token. Stored encrypted; never returned.
    #[schema(value_type = String, pattern = "^[!-~]{1,512}$")]
    pub bot_token: SecretString,
}

/// A business's own Discord application, without its secrets.
#[derive(Debug, Serialize, ToSchema)]
pub struct ApplicationView {
    pub client_id: String,
    /// The bot's username at Discord when the application was registered.
    pub bot_username: String,
    /// Register both at Discord ("OAuth2" → "Redirects"): customers come back to the
    /// first after authorizing, merchants to the second after installing the bot.
    pub redirect_uris: Vec<String>,
    pub created_at: String,
    pub updated_at: String,
}

fn view(state: &AppState, row: &AppRow) -> ApplicationView {
    let public = state.settings.http.public_url.trim_end_matches('/');
    ApplicationView {
        client_id: row.client_id.clone(),
        bot_username: row.bot_username.clone(),
        redirect_uris: vec![
            state.settings.oauth_redirect_uri(),
            format!("{public}/discord/bot/callback"),
        ],
        created_at: ts(row.created_at),
        updated_at: ts(row.updated_at),
    }
}

/// A secret as Discord issues them: printable ASCII without spaces, of a sane length.
fn secret_ok(field: &str, s: &SecretString) -> Result<(), Problem> {
    use secrecy::ExposeSecret;
    let v = s.expose_secret();
    if v.is_empty() || v.len() > 512 || !v.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Problem::new(
            "invalid_field",
            format!("{field}: must be the value Discord shows, without spaces"),
        ));
    }
    Ok(())
}

/// What Discord's answers to the checks mean for the merchant.
fn refused(e: DiscordError, what: &str) -> ApiError {
    match e {
        DiscordError::BadCredentials => ApiError::Invalid(vec![Problem::new(
            "discord_application_refused",
            format!("Discord refused the {what}. Copy it again from Discord's developer portal."),
        )]),
        e @ DiscordError::Busy { .. } => ApiError::DiscordBusy(format!(
            "Discord could not be asked: {e}. Try again in a few seconds."
        )),
        other => ApiError::Unavailable(format!(
            "Discord could not check the application ({other}); try again shortly."
        )),
    }
}

/// Registers (or replaces) this business's own Discord application. Discord is asked
/// first: the bot token must be the application's bot's, and the client secret the
/// application's. From the answer on, every Discord call of the business uses this bot.
#[utoipa::path(put, path = "/discord/application", tag = "discord",
    request_body = ApplicationBody,
    responses(
        (status = 200, body = ApplicationView), (status = 401, body = ErrorBody),
        (status = 409, description = "Another business registered this application (`discord_application_taken`)", body = ErrorBody),
        (status = 422, description = "A field is malformed, or Discord refused the credentials (`discord_application_refused`)", body = ErrorBody),
        (status = 503, body = ErrorBody),
    ),
    security(("api_key" = [])))]
pub async fn put(
    merchant: Merchant,
    State(state): State<AppState>,
    ApiJson(body): ApiJson<ApplicationBody>,
) -> ApiResult<ApiJson<ApplicationView>> {
    let business = merchant.business();
    let mut problems = Vec::new();
    let client = Snowflake::parse(&body.client_id);
    if client.is_none() {
        problems.push(Problem::new(
            "invalid_field",
            "client_id: must be a Discord application id (digits)",
        ));
    }
    for (field, s) in [
        ("client_secret", &body.client_secret),
        ("bot_token", &body.bot_token),
    ] {
        if let Err(p) = secret_ok(field, s) {
            problems.push(p);
        }
    }
    let Some(client) = client.filter(|_| problems.is_empty()) else {
        return Err(ApiError::Invalid(problems));
    };
    let client_id = client.to_string();
    if client_id == state.settings.discord.client_id {
        return Err(ApiError::field(
            "client_id",
            "is the shared bot's application; register an application of your own",
        ));
    }
    state
        .limits
        .check_application(business)
        .map_err(ApiError::rate_limited)?;
    let keys = AppKeys {
        client_id: client_id.clone(),
        client_secret: body.client_secret,
        bot_token: body.bot_token,
    };
    let probe = state.bots.probe(business, &keys);
    let bot = probe
        .bot_user()
        .await
        .map_err(|e| refused(e, "bot token"))?;
    if bot.id != client {
        return Err(ApiError::Invalid(vec![Problem::new(
            "discord_application_refused",
            format!(
                "The bot token belongs to application {}, not to client_id {client_id}.",
                bot.id
            ),
        )]));
    }
    probe
        .check_client()
        .await
        .map_err(|e| refused(e, "client secret"))?;
    // Held by another business: said only to whoever holds the application's
    // credentials, after the rate limit, so an id alone tells no one whose it is.
    let mut conn = state.pool.acquire(merchant.caller()).await?;
    let holder = applications::holder(&mut conn, &client_id).await?;
    if holder.as_deref().is_some_and(|h| h != business) {
        return Err(taken());
    }
    let cipher = &state.cipher;
    let saved = applications::save(
        &mut conn,
        NewApp {
            business_id: business,
            client_id: &client_id,
            client_secret_enc: bots::seal(
                cipher,
                business,
                &keys.client_secret,
                "client_secret_enc",
            ),
            bot_token_enc: bots::seal(cipher, business, &keys.bot_token, "bot_token_enc"),
            key_id: cipher.key_id(),
            bot_username: &bot.username,
            now: Utc::now(),
        },
    )
    .await?;
    drop(conn);
    let Saved::Saved(row) = saved else {
        return Err(taken());
    };
    state
        .bots
        .changed(business, Some((row.client_id.clone(), row.updated_at)));
    tracing::info!(business_id = %business, client_id = %row.client_id, "business registered its own Discord application");
    Ok(ApiJson(view(&state, &row)))
}

fn taken() -> ApiError {
    ApiError::Conflict {
        code: "discord_application_taken",
        message: "Another account registered this Discord application; an application serves one account.".into(),
    }
}

/// This business's own Discord application; 404 while the shared bot serves it.
#[utoipa::path(get, path = "/discord/application", tag = "discord",
    responses(
        (status = 200, body = ApplicationView), (status = 401, body = ErrorBody),
        (status = 404, description = "No application registered: the shared bot serves this business", body = ErrorBody),
    ),
    security(("api_key" = [])))]
pub async fn get(
    merchant: Merchant,
    State(state): State<AppState>,
) -> ApiResult<ApiJson<ApplicationView>> {
    let mut conn = state.pool.acquire(merchant.caller()).await?;
    let row = applications::of_business(&mut conn, merchant.business())
        .await?
        .ok_or(ApiError::NotFound("Discord application"))?;
    Ok(ApiJson(view(&state, &row)))
}

/// Forgets this business's own application: the shared bot serves it again (install it
/// in the business's servers with `GET /discord/install-url`). The secrets are deleted.
#[utoipa::path(delete, path = "/discord/application", tag = "discord",
    responses(
        (status = 204, description = "Forgotten; the shared bot serves the business"),
        (status = 401, body = ErrorBody),
        (status = 404, description = "No application registered", body = ErrorBody),
    ),
    security(("api_key" = [])))]
pub async fn delete(merchant: Merchant, State(state): State<AppState>) -> ApiResult<StatusCode> {
    let business = merchant.business();
    let mut conn = state.pool.acquire(merchant.caller()).await?;
    let deleted = applications::delete(&mut conn, business).await?;
    drop(conn);
    if !deleted {
        return Err(ApiError::NotFound("Discord application"));
    }
    state.bots.changed(business, None);
    tracing::info!(business_id = %business, "business went back to the shared Discord bot");
    Ok(StatusCode::NO_CONTENT)
}
