//! `/webhooks`: a business's webhook endpoints, their signing secrets, and the messages
//! sent to them with every attempt, plus replay. Built on [`crate::webhooks`], which
//! owns the storage and the rules (SSRF guard, at most five endpoints, secret format,
//! rotation overlap); this file only parses requests and shapes answers. A URL is
//! resolved (the SSRF guard) before a database connection is taken, never while one is
//! held.

use std::collections::BTreeMap;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};

use super::auth::Merchant;
use super::{Items, page};
use crate::grants::render::ts;
use crate::store::endpoints::{self as endpoint_store, After, Endpoint, Strings};
use crate::store::messages as db;
use crate::store::messages::{self, Message};
use crate::web::AppState;
use crate::web::error::{
    ApiError, ApiJson, ApiQuery, ApiResult, ErrorBody, OptionalApiJson, Problem,
};
use crate::webhooks::endpoints::{self, EndpointError, EndpointPatch, NewEndpoint};
use crate::webhooks::replay;
use crate::webhooks::ssrf::TargetPolicy;

impl From<EndpointError> for ApiError {
    fn from(e: EndpointError) -> Self {
        match e {
            EndpointError::Url(e) => ApiError::field("url", e),
            EndpointError::Secret(e) => ApiError::field("secret", e),
            EndpointError::BadFilter(t) => {
                ApiError::field("filter_types", format!("{t:?} is not an event type"))
            }
            EndpointError::DescriptionTooLong => {
                ApiError::field("description", "must be at most 1000 characters")
            }
            EndpointError::RateLimit => ApiError::field(
                "rate_limit",
                format!(
                    "must be between 1 and {} (deliveries per second), or null for no limit",
                    endpoints::MAX_RATE_LIMIT
                ),
            ),
            EndpointError::Invalid { field, why } => ApiError::field(&field, why),
            e @ EndpointError::TooMany => ApiError::Conflict {
                code: "limit_reached",
                message: format!("{e}. Delete one before adding another."),
            },
            EndpointError::NotFound => ApiError::NotFound("webhook endpoint"),
            EndpointError::Db(e) => e.into(),
        }
    }
}

fn policy(state: &AppState) -> TargetPolicy {
    TargetPolicy {
        allow_private: state.settings.webhooks.allow_private_targets,
    }
}

/// A webhook endpoint, shaped as the platform's `WebhookDetails` (its secret and custom
/// headers are read separately).
#[derive(Debug, Serialize, ToSchema)]
pub struct EndpointView {
    pub id: String,
    pub url: String,
    /// Empty when none was given.
    pub description: String,
    /// Strings by string, as given; empty when none.
    pub metadata: BTreeMap<String, String>,
    /// Only these event types are sent; null: every type.
    pub filter_types: Option<Vec<String>>,
    pub disabled: bool,
    /// Why it is disabled, when it is.
    pub disabled_reason: Option<String>,
    /// Deliveries per second at most; null: no limit.
    #[schema(value_type = Option<i32>, minimum = 1, maximum = 10000)]
    pub rate_limit: Option<i32>,
    pub created_at: String,
    pub updated_at: String,
}

impl From<&Endpoint> for EndpointView {
    fn from(e: &Endpoint) -> Self {
        Self {
            id: e.id.clone(),
            url: e.url.clone(),
            description: e.description.clone().unwrap_or_default(),
            metadata: e.metadata.0.clone(),
            filter_types: e.filter_types.clone(),
            disabled: e.disabled,
            disabled_reason: e.disabled_reason.clone(),
            rate_limit: e.rate_limit,
            created_at: ts(e.created_at),
            updated_at: ts(e.updated_at),
        }
    }
}

