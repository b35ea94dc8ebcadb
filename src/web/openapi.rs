//! Every HTTP route and its OpenAPI 3 document (`GET /openapi.json`). Every route is
//! registered here through its handler's `#[utoipa::path]` annotation, which also
//! documents it, so the served document and the real routes cannot disagree.
//!
//! What the edge answers for every route (the load limits of [`super::limits`],
//! authentication, the checks of [`super::error`]) is added to each operation by
//! [`EdgeResponses`] rather than repeated in every annotation, where a new route could
//! forget it; [`Pagination`] and [`OptionalBodies`] say, once for every route, what the
//! derive gets wrong about paging and optional bodies.

use axum::routing::get;
use axum::{Json, Router};
use utoipa::openapi::content::Content;
use utoipa::openapi::header::Header;
use utoipa::openapi::path::{Operation, ParameterIn};
use utoipa::openapi::response::{Response, ResponseBuilder};
use utoipa::openapi::schema::OneOfBuilder;
use utoipa::openapi::schema::SchemaType;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::openapi::{
    KnownFormat, Object, ObjectBuilder, Ref, RefOr, Required, Schema, SchemaFormat, Type,
};
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::api::{
    DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, application, discord, entitlements, grants, products,
    settings, translations, webhooks,
};

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
        (name = "business", description = "The business's delivery-email settings (a guildgate extension)"),
        (name = "customers", description = "Pages the customer's browser is sent to"),
        (name = "operations", description = "Health, readiness and metrics, for load balancers and monitoring"),
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

/// The responses the HTTP edge can give on every route, whatever its handler does, added
/// to every operation of the document (after the routes are in it: `modifiers(…)` of
/// `ApiDoc` run before any route is):
///
/// - 503 everywhere: `overloaded` (`http.max_concurrent_requests`) and
///   `request_timeout` (`http.request_timeout`) wrap every route, and the Discord-calling
///   routes add `service_unavailable` and `discord_busy`. An operation that documents a
///   503 of its own (Discord, an HTML page) keeps it, with the load causes added.
/// - 401 and 429 on every operation that needs an API key: authentication, then the
///   business's `api.requests_per_second`/`api.burst`, run before the handler.
/// - 422 everywhere: a U+0000 in any path or query parameter, or a path parameter that
///   is not UTF-8, is refused before the handler runs
///   ([`super::error::refuse_bad_params`]).
/// - 400 and 413 on every operation with a body: what [`super::error::ApiJson`] answers
///   for a body that is not JSON, or over `http.max_body_bytes`.
pub struct EdgeResponses;

const UNAUTHORIZED: &str = "Unauthorized";
const RATE_LIMITED: &str = "RateLimited";
const UNAVAILABLE: &str = "Unavailable";
/// What a page's 503 means when load refused it before its handler ran, after "the
/// server is".
const PAGE_UNDER_LOAD: &str = "under load (too many requests at once, with `Retry-After`, or the request took longer than `http.request_timeout`): a page saying to try again.";

/// Why any route can answer 503, after "the server is".
const UNDER_LOAD: &str = "under load: `overloaded` (too many requests at once, or no database connection free for requests; `Retry-After`), `request_timeout` (the request took longer than `http.request_timeout` and was abandoned; nothing it had not finished was saved) or `query_timeout` (a database statement of the request ran longer than `database.http_statement_timeout` and was cancelled; nothing was saved; ask for a smaller page).";

fn error_body() -> Content {
    Content::new(Some(Ref::from_schema_name("ErrorBody")))
}

/// `Retry-After`, in whole seconds.
fn retry_after(when: &str) -> Header {
    let seconds: Object = ObjectBuilder::new()
        .schema_type(Type::Integer)
        .minimum(Some(1))
        .build();
    let mut h = Header::new(seconds);
    h.description = Some(format!("Seconds to wait before trying again; {when}."));
    h
}

fn error_response(description: &str) -> ResponseBuilder {
    ResponseBuilder::new()
        .description(description)
        .content("application/json", error_body())
}

