//! `/webhooks`: a business's webhook endpoints, their signing secrets, and the messages
//! sent to them with every attempt, plus replay. Built on [`crate::webhooks`], which
//! owns the storage and the rules (SSRF guard, at most five endpoints, secret format,
//! rotation overlap); this file only parses requests and shapes answers. A URL is
//! resolved (the SSRF guard) before a database connection is taken, never while one is
//! held.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use chrono::Utc;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};

use super::auth::Merchant;
use super::error::{ApiError, ApiJson, ApiQuery, ApiResult, ErrorBody, OptionalApiJson};
use super::store::messages as db;
use super::{Items, page};
use crate::grants::render::ts;
use crate::http::AppState;
use crate::webhooks::endpoints::{self, Endpoint, EndpointError, EndpointPatch, NewEndpoint};
use crate::webhooks::messages::{self, Message};
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

/// A webhook endpoint (its secret is read separately).
#[derive(Debug, Serialize, ToSchema)]
pub struct EndpointView {
    pub id: String,
    pub url: String,
    pub description: Option<String>,
    /// Only these event types are sent; null: every type.
    pub filter_types: Option<Vec<String>>,
    pub disabled: bool,
    /// Why it is disabled, when it is.
    pub disabled_reason: Option<String>,
    pub created_at: String,
    pub updated_at: String,
}

impl From<&Endpoint> for EndpointView {
    fn from(e: &Endpoint) -> Self {
        Self {
            id: e.id.clone(),
            url: e.url.clone(),
            description: e.description.clone(),
            filter_types: e.filter_types.clone(),
            disabled: e.disabled,
            disabled_reason: e.disabled_reason.clone(),
            created_at: ts(e.created_at),
            updated_at: ts(e.updated_at),
        }
    }
}

/// `POST /webhooks`.
#[derive(Debug, Deserialize, ToSchema)]
pub struct CreateEndpoint {
    /// A public `https` URL.
    pub url: String,
    #[serde(default)]
    pub description: Option<String>,
    /// e.g. `["entitlement_grant.revoked"]`; absent or empty: every type.
    #[serde(default)]
    pub filter_types: Option<Vec<String>>,
    /// A `whsec_…` secret of your choosing; generated when absent.
    #[serde(default)]
    pub secret: Option<String>,
    /// Create it disabled.
    #[serde(default)]
    pub disabled: Option<bool>,
}

/// `PATCH /webhooks/{id}`: only the fields present change.
#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct UpdateEndpoint {
    #[serde(default)]
    pub url: Option<String>,
    /// `null` clears it.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<String>)]
    pub description: Option<Option<String>>,
    /// `null` or `[]`: every type.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<Vec<String>>)]
    pub filter_types: Option<Option<Vec<String>>>,
    #[serde(default)]
    pub disabled: Option<bool>,
}

fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

/// Add a webhook endpoint (at most five per business).
#[utoipa::path(post, path = "/webhooks", tag = "webhooks",
    request_body = CreateEndpoint,
    responses(
        (status = 201, body = EndpointView),
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
    };
    let checked = endpoints::check_new(new, policy(&state)).await?;
    let disable = if body.disabled == Some(true) {
        let patch = EndpointPatch {
            disabled: Some(true),
            ..Default::default()
        };
        Some(endpoints::check_patch(patch, policy(&state)).await?)
    } else {
        None
    };
    let mut conn = state.pool.acquire().await?;
    let mut ep = endpoints::insert(&mut conn, merchant.business(), checked).await?;
    if let Some(patch) = disable {
        ep = endpoints::apply_patch(&mut conn, merchant.business(), &ep.id, patch).await?;
    }
    Ok((StatusCode::CREATED, ApiJson(EndpointView::from(&ep))))
}

/// The business's webhook endpoints, oldest first.
#[utoipa::path(get, path = "/webhooks", tag = "webhooks",
    responses((status = 200, body = Items<EndpointView>), (status = 401, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn list(
    merchant: Merchant,
    State(state): State<AppState>,
) -> ApiResult<ApiJson<Items<EndpointView>>> {
    let mut conn = state.pool.acquire().await?;
    let rows = endpoints::list(&mut conn, merchant.business()).await?;
    Ok(ApiJson(Items {
        items: rows.iter().map(EndpointView::from).collect(),
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
    let mut conn = state.pool.acquire().await?;
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
    };
    let patch = endpoints::check_patch(patch, policy(&state)).await?;
    let mut conn = state.pool.acquire().await?;
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
    let mut conn = state.pool.acquire().await?;
    endpoints::delete(&mut conn, merchant.business(), &id).await?;
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
    let mut conn = state.pool.acquire().await?;
    let ep = endpoints::get(&mut conn, merchant.business(), &id).await?;
    Ok(ApiJson(SecretView { secret: ep.secret }))
}

/// `POST /webhooks/{id}/secret/rotate`; the body is optional.
#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct RotateSecret {
    /// A `whsec_…` secret of your choosing; generated when absent.
    #[serde(default)]
    pub secret: Option<String>,
}

/// Rotate the signing secret. The new secret signs from now on; the previous one keeps
/// signing too (a second signature) for 24 hours, so receivers can switch without a gap.
#[utoipa::path(post, path = "/webhooks/{id}/secret/rotate", tag = "webhooks",
    params(("id" = String, Path, description = "Endpoint id (`ep_…`)")),
    request_body(content = Option<RotateSecret>, description = "Optional"),
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
    let mut conn = state.pool.acquire().await?;
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
    let mut conn = state.pool.acquire().await?;
    endpoints::get(&mut conn, merchant.business(), &id).await?;
    let rows = db::of_endpoint(&mut conn, &id, q.status.as_deref(), p).await?;
    let mut items = Vec::with_capacity(rows.len());
    for m in rows {
        let attempts = messages::attempts(&mut conn, &m.id).await?;
        items.push(message_view(m, attempts));
    }
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

/// What a replay queued.
#[derive(Debug, Serialize, ToSchema)]
pub struct Replayed {
    /// The messages sent again (same `webhook-id`s).
    pub message_ids: Vec<String>,
}

/// Send one message again (a fresh retry schedule; the `webhook-id` stays the same).
/// Only a settled message (`failed` or `delivered`) is sent again: a `pending` one is
/// still being delivered, and a second delivery would send it twice at once (409).
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
    let mut tx = state.pool.begin().await?;
    let m = messages::get(&mut tx, &message_id)
        .await?
        .filter(|m| m.endpoint_id == id && m.business_id == merchant.business())
        .ok_or(ApiError::NotFound("webhook message"))?;
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
    pub limit: Option<i64>,
    /// The `next_cursor` of the previous call, to continue after it.
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
/// continue with `next_cursor` until it is null.
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
    if let Some(c) = q.cursor.as_deref()
        && (!c.starts_with("msg_") || c.len() > 64)
    {
        return Err(ApiError::field(
            "cursor",
            "is not a next_cursor this endpoint returned",
        ));
    }
    let mut tx = state.pool.begin().await?;
    endpoints::get(&mut tx, merchant.business(), &id).await?;
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
