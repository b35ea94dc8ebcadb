//! `/entitlements`: create, list, read, update and (soft) delete a business's Discord
//! entitlements, shaped like the platform's (`tests/fixtures/contract/api/entitlement.json`).
//!
//! Saving checks the configuration against Discord first (the server is connected to
//! this business, the bot is in it with its permissions, the role exists and the bot can
//! give it), so a merchant learns of a mistake when saving rather than from failed
//! grants. A save also hands grants back to the syncer: those that failed for a
//! configuration cause, and, when the server or role changed, those that applied the old
//! one, which the syncer moves (it undoes what each grant recorded it applied).
//!
//! No database connection is held while Discord is asked (that can take seconds under
//! rate limits, or as long as Discord is slow): a save reads, gives its connection back,
//! validates, and then writes in a transaction that checks again what it read.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use chrono::Utc;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;
use sqlx::PgConnection;
use utoipa::{IntoParams, ToSchema};

use super::auth::Merchant;
use super::{Items, page};
use crate::discord::Bots;
use crate::domain::Snowflake;
use crate::grants::render::ts;
use crate::store::entitlements::Entitlement;
use crate::store::stops;
use crate::store::{entitlements as db, guilds};
use crate::web::AppState;
use crate::web::error::{ApiError, ApiJson, ApiQuery, ApiResult, ErrorBody, Problem};
use crate::web::pool::{Caller, HttpPool};

/// The only integration guildgate implements.
pub const DISCORD: &str = "discord";
/// The longest grace period an entitlement may have, in days.
const MAX_GRACE_DAYS: i64 = 365;
pub const MAX_NAME: usize = 255;
pub const MAX_DESCRIPTION: usize = 2000;

/// Where a Discord entitlement gives access.
#[derive(Clone, Debug, Deserialize, Serialize, ToSchema)]
pub struct IntegrationConfig {
    /// The Discord server (a snowflake, as a string).
    #[schema(example = "123456789012345678")]
    pub guild_id: String,
    /// The role to give; absent or null: membership of the server only.
    #[serde(default)]
    #[schema(example = "987654321098765432")]
    pub role_id: Option<String>,
    /// guildgate extension: days a subscription's access is kept after it goes
    /// `on_hold` or `failed` (1 to 365); revoked when they end unless the subscription
    /// is active again. Absent or null: revoked at once, as on the platform. Returned
    /// only when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 365, example = 7)]
    pub grace_period_days: Option<i64>,
    /// guildgate extension: whether guildgate emails customers whose grant needs their
    /// Discord account (a "Join the Discord" email, and the business's reminders).
    /// Absent or null: yes, when the operator configured email; `false` for merchants
    /// who send their own from the `entitlement_grant.created` webhook. Returned only
    /// when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(example = true)]
    pub send_email: Option<bool>,
}

impl IntegrationConfig {
    /// The config of a stored entitlement.
    pub fn of(e: &Entitlement) -> Self {
        Self {
            guild_id: e.guild_id.clone(),
            role_id: e.role_id.clone(),
            grace_period_days: e.grace_period_days.map(i64::from),
            send_email: e.send_email,
        }
    }
}

/// An entitlement, as the platform shapes it.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct EntitlementView {
    pub id: String,
    pub business_id: String,
    pub name: String,
    pub description: Option<String>,
    /// Always `discord`.
    #[schema(value_type = super::values::DiscordIntegration)]
    pub integration_type: String,
    pub integration_config: IntegrationConfig,
    pub is_active: bool,
    #[schema(value_type = Object)]
    pub metadata: Value,
    /// RFC 3339, whole seconds, UTC.
    pub created_at: String,
    pub updated_at: String,
    /// guildgate extension: whether guildgate can act for this entitlement in Discord.
    pub health: Health,
}