impl EdgeResponses {
    fn shared() -> [(&'static str, Response); 3] {
        [
            (
                UNAUTHORIZED,
                error_response(
                    "No API key, or not a valid one (`unauthorized`): send `Authorization: Bearer <api key>`.",
                )
                .build(),
            ),
            (
                RATE_LIMITED,
                error_response(
                    "This business sent more requests than `api.requests_per_second`/`api.burst` allow (`rate_limited`). Each business has its own budget.",
                )
                .header("Retry-After", retry_after("always sent"))
                .build(),
            ),
            (
                UNAVAILABLE,
                error_response(&format!("The server is {UNDER_LOAD}"))
                    .header(
                        "Retry-After",
                        retry_after("sent with `overloaded`"),
                    )
                    .build(),
            ),
        ]
    }

    /// `page`: a route browsers are sent to, whose parameters its handler checks (no
    /// edge 422).
    fn operation(op: &mut Operation, page: bool) {
        let protected = op
            .security
            .as_ref()
            .is_some_and(|s| !s.is_empty() && !s.iter().any(is_anonymous));
        let has_body = op.request_body.is_some();
        let responses = &mut op.responses.responses;
        let mut shared = |status: &str, name: &str| {
            // An annotation's own answer for the status, when it says more than the
            // shared one (a description), is kept.
            let keep =
                matches!(responses.get(status), Some(RefOr::T(r)) if !r.description.is_empty());
            if !keep {
                responses.insert(status.into(), Ref::from_response_name(name).into());
            }
        };
        if protected {
            shared("401", UNAUTHORIZED);
            shared("429", RATE_LIMITED);
        }
        if page {
            Self::page_under_load(responses);
        } else {
            Self::under_load(responses);
        }
        // A bad path or query parameter is refused before the handler runs; a body is
        // refused by `ApiJson` when it is not JSON or too large. A page's form is read
        // by its handler, which answers a page; only its size is the edge's.
        let edge: &[&str] = match (has_body, page) {
            (true, false) => &["400", "413", "422"],
            (true, true) => &["413"],
            (false, false) => &["422"],
            (false, true) => &[],
        };
        for &status in edge {
            responses.entry(status.into()).or_insert_with(|| {
                ResponseBuilder::new()
                    .content("application/json", error_body())
                    .build()
                    .into()
            });
        }
        // Annotations name the body of most errors and leave the why to this.
        for (status, response) in responses.iter_mut() {
            if let RefOr::T(r) = response
                && r.description.is_empty()
                && let Some(why) = generic_error(status)
            {
                r.description = why.into();
            }
        }
    }
}

/// What an error status means on any route, for operations that do not say more.
fn generic_error(status: &str) -> Option<&'static str> {
    Some(match status {
        "400" => "The body is not JSON, or not sent as `application/json` (`malformed_request`).",
        "404" => "No such object for this business (`not_found`).",
        "413" => "The body is larger than `http.max_body_bytes` (`payload_too_large`).",
        "422" => {
            "The body, a field, or a path or query parameter is invalid, or holds U+0000 (`invalid_body`, `invalid_field`, `invalid_query`; the message names it)."
        }
        _ => return None,
    })
}

/// The paging parameters of every list, as [`super::api::page`] reads them: `page_size` 1 to
/// [`MAX_PAGE_SIZE`], `page_number` any `u32` (the derive would say int32, and refuse half
/// of what the server takes). Said once here, beside the constants, for every list.
pub struct Pagination;

impl Modify for Pagination {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let size: Object = ObjectBuilder::new()
            .schema_type(Type::Integer)
            .format(Some(SchemaFormat::KnownFormat(KnownFormat::Int32)))
            .minimum(Some(1))
            .maximum(Some(MAX_PAGE_SIZE))
            .default(Some(DEFAULT_PAGE_SIZE.into()))
            .build();
        let number: Object = ObjectBuilder::new()
            .schema_type(Type::Integer)
            .format(Some(SchemaFormat::KnownFormat(KnownFormat::Int64)))
            .minimum(Some(0))
            .maximum(Some(u32::MAX))
            .default(Some(0.into()))
            .build();
        for op in operations(openapi) {
            for param in op.parameters.iter_mut().flatten() {
                if param.parameter_in != ParameterIn::Query {
                    continue;
                }
                match param.name.as_str() {
                    "page_size" => param.schema = Some(size.clone().into()),
                    "page_number" => param.schema = Some(number.clone().into()),
                    _ => {}
                }
            }
        }
    }
}

