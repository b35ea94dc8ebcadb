//! Which entitlements a purchase of a product grants: `GET`/`PATCH /products/{product_id}`
//! as the platform's SDKs call them (`products.retrieve`, `products.update(entitlements=…)`),
//! and guildgate's own `/products/{product_id}/entitlements`. Setting the list replaces
//! it whole (`[]` clears it), in the order given, whichever route sets it.
//!
//! guildgate knows of a product only its id, its business and the entitlements attached
//! to it: price, name, tax category and the rest are the platform's, so a product read
//! here has none of them, and a `PATCH` of them is accepted and changes nothing.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use sqlx::PgConnection;
use utoipa::ToSchema;

use super::Items;
use super::auth::Merchant;
use super::entitlements::EntitlementView;
use super::entitlements::IntegrationConfig;
use super::entitlements::ReadQuery;
use crate::domain::ids::ProductId;
use crate::store::entitlements as db;
use crate::store::entitlements;
use crate::store::entitlements::Entitlement;
use crate::store::grants::business_brand;
use crate::web::AppState;
use crate::web::error::{ApiError, ApiJson, ApiQuery, ApiResult, ErrorBody, Problem};

/// The most entitlements one product may grant (the platform's limit).
pub const MAX_PER_PRODUCT: usize = 50;

#[derive(Debug, Deserialize, ToSchema)]
pub struct Attachment {
    #[schema(example = "ent_9Xc2Lw7QpR")]
    pub entitlement_id: String,
}

/// `PUT /products/{product_id}/entitlements`.
#[derive(Debug, Deserialize, ToSchema)]
pub struct SetProductEntitlements {
    /// At most 50; `[]` detaches everything.
    #[schema(max_items = 50)]
    pub entitlements: Vec<Attachment>,
}

fn product(id: String) -> Result<ProductId, ApiError> {
    ProductId::parse(id).map_err(|e| ApiError::field("product_id", e))
}

/// Replaces the entitlements `product` grants with `attachments`, in their order, after
/// checking them all (at most [`MAX_PER_PRODUCT`], each listed once, each an undeleted
/// entitlement of the business), in the caller's transaction. The one way both `PUT
/// /products/{product_id}/entitlements` and `PATCH /products/{product_id}` set the list.
async fn replace(
    tx: &mut PgConnection,
    business: &str,
    product: &ProductId,
    attachments: Vec<Attachment>,
) -> Result<(), ApiError> {
    if attachments.len() > MAX_PER_PRODUCT {
        return Err(ApiError::field(
            "entitlements",
            format!(
                "at most {MAX_PER_PRODUCT} entitlements per product, got {}",
                attachments.len()
            ),
        ));
    }
    let ids: Vec<String> = attachments.into_iter().map(|a| a.entitlement_id).collect();
    let mut problems = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        if ids[..i].contains(id) {
            problems.push(Problem::new(
                "invalid_field",
                format!("entitlements[{i}].entitlement_id: {id} is listed twice"),
            ));
        }
    }
    let owned = db::owned(tx, business, &ids).await?;
    for (i, id) in ids.iter().enumerate() {
        // Another business's entitlement reads exactly like a missing one.
        if !owned.contains(id) {
            problems.push(Problem::new(
                "invalid_field",
                format!("entitlements[{i}].entitlement_id: no entitlement {id}"),
            ));
        }
    }
    if !problems.is_empty() {
        return Err(ApiError::Invalid(problems));
    }
    // Newly attached entitlements reach the product's earlier buyers (docs/api.md).
    crate::store::backfill::start(tx, business, product.as_str(), &ids).await?;
    entitlements::set_product_entitlements(tx, business, product.as_str(), &ids).await?;
    Ok(())
}

/// Replace the entitlements a product grants.
#[utoipa::path(put, path = "/products/{product_id}/entitlements", tag = "products",
    params(("product_id" = String, Path, description = "The platform's product id (`pdt_…`)", pattern = r"^[A-Za-z0-9_.:-]{1,128}$")),
    request_body = SetProductEntitlements,
    responses(
        (status = 200, body = Items<EntitlementView>),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 413, body = ErrorBody),
        (status = 422, description = "More than 50, a duplicate, or an entitlement that is not this business's", body = ErrorBody),
    ),
    security(("api_key" = [])))]
pub async fn put(
    merchant: Merchant,
    State(state): State<AppState>,
    Path(product_id): Path<String>,
    ApiJson(body): ApiJson<SetProductEntitlements>,
) -> ApiResult<ApiJson<Items<EntitlementView>>> {
    let product = product(product_id)?;
    let mut tx = state.pool.begin(merchant.caller()).await?;
    replace(&mut tx, merchant.business(), &product, body.entitlements).await?;
    let items = db::of_product(&mut tx, merchant.business(), product.as_str()).await?;
    let items = super::entitlements::views(&mut tx, &items).await?;
    tx.commit().await?;
    Ok(ApiJson(Items { items }))
}

