//! Operations endpoints: `/healthz` (the process is alive), `/readyz` (database and
//! broker reachable, topology declared), `/metrics` (Prometheus text format).

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;

/// The routes, documented in `/openapi.json` under the `operations` tag.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .routes(routes!(metrics))
}

/// `/healthz`'s answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct Alive {
    /// Always `ok`.
    #[schema(pattern = "^ok$")]
    status: &'static str,
}

/// `/readyz`'s answer: what this process can reach.
#[derive(Debug, Serialize, ToSchema)]
pub struct Readiness {
    /// A query on the database succeeded.
    database: bool,
    /// The broker connection is open and the topology declared.
    broker: bool,
}

/// Liveness: the process answers HTTP. Asks nothing of the database or broker, so a
/// restart is never triggered by their outage.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "The process is alive", body = Alive)))]
async fn healthz() -> Json<Alive> {
    Json(Alive { status: "ok" })
}

/// Readiness: the database answers a query and the broker connection is up. A load
/// balancer sends traffic only while this is 200. The query goes through the pool of the
/// process's work, not the HTTP handlers' (requests holding every HTTP connection do not
/// take the replica out), one at a time, and its answer holds for a second
/// ([`crate::store::Probe`]): a flood of calls takes at most one of that pool's
/// connections.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses(
        (status = 200, description = "Database and broker reachable", body = Readiness),
        (status = 503, description = "The database or the broker is not reachable; the body says which", body = Readiness),
    ))]
async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Readiness>) {
    let database = state.database.answers().await;
    let broker = state.broker.is_ready();
    let status = if database && broker {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(Readiness { database, broker }))
}

/// Prometheus metrics of this process, in the OpenMetrics text format. The metrics are
/// listed in `docs/operations.md`.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Metrics (OpenMetrics text)",
        content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8", body = String)))]
async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(),
    )
}