/// Request bodies are JSON objects or nothing ([`super::error::OptionalApiJson`]); never
/// JSON `null`, which every route refuses with `invalid_body`. The derive documents an
/// optional body (`Option<T>`) as "`null` or `T`": this says "`T`, not required" instead.
pub struct OptionalBodies;

impl Modify for OptionalBodies {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        for op in operations(openapi) {
            let Some(body) = op.request_body.as_mut() else {
                continue;
            };
            let mut optional = false;
            for content in body.content.values_mut() {
                let Some(RefOr::T(Schema::OneOf(one))) = &content.schema else {
                    continue;
                };
                let mut not_null = one.items.iter().filter(|s| !is_null(s));
                if let (Some(only), None) = (not_null.next(), not_null.next())
                    && one.items.len() == 2
                {
                    content.schema = Some(only.clone());
                    optional = true;
                }
            }
            if optional {
                body.required = Some(Required::False);
            }
        }
    }
}

fn is_null(schema: &RefOr<Schema>) -> bool {
    matches!(schema, RefOr::T(Schema::Object(o)) if o.schema_type == SchemaType::Type(Type::Null))
}

/// Every operation of `openapi`.
fn operations(openapi: &mut utoipa::openapi::OpenApi) -> impl Iterator<Item = &mut Operation> {
    paths_and_operations(openapi).map(|(_, op)| op)
}

/// Every operation of the document with its path.
fn paths_and_operations(
    openapi: &mut utoipa::openapi::OpenApi,
) -> impl Iterator<Item = (&str, &mut Operation)> {
    openapi.paths.paths.iter_mut().flat_map(|(path, item)| {
        [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.options,
            &mut item.head,
            &mut item.patch,
            &mut item.trace,
        ]
        .into_iter()
        .flatten()
        .map(move |op| (path.as_str(), op))
    })
}

/// What [`document`] and [`router`] add to the routes' own documentation.
fn finish(openapi: &mut utoipa::openapi::OpenApi) {
    Pagination.modify(openapi);
    OptionalBodies.modify(openapi);
    EdgeResponses.modify(openapi);
}

/// `{}` in a security list: the operation may also be called without credentials.
fn is_anonymous(req: &utoipa::openapi::security::SecurityRequirement) -> bool {
    serde_json::to_value(req).is_ok_and(|v| v.as_object().is_some_and(|o| o.is_empty()))
}

impl EdgeResponses {
    /// A route's 503 as the API answers it: its own causes (Discord), and load refused
    /// before the handler, in the error shape.
    fn under_load(responses: &mut std::collections::BTreeMap<String, RefOr<Response>>) {
        match responses.get_mut("503") {
            Some(RefOr::T(own)) => {
                let said = own.description.trim_end_matches('.');
                let said = if said.is_empty() {
                    "Discord could not be asked (`service_unavailable`, or `discord_busy` with `Retry-After`)"
                } else {
                    said
                };
                own.description =
                    format!("{said}. Or, in the error shape, the server is {UNDER_LOAD}");
                // Load is refused before the handler runs, in the API's error shape
                // (pages: [`Self::page_under_load`]): a JSON answer of the route's own
                // (readiness) or the error shape.
                match own.content.get_mut("application/json") {
                    Some(json) => {
                        if let Some(schema) = json.schema.take() {
                            let either = OneOfBuilder::new()
                                .item(schema)
                                .item(Ref::from_schema_name("ErrorBody"))
                                .build();
                            json.schema = Some(RefOr::T(Schema::OneOf(either)));
                        }
                    }
                    None => {
                        own.content.insert("application/json".into(), error_body());
                    }
                }
                own.headers
                    .entry("Retry-After".into())
                    .or_insert_with(|| retry_after("sent with `overloaded` and `discord_busy`"));
            }
            Some(RefOr::Ref(_)) => {}
            None => {
                responses.insert("503".into(), Ref::from_response_name(UNAVAILABLE).into());
            }
        }
    }