/// `POST /webhooks`.
#[derive(Debug, Deserialize, ToSchema)]
pub struct CreateEndpoint {
    /// A public `https` URL.
    #[schema(format = "uri")]
    pub url: String,
    #[serde(default)]
    #[schema(max_length = 1000)]
    pub description: Option<String>,
    /// e.g. `["entitlement_grant.revoked"]`; absent or empty: every type.
    #[serde(default)]
    pub filter_types: Option<Vec<String>>,
    /// A `whsec_…` secret of your choosing (base64 of 24 to 64 bytes); generated when
    /// absent.
    #[serde(default)]
    // What `Secret::parse` takes: canonical standard base64 of 24 to 64 bytes (whole
    // groups of four characters, then one or two more bytes with their padding).
    #[schema(
        pattern = r"^whsec_(?:(?:[A-Za-z0-9+/]{4}){8,21}(?:[A-Za-z0-9+/][AQgw]==)?|(?:[A-Za-z0-9+/]{4}){8,20}[A-Za-z0-9+/]{2}[AEIMQUYcgkosw048]=)$"
    )]
    pub secret: Option<String>,
    /// Create it disabled.
    #[serde(default)]
    pub disabled: Option<bool>,
    /// Strings by string, returned as given (at most 50 keys).
    #[serde(default)]
    pub metadata: Option<BTreeMap<String, String>>,
    /// Deliveries per second at most (1 to 10000); absent or null: no limit.
    #[serde(default)]
    #[schema(value_type = Option<i64>, minimum = 1, maximum = 10000)]
    pub rate_limit: Option<i64>,
    /// Custom headers sent with every delivery (see `PATCH /webhooks/{id}/headers`).
    #[serde(default)]
    pub headers: Option<BTreeMap<String, String>>,
    /// A create repeated with the same key returns the endpoint the first one created
    /// (at most 255 characters).
    #[serde(default)]
    pub idempotency_key: Option<String>,
}

/// `PATCH /webhooks/{id}`: only the fields present change.
#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct UpdateEndpoint {
    /// A public `https` URL.
    #[serde(default)]
    #[schema(format = "uri")]
    pub url: Option<String>,
    /// `null` clears it.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<String>, max_length = 1000)]
    pub description: Option<Option<String>>,
    /// `null` or `[]`: every type.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<Vec<String>>)]
    pub filter_types: Option<Option<Vec<String>>>,
    #[serde(default)]
    pub disabled: Option<bool>,
    /// Replaces the metadata; `null`: empty.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<BTreeMap<String, String>>)]
    pub metadata: Option<Option<BTreeMap<String, String>>>,
    /// Deliveries per second at most (1 to 10000); `null`: no limit.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<i64>, minimum = 1, maximum = 10000)]
    pub rate_limit: Option<Option<i64>>,
}

fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

/// Add a webhook endpoint (at most five per business). With an `idempotency_key` an
/// endpoint of the business was created with, nothing is created: that endpoint is
/// answered.
#[utoipa::path(post, path = "/webhooks", tag = "webhooks",
    request_body = CreateEndpoint,
    responses(
        (status = 201, body = EndpointView),
        (status = 200, description = "The endpoint an earlier create with this `idempotency_key` made", body = EndpointView),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 409, description = "Five endpoints already", body = ErrorBody),
        (status = 413, body = ErrorBody), (status = 422, body = ErrorBody),
    ),
    security(("api_key" = [])))]
pub async fn create(
    merchant: Merchant,
    State(state): State<AppState>,
    ApiJson(body): ApiJson<CreateEndpoint>,
) -> ApiResult<impl IntoResponse> {
    let new = NewEndpoint {
        url: body.url,
        description: body.description,
        filter_types: body.filter_types,
        secret: body.secret,
        metadata: body.metadata,
        rate_limit: body.rate_limit,
        headers: body.headers,
        idempotency_key: body.idempotency_key,
    };
    let checked = endpoints::check_new(merchant.business(), new, policy(&state)).await?;
    let disable = if body.disabled == Some(true) {
        let patch = EndpointPatch {
            disabled: Some(true),
            ..Default::default()
        };
        Some(endpoints::check_patch(merchant.business(), patch, policy(&state)).await?)
    } else {
        None
    };
    // A transaction of the handlers' pool, not a connection: the insert's own `BEGIN`
    // is then a savepoint, and one cut short is rolled back with it (see `web::pool`).
    let mut tx = state.pool.begin(merchant.caller()).await?;
    let (mut ep, created) = endpoints::insert(&mut tx, merchant.business(), checked).await?;
    if !created {
        // A repeated create: the first one's endpoint, as it is now, changed by nothing.
        tx.commit().await?;
        return Ok((StatusCode::OK, ApiJson(EndpointView::from(&ep))));
    }
    if let Some(patch) = disable {
        ep = endpoints::apply_patch(&mut tx, merchant.business(), &ep.id, patch).await?;
    }
    tx.commit().await?;
    Ok((StatusCode::CREATED, ApiJson(EndpointView::from(&ep))))
}