/// Whether guildgate can act for an entitlement in Discord (a guildgate extension).
#[derive(Clone, Debug, Default, Serialize, ToSchema)]
pub struct Health {
    /// `ok`, or `stopped`: Discord refused the bot in the entitlement's server (the bot
    /// was removed) or for its role (Manage Roles removed, the role above the bot's), so
    /// guildgate stopped calling Discord for it. Grants not yet delivered fail with
    /// `code`; delivered ones keep their access; removals wait. Fix it in Discord, then
    /// save the entitlement again (`PATCH`, any or no change): once the save validates,
    /// the waiting work resumes.
    #[schema(example = "ok")]
    pub status: String,
    /// The grants' `error_code` for the cause (`discord_unknown_guild`,
    /// `discord_missing_permissions`, `discord_role_hierarchy`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Whether the whole server is stopped (`server`) or this entitlement (`entitlement`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    /// RFC 3339, whole seconds, UTC: when guildgate stopped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
}

impl Health {
    fn ok() -> Self {
        Self {
            status: "ok".into(),
            ..Self::default()
        }
    }

    fn stopped(s: &stops::Stop) -> Self {
        Self {
            status: "stopped".into(),
            code: Some(s.code.clone()),
            message: Some(s.message.clone()),
            scope: Some(
                if s.entitlement_id.is_some() {
                    "entitlement"
                } else {
                    "server"
                }
                .into(),
            ),
            since: Some(ts(s.since)),
        }
    }
}

/// The API objects of `rows`, with their health.
pub async fn views(
    conn: &mut sqlx::PgConnection,
    rows: &[Entitlement],
) -> Result<Vec<EntitlementView>, sqlx::Error> {
    let keys: Vec<(String, String)> = rows
        .iter()
        .map(|e| (e.id.clone(), e.guild_id.clone()))
        .collect();
    let stopped: std::collections::HashMap<String, stops::Stop> =
        stops::of_entitlements(conn, &keys)
            .await?
            .into_iter()
            .collect();
    Ok(rows
        .iter()
        .map(|e| {
            let mut v = EntitlementView::from(e);
            if let Some(s) = stopped.get(&e.id) {
                v.health = Health::stopped(s);
            }
            v
        })
        .collect())
}

impl From<&Entitlement> for EntitlementView {
    fn from(e: &Entitlement) -> Self {
        Self {
            id: e.id.clone(),
            business_id: e.business_id.clone(),
            name: e.name.clone(),
            description: e.description.clone(),
            integration_type: e.integration_type.clone(),
            integration_config: IntegrationConfig::of(e),
            is_active: e.is_active,
            metadata: e.metadata.clone(),
            created_at: ts(e.created_at),
            updated_at: ts(e.updated_at),
            health: Health::ok(),
        }
    }
}

/// `POST /entitlements`. Fields guildgate does not model are ignored.
#[derive(Debug, Deserialize, ToSchema)]
pub struct CreateEntitlement {
    #[schema(example = "Patrons Discord Role")]
    pub name: String,
    /// Must be `discord`.
    #[schema(example = "discord")]
    pub integration_type: String,
    pub integration_config: IntegrationConfig,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<Value>,
    #[serde(default)]
    pub is_active: Option<bool>,
}

/// `PATCH /entitlements/{id}`: only the fields present change; `integration_config`
/// is replaced as a whole.
#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct UpdateEntitlement {
    #[serde(default)]
    pub name: Option<String>,
    /// `null` clears it.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<String>)]
    pub description: Option<Option<String>>,
    #[serde(default)]
    pub integration_config: Option<IntegrationConfig>,
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<Value>,
    #[serde(default)]
    pub is_active: Option<bool>,
}

/// Tells "absent" (`None`) from "null" (`Some(None)`).
pub(crate) fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only entitlements of this integration type.
    pub integration_type: Option<String>,
    /// 1 to 100, default 10.
    pub page_size: Option<u32>,
    /// 0-based.
    pub page_number: Option<u32>,
    /// Shows each entitlement's `name` and `description` in this locale where it has a
    /// translation (the exact code's, else its language's: `pt-BR` → `pt`); an unknown
    /// code, or none, shows the base text.
    pub locale: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ReadQuery {
    /// Shows the `name` and `description` in this locale where they have a translation
    /// (the exact code's, else its language's: `pt-BR` → `pt`); an unknown code, or
    /// none, shows the base text.
    pub locale: Option<String>,
}

