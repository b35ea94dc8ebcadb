//! Grants through the API: list an entitlement's or a customer's grants, read one, and
//! revoke one by hand.
//!
//! A `Pending` grant read after its link expired is returned with a renewed `oauth_url`
//! (the merchant's customer portal shows it, so it must work). A manual revoke is final:
//! later payment events never grant that entitlement to that subscription again.

use axum::extract::{Path, State};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::PgConnection;
use utoipa::{IntoParams, ToSchema};

use super::auth::Merchant;
use super::{Items, page};
use crate::domain::ids::CustomerId;
use crate::domain::{Grant, GrantEventType, GrantStatus, RevocationReason};
use crate::grants::history::{self, Entry};
use crate::grants::link::LinkBuilder;
use crate::grants::link::renew_link;
use crate::grants::render::{GrantObject, grant_object, ts};
use crate::outbox::emit;
use crate::store::grants as grant_store;
use crate::store::{entitlements, grants as db};
use crate::web::AppState;
use crate::web::error::{ApiError, ApiJson, ApiQuery, ApiResult, ErrorBody};

fn status(s: Option<String>) -> Result<Option<GrantStatus>, ApiError> {
    s.map(|s| {
        GrantStatus::parse(&s).ok_or_else(|| {
            ApiError::field(
                "status",
                format!("{s:?} is not one of Pending, Delivered, Failed, Revoked"),
            )
        })
    })
    .transpose()
}

/// Renders grants, renewing expired links of `Pending` ones on the way.
async fn render(
    conn: &mut PgConnection,
    links: &LinkBuilder,
    grants: Vec<Grant>,
    now: DateTime<Utc>,
) -> Result<Vec<Value>, sqlx::Error> {
    let mut out = Vec::with_capacity(grants.len());
    for g in grants {
        let g = renew_link(conn, links, &g, now).await?;
        out.push(grant_object(&g, links));
    }
    Ok(out)
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EntitlementGrantsQuery {
    /// `Pending`, `Delivered`, `Failed` or `Revoked`.
    #[param(pattern = "^(Pending|Delivered|Failed|Revoked)$")]
    pub status: Option<String>,
    #[param(pattern = r"^[A-Za-z0-9_.:-]{1,128}$")]
    pub customer_id: Option<String>,
    /// 1 to 100, default 10.
    pub page_size: Option<u32>,
    /// 0-based.
    pub page_number: Option<u32>,
}

/// The grants of an entitlement (a deleted one's too), newest first.
#[utoipa::path(get, path = "/entitlements/{id}/grants", tag = "grants",
    params(("id" = String, Path, description = "Entitlement id"), EntitlementGrantsQuery),
    responses((status = 200, body = Items<GrantObject>), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn of_entitlement(
    merchant: Merchant,
    State(state): State<AppState>,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<EntitlementGrantsQuery>,
) -> ApiResult<ApiJson<Items<Value>>> {
    let p = page(q.page_size, q.page_number)?;
    let st = status(q.status)?;
    let customer = q
        .customer_id
        .map(|c| CustomerId::parse(c).map_err(|e| ApiError::field("customer_id", e)))
        .transpose()?;
    let mut conn = state.pool.acquire(merchant.caller()).await?;
    entitlements::get_any(&mut conn, merchant.business(), &id)
        .await?
        .ok_or(ApiError::NotFound("entitlement"))?;
    let rows = db::page_of_entitlement(
        &mut conn,
        merchant.business(),
        &id,
        st.map(GrantStatus::as_str),
        customer.as_ref().map(CustomerId::as_str),
        p,
    )
    .await?;
    let items = render(&mut conn, &state.links, rows, Utc::now()).await?;
    Ok(ApiJson(Items { items }))
}

/// One grant of an entitlement.
#[utoipa::path(get, path = "/entitlements/{id}/grants/{grant_id}", tag = "grants",
    params(("id" = String, Path, description = "Entitlement id"), ("grant_id" = String, Path, description = "Grant id")),
    responses((status = 200, body = GrantObject), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn get(
    merchant: Merchant,
    State(state): State<AppState>,
    Path((id, grant_id)): Path<(String, String)>,
) -> ApiResult<ApiJson<Value>> {
    let mut conn = state.pool.acquire(merchant.caller()).await?;
    let g = db::get_of_entitlement(&mut conn, merchant.business(), &id, &grant_id, false)
        .await?
        .ok_or(ApiError::NotFound("grant"))?;
    let mut out = render(&mut conn, &state.links, vec![g], Utc::now()).await?;
    Ok(ApiJson(out.remove(0)))
}

/// `POST /entitlements/{id}/grants`: comp access for a customer.
#[derive(Debug, Deserialize, ToSchema)]
pub struct CompGrant {
    /// The platform's customer id of the customer to give access to.
    #[schema(pattern = r"^[A-Za-z0-9_.:-]{1,128}$")]
    pub customer_id: String,
    /// When the access ends (RFC 3339, in the future); absent or null: until revoked.
    #[serde(default)]
    #[schema(format = DateTime)]
    pub expires_at: Option<String>,
    /// Where to email the customer their link (a guildgate extension): with email on,
    /// a comp grant that needs their Discord account is emailed like a purchase's.
    #[serde(default)]
    #[schema(format = Email, example = "ada@example.com")]
    pub customer_email: Option<String>,
}

/// Give a customer access without a payment (comp access; a guildgate extension). The
/// grant is like any other: `entitlement_grant.created` is sent, the customer connects
/// Discord through its `oauth_url` (or is delivered at once if they have before), and
/// it is revoked by hand or, with `expires_at`, when that passes (`revocation_reason:
/// expired`). One live comp grant per customer and entitlement: asking again answers it
/// (200) unchanged.
#[utoipa::path(post, path = "/entitlements/{id}/grants", tag = "grants",
    params(("id" = String, Path, description = "Entitlement id")),
    request_body = CompGrant,
    responses(
        (status = 201, description = "Comp access given", body = GrantObject),
        (status = 200, description = "The customer's live comp grant for this entitlement, unchanged", body = GrantObject),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 413, body = ErrorBody),
        (status = 422, description = "`customer_id` or `expires_at` is invalid, or `expires_at` is not in the future (`invalid_field`)", body = ErrorBody),
    ),
    security(("api_key" = [])))]