/// `limit` when the merchant gives none, and the most it may ask for (the platform's
/// webhook list).
pub const DEFAULT_LIST_LIMIT: i64 = 50;
pub const MAX_LIST_LIMIT: i64 = 250;

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// How many endpoints per page: 1 to 250, default 50.
    #[param(minimum = 1, maximum = 250)]
    pub limit: Option<i64>,
    /// The `iterator` of the previous page, to continue after it (absent or empty: the
    /// first page).
    pub iterator: Option<String>,
}

/// A page of endpoints, as the platform's cursor pages.
#[derive(Debug, Serialize, ToSchema)]
pub struct EndpointPage {
    pub data: Vec<EndpointView>,
    /// Pass as `iterator` to read on after this page (null when nothing was read yet).
    pub iterator: Option<String>,
    /// Whether this page holds the last endpoint.
    pub done: bool,
}

/// The opaque `iterator` of a page ending with `e`.
fn iterator_of(e: &Endpoint) -> String {
    URL_SAFE_NO_PAD.encode(format!("{}.{}", e.created_at.timestamp_micros(), e.id))
}

/// Reads an `iterator` [`iterator_of`] made; `None` for anything else.
fn parse_iterator(it: &str) -> Option<After> {
    let raw = String::from_utf8(URL_SAFE_NO_PAD.decode(it).ok()?).ok()?;
    let (micros, id) = raw.split_once('.')?;
    let created_at = DateTime::<Utc>::from_timestamp_micros(micros.parse().ok()?)?;
    (id.starts_with("ep_") && id.len() <= 64).then(|| After {
        created_at,
        id: id.to_string(),
    })
}

fn invalid_query(message: impl Into<String>) -> ApiError {
    ApiError::Invalid(vec![Problem::new("invalid_query", message)])
}

