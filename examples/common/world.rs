//! What the examples and the tests share: guildgate's settings that point at a
//! sandbox Discord, and removing a run's queues and exchanges. The examples and
//! `tests/common` include it with `#[path]`.
#![allow(dead_code)]

use guildgate::amqp::Names;
use guildgate::config::Settings;
use lapin::Channel;
use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use sandbox_discord::Sandbox;

/// The settings of a benchmark's own guildgate: its database, the broker, queues and
/// exchange named from `prefix`, and HTTP on `port` of 127.0.0.1.
pub fn bench_env(
    database_url: String,
    amqp_url: &str,
    prefix: &str,
    port: u16,
) -> Vec<(&'static str, String)> {
    vec![
        ("GUILDGATE_DATABASE__URL", database_url),
        ("GUILDGATE_AMQP__URL", amqp_url.to_string()),
        ("GUILDGATE_AMQP__QUEUE_PREFIX", prefix.to_string()),
        ("GUILDGATE_AMQP__EXCHANGE", format!("{prefix}.payments")),
        ("GUILDGATE_HTTP__ADDR", format!("127.0.0.1:{port}")),
        (
            "GUILDGATE_HTTP__PUBLIC_URL",
            format!("http://127.0.0.1:{port}"),
        ),
    ]
}

/// A run's own database and names on the servers the tests use
/// (`GUILDGATE_TEST_DATABASE_URL`, a URL without a database, and
/// `GUILDGATE_TEST_AMQP_URL`): the database, the broker's URL and the prefix of the
/// run's queues and exchange.
pub async fn bench_run() -> (Database, String, String) {
    let db_base = std::env::var("GUILDGATE_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into());
    let amqp_url = std::env::var("GUILDGATE_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let tag = guildgate::domain::ids::mint("r")
        .to_lowercase()
        .replace('_', "");
    let db = Database::new(&db_base, &format!("ggbench_{tag}")).await;
    (db, amqp_url, format!("ggbench-{tag}"))
}

/// `n` grants of `entitlement` (of `business`), delivered to as many members holding
/// `role` in `guild`: a large entitlement, written in one statement.
pub async fn seed_delivered_grants(
    pool: &sqlx::PgPool,
    business: &str,
    entitlement: &str,
    (guild, role): (&str, &str),
    n: usize,
) {
    sqlx::query(
        "INSERT INTO grants (id, business_id, brand_id, entitlement_id, customer_id,
             payment_id, status, delivered_at, oauth_nonce, oauth_expires_at,
             applied_user_id, applied_guild_id, applied_role_id)
         SELECT 'grant_m' || i, $1, 'brd_1', $2, 'cus_' || i, 'pay_' || i, 'Delivered',
             now(), 'nonce' || i, now() + interval '7 days', (100000 + i)::text, $3, $4
         FROM generate_series(1, $5) AS i",
    )
    .bind(business)
    .bind(entitlement)
    .bind(guild)
    .bind(role)
    .bind(i64::try_from(n).expect("a count of grants"))
    .execute(pool)
    .await
    .unwrap();
    sqlx::query("ANALYZE grants").execute(pool).await.unwrap();
}

/// A connection to the server at `base` (a URL without a database), to its `postgres`
/// database: what creates and drops a benchmark's databases.
async fn admin(base: &str) -> Result<sqlx::PgConnection, sqlx::Error> {
    use sqlx::Connection as _;
    sqlx::PgConnection::connect(&format!("{base}/postgres")).await
}

/// A database of a run's own on the server at `base` (a URL without a database),
/// dropped with it: by [`Database::drop_db`] at the end of the run, or when the value
/// goes (a run or test that panicked), so no failure leaves one behind.
pub struct Database {
    pub name: String,
    pub url: String,
    base: String,
    dropped: std::sync::atomic::AtomicBool,
}

impl Database {
    /// Creates database `name`.
    pub async fn new(base: &str, name: &str) -> Database {
        Self::run_create(base, name, format!("CREATE DATABASE {name}")).await
    }

    /// Creates database `name` as a copy of `template` (a database nobody is connected
    /// to): a benchmark seeds one database once and gives each round a copy of it.
    pub async fn copy(base: &str, name: &str, template: &str) -> Database {
        Self::run_create(
            base,
            name,
            format!("CREATE DATABASE {name} TEMPLATE {template}"),
        )
        .await
    }

    async fn run_create(base: &str, name: &str, create: String) -> Database {
        use sqlx::Connection as _;
        let mut admin = admin(base)
            .await
            .expect("PostgreSQL must be running (see README)");
        sqlx::query(sqlx::AssertSqlSafe(create.clone()))
            .execute(&mut admin)
            .await
            .unwrap_or_else(|e| panic!("{create}: {e}"));
        // A copy is written to the WAL, and an idle backend reports its WAL statistics
        // up to ten seconds late: closed, it reports them now, before anything is
        // measured.
        let _ = admin.close().await;
        Database {
            name: name.to_string(),
            url: format!("{base}/{name}"),
            base: base.to_string(),
            dropped: Default::default(),
        }
    }

    /// Drops the database, once. Best effort: a run's figures are printed whether or
    /// not it goes, and a server that is gone (a test killed it) took it along.
    pub async fn drop_db(&self) {
        if self.dropped.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        let Ok(mut admin) = admin(&self.base).await else {
            return;
        };
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        )))
        .execute(&mut admin)
        .await;
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        if *self.dropped.get_mut() {
            return;
        }
        let db = Database {
            name: std::mem::take(&mut self.name),
            url: std::mem::take(&mut self.url),
            base: std::mem::take(&mut self.base),
            dropped: Default::default(),
        };
        *self.dropped.get_mut() = true;
        block_on_aside(async move { db.drop_db().await });
    }
}