    /// A browser page's 503: its own page (the database, Discord), and load refused
    /// before the handler, answered with a page saying to try again.
    fn page_under_load(responses: &mut std::collections::BTreeMap<String, RefOr<Response>>) {
        let r = responses.entry("503".into()).or_insert_with(|| {
            ResponseBuilder::new()
                .description("Something went wrong on our side (HTML page)")
                .build()
                .into()
        });
        if let RefOr::T(own) = r {
            let said = own.description.trim_end_matches('.').to_string();
            own.description = format!("{said}. Or the server is {PAGE_UNDER_LOAD}");
            own.content
                .entry("text/html".into())
                .or_insert_with(|| Content::new(None::<RefOr<Schema>>));
            own.headers
                .entry("Retry-After".into())
                .or_insert_with(|| retry_after("sent when too many requests came at once"));
        }
    }
}

impl Modify for EdgeResponses {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        for (name, response) in Self::shared() {
            components.responses.insert(name.into(), response.into());
        }
        for (path, op) in paths_and_operations(openapi) {
            Self::operation(op, super::error::BROWSER_PAGES.contains(&path));
        }
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
        .routes(routes!(products::retrieve, products::update))
        .routes(routes!(translations::list))
        .routes(routes!(translations::put, translations::delete))
        .routes(routes!(grants::of_entitlement, grants::comp))
        .routes(routes!(grants::get, grants::revoke))
        .routes(routes!(grants::history))
        .routes(routes!(grants::resend))
        .routes(routes!(settings::get, settings::update))
        .routes(routes!(grants::of_customer))
        .routes(routes!(grants::entitlements_of_customer))
        .routes(routes!(discord::install_url))
        .routes(routes!(discord::bot_callback))
        .routes(routes!(discord::guilds))
        .routes(routes!(discord::disconnect))
        .routes(routes!(discord::roles))
        .routes(routes!(discord::member_access))
        .routes(routes!(
            application::put,
            application::get,
            application::delete
        ))
        .routes(routes!(webhooks::create, webhooks::list))
        .routes(routes!(webhooks::get, webhooks::update, webhooks::delete))
        .routes(routes!(webhooks::headers, webhooks::update_headers))
        .routes(routes!(webhooks::secret))
        .routes(routes!(webhooks::rotate))
        .routes(routes!(webhooks::list_messages))
        .routes(routes!(webhooks::retry_message))
        .routes(routes!(webhooks::retry_failed))
        .merge(super::oauth::router())
        .merge(super::access::router())
        .merge(super::ops::router())
}

/// The OpenAPI document of the API.
pub fn document() -> utoipa::openapi::OpenApi {
    let mut doc = documented().into_openapi();
    finish(&mut doc);
    doc
}