/// Checks every merchant-set field, reporting every problem at once.
fn check_fields(f: &db::Fields, integration_type: &str) -> Result<(), ApiError> {
    let mut problems = Vec::new();
    if integration_type != DISCORD {
        problems.push(Problem::new(
            "unsupported_integration_type",
            format!("integration_type: {integration_type:?} is not supported; guildgate handles \"discord\" entitlements only."),
        ));
    }
    let mut bad = |field: &str, msg: &str| {
        problems.push(Problem::new("invalid_field", format!("{field}: {msg}")));
    };
    if f.name.trim().is_empty() {
        bad("name", "must not be empty");
    } else if f.name.chars().count() > MAX_NAME {
        bad("name", "must be at most 255 characters");
    }
    if f.description
        .as_ref()
        .is_some_and(|d| d.chars().count() > MAX_DESCRIPTION)
    {
        bad("description", "must be at most 2000 characters");
    }
    if Snowflake::parse(&f.guild_id).is_none() {
        bad(
            "integration_config.guild_id",
            "must be a Discord server id (digits, as a string)",
        );
    }
    if f.grace_period_days
        .is_some_and(|d| !(1..=MAX_GRACE_DAYS).contains(&d))
    {
        bad(
            "integration_config.grace_period_days",
            "must be a whole number of days from 1 to 365, or null for none",
        );
    }
    if f.role_id
        .as_deref()
        .is_some_and(|r| Snowflake::parse(r).is_none())
    {
        bad(
            "integration_config.role_id",
            "must be a Discord role id (digits, as a string) or null",
        );
    }
    match f.metadata.as_object() {
        None => bad("metadata", "must be an object"),
        // The platform's metadata maps each key to a string, number or boolean: an SDK
        // reading anything else back fails, so it is refused here.
        Some(map) => {
            for (key, value) in map {
                if !(value.is_string() || value.is_number() || value.is_boolean()) {
                    bad(
                        &format!("metadata.{key}"),
                        "must be a string, number or boolean",
                    );
                }
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(ApiError::Invalid(problems))
    }
}

/// The server must have been connected by this business (a bot install proves the
/// merchant manages it; without this, one merchant could sell roles in another's server).
async fn check_connected(
    conn: &mut PgConnection,
    business_id: &str,
    f: &db::Fields,
) -> Result<(), ApiError> {
    let Some(guild) = guilds::get(conn, business_id, &f.guild_id).await? else {
        return Err(ApiError::Invalid(vec![Problem::new(
            "discord_guild_not_connected",
            format!(
                "Discord server {} is not connected to this account. Add guildgate's bot to it with the link from GET /discord/install-url, then save again.",
                f.guild_id
            ),
        )]));
    };
    if guild.needs_reinstall {
        let message = super::discord::needs_reinstall(&f.guild_id).to_string();
        return Err(ApiError::Invalid(vec![Problem::new(
            "discord_guild_needs_reinstall",
            message,
        )]));
    }
    Ok(())
}

/// Checks the configuration: connected to this business (a short read on a pooled
/// connection, given back before Discord is asked), then the live checks on Discord,
/// with no connection held.
async fn check_discord(
    pool: &HttpPool,
    bots: &Bots,
    business_id: &str,
    f: &db::Fields,
) -> Result<Option<String>, ApiError> {
    {
        let mut conn = pool.acquire(Caller::Business(business_id)).await?;
        check_connected(&mut conn, business_id, f).await?;
    }
    // Checked with the bot that will serve the server: the business's own, if any.
    let bot = bots.of_business(business_id).await?;
    super::discord::validate(&bot.side, &f.guild_id, f.role_id.as_deref()).await
}

/// Create an entitlement.
#[utoipa::path(post, path = "/entitlements", tag = "entitlements",
    request_body = CreateEntitlement,
    responses(
        (status = 201, body = EntitlementView),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 413, body = ErrorBody),
        (status = 422, description = "A field is invalid, or the Discord configuration is not usable (one problem each in `errors`)", body = ErrorBody),
        (status = 503, description = "Discord could not be asked", body = ErrorBody),
    ),
    security(("api_key" = [])))]