/// Runs `work` to its end (for up to 20 s) from a `Drop`, which may run inside a
/// runtime that cannot be blocked on: on a thread and a runtime of its own.
pub fn block_on_aside(work: impl std::future::Future<Output = ()> + Send + 'static) {
    let _ = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(20), work).await;
        });
    })
    .join();
}

/// The `GUILDGATE_DISCORD__*` settings that point guildgate at `sandbox`.
pub fn sandbox_env(sandbox: &Sandbox) -> Vec<(&'static str, String)> {
    vec![
        ("GUILDGATE_DISCORD__API_BASE", sandbox.api_base()),
        ("GUILDGATE_DISCORD__AUTHORIZE_URL", sandbox.authorize_url()),
        (
            "GUILDGATE_DISCORD__CLIENT_ID",
            sandbox.client_id().to_string(),
        ),
        (
            "GUILDGATE_DISCORD__CLIENT_SECRET",
            sandbox.client_secret().to_string(),
        ),
        (
            "GUILDGATE_DISCORD__BOT_TOKEN",
            sandbox.bot_token().to_string(),
        ),
    ]
}

/// Deletes every queue and exchange of `settings`' topology (best effort).
pub async fn delete_topology(ch: &Channel, settings: &Settings) {
    let names = Names::from_settings(settings);
    for q in guildgate::amqp::topology::all_queues(&names, settings) {
        let _ = ch
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    for ex in [settings.amqp.exchange.clone(), names.dead_letter_exchange()] {
        let _ = ch
            .exchange_delete(ex.as_str().into(), ExchangeDeleteOptions::default())
            .await;
    }
}

/// Links `customer` of `business` to the sandbox user `user` as the OAuth callback
/// would: a fresh token pair (issued to `app`, or to the shared application), sealed
/// with `cipher` for the customer's row.
#[allow(clippy::too_many_arguments)]
pub async fn link_user(
    conn: &mut sqlx::PgConnection,
    sandbox: &Sandbox,
    cipher: &guildgate::crypto::TokenCipher,
    business: &str,
    app: Option<&sandbox_discord::AppCredentials>,
    customer: &str,
    user: u64,
    now: chrono::DateTime<chrono::Utc>,
) {
    use guildgate::store::links::{LinkRow, SealedTokens, upsert_link};
    let scopes = ["identify", "guilds.join"];
    let t = match app {
        None => sandbox.issue_token(user, &scopes),
        Some(a) => sandbox.issue_token_for(a.client_id, user, &scopes),
    };
    let link = LinkRow::new(
        business,
        customer,
        user.to_string(),
        SealedTokens::seal(
            cipher,
            business,
            customer,
            &t.access_token.clone().into(),
            Some(&t.refresh_token.clone().into()),
        ),
        now + chrono::Duration::from_std(t.expires_in).expect("a token's lifetime"),
        t.scope.clone(),
    )
    .issued_by(app.map(|a| a.client_id.to_string()));
    upsert_link(conn, &link, None, now)
        .await
        .expect("link stored");
}

/// A customer of `business` who already authorized Discord (a sandbox user whose tokens,
/// issued to `app` or to the shared application, are stored), with a grant of
/// `entitlement` and its sync job queued, in `tx`; returns the grant's id.
#[allow(clippy::too_many_arguments)]
pub async fn linked_grant(
    tx: &mut sqlx::PgConnection,
    sandbox: &Sandbox,
    cipher: &guildgate::crypto::TokenCipher,
    business: &str,
    app: Option<&sandbox_discord::AppCredentials>,
    customer: &str,
    entitlement: &str,
    payment: &str,
) -> String {
    let now = chrono::Utc::now();
    let user = sandbox.add_user(sandbox_discord::UserSpec::new(format!(
        "{business}-{customer}"
    )));
    link_user(
        &mut *tx, sandbox, cipher, business, app, customer, user, now,
    )
    .await;
    let g = guildgate::store::grants::insert(
        &mut *tx,
        guildgate::store::grants::NewGrant {
            business_id: business,
            brand_id: business,
            entitlement_id: entitlement,
            customer_id: customer,
            payment_id: Some(payment),
            subscription_id: None,
            oauth_nonce: "n_linked",
            oauth_expires_at: now + chrono::Duration::days(7),
            now,
        },
    )
    .await
    .expect("grant stored");
    guildgate::outbox::queue_sync(&mut *tx, &g.id)
        .await
        .expect("sync queued");
    g.id
}

/// Prints `usage` and exits when the command line asks for help (`--help`, `-h`).
pub fn help(usage: &str) {
    if std::env::args().skip(1).any(|a| a == "--help" || a == "-h") {
        println!("{}", usage.trim());
        std::process::exit(0);
    }
}