/// The business's webhook endpoints, oldest first, a page at a time: pass each page's
/// `iterator` to read the next, until `done`.
#[utoipa::path(get, path = "/webhooks", tag = "webhooks",
    params(ListQuery),
    responses((status = 200, body = EndpointPage), (status = 401, body = ErrorBody), (status = 422, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn list(
    merchant: Merchant,
    State(state): State<AppState>,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> ApiResult<ApiJson<EndpointPage>> {
    let limit = q.limit.unwrap_or(DEFAULT_LIST_LIMIT);
    if !(1..=MAX_LIST_LIMIT).contains(&limit) {
        return Err(invalid_query(format!(
            "limit: must be between 1 and {MAX_LIST_LIMIT}"
        )));
    }
    // An empty iterator is no iterator: the first page (clients that keep the last
    // page's value in a string start with an empty one).
    let after = match q.iterator.as_deref().filter(|it| !it.is_empty()) {
        Some(it) => Some(
            parse_iterator(it)
                .ok_or_else(|| invalid_query("iterator: is not an iterator this list returned"))?,
        ),
        None => None,
    };
    let mut conn = state.pool.acquire(merchant.caller()).await?;
    // One more than asked for tells whether this page is the last.
    let mut rows =
        endpoint_store::page(&mut conn, merchant.business(), after.as_ref(), limit + 1).await?;
    let done = rows.len() as i64 <= limit;
    rows.truncate(limit as usize);
    Ok(ApiJson(EndpointPage {
        // An empty page keeps the place it was asked for, to poll for newer endpoints.
        iterator: rows.last().map(iterator_of).or(q.iterator),
        data: rows.iter().map(EndpointView::from).collect(),
        done,
    }))
}

/// One webhook endpoint.
#[utoipa::path(get, path = "/webhooks/{id}", tag = "webhooks",
    params(("id" = String, Path, description = "Endpoint id (`ep_…`)")),
    responses((status = 200, body = EndpointView), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn get(
    merchant: Merchant,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<ApiJson<EndpointView>> {
    let mut conn = state.pool.acquire(merchant.caller()).await?;
    let ep = endpoints::get(&mut conn, merchant.business(), &id).await?;
    Ok(ApiJson(EndpointView::from(&ep)))
}

/// Change a webhook endpoint. Enabling a disabled endpoint clears why it was disabled.
#[utoipa::path(patch, path = "/webhooks/{id}", tag = "webhooks",
    params(("id" = String, Path, description = "Endpoint id (`ep_…`)")),
    request_body = UpdateEndpoint,
    responses(
        (status = 200, body = EndpointView), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 413, body = ErrorBody), (status = 422, body = ErrorBody),
    ),
    security(("api_key" = [])))]
pub async fn update(
    merchant: Merchant,
    State(state): State<AppState>,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<UpdateEndpoint>,
) -> ApiResult<ApiJson<EndpointView>> {
    let patch = EndpointPatch {
        url: body.url,
        description: body.description,
        filter_types: body.filter_types,
        disabled: body.disabled,
        metadata: body.metadata,
        rate_limit: body.rate_limit,
    };
    let patch = endpoints::check_patch(merchant.business(), patch, policy(&state)).await?;
    let mut conn = state.pool.acquire(merchant.caller()).await?;
    let ep = endpoints::apply_patch(&mut conn, merchant.business(), &id, patch).await?;
    Ok(ApiJson(EndpointView::from(&ep)))
}

/// Delete a webhook endpoint with its messages.
#[utoipa::path(delete, path = "/webhooks/{id}", tag = "webhooks",
    params(("id" = String, Path, description = "Endpoint id (`ep_…`)")),
    responses((status = 204, description = "Deleted"), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn delete(
    merchant: Merchant,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let mut conn = state.pool.acquire(merchant.caller()).await?;
    endpoints::delete(&mut conn, merchant.business(), &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// An endpoint's custom headers, as the platform's `HeaderRetrieveResponse`.
#[derive(Debug, Serialize, ToSchema)]
pub struct HeadersView {
    /// The headers whose values may be shown, by name.
    pub headers: BTreeMap<String, String>,
    /// The names of the headers that hold credentials (their names say so: `auth`,
    /// `token`, `secret`, `key`, `cookie`, …); their values are sent but never shown.
    pub sensitive: Vec<String>,
}

/// `PATCH /webhooks/{id}/headers`.
#[derive(Debug, Deserialize, ToSchema)]
pub struct UpdateHeaders {
    /// Every custom header, by name: replaces those set before (`{}` removes them all).
    pub headers: BTreeMap<String, String>,
}

/// The custom headers sent with every delivery to the endpoint.
#[utoipa::path(get, path = "/webhooks/{id}/headers", tag = "webhooks",
    params(("id" = String, Path, description = "Endpoint id (`ep_…`)")),
    responses((status = 200, body = HeadersView), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn headers(
    merchant: Merchant,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<ApiJson<HeadersView>> {
    let mut conn = state.pool.acquire(merchant.caller()).await?;
    let ep = endpoints::get(&mut conn, merchant.business(), &id).await?;
    let (sensitive, shown): (Strings, Strings) = ep
        .headers
        .0
        .into_iter()
        .partition(|(name, _)| endpoints::is_sensitive(name));
    Ok(ApiJson(HeadersView {
        headers: shown,
        sensitive: sensitive.into_keys().collect(),
    }))
}

/// Replace the custom headers sent with every delivery to the endpoint. Refused (422,
/// naming the header): the Standard Webhooks headers (`webhook-id`,
/// `webhook-timestamp`, `webhook-signature`), `host`, `content-type`,
/// `content-length`, hop-by-hop headers (`connection`, `keep-alive`,
/// `transfer-encoding`, `te`, `trailer`, `upgrade`, `proxy-*`), invalid names, values
/// that are not printable ASCII, a name given twice in different case.
#[utoipa::path(patch, path = "/webhooks/{id}/headers", tag = "webhooks",
    params(("id" = String, Path, description = "Endpoint id (`ep_…`)")),
    request_body = UpdateHeaders,
    responses(
        (status = 204, description = "Replaced"), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 413, body = ErrorBody), (status = 422, body = ErrorBody),
    ),
    security(("api_key" = [])))]
pub async fn update_headers(
    merchant: Merchant,
    State(state): State<AppState>,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<UpdateHeaders>,
) -> ApiResult<StatusCode> {
    endpoints::check_headers(&body.headers)?;
    let mut conn = state.pool.acquire(merchant.caller()).await?;
    endpoints::set_headers(&mut conn, merchant.business(), &id, &body.headers).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// An endpoint's signing secret.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SecretView {
    /// `whsec_…`: verify `webhook-signature` with it (Standard Webhooks).
    pub secret: String,
}

/// The endpoint's current signing secret.
#[utoipa::path(get, path = "/webhooks/{id}/secret", tag = "webhooks",
    params(("id" = String, Path, description = "Endpoint id (`ep_…`)")),
    responses((status = 200, body = SecretView), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn secret(
    merchant: Merchant,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<ApiJson<SecretView>> {
    let mut conn = state.pool.acquire(merchant.caller()).await?;
    let ep = endpoints::get(&mut conn, merchant.business(), &id).await?;
    Ok(ApiJson(SecretView { secret: ep.secret }))
}

/// `POST /webhooks/{id}/secret/rotate`; the body is optional.
#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct RotateSecret {
    /// A `whsec_…` secret of your choosing (base64 of 24 to 64 bytes); generated when
    /// absent.
    #[serde(default)]
    // What `Secret::parse` takes: canonical standard base64 of 24 to 64 bytes (whole
    // groups of four characters, then one or two more bytes with their padding).
    #[schema(
        pattern = r"^whsec_(?:(?:[A-Za-z0-9+/]{4}){8,21}(?:[A-Za-z0-9+/][AQgw]==)?|(?:[A-Za-z0-9+/]{4}){8,20}[A-Za-z0-9+/]{2}[AEIMQUYcgkosw048]=)$"
    )]
    pub secret: Option<String>,
}

/// Rotate the signing secret. The new secret signs from now on; the previous one keeps
/// signing too (a second signature) for 24 hours, so receivers can switch without a gap.
#[utoipa::path(post, path = "/webhooks/{id}/secret/rotate", tag = "webhooks",
    params(("id" = String, Path, description = "Endpoint id (`ep_…`)")),
    request_body(content = Option<RotateSecret>, description = "Optional: without a body, a secret is generated"),
    responses(
        (status = 200, description = "The new secret", body = SecretView),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 422, body = ErrorBody),
    ),
    security(("api_key" = [])))]
