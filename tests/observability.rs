//! Observability end to end: a full flow (checkout → OAuth → delivered → webhook) and then
//! `/metrics` scraped over HTTP, `/healthz` and `/readyz` (also with the database cut),
//! and the JSON logs of the run searched for every secret and token involved.
//!
//! Every test of this binary logs into one in-memory buffer, in the JSON format of
//! `GUILDGATE_LOG__FORMAT=json`, at `trace` for guildgate.

use crate::common;
use crate::discord_world;

use std::io::Write;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::http::StatusCode;
use common::events::*;
use common::proxy::Proxy;
use common::{TestApp, TestConfig, wait_for};
use discord_world::World;
use guildgate::domain::ids::BusinessId;
use guildgate::webhooks::endpoints::{self, NewEndpoint};
use guildgate::webhooks::ssrf::TargetPolicy;
use sandbox_discord::ForcedRateLimit;
use secrecy::ExposeSecret;

const T0: &str = "2026-05-01T10:31:00Z";
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// The log lines of this test binary.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// Installs the JSON subscriber (as `telemetry::init(LogFormat::Json)` does, but into a
/// buffer): the process's one subscriber, so the test reading it runs [`alone`].
fn logs() -> Captured {
    static LOGS: OnceLock<Captured> = OnceLock::new();
    LOGS.get_or_init(|| {
        let c = Captured::default();
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(
                "info,guildgate=trace,sqlx=warn,lapin=warn,amq_protocol=warn,sandbox_discord=off",
            ))
            .with_writer(c.clone())
            .json()
            .flatten_event(true)
            .try_init()
            .expect("the only subscriber of its process: run this test alone");
        c
    })
    .clone()
}

/// A merchant's receiver that accepts everything.
async fn receiver() -> (String, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move || {
            let h = h.clone();
            async move {
                h.fetch_add(1, Ordering::SeqCst);
                StatusCode::NO_CONTENT
            }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, hits)
}

/// The sum of the samples of `name` whose labels contain every one of `labels`
/// (`key="value"`); `None` if there is no such series.
fn sample(metrics: &str, name: &str, labels: &[&str]) -> Option<f64> {
    let mut found = None;
    for line in metrics.lines().filter(|l| !l.starts_with('#')) {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        if !(rest.starts_with('{') || rest.starts_with(' ')) {
            continue;
        }
        if !labels.iter().all(|l| rest.contains(l)) {
            continue;
        }
        let v: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        *found.get_or_insert(0.0) += v;
    }
    found
}

async fn scrape(addr: SocketAddr) -> String {
    let r = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.text().await.unwrap()
}

fn addr_of(url: &str) -> SocketAddr {
    let u = url::Url::parse(url).unwrap();
    (u.host_str().unwrap(), u.port_or_known_default().unwrap())
        .to_socket_addrs()
        .unwrap()
        .next()
        .unwrap()
}

