//! The web: every HTTP route guildgate serves, merged in [`app`] behind the load limits
//! of [`limits`]; the server itself is started by [`crate::app::App`].
//!
//! - [`state`]: [`AppState`], what every handler can reach.
//! - [`api`]: the merchant REST API, one file per resource.
//! - [`oauth`] (the customer's OAuth callback) and [`access`] (the customer's access
//!   page); [`accounts`]: linking a customer's Discord account, which both do.
//! - [`ops`]: health, readiness, metrics.
//! - [`error`]: the one error shape of every JSON answer; [`limits`]: rate and load
//!   limits, the client's address.
//! - [`pool`]: the handlers' database pool, its connections shared out among
//!   businesses and client networks.
//! - [`openapi`]: every route, registered through its handler's annotation, and the
//!   document they make (`GET /openapi.json`).
//!
//! Imports go one way: this module and [`openapi`] assemble the routers; the routers
//! import [`state`], [`error`], [`limits`], [`pool`] and [`accounts`], never this module or each
//! other (the OAuth callback hands an account switch to [`access`]).
//!
//! No handler holds a database connection while it waits for another peer (Discord, a
//! DNS lookup): it reads what it needs, gives the connection back, calls out, and takes
//! one again to write, checking there that what it read still holds. A slow Discord then
//! costs a waiting request nothing but its place under `http.max_concurrent_requests`.
//! Handlers draw from a pool of their own ([`AppState::pool`], each statement bounded by
//! `database.http_statement_timeout`, each connection taken for a [`pool::Caller`]),
//! not from the one of ingest, the relay, the syncer and delivery; only the Discord budget's slot leases ([`AppState::bots`]) and
//! readiness ([`AppState::database`]) use that one, a short statement each.

pub mod access;
pub mod accounts;
pub mod api;
mod callback_texts;
pub mod error;
pub mod limits;
pub mod oauth;
pub mod openapi;
pub mod ops;
pub mod pool;
pub mod state;

use axum::Router;

pub use state::AppState;

/// The whole HTTP surface, without a socket (tests call it directly too).
pub fn app(state: AppState) -> Router {
    let limit = state.settings.http.max_body_bytes;
    let settings = state.settings.clone();
    let router = Router::new()
        .merge(openapi::router().layer(axum::middleware::from_fn(error::refuse_bad_params)))
        .fallback(no_route)
        .method_not_allowed_fallback(wrong_method)
        .layer(axum::extract::DefaultBodyLimit::max(limit));
    limits::protect(router, &settings.http, access::try_again_page).with_state(state)
}

/// A path no route has: 404 in the API's error shape.
async fn no_route(method: axum::http::Method, uri: axum::http::Uri) -> error::ApiError {
    error::ApiError::NoRoute {
        method: method.to_string(),
        path: uri.path().to_string(),
        other_methods: false,
    }
}

/// A route's path with a method it does not take: 405 in the API's error shape.
async fn wrong_method(method: axum::http::Method, uri: axum::http::Uri) -> error::ApiError {
    error::ApiError::NoRoute {
        method: method.to_string(),
        path: uri.path().to_string(),
        other_methods: true,
    }
}