pub async fn comp(
    merchant: Merchant,
    State(state): State<AppState>,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<CompGrant>,
) -> ApiResult<(axum::http::StatusCode, ApiJson<Value>)> {
    let now = Utc::now();
    let customer =
        CustomerId::parse(body.customer_id).map_err(|e| ApiError::field("customer_id", e))?;
    let expires_at = body
        .expires_at
        .map(|t| {
            DateTime::parse_from_rfc3339(&t)
                .map(|t| t.with_timezone(&Utc))
                .map_err(|_| ApiError::field("expires_at", "must be an RFC 3339 time"))
        })
        .transpose()?;
    if expires_at.is_some_and(|t| t <= now) {
        return Err(ApiError::field("expires_at", "must be in the future"));
    }
    let email = match body.customer_email.as_deref() {
        None => None,
        Some(raw) => Some(
            crate::email::address(Some(raw))
                .ok_or_else(|| ApiError::field("customer_email", "must be an email address"))?,
        ),
    };
    let business = merchant.business();
    let mut tx = state.pool.begin(merchant.caller()).await?;
    entitlements::get(&mut tx, business, &id, false)
        .await?
        .ok_or(ApiError::NotFound("entitlement"))?;
    let live = db::live_comp(&mut tx, &id, customer.as_str()).await?;
    let (status, g) = match live {
        Some(g) => (axum::http::StatusCode::OK, g),
        None => {
            let brand = grant_store::business_brand(&mut tx, business).await?;
            let grant_id = crate::domain::ids::GrantId::mint().to_string();
            let nonce = LinkBuilder::new_nonce();
            let new = db::NewComp {
                id: &grant_id,
                business_id: business,
                brand_id: &brand,
                entitlement_id: &id,
                customer_id: customer.as_str(),
                oauth_nonce: &nonce,
                oauth_expires_at: now + state.links.ttl,
                expires_at,
                now,
            };
            match db::insert_comp(&mut tx, &new).await? {
                Some(g) => {
                    // The grant, its webhook and its sync job commit together.
                    emit(&mut tx, &state.links, &g, GrantEventType::Created, now).await?;
                    if state.settings.email.enabled()
                        && let Some(to) = email.as_deref()
                    {
                        // The worker sends it only while the grant waits for the
                        // customer's account (a linked customer is delivered at once).
                        let job = crate::email::Job::join(&g.id, Some(to));
                        crate::email::queue(&mut tx, &job, business).await?;
                    }
                    crate::store::history::record(
                        &mut tx,
                        &g.id,
                        now,
                        "comp",
                        serde_json::json!({"expires_at": expires_at.map(ts)}),
                    )
                    .await?;
                    (axum::http::StatusCode::CREATED, g)
                }
                // Given meanwhile by a concurrent request: answer that one (this
                // statement's snapshot sees it committed).
                None => {
                    let g = db::live_comp(&mut tx, &id, customer.as_str())
                        .await?
                        .ok_or_else(|| ApiError::Internal("a comp grant vanished".into()))?;
                    (axum::http::StatusCode::OK, g)
                }
            }
        }
    };
    tx.commit().await?;
    let mut conn = state.pool.acquire(merchant.caller()).await?;
    let mut out = render(&mut conn, &state.links, vec![g], now).await?;
    Ok((status, ApiJson(out.remove(0))))
}

