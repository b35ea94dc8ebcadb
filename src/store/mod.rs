//! PostgreSQL: the pool, migrations, and the SQL of each aggregate in its own file.
//!
//! Queries are written as `&'static str` and checked by the integration tests against a
//! real database rather than by `sqlx::query!` macros: the macros would need a live
//! database or a checked-in `.sqlx` cache at build time, which CI and a fresh clone do
//! not have.

pub mod access;
pub mod api_keys;
pub mod applications;
pub mod backfill;
pub mod budget;
pub mod businesses;
pub mod email;
pub mod endpoints;
pub mod entitlements;
pub mod grants;
pub mod guilds;
pub mod history;
pub mod holdings;
pub mod ingest;
pub mod links;
pub mod messages;
pub mod moves;
pub mod outbox;
pub mod reconcile;
pub mod stops;
pub mod sync_parking;
pub mod translations;

/// A page of a list: `LIMIT`/`OFFSET` from `page_size`/`page_number`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Page {
    pub limit: i64,
    pub offset: i64,
}

use secrecy::ExposeSecret;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgConnection, PgPool, migrate::Migrator};
use std::str::FromStr;
use std::time::Duration;

use crate::config::DatabaseSettings;

/// Migrations embedded in the binary.
pub static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

/// The pool of the process's work (ingest, the relay, the syncer, delivery, the
/// timers). Connects lazily: a database that is down at start-up makes the first query
/// fail (and be retried), not the process.
pub fn pool(settings: &DatabaseSettings) -> Result<PgPool, sqlx::Error> {
    let opts = connect_options(settings, "guildgate")?;
    Ok(lazy_pool(opts, settings.max_connections))
}

/// The configured database's connect options, its connections named `name` in
/// `pg_stat_activity`.
fn connect_options(
    settings: &DatabaseSettings,
    name: &str,
) -> Result<PgConnectOptions, sqlx::Error> {
    Ok(PgConnectOptions::from_str(settings.url.expose_secret())?.application_name(name))
}

/// A pool of at most `max` connections, connected as it needs them, that waits at most
/// 5 s for one.
fn lazy_pool(opts: PgConnectOptions, max: u32) -> PgPool {
    PgPoolOptions::new()
        .max_connections(max)
        .acquire_timeout(Duration::from_secs(5))
        .connect_lazy_with(opts)
}

/// The HTTP handlers' pool (`database.http_max_connections`), apart from [`pool`]: however
/// many requests merchants and customers send, and however slow their statements, they
/// wait for these connections and never for one that ingest or delivery needs. Each
/// statement on it is cancelled by PostgreSQL after `database.http_statement_timeout`
/// (SQLSTATE 57014, see [`is_statement_timeout`]), so no request holds a connection for
/// long. Its connections are named `guildgate-http` in `pg_stat_activity`.
pub fn http_pool(settings: &DatabaseSettings) -> Result<PgPool, sqlx::Error> {
    let timeout_ms = settings
        .http_statement_timeout
        .as_millis()
        .max(1)
        .to_string();
    let opts = connect_options(settings, "guildgate-http")?
        .options([("statement_timeout", timeout_ms.as_str())]);
    Ok(lazy_pool(opts, settings.http_max_connections))
}

/// Whether PostgreSQL cancelled a statement that ran past its `statement_timeout`.
pub fn is_statement_timeout(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Database(db) if db.code().as_deref() == Some("57014"))
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

/// Why the database's schema is not the one this binary was built with.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("reading the applied migrations: {0}")]
    Db(#[from] sqlx::Error),
    #[error(
        "the database lacks migration {version} ({description}): run `guildgate migrate` of this release first"
    )]
    Missing { version: i64, description: String },
    #[error(
        "the database has migration {version} ({description}), which this guildgate does not know: a newer release migrated it; run that release"
    )]
    Unknown { version: i64, description: String },
}

/// Checks that the database has exactly this binary's migrations applied, for `serve
/// --no-migrate` (where a separate step migrates): a replica must not run against a
/// schema older or newer than its own, whose tables and columns it would misread.
pub async fn check_schema(pool: &PgPool) -> Result<(), SchemaError> {
    let mut conn = pool.acquire().await?;
    let has_table: bool = sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
        .fetch_one(&mut *conn)
        .await?;
    let applied: Vec<(i64, String)> = if has_table {
        sqlx::query_as(
            "SELECT version, description FROM _sqlx_migrations WHERE success ORDER BY version",
        )
        .fetch_all(&mut *conn)
        .await?
    } else {
        Vec::new()
    };
    let known: Vec<(i64, String)> = MIGRATOR
        .iter()
        .map(|m| (m.version, m.description.to_string()))
        .collect();
    compare_migrations(&applied, &known)
}

/// The first difference between the applied and the known migrations (by version).
fn compare_migrations(
    applied: &[(i64, String)],
    known: &[(i64, String)],
) -> Result<(), SchemaError> {
    use std::collections::HashSet;
    let applied_versions: HashSet<i64> = applied.iter().map(|(v, _)| *v).collect();
    let known_versions: HashSet<i64> = known.iter().map(|(v, _)| *v).collect();
    if let Some((version, description)) = applied.iter().find(|(v, _)| !known_versions.contains(v))
    {
        return Err(SchemaError::Unknown {
            version: *version,
            description: description.clone(),
        });
    }
    if let Some((version, description)) = known.iter().find(|(v, _)| !applied_versions.contains(v))
    {
        return Err(SchemaError::Missing {
            version: *version,
            description: description.clone(),
        });
    }
    Ok(())
}

