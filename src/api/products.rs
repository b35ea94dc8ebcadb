//! `/products/{product_id}/entitlements`: which entitlements a purchase of a product
//! grants. `PUT` replaces the whole list (`[]` clears it), in the order given.

use axum::extract::{Path, State};
use serde::Deserialize;
use utoipa::ToSchema;

use super::Items;
use super::auth::Merchant;
use super::entitlements::EntitlementView;
use super::error::{ApiError, ApiJson, ApiResult, ErrorBody, Problem};
use super::store::entitlements as db;
use crate::http::AppState;
use crate::ids::ProductId;
use crate::store::setup;

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
    if body.entitlements.len() > MAX_PER_PRODUCT {
        return Err(ApiError::field(
            "entitlements",
            format!(
                "at most {MAX_PER_PRODUCT} entitlements per product, got {}",
                body.entitlements.len()
            ),
        ));
    }
    let ids: Vec<String> = body
        .entitlements
        .into_iter()
        .map(|a| a.entitlement_id)
        .collect();
    let mut problems = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        if ids[..i].contains(id) {
            problems.push(Problem::new(
                "invalid_field",
                format!("entitlements[{i}].entitlement_id: {id} is listed twice"),
            ));
        }
    }
    let business = merchant.business();
    let mut tx = state.pool.begin().await?;
    let owned = db::owned(&mut tx, business, &ids).await?;
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
    setup::set_product_entitlements(&mut tx, business, product.as_str(), &ids).await?;
    let items = db::of_product(&mut tx, business, product.as_str()).await?;
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
    let mut conn = state.pool.acquire().await?;
    let items = db::of_product(&mut conn, merchant.business(), product.as_str()).await?;
    Ok(ApiJson(Items {
        items: super::entitlements::views(&mut conn, &items).await?,
    }))
}