/// Runs the ignored test `name` of this module alone, in a process of its own (this
/// test binary started again for it): it reads every log line of its process, and the
/// other tests of the binary share theirs.
fn alone(name: &str) {
    let out = std::process::Command::new(std::env::current_exe().expect("own path"))
        .args(["--exact", &format!("observability::{name}")])
        .args(["--ignored", "--test-threads=1"])
        .output()
        .expect("the test binary starts");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "{name}, run alone:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_full_flow_is_measured_and_logged_without_secrets() {
    alone("full_flow_alone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run alone, in a process of its own, by a_full_flow_is_measured_and_logged_without_secrets"]
async fn full_flow_alone() {
    let logs = logs();
    let w = World::start().await;
    let g = w.guild("Acme Community");
    let role = g.role("Patrons");
    let alice = w.user("alice");
    let biz = w.app.business();
    let ent = w
        .app
        .entitlement_for("pdt_obs", &g.guild_id.to_string(), Some(&role.to_string()))
        .await;
    let (url, hits) = receiver().await;
    let api_key = {
        let mut conn = w.app.pool.acquire().await.unwrap();
        endpoints::create(
            &mut conn,
            &biz,
            NewEndpoint {
                url,
                description: None,
                filter_types: None,
                secret: Some(SECRET.into()),
                ..NewEndpoint::default()
            },
            TargetPolicy {
                allow_private: true,
            },
        )
        .await
        .unwrap();
        let (_, key) = guildgate::web::api::auth::create_api_key(
            &mut conn,
            &BusinessId::parse(biz.clone()).unwrap(),
            Some("observability"),
        )
        .await
        .unwrap();
        key.expose_secret().to_string()
    };

    w.app
        .publish(&payment(&biz, "pay_1", "cus_1", &["pdt_obs"], T0), "evt_1")
        .await;
    let grant = w.grant_of("cus_1").await;
    // The merchant reads the grant through the API with its key.
    let r = w
        .http
        .get(format!(
            "http://{}/entitlements/{ent}/grants/{}",
            w.app.addr, grant.id
        ))
        .bearer_auth(&api_key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Discord answers the next bot request with a global 429 (waited out in the client).
    w.sandbox
        .force_rate_limit(ForcedRateLimit::global(1).retry_after(Duration::from_millis(300)));
    let (status, page) = w.authorize(&grant, alice).await;
    assert_eq!(status, 200, "{page}");
    w.wait_status(&grant.id, "Delivered").await;
    assert!(w.has_role(g.guild_id, alice, role));
    // created + delivered reach the receiver.
    wait_for("two webhooks", || async {
        (hits.load(Ordering::SeqCst) >= 2).then_some(())
    })
    .await;

    // /metrics over HTTP. Counters are settled just after the effects are visible, so
    // wait for the last of them.
    let m = wait_for("webhook attempts in /metrics", || async {
        let m = scrape(w.app.addr).await;
        (sample(
            &m,
            "guildgate_webhook_attempts_total",
            &["outcome=\"delivered\""],
        )
        .unwrap_or(0.0)
            >= 2.0)
            .then_some(m)
    })
    .await;
    let positive = |name: &str, labels: &[&str]| {
        let v = sample(&m, name, labels)
            .unwrap_or_else(|| panic!("no series {name} {labels:?} in\n{m}"));
        assert!(v > 0.0, "{name} {labels:?} is {v}\n{m}");
    };
    positive(
        "guildgate_events_total",
        &["type=\"payment.succeeded\"", "outcome=\"applied\""],
    );
    positive("guildgate_event_batch_seconds_count", &[]);
    positive("guildgate_outbox_relayed_total", &[]);
    positive("guildgate_discord_syncs_total", &["outcome=\"delivered\""]);
    positive(
        "guildgate_discord_requests_total",
        &[
            "route=\"PUT /guilds/:guild/members/:user\"",
            "status=\"201\"",
        ],
    );
    positive("guildgate_discord_requests_total", &["status=\"429\""]);
    positive("guildgate_discord_requests_total", &["status=\"200\""]);
    positive("guildgate_discord_invalid_requests_10m", &[]);
    positive("guildgate_webhook_seconds_count", &[]);
    for gauge in [
        "guildgate_outbox_backlog",
        "guildgate_outbox_lag_seconds",
        "guildgate_entitlement_moves",
    ] {
        assert!(sample(&m, gauge, &[]).is_some(), "no {gauge} in\n{m}");
    }
    // The sampler's first round runs at start.
    for q in w
        .app
        .names
        .work_queues()
        .into_iter()
        .chain(w.app.names.dead_queues())
    {
        let label = format!("queue=\"{q}\"");
        assert!(
            sample(&m, "guildgate_queue_depth", &[&label]).is_some(),
            "no depth of {q} in\n{m}"
        );
    }

    let link = {
        let mut conn = w.app.pool.acquire().await.unwrap();
        guildgate::store::links::link_of(&mut conn, &w.app.business(), "cus_1")
            .await
            .unwrap()
            .unwrap()
    };
    let settings = w.app.settings.clone();
    let cipher = settings.token_cipher().unwrap();
    let access = link
        .access_token(&cipher)
        .unwrap()
        .expose_secret()
        .to_string();
    let refresh = link
        .refresh_token(&cipher)
        .unwrap()
        .unwrap()
        .expose_secret()
        .to_string();
    let secrets = [
        ("bot token", w.sandbox.bot_token().to_string()),
        ("client secret", w.sandbox.client_secret().to_string()),
        ("customer access token", access),
        ("customer refresh token", refresh),
        ("webhook secret", SECRET.to_string()),
        // The part of the secret that is the HMAC key.
        ("webhook signing key", SECRET["whsec_".len()..].to_string()),
        ("API key", api_key),
        (
            "state signing key",
            settings
                .secrets
                .state_signing_key
                .expose_secret()
                .to_string(),
        ),
        (
            "token encryption key",
            settings
                .secrets
                .token_encryption_key
                .expose_secret()
                .to_string(),
        ),
    ];
    w.stop().await;

    let text = logs.text();
    assert!(!text.is_empty(), "nothing was logged");
    for line in text.lines() {
        serde_json::from_str::<serde_json::Value>(line)
            .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
    }
    for (what, secret) in &secrets {
        assert!(secret.len() >= 16, "{what} is too short to search for");
        assert!(
            !text.contains(secret.as_str()),
            "the logs contain the {what}"
        );
    }
    // Grant ids travel in the spans of the syncer.
    let in_span = format!("\"grant_id\":\"{}\"", grant.id);
    assert!(
        text.lines()
            .any(|l| l.contains("\"discord_sync\"") && l.contains(&in_span)),
        "no log line in a discord_sync span of {}",
        grant.id
    );
    assert!(
        text.contains("\"event_ids\":\"evt_1"),
        "no log line in an event batch span naming evt_1"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_types_from_messages_do_not_become_metric_series() {
    let mut app = TestApp::spawn_ingest().await;
    let b = app.business();
    // A type guildgate does not act on, on a key the `subscription.#` binding lets in:
    // acknowledged and ignored.
    let mut made_up = subscription("active", &b, "sub_1", "cus_1", "pdt_x", "active", T0);
    made_up["type"] = serde_json::json!("subscription.made_up_type_1");
    app.publish(&made_up, "m1").await;
    // A key whose type disagrees: dead-lettered, counted by its routing key.
    let body = serde_json::to_vec(&made_up).unwrap();
    app.publish_raw("subscription.made_up_key_2", &body, Some("m2"))
        .await;
    // A type guildgate acts on keeps its own label.
    app.publish(&payment(&b, "pay_1", "cus_1", &["pdt_nothing"], T0), "m3")
        .await;

    let m = wait_for("the three events in /metrics", || async {
        let m = scrape(app.addr).await;
        (sample(
            &m,
            "guildgate_events_total",
            &["type=\"other\"", "outcome=\"ignored\""],
        ) == Some(1.0)
            && sample(
                &m,
                "guildgate_events_total",
                &["type=\"other\"", "outcome=\"dead_lettered\""],
            ) == Some(1.0)
            && sample(
                &m,
                "guildgate_events_total",
                &["type=\"payment.succeeded\"", "outcome=\"irrelevant\""],
            ) == Some(1.0))
        .then_some(m)
    })
    .await;
    assert!(!m.contains("made_up"), "{m}");
    let _ = app.shutdown().await;
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_and_readyz_follow_the_database() {
    let pg = Proxy::start(addr_of(&common::database_base_url())).await;
    let mut app = TestApp::spawn_with(TestConfig {
        db_via: Some(pg.addr),
        ..TestConfig::default()
    })
    .await;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let get = |path: &'static str| {
        let (http, addr) = (http.clone(), app.addr);
        async move {
            let r = http
                .get(format!("http://{addr}{path}"))
                .send()
                .await
                .unwrap();
            (
                r.status().as_u16(),
                r.json::<serde_json::Value>().await.unwrap(),
            )
        }
    };
    assert_eq!(get("/healthz").await.0, 200);
    let (status, body) = wait_for("ready", || async {
        let r = get("/readyz").await;
        (r.0 == 200).then_some(r)
    })
    .await;
    assert_eq!(status, 200);
    assert_eq!(body["database"], true);
    assert_eq!(body["broker"], true);

    pg.cut();
    // The last answer holds for a second.
    let (status, body) = wait_for("not ready", || async {
        let r = get("/readyz").await;
        (r.0 != 200).then_some(r)
    })
    .await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["database"], false);
    assert_eq!(body["broker"], true);
    assert_eq!(get("/healthz").await.0, 200, "still alive");

    pg.restore();
    wait_for("ready again", || async {
        (get("/readyz").await.0 == 200).then_some(())
    })
    .await;
    let _ = app.shutdown().await;
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_without_migrating_refuses_a_schema_it_was_not_built_for() {
    use guildgate::app::{App, Options, StartError};
    use guildgate::store::{self, SchemaError};
    let _ = rustls::crypto::ring::default_provider().install_default();
    let db = common::TestDb::create().await;
    let settings = common::TestApp::settings_for(&db, &common::TestConfig::default(), 0);
    let options = Options {
        migrate: false,
        ..Options::default()
    };
    let refusal = |r: Result<App, StartError>| match r {
        Ok(_) => panic!("started against the wrong schema"),
        Err(StartError::Schema(e)) => e,
        Err(e) => panic!("refused for another reason: {e}"),
    };

    // Never migrated.
    let e = refusal(App::build(settings.clone(), options.clone()).await);
    assert!(matches!(e, SchemaError::Missing { version: 1, .. }), "{e}");
    assert!(e.to_string().contains("guildgate migrate"), "{e}");

    // Migrated by this release: starts.
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    store::migrate(&pool).await.unwrap();
    let app = App::build(settings.clone(), options.clone())
        .await
        .expect("starts on its own schema");
    app.broker.close().await;
    drop(app);

    // Migrated further by a newer release.
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time)
         VALUES (99991231000000, 'from a newer release', true, '\\x00', 0)",
    )
    .execute(&pool)
    .await
    .unwrap();
    let e = refusal(App::build(settings.clone(), options).await);
    assert!(
        matches!(
            e,
            SchemaError::Unknown {
                version: 99991231000000,
                ..
            }
        ),
        "{e}"
    );

    pool.close().await;
    common::delete_broker_objects(&settings).await;
    db.drop_db().await;
}