pub async fn create(
    merchant: Merchant,
    State(state): State<AppState>,
    ApiJson(body): ApiJson<CreateEntitlement>,
) -> ApiResult<impl IntoResponse> {
    let mut f = db::Fields {
        name: body.name,
        description: body.description,
        guild_id: body.integration_config.guild_id,
        role_id: body.integration_config.role_id,
        grace_period_days: body.integration_config.grace_period_days,
        send_email: body.integration_config.send_email,
        role_name: None,
        is_active: body.is_active.unwrap_or(true),
        metadata: body
            .metadata
            .unwrap_or_else(|| Value::Object(Default::default())),
    };
    check_fields(&f, &body.integration_type)?;
    f.role_name = check_discord(&state.pool, &state.bots, merchant.business(), &f).await?;
    // Still connected now that Discord has answered (the check above ran before).
    let mut tx = state.pool.begin(merchant.caller()).await?;
    check_connected(&mut tx, merchant.business(), &f).await?;
    let e = db::insert(&mut tx, merchant.business(), &f, Utc::now()).await?;
    // The bot is in the server (validated above): a stop of the whole server is over.
    resume(&mut tx, &e).await?;
    tx.commit().await?;
    Ok((StatusCode::CREATED, ApiJson(EntitlementView::from(&e))))
}