/// A resend that was queued.
#[derive(Debug, Serialize, ToSchema)]
pub struct ResendView {
    /// The email's id (`<grant_id>:resend:<n>`).
    #[schema(example = "grant_7f3kq2:resend:1")]
    pub email_id: String,
    pub grant_id: String,
    /// Always `queued`: the email worker sends it (its outcome shows in the grant's
    /// history as `email_sent`).
    #[schema(example = "queued")]
    pub status: String,
}

/// Email the customer again (a guildgate extension): the "Join the Discord" email
/// while the grant waits for their Discord account, otherwise an email with the link to
/// their access page. Sent even when the entitlement's `send_email` is `false`. Three a
/// grant an hour; a fourth answers 429 `rate_limited` with `Retry-After`.
#[utoipa::path(post, path = "/entitlements/{id}/grants/{grant_id}/resend", tag = "grants",
    params(("id" = String, Path, description = "Entitlement id"), ("grant_id" = String, Path, description = "Grant id")),
    responses(
        (status = 202, description = "Queued", body = ResendView),
        (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, description = "Email is off on this guildgate (`email_disabled`), the grant is revoked (`grant_revoked`), or no address is known for the customer (`no_email_address`)", body = ErrorBody),
    ),
    security(("api_key" = [])))]
pub async fn resend(
    merchant: Merchant,
    State(state): State<AppState>,
    Path((id, grant_id)): Path<(String, String)>,
) -> ApiResult<(axum::http::StatusCode, ApiJson<ResendView>)> {
    let mut tx = state.pool.begin(merchant.caller()).await?;
    let g = db::get_of_entitlement(&mut tx, merchant.business(), &id, &grant_id, false)
        .await?
        .ok_or(ApiError::NotFound("grant"))?;
    let job = crate::email::resend::queue(
        &mut tx,
        &g,
        state.settings.email.enabled(),
        crate::email::resend::AskedBy::Merchant,
    )
    .await?
    .map_err(|r| match r {
        crate::email::resend::Refused::TooMany { retry_after } => {
            ApiError::RateLimited { retry_after }
        }
        r => ApiError::Conflict {
            code: r.code(),
            message: r.to_string(),
        },
    })?;
    tx.commit().await?;
    Ok((
        axum::http::StatusCode::ACCEPTED,
        ApiJson(ResendView {
            email_id: job.email_id,
            grant_id: job.grant_id,
            status: "queued".into(),
        }),
    ))
}