/// Every API route, and `GET /openapi.json` serving their document.
pub fn router() -> Router<AppState> {
    let (router, mut doc) = documented().split_for_parts();
    finish(&mut doc);
    let doc = std::sync::Arc::new(doc);
    router.route(
        "/openapi.json",
        get(move || {
            let doc = doc.clone();
            async move { Json(doc.as_ref().clone()) }
        }),
    )
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    /// `response`, or the shared response it refers to.
    fn resolve<'a>(doc: &'a Value, response: &'a Value) -> &'a Value {
        match response["$ref"].as_str() {
            Some(r) => {
                let name = r.strip_prefix("#/components/responses/").unwrap();
                &doc["components"]["responses"][name]
            }
            None => response,
        }
    }

    /// Every operation of the document, as (`METHOD path`, operation).
    fn operations(doc: &Value) -> Vec<(String, &Value)> {
        let mut out = Vec::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                out.push((format!("{} {path}", method.to_uppercase()), op));
            }
        }
        out
    }

    fn is_error_shape(doc: &Value, r: &Value) -> bool {
        let r = resolve(doc, r);
        let schema = &r["content"]["application/json"]["schema"];
        let error = json!({"$ref": "#/components/schemas/ErrorBody"});
        // The error shape, or (a route with its own JSON answer) one of them.
        let shaped = *schema == error
            || schema["oneOf"]
                .as_array()
                .is_some_and(|o| o.contains(&error));
        shaped && !r["description"].as_str().unwrap_or("").is_empty()
    }

    fn has_retry_after(doc: &Value, r: &Value) -> bool {
        resolve(doc, r)["headers"]["Retry-After"]["schema"]["type"] == "integer"
    }

    #[test]
    fn every_operation_documents_what_the_edge_answers() {
        let doc = serde_json::to_value(document()).unwrap();
        let ops = operations(&doc);
        assert!(ops.len() > 20, "{ops:?}");
        let mut protected = 0;
        for (name, op) in ops {
            let responses = &op["responses"];
            let status = |s: &str| &responses[s];
            // A NUL in any path or query parameter is refused before the handler, but
            // on the pages browsers are sent to, which show a page instead.
            let page = super::super::error::BROWSER_PAGES
                .contains(&name.split_once(' ').map_or("", |(_, p)| p));
            // The concurrency limit and the timeout wrap every route: a page says so
            // with a page, the API in its error shape.
            if page {
                let r = resolve(&doc, status("503"));
                assert!(r["content"]["text/html"].is_object(), "{name}: 503 {r}");
                assert!(
                    r["description"]
                        .as_str()
                        .is_some_and(|d| d.contains("try again")),
                    "{name}: 503 {r}"
                );
            } else {
                assert!(is_error_shape(&doc, status("503")), "{name}: 503");
            }
            assert!(
                has_retry_after(&doc, status("503")),
                "{name}: 503 Retry-After"
            );
            assert_eq!(status("422").is_null(), page, "{name}: 422");
            if op["requestBody"].is_object() {
                let edge: &[&str] = if page {
                    &["413"]
                } else {
                    &["400", "413", "422"]
                };
                for s in edge {
                    assert!(is_error_shape(&doc, status(s)), "{name}: {s}");
                }
            }
            let secured = op["security"]
                .as_array()
                .is_some_and(|s| s.iter().any(|r| r.get("api_key").is_some()));
            if secured {
                protected += 1;
                assert!(is_error_shape(&doc, status("401")), "{name}: 401");
                assert!(is_error_shape(&doc, status("429")), "{name}: 429");
                assert!(
                    has_retry_after(&doc, status("429")),
                    "{name}: 429 Retry-After"
                );
            } else if name != "GET /oauth/discord/callback"
                && name != "GET /access"
                && !name.starts_with("POST /access/")
            {
                assert!(
                    status("429").is_null(),
                    "{name} has no per-business rate limit"
                );
            } else {
                // The customer's callback and actions have their own limits, per link or
                // customer and per address.
                assert!(
                    has_retry_after(&doc, status("429")),
                    "{name}: 429 Retry-After"
                );
            }
        }
        assert!(protected > 20);
    }

    #[test]
    fn an_operations_own_503_keeps_its_content_and_gains_the_load_causes() {
        let doc = serde_json::to_value(document()).unwrap();
        let callback = &doc["paths"]["/discord/bot/callback"]["get"]["responses"]["503"];
        // The page Discord's outage shows, which is also the page load is refused
        // with.
        assert!(callback["content"]["text/html"].is_object(), "{callback}");
        assert!(!is_error_shape(&doc, callback), "{callback}");
        let text = callback["description"].as_str().unwrap();
        assert!(text.contains("Discord could not be asked"), "{text}");
        assert!(text.contains("too many requests at once"), "{text}");
        let roles = &doc["paths"]["/discord/guilds/{guild_id}/roles"]["get"]["responses"]["503"];
        assert!(
            roles["description"]
                .as_str()
                .unwrap()
                .contains("`discord_busy`"),
            "{roles}"
        );
    }

    #[test]
    fn paging_and_optional_bodies_are_documented_as_the_server_reads_them() {
        let doc = serde_json::to_value(document()).unwrap();
        let mut lists = 0;
        for (name, op) in operations(&doc) {
            for p in op["parameters"].as_array().into_iter().flatten() {
                let schema = &p["schema"];
                match p["name"].as_str().unwrap() {
                    "page_size" => {
                        lists += 1;
                        assert_eq!(
                            (&schema["minimum"], &schema["maximum"]),
                            (&1.into(), &MAX_PAGE_SIZE.into()),
                            "{name}"
                        );
                    }
                    "page_number" => {
                        assert_eq!(schema["maximum"], u32::MAX, "{name}");
                    }
                    _ => {}
                }
            }
        }
        assert!(lists >= 4, "{lists}");
        // An optional body is left out, never `null` (which every route refuses).
        let rotate = &doc["paths"]["/webhooks/{id}/secret/rotate"]["post"]["requestBody"];
        assert_eq!(rotate["required"], false, "{rotate}");
        assert_eq!(
            rotate["content"]["application/json"]["schema"]["$ref"],
            "#/components/schemas/RotateSecret",
            "{rotate}"
        );
    }
}