/// List entitlements, newest first.
#[utoipa::path(get, path = "/entitlements", tag = "entitlements",
    params(ListQuery),
    responses((status = 200, body = Items<EntitlementView>), (status = 401, body = ErrorBody), (status = 422, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn list(
    merchant: Merchant,
    State(state): State<AppState>,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> ApiResult<ApiJson<Items<EntitlementView>>> {
    let p = page(q.page_size, q.page_number)?;
    let mut conn = state.pool.acquire(merchant.caller()).await?;
    let rows = db::list(
        &mut conn,
        merchant.business(),
        q.integration_type.as_deref(),
        p,
    )
    .await?;
    let mut items = views(&mut conn, &rows).await?;
    super::translations::localize(&mut conn, &mut items, q.locale.as_deref()).await?;
    Ok(ApiJson(Items { items }))
}

/// Read an entitlement.
#[utoipa::path(get, path = "/entitlements/{id}", tag = "entitlements",
    params(("id" = String, Path, description = "Entitlement id (`ent_…`)"), ReadQuery),
    responses((status = 200, body = EntitlementView), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn get(
    merchant: Merchant,
    State(state): State<AppState>,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<ReadQuery>,
) -> ApiResult<ApiJson<EntitlementView>> {
    let mut conn = state.pool.acquire(merchant.caller()).await?;
    let e = db::get(&mut conn, merchant.business(), &id, false)
        .await?
        .ok_or(ApiError::NotFound("entitlement"))?;
    let mut view = views(&mut conn, std::slice::from_ref(&e)).await?;
    super::translations::localize(&mut conn, &mut view, q.locale.as_deref()).await?;
    Ok(ApiJson(view.remove(0)))
}

/// Update an entitlement. Every save re-validates against Discord and retries the
/// grants that failed for a configuration cause; a new server or role moves delivered
/// grants to it.
#[utoipa::path(patch, path = "/entitlements/{id}", tag = "entitlements",
    params(("id" = String, Path, description = "Entitlement id (`ent_…`)")),
    request_body = UpdateEntitlement,
    responses(
        (status = 200, body = EntitlementView),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, description = "Changed by another request meanwhile; read it and try again", body = ErrorBody),
        (status = 413, body = ErrorBody), (status = 422, body = ErrorBody), (status = 503, body = ErrorBody),
    ),
    security(("api_key" = [])))]
pub async fn update(
    merchant: Merchant,
    State(state): State<AppState>,
    Path(id): Path<String>,
    ApiJson(patch): ApiJson<UpdateEntitlement>,
) -> ApiResult<ApiJson<EntitlementView>> {
    let business = merchant.business();
    let before = {
        let mut conn = state.pool.acquire(merchant.caller()).await?;
        db::get(&mut conn, business, &id, false)
            .await?
            .ok_or(ApiError::NotFound("entitlement"))?
    };
    // A config replaces the whole config, as on the platform.
    let (guild_id, role_id, grace_period_days, send_email) = match patch.integration_config {
        Some(c) => (c.guild_id, c.role_id, c.grace_period_days, c.send_email),
        None => (
            before.guild_id.clone(),
            before.role_id.clone(),
            before.grace_period_days.map(i64::from),
            before.send_email,
        ),
    };
    let mut f = db::Fields {
        name: patch.name.unwrap_or_else(|| before.name.clone()),
        description: patch
            .description
            .unwrap_or_else(|| before.description.clone()),
        guild_id,
        role_id,
        grace_period_days,
        send_email,
        role_name: None,
        is_active: patch.is_active.unwrap_or(before.is_active),
        metadata: patch.metadata.unwrap_or_else(|| before.metadata.clone()),
    };
    check_fields(&f, &before.integration_type)?;
    // Discord is asked with no connection held, let alone a row lock: it can take
    // seconds (rate limits). The row is re-read under lock below and the save refused if
    // someone else changed it in between.
    f.role_name = check_discord(&state.pool, &state.bots, business, &f).await?;
    let mut tx = state.pool.begin(merchant.caller()).await?;
    let current = db::get(&mut tx, business, &id, true)
        .await?
        .ok_or(ApiError::NotFound("entitlement"))?;
    if current.updated_at != before.updated_at {
        return Err(ApiError::Conflict {
            code: "concurrent_update",
            message: "The entitlement was changed by another request while this one was validated. Read it again and retry.".into(),
        });
    }
    check_connected(&mut tx, business, &f).await?;
    let now = Utc::now();
    let saved = db::update(&mut tx, &id, &f, now).await?;
    let moved = current.guild_id != saved.guild_id || current.role_id != saved.role_id;
    crate::lifecycle::moves::start(&mut tx, business, &id, moved).await?;
    resume(&mut tx, &saved).await?;
    tx.commit().await?;
    Ok(ApiJson(EntitlementView::from(&saved)))
}

/// A save of `e` validated against Discord: the stops covering it are over, and the
/// grants waiting on them are queued again (see [`stops`]).
async fn resume(tx: &mut sqlx::PgConnection, e: &Entitlement) -> Result<(), sqlx::Error> {
    let queued = crate::sync::stops::resume_and_queue(tx, &e.guild_id, &e.id).await?;
    if queued > 0 {
        tracing::info!(entitlement_id = %e.id, queued, "entitlement saved; waiting Discord work resumed");
    }
    Ok(())
}

/// Delete an entitlement. A soft delete, as on the platform: it disappears from the API
/// and from its products, so no purchase grants it any more, but its grants are kept
/// and NOT revoked (revoke them one by one first if access should end). Its grants stay
/// readable and revocable under `/entitlements/{id}/grants`.
#[utoipa::path(delete, path = "/entitlements/{id}", tag = "entitlements",
    params(("id" = String, Path, description = "Entitlement id (`ent_…`)")),
    responses((status = 204, description = "Deleted"), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn delete(
    merchant: Merchant,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let mut tx = state.pool.begin(merchant.caller()).await?;
    if !db::soft_delete(&mut tx, merchant.business(), &id, Utc::now()).await? {
        return Err(ApiError::NotFound("entitlement"));
    }
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}
