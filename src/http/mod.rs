//! HTTP: routers per concern, merged in [`app`] behind the load limits of [`limits`];
//! the server itself is started by [`crate::app::App`].
//!
//! No handler holds a database connection while it waits for another peer (Discord, a
//! DNS lookup): it reads what it needs, gives the connection back, calls out, and takes
//! one again to write, checking there that what it read still holds. A slow Discord then
//! costs a waiting request nothing but its place under `http.max_concurrent_requests`,
//! and the pool stays with ingest, the relay, the syncer and delivery.

mod callback_texts;
pub mod limits;
pub mod oauth;
pub mod ops;

use std::sync::Arc;

use axum::Router;
use sqlx::PgPool;

use crate::amqp::Broker;
use crate::config::Settings;
use crate::crypto::TokenCipher;
use crate::discord::Bots;
use crate::grants::link::LinkBuilder;
use crate::metrics::Metrics;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub settings: Arc<Settings>,
    pub pool: PgPool,
    pub broker: Broker,
    pub links: LinkBuilder,
    pub metrics: Arc<Metrics>,
    /// The bots: a business's own, or the shared one, each on this process's small side
    /// budget here (OAuth exchange, validation).
    pub bots: Bots,
    /// Encrypts customers' Discord tokens at rest.
    pub cipher: TokenCipher,
    /// Per-business and OAuth callback rate limits.
    pub limits: Arc<limits::Limits>,
}

/// The whole HTTP surface, without a socket (tests call it directly too).
pub fn app(state: AppState) -> Router {
    let limit = state.settings.http.max_body_bytes;
    let settings = state.settings.clone();
    let router = Router::new()
        .merge(crate::api::router())
        .fallback(no_route)
        .method_not_allowed_fallback(wrong_method)
        .layer(axum::extract::DefaultBodyLimit::max(limit));
    limits::protect(router, &settings.http).with_state(state)
}

/// A path no route has: 404 in the API's error shape.
async fn no_route(method: axum::http::Method, uri: axum::http::Uri) -> crate::api::error::ApiError {
    crate::api::error::ApiError::NoRoute {
        method: method.to_string(),
        path: uri.path().to_string(),
        other_methods: false,
    }
}

/// A route's path with a method it does not take: 405 in the API's error shape.
async fn wrong_method(
    method: axum::http::Method,
    uri: axum::http::Uri,
) -> crate::api::error::ApiError {
    crate::api::error::ApiError::NoRoute {
        method: method.to_string(),
        path: uri.path().to_string(),
        other_methods: true,
    }
}
