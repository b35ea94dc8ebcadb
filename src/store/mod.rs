//! PostgreSQL: the pool, migrations, and the SQL of each aggregate in its own file.
//!
//! Queries are written as `&'static str` and checked by the integration tests against a
//! real database rather than by `sqlx::query!` macros: the macros would need a live
//! database or a checked-in `.sqlx` cache at build time, which CI and a fresh clone do
//! not have.

pub mod grants;
pub mod ingest;
pub mod outbox;
pub mod setup;

use secrecy::ExposeSecret;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, migrate::Migrator};
use std::str::FromStr;
use std::time::Duration;

use crate::config::DatabaseSettings;

/// Migrations embedded in the binary.
pub static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

/// A pool for `settings`. Connects lazily: a database that is down at start-up makes
/// the first query fail (and be retried), not the process.
pub fn pool(settings: &DatabaseSettings) -> Result<PgPool, sqlx::Error> {
    let opts =
        PgConnectOptions::from_str(settings.url.expose_secret())?.application_name("guildgate");
    Ok(PgPoolOptions::new()
        .max_connections(settings.max_connections)
        .acquire_timeout(Duration::from_secs(5))
        .connect_lazy_with(opts))
}

/// Creates the configured database if it does not exist (a fresh machine's first
/// `migrate` or `serve`), so a newcomer needs no manual `createdb`.
pub async fn ensure_database(settings: &DatabaseSettings) -> Result<(), sqlx::Error> {
    use sqlx::migrate::MigrateDatabase;
    let url = settings.url.expose_secret();
    if !sqlx::Postgres::database_exists(url).await? {
        tracing::info!("creating the database");
        sqlx::Postgres::create_database(url).await?;
    }
    Ok(())
}

pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    MIGRATOR.run(pool).await
}

/// One column of `rows`, for binding a batch as arrays to `unnest(...)`.
pub(crate) fn col<R, T>(rows: &[R], f: impl Fn(&R) -> T) -> Vec<T> {
    rows.iter().map(f).collect()
}

/// Whether a database error is worth retrying as is: the connection or the server
/// failed, or the transaction lost a race (serialization failure, deadlock, a unique
/// violation between concurrent inserters) that a retry resolves. Everything else is a
/// property of the data and will fail again.
pub fn is_transient(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => {
            let code = db.code();
            let code = code.as_deref().unwrap_or("");
            // 08: connection exception, 40: transaction rollback (40001, 40P01),
            // 53: insufficient resources, 57P: operator intervention (shutdown),
            // 23505: unique violation (a concurrent insert won; the retry sees it).
            code.starts_with("08")
                || code.starts_with("40")
                || code.starts_with("53")
                || code.starts_with("57P")
                || code == "23505"
        }
        _ => false,
    }
}