pub async fn rotate(
    merchant: Merchant,
    State(state): State<AppState>,
    Path(id): Path<String>,
    OptionalApiJson(req): OptionalApiJson<RotateSecret>,
) -> ApiResult<ApiJson<SecretView>> {
    let mut conn = state.pool.acquire(merchant.caller()).await?;
    let ep = endpoints::rotate_secret(
        &mut conn,
        merchant.business(),
        &id,
        req.secret.as_deref(),
        Utc::now(),
    )
    .await?;
    Ok(ApiJson(SecretView { secret: ep.secret }))
}

/// One delivery attempt.
#[derive(Debug, Serialize, ToSchema)]
pub struct AttemptView {
    pub attempted_at: String,
    /// The endpoint's HTTP status; null if it was not reached.
    pub status_code: Option<i32>,
    pub latency_ms: i32,
    pub error: Option<String>,
    /// The first KiB of the answer.
    pub response: Option<String>,
}

/// A message: one grant event for one endpoint, with its attempts.
#[derive(Debug, Serialize, ToSchema)]
pub struct MessageView {
    /// The `webhook-id` header.
    pub id: String,
    pub event_type: String,
    pub grant_id: String,
    /// `pending`, `delivered` or `failed`.
    pub status: String,
    pub attempt_count: i32,
    pub next_attempt_at: Option<String>,
    pub last_error: Option<String>,
    pub delivered_at: Option<String>,
    /// The body sent.
    #[schema(value_type = Object)]
    pub payload: Value,
    pub attempts: Vec<AttemptView>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct MessagesQuery {
    /// `pending`, `delivered` or `failed`.
    #[param(pattern = "^(pending|delivered|failed)$")]
    pub status: Option<String>,
    /// 1 to 100, default 10.
    pub page_size: Option<u32>,
    /// 0-based.
    pub page_number: Option<u32>,
}

/// The messages sent (or being sent) to an endpoint, newest first, with their attempts.
#[utoipa::path(get, path = "/webhooks/{id}/messages", tag = "webhooks",
    params(("id" = String, Path, description = "Endpoint id (`ep_…`)"), MessagesQuery),
    responses((status = 200, body = Items<MessageView>), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn list_messages(
    merchant: Merchant,
    State(state): State<AppState>,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<MessagesQuery>,
) -> ApiResult<ApiJson<Items<MessageView>>> {
    let p = page(q.page_size, q.page_number)?;
    if let Some(s) = q.status.as_deref()
        && !matches!(s, "pending" | "delivered" | "failed")
    {
        return Err(ApiError::field(
            "status",
            format!("{s:?} is not one of pending, delivered, failed"),
        ));
    }
    let mut conn = state.pool.acquire(merchant.caller()).await?;
    endpoints::get(&mut conn, merchant.business(), &id).await?;
    let rows = db::page_of_endpoint(&mut conn, &id, q.status.as_deref(), p).await?;
    // The page's attempts in one query, not one per message.
    let ids: Vec<String> = rows.iter().map(|m| m.id.clone()).collect();
    let mut attempts = messages::attempts_of_many(&mut conn, &ids).await?;
    let items = rows
        .into_iter()
        .map(|m| {
            let its = attempts.remove(&m.id).unwrap_or_default();
            message_view(m, its)
        })
        .collect();
    Ok(ApiJson(Items { items }))
}

fn message_view(m: Message, attempts: Vec<messages::Attempt>) -> MessageView {
    MessageView {
        payload: serde_json::from_str(&m.body).unwrap_or(Value::String(m.body.clone())),
        id: m.id,
        event_type: m.event_type,
        grant_id: m.grant_id,
        status: m.status,
        attempt_count: m.attempts,
        next_attempt_at: m.next_attempt_at.map(ts),
        last_error: m.last_error,
        delivered_at: m.delivered_at.map(ts),
        attempts: attempts
            .into_iter()
            .map(|a| AttemptView {
                attempted_at: ts(a.attempted_at),
                status_code: a.status_code,
                latency_ms: a.latency_ms,
                error: a.error,
                response: a.response,
            })
            .collect(),
    }
}

/// Counts `messages` replays against the business's `webhooks.replays_per_hour`: every
/// replayed message is a delivery job in the queue every business shares, ahead of the
/// others' new ones.
fn replays_allowed(state: &AppState, merchant: &Merchant, messages: u32) -> ApiResult<()> {
    state
        .limits
        .check_replays(merchant.business(), messages)
        .map_err(ApiError::rate_limited)
}

/// What a replay queued.
#[derive(Debug, Serialize, ToSchema)]
pub struct Replayed {
    /// The messages sent again (same `webhook-id`s).
    pub message_ids: Vec<String>,
}

/// Send one message again (a fresh retry schedule; the `webhook-id` stays the same).
/// Only a settled message (`failed` or `delivered`) is sent again: a `pending` one is
/// still being delivered, and a second delivery would send it twice at once (409).
/// Each call counts one against the business's `webhooks.replays_per_hour`.
#[utoipa::path(post, path = "/webhooks/{id}/messages/{message_id}/retry", tag = "webhooks",
    params(("id" = String, Path, description = "Endpoint id (`ep_…`)"), ("message_id" = String, Path, description = "Message id (`msg_…`)")),
    responses(
        (status = 202, body = Replayed), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, description = "The message is still pending", body = ErrorBody),
    ),
    security(("api_key" = [])))]
