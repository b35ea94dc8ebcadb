//! The API's routes and their OpenAPI 3 document (`GET /openapi.json`). Every route is
//! registered here through its handler's `#[utoipa::path]` annotation, which also
//! documents it, so the served document and the real routes cannot disagree.

use axum::routing::get;
use axum::{Json, Router};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{discord, entitlements, grants, products, webhooks};
use crate::http::AppState;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "guildgate merchant API",
        description = "Discord entitlements, compatible with the Dodo Payments entitlements API: same paths, objects and pagination (`page_size`, `page_number`, answers `{\"items\": [...]}`; webhook endpoints are listed in cursor pages `{\"data\": [...], \"iterator\", \"done\"}` like the platform's). Authenticate with `Authorization: Bearer <api key>`. Errors are `{code, message}`."
    ),
    modifiers(&BearerAuth),
    tags(
        (name = "entitlements", description = "Discord entitlements"),
        (name = "products", description = "Which entitlements a product grants"),
        (name = "grants", description = "What customers were given"),
        (name = "discord", description = "Connected Discord servers"),
        (name = "webhooks", description = "Webhook endpoints and messages"),
    )
)]
struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
    }
}

/// The API's routes with their documentation.
fn documented() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(entitlements::create, entitlements::list))
        .routes(routes!(
            entitlements::get,
            entitlements::update,
            entitlements::delete
        ))
        .routes(routes!(products::put, products::get))
        .routes(routes!(grants::of_entitlement))
        .routes(routes!(grants::get, grants::revoke))
        .routes(routes!(grants::of_customer))
        .routes(routes!(discord::install_url))
        .routes(routes!(discord::bot_callback))
        .routes(routes!(discord::guilds))
        .routes(routes!(discord::disconnect))
        .routes(routes!(discord::roles))
        .routes(routes!(webhooks::create, webhooks::list))
        .routes(routes!(webhooks::get, webhooks::update, webhooks::delete))
        .routes(routes!(webhooks::headers, webhooks::update_headers))
        .routes(routes!(webhooks::secret))
        .routes(routes!(webhooks::rotate))
        .routes(routes!(webhooks::list_messages))
        .routes(routes!(webhooks::retry_message))
        .routes(routes!(webhooks::retry_failed))
}

/// The OpenAPI document of the API.
pub fn document() -> utoipa::openapi::OpenApi {
    documented().into_openapi()
}

/// Every API route, and `GET /openapi.json` serving their document.
pub fn router() -> Router<AppState> {
    let (router, doc) = documented().split_for_parts();
    let doc = std::sync::Arc::new(doc);
    router.route(
        "/openapi.json",
        get(move || {
            let doc = doc.clone();
            async move { Json(doc.as_ref().clone()) }
        }),
    )
}