/// The entitlements a product grants, in order.
#[utoipa::path(get, path = "/products/{product_id}/entitlements", tag = "products",
    params(("product_id" = String, Path, description = "The platform's product id (`pdt_…`)", pattern = r"^[A-Za-z0-9_.:-]{1,128}$")),
    responses((status = 200, body = Items<EntitlementView>), (status = 401, body = ErrorBody), (status = 422, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn get(
    merchant: Merchant,
    State(state): State<AppState>,
    Path(product_id): Path<String>,
) -> ApiResult<ApiJson<Items<EntitlementView>>> {
    let product = product(product_id)?;
    let mut conn = state.pool.acquire(merchant.caller()).await?;
    let items = db::of_product(&mut conn, merchant.business(), product.as_str()).await?;
    Ok(ApiJson(Items {
        items: super::entitlements::views(&mut conn, &items).await?,
    }))
}

/// An entitlement attached to a product, as the platform's product shows it
/// (`ProductEntitlementSummary` in its SDKs).
#[derive(Debug, Serialize, ToSchema)]
pub struct ProductEntitlement {
    pub id: String,
    pub name: String,
    pub description: Option<String>,
    /// Always `discord`.
    #[schema(value_type = super::values::DiscordIntegration)]
    pub integration_type: String,
    pub integration_config: IntegrationConfig,
}

impl super::translations::Localized for ProductEntitlement {
    fn entitlement_id(&self) -> &str {
        &self.id
    }
    fn texts(&mut self) -> (&mut String, &mut Option<String>) {
        (&mut self.name, &mut self.description)
    }
}

impl From<&Entitlement> for ProductEntitlement {
    fn from(e: &Entitlement) -> Self {
        Self {
            id: e.id.clone(),
            name: e.name.clone(),
            description: e.description.clone(),
            integration_type: e.integration_type.clone(),
            integration_config: IntegrationConfig::of(e),
        }
    }
}

/// A product as guildgate knows it: the platform's product object with only the fields
/// guildgate has. The platform's price, name, tax category, timestamps and the like are
/// absent, not null or made up: they are the platform's to say.
#[derive(Debug, Serialize, ToSchema)]
pub struct ProductView {
    pub product_id: String,
    pub business_id: String,
    /// The business's most recent brand (from its latest grant), or, before any, the
    /// business's default brand, whose id on the platform is the business's.
    pub brand_id: String,
    /// In the order they were attached.
    pub entitlements: Vec<ProductEntitlement>,
    /// guildgate extension: earlier purchases (live subscriptions, paid one-time
    /// purchases) that newly attached entitlements are still being given to; 0 once
    /// every one has its grant.
    pub backfilling: i64,
}

/// Read a product: the entitlements it grants. A product with none attached is one
/// guildgate does not know (404).
#[utoipa::path(get, path = "/products/{product_id}", tag = "products",
    params(("product_id" = String, Path, description = "The platform's product id (`pdt_…`)", pattern = r"^[A-Za-z0-9_.:-]{1,128}$"), ReadQuery),
    responses((status = 200, body = ProductView), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn retrieve(
    merchant: Merchant,
    State(state): State<AppState>,
    Path(product_id): Path<String>,
    ApiQuery(q): ApiQuery<ReadQuery>,
) -> ApiResult<ApiJson<ProductView>> {
    let product = product(product_id)?;
    let business = merchant.business();
    let mut conn = state.pool.acquire(merchant.caller()).await?;
    let rows = db::of_product(&mut conn, business, product.as_str()).await?;
    if rows.is_empty() {
        return Err(ApiError::NotFound("product"));
    }
    let mut entitlements: Vec<ProductEntitlement> =
        rows.iter().map(ProductEntitlement::from).collect();
    super::translations::localize(&mut conn, &mut entitlements, q.locale.as_deref()).await?;
    Ok(ApiJson(ProductView {
        product_id: product.to_string(),
        business_id: business.to_string(),
        brand_id: business_brand(&mut conn, business).await?,
        entitlements,
        backfilling: crate::store::backfill::remaining(&mut conn, business, product.as_str())
            .await?,
    }))
}

/// `PATCH /products/{product_id}`, the platform's product update. Only `entitlements`
/// means anything to guildgate; the platform's other fields (`name`, `price`,
/// `credit_entitlements`, …) are accepted and ignored.
#[derive(Debug, Deserialize, ToSchema)]
pub struct UpdateProduct {
    /// Replaces the list, as `PUT /products/{product_id}/entitlements` does: at most 50,
    /// `[]` detaches everything; absent or null leaves it as it is.
    #[serde(default)]
    #[schema(max_items = 50)]
    pub entitlements: Option<Vec<Attachment>>,
}

/// Update a product: with `entitlements`, replace the entitlements it grants (a product
/// guildgate has not seen is created with them). Answers no body, as the platform does.
#[utoipa::path(patch, path = "/products/{product_id}", tag = "products",
    params(("product_id" = String, Path, description = "The platform's product id (`pdt_…`)", pattern = r"^[A-Za-z0-9_.:-]{1,128}$")),
    request_body = UpdateProduct,
    responses(
        (status = 200, description = "Updated; no body"),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 413, body = ErrorBody),
        (status = 422, description = "More than 50, a duplicate, or an entitlement that is not this business's", body = ErrorBody),
    ),
    security(("api_key" = [])))]
pub async fn update(
    merchant: Merchant,
    State(state): State<AppState>,
    Path(product_id): Path<String>,
    ApiJson(body): ApiJson<UpdateProduct>,
) -> ApiResult<StatusCode> {
    let product = product(product_id)?;
    if let Some(attachments) = body.entitlements {
        let mut tx = state.pool.begin(merchant.caller()).await?;
        replace(&mut tx, merchant.business(), &product, attachments).await?;
        tx.commit().await?;
    }
    Ok(StatusCode::OK)
}
