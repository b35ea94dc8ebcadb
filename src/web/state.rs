//! What every handler can reach.

use std::sync::Arc;

use super::limits::Limits;
use super::pool::HttpPool;
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
    /// The HTTP handlers' own pool, each statement bounded by
    /// `database.http_statement_timeout` ([`crate::store::http_pool`]), its
    /// connections shared out among callers ([`super::pool`]).
    pub pool: HttpPool,
    /// Readiness's question to the database, on the pool of the process's work.
    pub database: Arc<crate::store::Probe>,
    pub broker: Broker,
    pub links: LinkBuilder,
    pub metrics: Arc<Metrics>,
    /// The bots: a business's own, or the shared one, each on this process's small side
    /// budget here (OAuth exchange, validation).
    pub bots: Bots,
    /// Encrypts customers' Discord tokens at rest.
    pub cipher: TokenCipher,
    /// Per-business and OAuth callback rate limits.
    pub limits: Arc<Limits>,
    /// The API keys that authenticated recently.
    pub keys: crate::web::api::auth::KnownKeys,
}