pub async fn retry_message(
    merchant: Merchant,
    State(state): State<AppState>,
    Path((id, message_id)): Path<(String, String)>,
) -> ApiResult<impl IntoResponse> {
    let mut tx = state.pool.begin(merchant.caller()).await?;
    let m = messages::get(&mut tx, &message_id)
        .await?
        .filter(|m| m.endpoint_id == id && m.business_id == merchant.business())
        .ok_or(ApiError::NotFound("webhook message"))?;
    replays_allowed(&state, &merchant, 1)?;
    // Conditional on its status in the same statement, so a message that became
    // pending meanwhile is refused too.
    if !replay::replay_message(&mut tx, merchant.business(), &m.id).await? {
        return Err(ApiError::Conflict {
            code: "message_pending",
            message: "The message is still being delivered (status pending); retry it once it is failed or delivered.".into(),
        });
    }
    tx.commit().await?;
    Ok((
        StatusCode::ACCEPTED,
        ApiJson(Replayed {
            message_ids: vec![m.id],
        }),
    ))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct RetryFailedQuery {
    /// How many failed messages to send again: 1 to 1000, default 100.
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<i64>,
    /// The `next_cursor` of the previous call, to continue after it.
    #[param(pattern = "^msg_", max_length = 64)]
    pub cursor: Option<String>,
}

/// What a bulk replay queued, and where to continue.
#[derive(Debug, Serialize, ToSchema)]
pub struct ReplayedPage {
    /// The messages sent again (same `webhook-id`s), in id order.
    pub message_ids: Vec<String>,
    /// Pass as `cursor` to send the next failed messages; null when this call took the
    /// last of them.
    pub next_cursor: Option<String>,
}

/// Send the endpoint's failed messages again, at most `limit` per call, in id order;
/// continue with `next_cursor` until it is null. Each call counts its `limit` against
/// the business's `webhooks.replays_per_hour` (a `limit` over the whole budget is taken
/// as the budget).
#[utoipa::path(post, path = "/webhooks/{id}/messages/retry-failed", tag = "webhooks",
    params(("id" = String, Path, description = "Endpoint id (`ep_…`)"), RetryFailedQuery),
    responses((status = 202, body = ReplayedPage), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn retry_failed(
    merchant: Merchant,
    State(state): State<AppState>,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<RetryFailedQuery>,
) -> ApiResult<impl IntoResponse> {
    let limit = q.limit.unwrap_or(replay::DEFAULT_FAILED_PAGE);
    if !(1..=replay::MAX_FAILED_PAGE).contains(&limit) {
        return Err(ApiError::field(
            "limit",
            format!("must be between 1 and {}", replay::MAX_FAILED_PAGE),
        ));
    }
    // Characters, not bytes: the document's `maxLength` counts them so.
    if let Some(c) = q.cursor.as_deref()
        && (!c.starts_with("msg_") || c.chars().count() > 64)
    {
        return Err(ApiError::field(
            "cursor",
            "is not a next_cursor this endpoint returned",
        ));
    }
    // Never more than the whole hourly budget in one call.
    let limit = limit.min(i64::from(state.limits.replay_budget()));
    let mut tx = state.pool.begin(merchant.caller()).await?;
    endpoints::get(&mut tx, merchant.business(), &id).await?;
    replays_allowed(&state, &merchant, u32::try_from(limit).unwrap_or(u32::MAX))?;
    let (ids, next_cursor) = replay::replay_failed(
        &mut tx,
        merchant.business(),
        &id,
        q.cursor.as_deref(),
        limit,
    )
    .await?;
    tx.commit().await?;
    Ok((
        StatusCode::ACCEPTED,
        ApiJson(ReplayedPage {
            message_ids: ids,
            next_cursor,
        }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iterators_read_back_only_what_they_were() {
        let at = DateTime::<Utc>::from_timestamp_micros(1_777_777_777_123_456).unwrap();
        let it = URL_SAFE_NO_PAD.encode(format!("{}.ep_abc", at.timestamp_micros()));
        assert_eq!(
            parse_iterator(&it),
            Some(After {
                created_at: at,
                id: "ep_abc".into()
            })
        );
        for bad in [
            "",
            "nope",
            "ep_abc",
            &URL_SAFE_NO_PAD.encode("x.ep_abc"),
            &URL_SAFE_NO_PAD.encode("1.msg_abc"),
            &URL_SAFE_NO_PAD.encode("1"),
            &URL_SAFE_NO_PAD.encode(format!("1.ep_{}", "a".repeat(80))),
        ] {
            assert_eq!(parse_iterator(bad), None, "{bad}");
        }
    }
}