/// One column of `rows`, for binding a batch as arrays to `unnest(...)`.
pub(crate) fn col<'a, R, T>(rows: &'a [R], f: impl Fn(&'a R) -> T) -> Vec<T> {
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

/// Whether a database error is a unique violation (23505): transient when a concurrent
/// insert won a race (a retry sees its row), permanent when the data always collides.
pub fn is_unique_violation(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Database(db) if db.code().as_deref() == Some("23505"))
}

/// Whether the database answers a query now.
pub async fn answers(pool: &PgPool) -> bool {
    sqlx::query("SELECT 1").execute(pool).await.is_ok()
}

/// Whether the database answers, as readiness asks it: on the pool of the process's
/// work (requests holding every HTTP connection do not make a replica unready), one
/// query at a time, and an answer younger than [`Probe::FRESH`] given again. However
/// often `/readyz` is called, and by whom, it takes at most one connection of that pool.
#[derive(Debug)]
pub struct Probe {
    pool: PgPool,
    last: tokio::sync::Mutex<Option<(std::time::Instant, bool)>>,
}

impl Probe {
    /// How long an answer is given again.
    pub const FRESH: Duration = Duration::from_secs(1);

    pub fn new(pool: PgPool) -> Self {
        Probe {
            pool,
            last: tokio::sync::Mutex::new(None),
        }
    }

    /// Whether the database answered a query at most [`Probe::FRESH`] ago.
    pub async fn answers(&self) -> bool {
        // Held across the query: callers meanwhile wait for its answer, not a connection.
        let mut last = self.last.lock().await;
        if let Some((at, ok)) = *last
            && at.elapsed() < Self::FRESH
        {
            return ok;
        }
        let ok = answers(&self.pool).await;
        *last = Some((std::time::Instant::now(), ok));
        ok
    }
}

/// Takes a session-level advisory lock (two-key form) on `conn` without waiting:
/// `false` when another session holds it. It lasts until [`session_unlock`] or until the
/// connection closes, also when the process dies.
pub async fn try_session_lock(
    conn: &mut PgConnection,
    key: (i32, i32),
) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT pg_try_advisory_lock($1, $2)")
        .bind(key.0)
        .bind(key.1)
        .fetch_one(conn)
        .await
}

/// Releases a lock [`try_session_lock`] took on `conn`.
pub async fn session_unlock(conn: &mut PgConnection, key: (i32, i32)) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_advisory_unlock($1, $2)")
        .bind(key.0)
        .bind(key.1)
        .execute(conn)
        .await
        .map(|_| ())
}

/// A duration as PostgreSQL's `interval` (microseconds; a duration beyond them is the
/// longest interval).
pub fn pg_interval(d: std::time::Duration) -> sqlx::postgres::types::PgInterval {
    sqlx::postgres::types::PgInterval {
        months: 0,
        days: 0,
        microseconds: i64::try_from(d.as_micros()).unwrap_or(i64::MAX),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(v: &[i64]) -> Vec<(i64, String)> {
        v.iter().map(|v| (*v, format!("m{v}"))).collect()
    }

    #[test]
    fn only_the_store_runs_sql() {
        let files = crate::tests::sources_outside("store");
        // `sqlx::query` also covers `query_as`, `query_scalar` and their `_with` forms.
        let calls = ["sqlx::query", "sqlx::raw_sql", "QueryBuilder"];
        for (path, text) in files {
            for call in &calls {
                assert!(
                    !text.contains(call),
                    "src/{} calls {call}: SQL belongs in src/store",
                    path.display()
                );
            }
        }
    }

    /// The store sits under everything that uses it: its code (doc links aside) names
    /// no module of guildgate but the domain and the leaves it needs (settings, token
    /// sealing), so no import goes from the store back up.
    #[test]
    fn the_store_imports_nothing_above_it() {
        // `tests`: the layout tests' helpers, which exist in test builds only.
        let allowed = ["store", "domain", "config", "crypto", "tests"];
        let files = crate::tests::sources("store");
        let read = files.len();
        for (path, text) in files {
            for line in text.lines().filter(|l| !l.trim_start().starts_with("//")) {
                for module in crate::tests::crate_modules(line) {
                    assert!(
                        allowed.contains(&module.as_str()),
                        "src/{} uses crate::{module}: the store may use only {allowed:?}",
                        path.display()
                    );
                }
            }
        }
        assert!(read > 20, "read only {read} files");
    }

    #[test]
    fn the_schema_must_have_exactly_the_known_migrations() {
        assert!(compare_migrations(&m(&[1, 2, 3]), &m(&[1, 2, 3])).is_ok());
        assert!(matches!(
            compare_migrations(&m(&[1, 2]), &m(&[1, 2, 3])),
            Err(SchemaError::Missing { version: 3, .. })
        ));
        assert!(matches!(
            compare_migrations(&m(&[]), &m(&[1, 2])),
            Err(SchemaError::Missing { version: 1, .. })
        ));
        // A newer release's migration is named before anything missing.
        assert!(matches!(
            compare_migrations(&m(&[1, 4]), &m(&[1, 2])),
            Err(SchemaError::Unknown { version: 4, .. })
        ));
    }

    #[test]
    fn the_embedded_migrations_are_the_ones_in_the_folder() {
        let files = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations"))
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "sql"))
            })
            .count();
        assert_eq!(MIGRATOR.iter().count(), files);
    }
}