/// A grant's history, oldest first (a guildgate extension): created, linked, account
/// switched, each change made in Discord with Discord's answer, what was left in place
/// and why, delivered, failed with its code, waiting on a stopped server, revoked with
/// its reason.
#[utoipa::path(get, path = "/entitlements/{id}/grants/{grant_id}/history", tag = "grants",
    params(("id" = String, Path, description = "Entitlement id"), ("grant_id" = String, Path, description = "Grant id")),
    responses((status = 200, body = Items<Entry>), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn history(
    merchant: Merchant,
    State(state): State<AppState>,
    Path((id, grant_id)): Path<(String, String)>,
) -> ApiResult<ApiJson<Items<Entry>>> {
    let mut conn = state.pool.acquire(merchant.caller()).await?;
    let g = db::get_of_entitlement(&mut conn, merchant.business(), &id, &grant_id, false)
        .await?
        .ok_or(ApiError::NotFound("grant"))?;
    Ok(ApiJson(Items {
        items: history::of(&mut conn, &g).await?,
    }))
}

/// Revoke a grant by hand (`revocation_reason: manual`). The role (or, for a
/// membership-only entitlement, the membership) is taken away in Discord and an
/// `entitlement_grant.revoked` webhook is sent. Idempotent: revoking a revoked grant
/// returns it unchanged. Later payment events never re-grant it.
#[utoipa::path(delete, path = "/entitlements/{id}/grants/{grant_id}", tag = "grants",
    params(("id" = String, Path, description = "Entitlement id"), ("grant_id" = String, Path, description = "Grant id")),
    responses((status = 200, description = "The revoked grant", body = GrantObject), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn revoke(
    merchant: Merchant,
    State(state): State<AppState>,
    Path((id, grant_id)): Path<(String, String)>,
) -> ApiResult<ApiJson<Value>> {
    let now = Utc::now();
    let mut tx = state.pool.begin(merchant.caller()).await?;
    // Locked, so a concurrent event that revokes or delivers it waits for this one.
    let g = db::get_of_entitlement(&mut tx, merchant.business(), &id, &grant_id, true)
        .await?
        .ok_or(ApiError::NotFound("grant"))?;
    let g = match grant_store::revoke(&mut tx, &g.id, RevocationReason::Manual, now).await? {
        // The status change, its webhook and the Discord sync job commit together, so a
        // revoke is never visible without its effects on their way.
        Some(revoked) => {
            emit(
                &mut tx,
                &state.links,
                &revoked,
                GrantEventType::Revoked,
                now,
            )
            .await?;
            revoked
        }
        None => g,
    };
    tx.commit().await?;
    Ok(ApiJson(grant_object(&g, &state.links)))
}

/// The platform's integration types, as its SDKs send them in `integration_type`. Only
/// `discord` exists in guildgate; the others are known so that a filter on them answers
/// an empty page, as the platform does for a business without such grants, rather than
/// an error an SDK's own type check would not expect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum IntegrationType {
    Discord,
    Telegram,
    Github,
    Figma,
    Framer,
    Notion,
    DigitalFiles,
    LicenseKey,
    FeatureFlag,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct CustomerGrantsQuery {
    /// `Pending`, `Delivered`, `Failed` or `Revoked`.
    #[param(pattern = "^(Pending|Delivered|Failed|Revoked)$")]
    pub status: Option<String>,
    /// Only grants of this integration type: every grant for `discord`, none for the
    /// platform's other types; any other value is refused (`invalid_query`).
    #[param(inline)]
    pub integration_type: Option<IntegrationType>,
    /// 1 to 100, default 10.
    pub page_size: Option<u32>,
    /// 0-based.
    pub page_number: Option<u32>,
}

/// A customer's grants across entitlements, newest first.
#[utoipa::path(get, path = "/customers/{customer_id}/entitlement-grants", tag = "grants",
    params(("customer_id" = String, Path, description = "The platform's customer id", pattern = r"^[A-Za-z0-9_.:-]{1,128}$"), CustomerGrantsQuery),
    responses((status = 200, body = Items<GrantObject>), (status = 401, body = ErrorBody), (status = 422, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn of_customer(
    merchant: Merchant,
    State(state): State<AppState>,
    Path(customer_id): Path<String>,
    ApiQuery(q): ApiQuery<CustomerGrantsQuery>,
) -> ApiResult<ApiJson<Items<Value>>> {
    let p = page(q.page_size, q.page_number)?;
    let st = status(q.status)?;
    let customer = CustomerId::parse(customer_id).map_err(|e| ApiError::field("customer_id", e))?;
    if q.integration_type
        .is_some_and(|t| t != IntegrationType::Discord)
    {
        return Ok(ApiJson(Items { items: Vec::new() }));
    }
    let mut conn = state.pool.acquire(merchant.caller()).await?;
    let rows = db::page_of_customer(
        &mut conn,
        merchant.business(),
        customer.as_str(),
        st.map(GrantStatus::as_str),
        p,
    )
    .await?;
    let items = render(&mut conn, &state.links, rows, Utc::now()).await?;
    Ok(ApiJson(Items { items }))
}

/// An entitlement a customer holds, one per live grant, as the platform's SDKs read it
/// (`CustomerListEntitlementsResponse`).
#[derive(Debug, Serialize, ToSchema)]
pub struct CustomerEntitlement {
    pub grant_id: String,
    pub entitlement_id: String,
    pub entitlement_name: String,
    pub entitlement_description: Option<String>,
    /// Always `discord`.
    #[schema(value_type = super::values::DiscordIntegration)]
    pub integration_type: String,
    /// `pending`, `delivered` or `failed`: lower case here, as the platform writes it in
    /// this list (grants themselves say `Pending`, …). Revoked grants are not listed.
    #[schema(value_type = super::values::HeldStatus)]
    pub status: String,
    pub delivered_at: Option<String>,
    /// Always null: revoked grants are not listed.
    pub revoked_at: Option<String>,
    pub created_at: String,
    pub updated_at: String,
}

impl super::translations::Localized for CustomerEntitlement {
    fn entitlement_id(&self) -> &str {
        &self.entitlement_id
    }
    fn texts(&mut self) -> (&mut String, &mut Option<String>) {
        (
            &mut self.entitlement_name,
            &mut self.entitlement_description,
        )
    }
}

impl From<db::Held> for CustomerEntitlement {
    fn from(h: db::Held) -> Self {
        Self {
            grant_id: h.grant_id,
            entitlement_id: h.entitlement_id,
            entitlement_name: h.entitlement_name,
            entitlement_description: h.entitlement_description,
            integration_type: h.integration_type,
            status: h.status.to_lowercase(),
            delivered_at: h.delivered_at.map(ts),
            revoked_at: h.revoked_at.map(ts),
            created_at: ts(h.created_at),
            updated_at: ts(h.updated_at),
        }
    }
}

/// The entitlements a customer holds: one item per live grant (pending, delivered or
/// failed and awaiting a retry), newest first, unpaginated as on the platform.
#[utoipa::path(get, path = "/customers/{customer_id}/entitlements", tag = "grants",
    params(("customer_id" = String, Path, description = "The platform's customer id", pattern = r"^[A-Za-z0-9_.:-]{1,128}$"), super::entitlements::ReadQuery),
    responses((status = 200, body = Items<CustomerEntitlement>), (status = 401, body = ErrorBody), (status = 422, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn entitlements_of_customer(
    merchant: Merchant,
    State(state): State<AppState>,
    Path(customer_id): Path<String>,
    ApiQuery(q): ApiQuery<super::entitlements::ReadQuery>,
) -> ApiResult<ApiJson<Items<CustomerEntitlement>>> {
    let customer = CustomerId::parse(customer_id).map_err(|e| ApiError::field("customer_id", e))?;
    let mut conn = state.pool.acquire(merchant.caller()).await?;
    let rows = db::held_by_customer(&mut conn, merchant.business(), customer.as_str()).await?;
    let mut items: Vec<CustomerEntitlement> =
        rows.into_iter().map(CustomerEntitlement::from).collect();
    super::translations::localize(&mut conn, &mut items, q.locale.as_deref()).await?;
    Ok(ApiJson(Items { items }))
}
