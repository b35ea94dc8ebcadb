//! Webhooks to merchants, end to end: payment events in, signed `entitlement_grant.*`
//! webhooks out to small receivers on loopback (real RabbitMQ and PostgreSQL, short
//! retry delays). Every receiver checks every signature with the `standardwebhooks`
//! crate, an implementation that is not ours, which also refuses stale timestamps.

use crate::common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use common::events::*;
use common::{TestApp, TestConfig, wait_for};
use guildgate::app::Options;
use guildgate::faults::Point;
use guildgate::store::endpoints::Endpoint;
use guildgate::store::messages::{self, Message};
use guildgate::webhooks::deliver::Deliverer;
use guildgate::webhooks::endpoints::{self, EndpointError, NewEndpoint};
use guildgate::webhooks::fanout::{Fanned, Fanout};
use guildgate::webhooks::replay;
use guildgate::webhooks::ssrf::{SsrfError, TargetPolicy};
use serde_json::json;
use standardwebhooks::Webhook;
use tokio_util::sync::CancellationToken;

const T0: &str = "2026-05-01T10:31:00Z";
const T1: &str = "2026-05-01T11:00:00Z";
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const SECRET_2: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
const SECRET_3: &str = "whsec_q8Zf1wH0nYbq3kP2LrT5vXc9aSd4eFg7";
const LOCAL: TargetPolicy = TargetPolicy {
    allow_private: true,
};

/// How a receiver answers its n-th request (0-based).
#[derive(Clone, Debug)]
enum Reply {
    Status(u16),
    /// Answers with this status after a while.
    After(std::time::Duration, u16),
    /// Answers with this status once the token is cancelled, or after a while.
    Until(CancellationToken, std::time::Duration, u16),
    /// Never answers.
    Hang,
    /// Answers with this status and body.
    Body(u16, &'static str),
    RedirectTo(String),
}

/// One request a receiver got.
#[derive(Clone, Debug)]
struct Hit {
    id: String,
    signature: String,
    body: Vec<u8>,
    /// Every secret the receiver holds verified the request.
    verified: bool,
    headers: HeaderMap,
    at: std::time::Instant,
}

type Script = Arc<dyn Fn(usize) -> Reply + Send + Sync>;

/// A merchant's webhook receiver on 127.0.0.1.
#[derive(Clone)]
struct Receiver {
    url: String,
    hits: Arc<Mutex<Vec<Hit>>>,
    secrets: Arc<Mutex<Vec<String>>>,
    script: Script,
}

impl Receiver {
    async fn start(
        secrets: &[&str],
        script: impl Fn(usize) -> Reply + Send + Sync + 'static,
    ) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let r = Receiver {
            url: format!("http://{}/hook", listener.local_addr().unwrap()),
            hits: Arc::default(),
            secrets: Arc::new(Mutex::new(secrets.iter().map(|s| s.to_string()).collect())),
            script: Arc::new(script),
        };
        let app = Router::new()
            .route("/hook", axum::routing::post(receive))
            .with_state(r.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        r
    }

    fn hits(&self) -> Vec<Hit> {
        self.hits.lock().unwrap().clone()
    }

    fn count(&self) -> usize {
        self.hits.lock().unwrap().len()
    }
}

async fn receive(State(r): State<Receiver>, headers: HeaderMap, body: Bytes) -> Response {
    let secrets = r.secrets.lock().unwrap().clone();
    let verified = !secrets.is_empty()
        && secrets
            .iter()
            .all(|s| Webhook::new(s).unwrap().verify(&body, &headers).is_ok());
    let h = |k: &str| {
        headers
            .get(k)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let n = {
        let mut hits = r.hits.lock().unwrap();
        hits.push(Hit {
            id: h("webhook-id"),
            signature: h("webhook-signature"),
            body: body.to_vec(),
            verified,
            headers: headers.clone(),
            at: std::time::Instant::now(),
        });
        hits.len() - 1
    };
    if !verified {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    match (r.script)(n) {
        Reply::Status(code) => (StatusCode::from_u16(code).unwrap(), "ok").into_response(),
        Reply::After(wait, code) => {
            tokio::time::sleep(wait).await;
            (StatusCode::from_u16(code).unwrap(), "ok").into_response()
        }
        Reply::Until(gate, wait, code) => {
            let _ = tokio::time::timeout(wait, gate.cancelled()).await;
            (StatusCode::from_u16(code).unwrap(), "ok").into_response()
        }
        Reply::Hang => std::future::pending().await,
        Reply::Body(code, body) => (StatusCode::from_u16(code).unwrap(), body).into_response(),
        Reply::RedirectTo(url) => (
            StatusCode::TEMPORARY_REDIRECT,
            [(axum::http::header::LOCATION, url)],
        )
            .into_response(),
    }
}

async fn add_endpoint(app: &TestApp, url: &str, filter: Option<&[&str]>, secret: &str) -> Endpoint {
    add_endpoint_of(app, &app.business(), url, filter, secret).await
}

async fn add_endpoint_of(
    app: &TestApp,
    business: &str,
    url: &str,
    filter: Option<&[&str]>,
    secret: &str,
) -> Endpoint {
    let mut conn = app.pool.acquire().await.unwrap();
    endpoints::create(
        &mut conn,
        business,
        NewEndpoint {
            url: url.to_string(),
            description: Some("test receiver".into()),
            filter_types: filter.map(|f| f.iter().map(|s| s.to_string()).collect()),
            secret: Some(secret.to_string()),
            ..NewEndpoint::default()
        },
        LOCAL,
    )
    .await
    .unwrap()
}

async fn messages_of(app: &TestApp, ep: &Endpoint) -> Vec<Message> {
    let mut conn = app.pool.acquire().await.unwrap();
    messages::of_endpoint(&mut conn, &ep.id).await.unwrap()
}

async fn attempts_of(app: &TestApp, message_id: &str) -> Vec<messages::Attempt> {
    let mut conn = app.pool.acquire().await.unwrap();
    messages::attempts(&mut conn, message_id).await.unwrap()
}

/// Waits until the endpoint has `n` messages, all with `status`.
async fn wait_messages(app: &TestApp, ep: &Endpoint, n: usize, status: &str) -> Vec<Message> {
    wait_for(&format!("{n} {status} messages of {}", ep.id), || async {
        let m = messages_of(app, ep).await;
        (m.len() == n && m.iter().all(|m| m.status == status)).then_some(m)
    })
    .await
}

/// A product with an entitlement, and a one-time payment for it.
async fn pay(app: &TestApp, payment: &str, customer: &str, event_id: &str) {
    app.publish(&payment_event(app, payment, customer), event_id)
        .await;
}

/// One payment per `i` (`pay_i` by `cus_i`, event `evt_i`).
async fn pay_each(app: &TestApp, range: std::ops::Range<usize>) {
    for i in range {
        pay(
            app,
            &format!("pay_{i}"),
            &format!("cus_{i}"),
            &format!("evt_{i}"),
        )
        .await;
    }
}

fn payment_event(app: &TestApp, payment_id: &str, customer: &str) -> serde_json::Value {
    payment(&app.business(), payment_id, customer, &["pdt_hooks"], T0)
}

async fn with_entitlement(app: &TestApp) {
    app.entitlement_for(
        "pdt_hooks",
        "123456789012345678",
        Some("987654321098765432"),
    )
    .await;
}

fn all_verified(r: &Receiver) {
    for h in r.hits() {
        assert!(h.verified, "signature of {} did not verify", h.id);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_event_reaches_the_endpoint_signed_with_a_stable_id() {
    let app = TestApp::spawn().await;
    with_entitlement(&app).await;
    let r = Receiver::start(&[SECRET], |_| Reply::Status(200)).await;
    let ep = add_endpoint(&app, &r.url, None, SECRET).await;
    pay(&app, "pay_1", "cus_1", "evt_1").await;

    let msgs = wait_messages(&app, &ep, 1, "delivered").await;
    let grant = &app.grants_of("cus_1").await[0];
    let m = &msgs[0];
    assert_eq!(m.event_type, "entitlement_grant.created");
    assert_eq!(m.grant_id, grant.id.as_str());
    assert_eq!(
        m.id,
        messages::message_id(grant.id.as_str(), "entitlement_grant.created", &ep.id)
    );
    let hits = r.hits();
    assert_eq!(hits.len(), 1);
    all_verified(&r);
    assert_eq!(hits[0].id, m.id);
    assert_eq!(hits[0].body, m.body.as_bytes());
    let body: serde_json::Value = serde_json::from_slice(&hits[0].body).unwrap();
    assert_eq!(body["type"], "entitlement_grant.created");
    assert_eq!(body["business_id"], app.business());
    assert_eq!(body["data"]["payload_type"], "EntitlementGrant");
    assert_eq!(body["data"]["id"], grant.id.as_str());
    assert_eq!(body["data"]["status"], "Pending");
    let attempts = attempts_of(&app, &m.id).await;
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0].status_code, Some(200));
    assert_eq!(attempts[0].response.as_deref(), Some("ok"));
    assert_eq!(m.attempts, 1);
    app.stop().await;
}

/// An answer is kept as text, which PostgreSQL refuses with U+0000 in it: an endpoint
/// answering with a NUL must not fail its record (which sent it the message again and
/// again, and failed the other endpoints' records written with it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_holding_a_nul_is_recorded_and_not_sent_again() {
    let app = TestApp::spawn().await;
    with_entitlement(&app).await;
    let nul = Receiver::start(&[SECRET], |_| Reply::Body(200, "ok\0then\0")).await;
    let plain = Receiver::start(&[SECRET], |_| Reply::Status(200)).await;
    let ep_nul = add_endpoint(&app, &nul.url, None, SECRET).await;
    let ep_plain = add_endpoint(&app, &plain.url, None, SECRET).await;
    pay_each(&app, 0..20).await;

    let got = wait_messages(&app, &ep_nul, 20, "delivered").await;
    wait_messages(&app, &ep_plain, 20, "delivered").await;
    for m in &got {
        assert_eq!(m.attempts, 1, "{m:?}");
        let attempts = attempts_of(&app, &m.id).await;
        assert_eq!(attempts.len(), 1);
        assert_eq!(attempts[0].status_code, Some(200));
        assert_eq!(
            attempts[0].response.as_deref(),
            Some("ok\u{FFFD}then\u{FFFD}")
        );
    }
    // Nothing is sent again once recorded.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(nul.count(), 20);
    assert_eq!(plain.count(), 20);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_and_timeouts_are_retried_with_the_same_id() {
    let app =
        TestApp::spawn_with(TestConfig::default().env("GUILDGATE_WEBHOOKS__TIMEOUT", "500ms"))
            .await;
    with_entitlement(&app).await;
    let r = Receiver::start(&[SECRET], |n| match n {
        0 => Reply::Status(500),
        1 => Reply::Hang,
        _ => Reply::Status(204),
    })
    .await;
    let ep = add_endpoint(&app, &r.url, None, SECRET).await;
    pay(&app, "pay_1", "cus_1", "evt_1").await;

    let m = &wait_messages(&app, &ep, 1, "delivered").await[0];
    let hits = r.hits();
    assert_eq!(hits.len(), 3);
    all_verified(&r);
    assert!(hits.iter().all(|h| h.id == m.id), "{hits:?}");
    let attempts = attempts_of(&app, &m.id).await;
    let codes: Vec<Option<i32>> = attempts.iter().map(|a| a.status_code).collect();
    assert_eq!(codes, vec![Some(500), None, Some(204)]);
    assert!(
        attempts[1].error.as_deref().unwrap().contains("timed out"),
        "{:?}",
        attempts[1].error
    );
    assert_eq!(m.attempts, 3);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gone_disables_the_endpoint_and_fails_without_retry() {
    let app = TestApp::spawn().await;
    with_entitlement(&app).await;
    let gone = Receiver::start(&[SECRET], |_| Reply::Status(410)).await;
    let witness = Receiver::start(&[SECRET], |_| Reply::Status(200)).await;
    let ep = add_endpoint(&app, &gone.url, None, SECRET).await;
    let wit = add_endpoint(&app, &witness.url, None, SECRET).await;
    pay(&app, "pay_1", "cus_1", "evt_1").await;

    let m = &wait_messages(&app, &ep, 1, "failed").await[0];
    assert_eq!(gone.count(), 1);
    let mut conn = app.pool.acquire().await.unwrap();
    let ep_now = endpoints::get(&mut conn, &app.business(), &ep.id)
        .await
        .unwrap();
    assert!(ep_now.disabled);
    assert!(ep_now.disabled_reason.unwrap().contains("410"));
    drop(conn);
    let dead = wait_for("the failed message parked", || async {
        let d = app
            .drain_queue(&format!("{}.dead", app.names.webhooks()))
            .await;
        (!d.is_empty()).then_some(d)
    })
    .await;
    assert_eq!(dead[0].message_id, m.id);
    assert_eq!(
        dead[0].header("x-guildgate-reason-code").as_deref(),
        Some("endpoint_gone")
    );

    // A later grant reaches the witness, and nothing reaches the disabled endpoint.
    pay(&app, "pay_2", "cus_2", "evt_2").await;
    wait_messages(&app, &wit, 2, "delivered").await;
    assert_eq!(messages_of(&app, &ep).await.len(), 1);
    assert_eq!(gone.count(), 1);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_is_not_followed() {
    let app = TestApp::spawn().await;
    with_entitlement(&app).await;
    let elsewhere = Receiver::start(&[SECRET], |_| Reply::Status(200)).await;
    let target = elsewhere.url.clone();
    let r = Receiver::start(&[SECRET], move |_| Reply::RedirectTo(target.clone())).await;
    let ep = add_endpoint(&app, &r.url, None, SECRET).await;
    pay(&app, "pay_1", "cus_1", "evt_1").await;

    // Retry delays 0s,100ms,200ms: four attempts, then failed and parked.
    let m = &wait_messages(&app, &ep, 1, "failed").await[0];
    assert_eq!(elsewhere.count(), 0);
    assert_eq!(r.count(), 4);
    all_verified(&r);
    let attempts = attempts_of(&app, &m.id).await;
    assert!(attempts.iter().all(|a| a.status_code == Some(307)));
    let dead = wait_for("the failed message parked", || async {
        let d = app
            .drain_queue(&format!("{}.dead", app.names.webhooks()))
            .await;
        (!d.is_empty()).then_some(d)
    })
    .await;
    assert_eq!(
        dead[0].header("x-guildgate-reason-code").as_deref(),
        Some("retries_exhausted")
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_sending_and_recording_delivers_again_with_the_same_id() {
    // The app relays the outbox; the delivery worker is ours, with the crash hook.
    let app = TestApp::spawn_with(TestConfig {
        options: Some(Options {
            webhooks: false,
            ..Options::default()
        }),
        ..TestConfig::default()
    })
    .await;
    let r = Receiver::start(&[SECRET], |_| Reply::Status(200)).await;
    let ep = add_endpoint(&app, &r.url, None, SECRET).await;
    let deliverer = Deliverer::new(
        app.pool.clone(),
        guildgate::amqp::Broker::new(&app.settings, "test-deliverer"),
        &app.settings.webhooks,
        app.metrics.clone(),
    )
    .unwrap();
    let faults = Arc::new(common::Injected::default());
    faults.once(Point::AfterSend);
    let deliverer = deliverer.with_faults(faults.clone());
    let stop = CancellationToken::new();
    let worker = tokio::spawn(deliverer.clone().run(stop.clone()));

    let mut body = common::events::fixture("../webhooks/entitlement_grant.created.json");
    body["business_id"] = serde_json::json!(app.business());
    let fanout = Fanout {
        pool: app.pool.clone(),
        broker: deliverer.broker.clone(),
        prefetch: 1,
        batch_size: 1,
        batch_linger: std::time::Duration::ZERO,
        metrics: app.metrics.clone(),
        holds: None,
    };
    let bytes = serde_json::to_vec(&body).unwrap();
    assert_eq!(fanout.handle(&bytes).await.unwrap(), Fanned::Messages(1));

    let m = &wait_messages(&app, &ep, 1, "delivered").await[0];
    assert!(!faults.pending(Point::AfterSend), "the fault fired");
    let hits = r.hits();
    assert_eq!(hits.len(), 2, "sent, crashed, sent again");
    assert!(hits.iter().all(|h| h.id == m.id));
    all_verified(&r);
    // The crashed attempt was never recorded.
    assert_eq!(attempts_of(&app, &m.id).await.len(), 1);
    stop.cancel();
    worker.await.unwrap();
    deliverer.broker.close().await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_endpoint_does_not_hold_up_a_healthy_one() {
    let app = TestApp::spawn_with(
        TestConfig::default()
            .env("GUILDGATE_WEBHOOKS__TIMEOUT", "10s")
            .env("GUILDGATE_WEBHOOKS__WORKERS", "4")
            .env("GUILDGATE_WEBHOOKS__MAX_IN_FLIGHT_PER_ENDPOINT", "2"),
    )
    .await;
    with_entitlement(&app).await;
    let dead = Receiver::start(&[SECRET], |_| Reply::Hang).await;
    let healthy = Receiver::start(&[SECRET], |_| Reply::Status(200)).await;
    let dead_ep = add_endpoint(&app, &dead.url, None, SECRET).await;
    let ok_ep = add_endpoint(&app, &healthy.url, None, SECRET).await;
    pay_each(&app, 0..10).await;
    // Four workers, and the dead endpoint's requests each hold one for 10 s: only the
    // in-flight cap lets the healthy endpoint get everything before the first of them
    // times out.
    wait_messages(&app, &ok_ep, 10, "delivered").await;
    assert_eq!(healthy.count(), 10);
    all_verified(&healthy);
    let dead_msgs = messages_of(&app, &dead_ep).await;
    assert_eq!(dead_msgs.len(), 10);
    assert!(
        dead_msgs
            .iter()
            .all(|m| m.status == "pending" && m.attempts == 0)
    );
    assert!(
        dead.count() <= 2,
        "at most the cap in flight: {}",
        dead.count()
    );
    let mut app = app;
    // Shutdown waits for the requests in flight (bounded by the timeout).
    let _ = app.shutdown().await;
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_to_a_hanging_endpoint_give_their_workers_back() {
    // As many workers as the hanging endpoint may have requests in flight: without
    // giving them back, nothing else is sent until those requests time out.
    let app = TestApp::spawn_with(
        TestConfig::default()
            .env("GUILDGATE_WEBHOOKS__TIMEOUT", "15s")
            .env("GUILDGATE_WEBHOOKS__WORKERS", "2")
            .env("GUILDGATE_WEBHOOKS__MAX_IN_FLIGHT_PER_ENDPOINT", "2"),
    )
    .await;
    with_entitlement(&app).await;
    let dead = Receiver::start(&[SECRET], |_| Reply::Hang).await;
    let dead_ep = add_endpoint(&app, &dead.url, None, SECRET).await;
    pay_each(&app, 0..2).await;
    wait_for("both workers waiting on the hanging endpoint", || async {
        (dead.count() == 2).then_some(())
    })
    .await;
    let healthy = Receiver::start(&[SECRET], |_| Reply::Status(200)).await;
    let ok_ep = add_endpoint(&app, &healthy.url, None, SECRET).await;
    pay_each(&app, 2..6).await;
    wait_messages(&app, &ok_ep, 4, "delivered").await;
    all_verified(&healthy);
    // Before the hanging requests timed out: nothing of theirs has been recorded yet.
    assert!(
        messages_of(&app, &dead_ep)
            .await
            .iter()
            .all(|m| m.status == "pending" && m.attempts == 0)
    );
    assert_eq!(dead.count(), 2, "at most the cap in flight");
    let mut app = app;
    // Shutdown waits for the requests in flight (bounded by the timeout).
    let _ = app.shutdown().await;
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_secret_signs_alongside_the_old_one_for_a_day() {
    let app = TestApp::spawn().await;
    with_entitlement(&app).await;
    // The receiver demands that both secrets verify each request.
    let r = Receiver::start(&[SECRET, SECRET_2], |_| Reply::Status(200)).await;
    let ep = add_endpoint(&app, &r.url, None, SECRET).await;
    let mut conn = app.pool.acquire().await.unwrap();
    let rotated = endpoints::rotate_secret(
        &mut conn,
        &app.business(),
        &ep.id,
        Some(SECRET_2),
        chrono::Utc::now(),
    )
    .await
    .unwrap();
    assert_eq!(rotated.secret, SECRET_2);
    assert_eq!(rotated.previous_secret.as_deref(), Some(SECRET));
    drop(conn);
    pay(&app, "pay_1", "cus_1", "evt_1").await;
    wait_messages(&app, &ep, 1, "delivered").await;
    all_verified(&r);
    assert_eq!(r.hits()[0].signature.split(' ').count(), 2);

    // A day later only the new secret signs.
    sqlx::query("UPDATE webhook_endpoint_old_secrets SET expires_at = now() - interval '1 second'")
        .execute(&app.pool)
        .await
        .unwrap();
    *r.secrets.lock().unwrap() = vec![SECRET_2.to_string()];
    pay(&app, "pay_2", "cus_2", "evt_2").await;
    wait_messages(&app, &ep, 2, "delivered").await;
    all_verified(&r);
    assert_eq!(r.hits()[1].signature.split(' ').count(), 1);
    app.stop().await;
}

/// Rotating twice within a day keeps the first secret too: each secret still inside its
/// overlap signs, one `v1,` entry each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_rotations_within_a_day_keep_every_secret_signing() {
    let app = TestApp::spawn().await;
    with_entitlement(&app).await;
    // The receiver demands that all three secrets verify each request.
    let r = Receiver::start(&[SECRET, SECRET_2, SECRET_3], |_| Reply::Status(200)).await;
    let ep = add_endpoint(&app, &r.url, None, SECRET).await;
    let mut conn = app.pool.acquire().await.unwrap();
    for next in [SECRET_2, SECRET_3] {
        let rotated = endpoints::rotate_secret(
            &mut conn,
            &app.business(),
            &ep.id,
            Some(next),
            chrono::Utc::now(),
        )
        .await
        .unwrap();
        assert_eq!(rotated.secret, next);
    }
    drop(conn);
    pay(&app, "pay_1", "cus_1", "evt_1").await;
    let first = wait_for("the first request", || async {
        r.hits().into_iter().next()
    })
    .await;
    assert_eq!(first.signature.split(' ').count(), 3, "{}", first.signature);
    assert!(first.verified, "every live secret signs");
    wait_messages(&app, &ep, 1, "delivered").await;

    // Once the first secret's day is over, the two others still sign.
    sqlx::query(
        "UPDATE webhook_endpoint_old_secrets SET expires_at = now() - interval '1 second'
         WHERE secret = $1",
    )
    .bind(SECRET)
    .execute(&app.pool)
    .await
    .unwrap();
    *r.secrets.lock().unwrap() = vec![SECRET_2.to_string(), SECRET_3.to_string()];
    pay(&app, "pay_2", "cus_2", "evt_2").await;
    wait_messages(&app, &ep, 2, "delivered").await;
    all_verified(&r);
    assert_eq!(r.hits().last().unwrap().signature.split(' ').count(), 2);
    app.stop().await;
}

/// An endpoint rotated many times within a day signs with its current secret and the
/// four latest it was rotated away from, not with every one: each is a signature on
/// every request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_in_a_loop_keeps_only_the_latest_old_secrets_signing() {
    let app = TestApp::spawn().await;
    with_entitlement(&app).await;
    let r = Receiver::start(&[SECRET], |_| Reply::Status(200)).await;
    let ep = add_endpoint(&app, &r.url, None, SECRET).await;
    let mut conn = app.pool.acquire().await.unwrap();
    let mut secrets = vec![SECRET.to_string()];
    for _ in 0..7 {
        let rotated =
            endpoints::rotate_secret(&mut conn, &app.business(), &ep.id, None, chrono::Utc::now())
                .await
                .unwrap();
        secrets.push(rotated.secret);
    }
    let kept: Vec<String> = sqlx::query_scalar(
        "SELECT secret FROM webhook_endpoint_old_secrets WHERE endpoint_id = $1 ORDER BY expires_at",
    )
    .bind(&ep.id)
    .fetch_all(&mut *conn)
    .await
    .unwrap();
    assert_eq!(kept, secrets[3..7], "the four latest rotated away from");
    // Rows beyond the four (an earlier release's, or two rotations at once) do not sign.
    for n in 0..3 {
        sqlx::query(
            "INSERT INTO webhook_endpoint_old_secrets (endpoint_id, secret, expires_at)
             VALUES ($1, $2, now() + interval '1 hour')",
        )
        .bind(&ep.id)
        .bind(format!(
            "whsec_{}",
            [
                "QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFB",
                "QkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJC",
                "Q0NDQ0NDQ0NDQ0NDQ0NDQ0NDQ0NDQ0ND"
            ][n]
        ))
        .execute(&mut *conn)
        .await
        .unwrap();
    }
    drop(conn);

    // The receiver demands that the five live secrets all verify the request.
    *r.secrets.lock().unwrap() = secrets[3..].to_vec();
    pay(&app, "pay_1", "cus_1", "evt_1").await;
    wait_messages(&app, &ep, 1, "delivered").await;
    let hit = r.hits().into_iter().next().unwrap();
    assert_eq!(hit.signature.split(' ').count(), 5, "{}", hit.signature);
    assert!(hit.verified, "every live secret signs");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filter_types_choose_the_events_an_endpoint_gets() {
    let app = TestApp::spawn().await;
    with_entitlement(&app).await;
    let only_revoked = Receiver::start(&[SECRET], |_| Reply::Status(200)).await;
    let everything = Receiver::start(&[SECRET], |_| Reply::Status(200)).await;
    let filtered = add_endpoint(
        &app,
        &only_revoked.url,
        Some(&["entitlement_grant.revoked"]),
        SECRET,
    )
    .await;
    let all = add_endpoint(&app, &everything.url, None, SECRET).await;
    pay(&app, "pay_1", "cus_1", "evt_1").await;
    // Consumers take events in parallel: a refund applied before its payment makes the
    // payment grant nothing, so the refund goes out once the grant exists.
    app.wait_processed(1).await;
    app.publish(&refund(&app.business(), "pay_1", false, T1), "evt_2")
        .await;

    let got = wait_messages(&app, &all, 2, "delivered").await;
    let mut types: Vec<&str> = got.iter().map(|m| m.event_type.as_str()).collect();
    types.sort();
    assert_eq!(
        types,
        vec!["entitlement_grant.created", "entitlement_grant.revoked"]
    );
    let f = wait_messages(&app, &filtered, 1, "delivered").await;
    assert_eq!(f[0].event_type, "entitlement_grant.revoked");
    assert_eq!(only_revoked.count(), 1);
    all_verified(&only_revoked);
    all_verified(&everything);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_event_type_is_sent_at_most_once_per_grant_and_endpoint() {
    let app = TestApp::spawn().await;
    with_entitlement(&app).await;
    let r = Receiver::start(&[SECRET], |_| Reply::Status(200)).await;
    let ep = add_endpoint(&app, &r.url, None, SECRET).await;
    // The platform sends the same payment twice under two event ids.
    pay(&app, "pay_1", "cus_1", "evt_1").await;
    pay(&app, "pay_1", "cus_1", "evt_1_again").await;
    // The second is recognised by the payment the first recorded.
    app.wait_payments_decided(2).await;
    assert_eq!(app.processed_count().await, 1);
    app.wait_outbox_empty().await;
    let m = wait_messages(&app, &ep, 1, "delivered").await.remove(0);
    assert_eq!(app.grants_of("cus_1").await.len(), 1);

    // The grant event arrives again (relay crash, redelivery): nothing new is created,
    // through the handler and through the queue.
    let fanout = Fanout {
        pool: app.pool.clone(),
        broker: guildgate::amqp::Broker::new(&app.settings, "test-fanout"),
        prefetch: 1,
        batch_size: 1,
        batch_linger: std::time::Duration::ZERO,
        metrics: app.metrics.clone(),
        holds: None,
    };
    assert_eq!(
        fanout.handle(m.body.as_bytes()).await.unwrap(),
        Fanned::Messages(0)
    );
    republish(&app, &app.names.grant_events(), m.body.as_bytes()).await;
    wait_for("the grant event consumed", || async {
        (app.queue_len(&app.names.grant_events()).await == 0).then_some(())
    })
    .await;
    // A second customer's grant is the witness that the fan-out ran past it.
    pay(&app, "pay_2", "cus_2", "evt_2").await;
    wait_messages(&app, &ep, 2, "delivered").await;
    let first: Vec<Hit> = r.hits().into_iter().filter(|h| h.id == m.id).collect();
    assert_eq!(first.len(), 1);
    all_verified(&r);
    fanout.broker.close().await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_messages_are_replayed_with_the_same_id() {
    let app = TestApp::spawn().await;
    with_entitlement(&app).await;
    let healthy = Arc::new(AtomicBool::new(false));
    let h = healthy.clone();
    let r = Receiver::start(&[SECRET], move |_| {
        Reply::Status(if h.load(Ordering::SeqCst) { 200 } else { 500 })
    })
    .await;
    let ep = add_endpoint(&app, &r.url, None, SECRET).await;
    pay(&app, "pay_1", "cus_1", "evt_1").await;
    let m = wait_messages(&app, &ep, 1, "failed").await.remove(0);
    assert_eq!(m.attempts, 4);
    assert_eq!(r.count(), 4);

    healthy.store(true, Ordering::SeqCst);
    let mut conn = app.pool.acquire().await.unwrap();
    let (ids, next) = replay::replay_failed(&mut conn, &app.business(), &ep.id, None, 100)
        .await
        .unwrap();
    assert_eq!(ids, vec![m.id.clone()]);
    assert_eq!(next, None);
    wait_messages(&app, &ep, 1, "delivered").await;
    assert_eq!(r.count(), 5);

    // One message, again, on request.
    assert!(
        replay::replay_message(&mut conn, &app.business(), &m.id)
            .await
            .unwrap()
    );
    wait_for("the replayed message", || async {
        (r.count() == 6).then_some(())
    })
    .await;
    wait_messages(&app, &ep, 1, "delivered").await;
    assert!(r.hits().iter().all(|h| h.id == m.id));
    all_verified(&r);
    assert!(
        !replay::replay_message(&mut conn, &app.business(), "msg_nope")
            .await
            .unwrap()
    );
    drop(conn);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_are_checked_on_save_and_limited_to_five() {
    let app = TestApp::spawn().await;
    let strict = TargetPolicy {
        allow_private: false,
    };
    let mut conn = app.pool.acquire().await.unwrap();
    let try_create = |url: &str| NewEndpoint {
        url: url.to_string(),
        ..NewEndpoint::default()
    };
    let b = app.business();
    for (url, want) in [
        ("http://93.184.216.34/hook", "Scheme"),
        ("https://127.0.0.1/hook", "NotPublic"),
        ("https://[::1]/hook", "NotPublic"),
        ("https://localhost/hook", "ResolvesNotPublic"),
        ("https://10.0.0.8/hook", "NotPublic"),
        ("https://169.254.169.254/latest", "NotPublic"),
    ] {
        let e = endpoints::create(&mut conn, &b, try_create(url), strict)
            .await
            .unwrap_err();
        let ok = matches!(
            (&e, want),
            (EndpointError::Url(SsrfError::Scheme), "Scheme")
                | (EndpointError::Url(SsrfError::NotPublic(_)), "NotPublic")
                | (
                    EndpointError::Url(SsrfError::ResolvesNotPublic),
                    "ResolvesNotPublic"
                )
        );
        assert!(ok, "{url}: {e:?}");
    }
    let created = endpoints::create(&mut conn, &b, try_create("https://1.1.1.1/hook"), strict)
        .await
        .unwrap();
    assert!(created.secret.starts_with("whsec_"));
    assert!(!format!("{created:?}").contains(&created.secret));
    for _ in 0..4 {
        endpoints::create(&mut conn, &b, try_create("http://127.0.0.1:9/hook"), LOCAL)
            .await
            .unwrap();
    }
    assert!(matches!(
        endpoints::create(&mut conn, &b, try_create("https://1.1.1.1/hook"), strict).await,
        Err(EndpointError::TooMany)
    ));
    assert_eq!(
        guildgate::store::endpoints::list(&mut conn, &b)
            .await
            .unwrap()
            .len(),
        5
    );
    endpoints::delete(&mut conn, &b, &created.id).await.unwrap();
    assert_eq!(
        guildgate::store::endpoints::list(&mut conn, &b)
            .await
            .unwrap()
            .len(),
        4
    );
    drop(conn);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_that_resolves_to_a_private_address_is_refused_at_connect_time() {
    let app = TestApp::spawn_with(
        TestConfig::default().env("GUILDGATE_WEBHOOKS__ALLOW_PRIVATE_TARGETS", "false"),
    )
    .await;
    with_entitlement(&app).await;
    let r = Receiver::start(&[SECRET], |_| Reply::Status(200)).await;
    // Saved while the name was public (inserted directly); it now resolves to loopback.
    let port = r
        .url
        .split(':')
        .nth(2)
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let ep = add_endpoint(&app, &r.url, None, SECRET).await;
    sqlx::query("UPDATE webhook_endpoints SET url = $1 WHERE id = $2")
        .bind(format!("https://localhost:{port}/hook"))
        .bind(&ep.id)
        .execute(&app.pool)
        .await
        .unwrap();
    pay(&app, "pay_1", "cus_1", "evt_1").await;
    let m = wait_messages(&app, &ep, 1, "failed").await.remove(0);
    assert_eq!(r.count(), 0);
    let attempts = attempts_of(&app, &m.id).await;
    assert_eq!(attempts.len(), 4);
    assert!(
        attempts.iter().all(|a| a.status_code.is_none()
            && a.error.as_deref().unwrap().contains("no public address")),
        "{attempts:?}"
    );
    app.stop().await;
}

/// Publishes a body straight to one of guildgate's queues (as a redelivery would).
async fn republish(app: &TestApp, queue: &str, body: &[u8]) {
    publish_to(app, queue, body, None).await
}

/// Publishes a body with a message id straight to one of guildgate's queues.
async fn publish_to(app: &TestApp, queue: &str, body: &[u8], message_id: Option<&str>) {
    let conn = lapin::Connection::connect(&common::amqp_url(), Default::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    let confirm = ch
        .basic_publish(
            "".into(),
            queue.into(),
            Default::default(),
            body,
            match message_id {
                Some(id) => lapin::BasicProperties::default().with_message_id(id.into()),
                None => lapin::BasicProperties::default(),
            }
            .with_delivery_mode(2),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(confirm.is_ack());
    let _ = app;
    let _ = conn.close(200, "done".into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_grant_events_is_fanned_out_in_one_statement() {
    let app = TestApp::spawn_with(TestConfig {
        options: Some(Options {
            webhooks: false,
            ..Options::default()
        }),
        ..TestConfig::default()
    })
    .await;
    let all = add_endpoint(&app, "http://127.0.0.1:9/all", None, SECRET).await;
    let revoked_only = add_endpoint(
        &app,
        "http://127.0.0.1:9/revoked",
        Some(&["entitlement_grant.revoked"]),
        SECRET,
    )
    .await;
    let event = |business: &str, grant: &str, event_type: &str| {
        let mut body = common::events::fixture("../webhooks/entitlement_grant.created.json");
        body["business_id"] = serde_json::json!(business);
        body["type"] = serde_json::json!(event_type);
        body["data"]["id"] = serde_json::json!(grant);
        serde_json::to_vec(&body).unwrap()
    };
    let (created, revoked) = ("entitlement_grant.created", "entitlement_grant.revoked");
    let batch = [
        event(&app.business(), "grant_BatchA", created),
        event(&app.business(), "grant_BatchA", revoked),
        // The same grant event twice in one batch: created once.
        event(&app.business(), "grant_BatchA", created),
        b"not a grant event".to_vec(),
        // A business without endpoints.
        event("bus_nobody", "grant_BatchB", created),
    ];
    let bodies: Vec<&[u8]> = batch.iter().map(Vec::as_slice).collect();
    let fanout = Fanout {
        pool: app.pool.clone(),
        broker: guildgate::amqp::Broker::new(&app.settings, "test-fanout"),
        prefetch: 1,
        batch_size: 1,
        batch_linger: std::time::Duration::ZERO,
        metrics: app.metrics.clone(),
        holds: None,
    };
    let outcomes = fanout.handle_batch(&bodies).await.unwrap();
    assert_eq!(
        outcomes[..3],
        [
            Fanned::Messages(1),
            Fanned::Messages(2),
            Fanned::Messages(0)
        ]
    );
    assert!(matches!(
        outcomes[3],
        Fanned::Refused {
            code: "bad_shape",
            ..
        }
    ));
    assert_eq!(outcomes[4], Fanned::Messages(0));

    let ids = |ep: &Endpoint, types: &[&str]| {
        let mut ids: Vec<String> = types
            .iter()
            .map(|t| messages::message_id("grant_BatchA", t, &ep.id))
            .collect();
        ids.sort();
        ids
    };
    let stored = |m: Vec<Message>| {
        let mut ids: Vec<String> = m.into_iter().map(|m| m.id).collect();
        ids.sort();
        ids
    };
    assert_eq!(
        stored(messages_of(&app, &all).await),
        ids(&all, &[created, revoked])
    );
    assert_eq!(
        stored(messages_of(&app, &revoked_only).await),
        ids(&revoked_only, &[revoked])
    );
    // The whole batch again (a redelivery): nothing new.
    let again = fanout.handle_batch(&bodies).await.unwrap();
    assert_eq!(
        again[..3],
        [
            Fanned::Messages(0),
            Fanned::Messages(0),
            Fanned::Messages(0)
        ]
    );
    assert_eq!(messages_of(&app, &all).await.len(), 2);
    fanout.broker.close().await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bundle_is_fanned_out_and_its_bad_element_parked_alone() {
    // Fan-out without the relay: the messages' jobs stay in the outbox, nothing is sent.
    let mut app = TestApp::spawn_with(TestConfig {
        options: Some(Options {
            relay: false,
            sync: false,
            ..Options::default()
        }),
        ..TestConfig::default()
    })
    .await;
    let ep = add_endpoint(&app, "http://127.0.0.1:9/all", None, SECRET).await;
    let event = |grant: &str| {
        let mut body = common::events::fixture("../webhooks/entitlement_grant.created.json");
        body["business_id"] = serde_json::json!(app.business());
        body["data"]["id"] = serde_json::json!(grant);
        serde_json::to_string(&body).unwrap()
    };
    let bad = r#"{"type": "entitlement_grant.created", "data": {}}"#;
    let bundle = format!(
        "[{},{bad},\n{}]",
        event("grant_BundleA"),
        event("grant_BundleB")
    );
    let queue = app.names.grant_events();
    let dead_queue = guildgate::amqp::Names::dead(&queue);
    publish_to(&app, &queue, bundle.as_bytes(), Some("grant-events:b_one")).await;

    // The good elements on either side of the bad one are fanned out...
    let made = wait_for("the bundle's good events fanned out", || async {
        let m = messages_of(&app, &ep).await;
        (m.len() == 2).then_some(m)
    })
    .await;
    let mut grants: Vec<&str> = made.iter().map(|m| m.grant_id.as_str()).collect();
    grants.sort();
    assert_eq!(grants, ["grant_BundleA", "grant_BundleB"]);
    // ...and the bad one is parked on its own: its bytes, its reason, its own id.
    let dead = parked_one(&app, &dead_queue).await;
    assert_eq!(dead.message_id, "grant-events:b_one#1");
    assert_eq!(dead.body, bad.as_bytes());
    assert_eq!(
        dead.header(guildgate::amqp::REASON_CODE_HEADER).as_deref(),
        Some("bad_shape")
    );

    // A bundle whose elements cannot be told apart is parked whole, under its id.
    let broken = br#"[{"type": "entitlement_grant.created", "#;
    publish_to(&app, &queue, broken, Some("grant-events:b_broken")).await;
    let dead = parked_one(&app, &dead_queue).await;
    assert_eq!(dead.message_id, "grant-events:b_broken");
    assert_eq!(dead.body, broken);

    // Both were acked: nothing comes back when the consumer lets go of what it holds.
    assert_eq!(app.shutdown().await, Ok(()));
    assert_eq!(app.queue_len(&queue).await, 0);
    assert_eq!(messages_of(&app, &ep).await.len(), 2);
    app.cleanup().await;
}

/// Waits for a message parked in `queue`, takes it, and checks it is the only one.
async fn parked_one(app: &TestApp, queue: &str) -> common::Taken {
    let mut parked = wait_for("a message parked", || async {
        let d = app.drain_queue(queue).await;
        (!d.is_empty()).then_some(d)
    })
    .await;
    assert_eq!(parked.len(), 1, "one message parked");
    parked.remove(0)
}

/// The messages of an endpoint held (not those taken from parking to be sent, which are
/// held only until their attempt is recorded).
async fn held_of(app: &TestApp, ep: &Endpoint) -> Vec<String> {
    waiting_of(app, ep, |w| w.held && !w.parked).await
}

/// Where a message stands: waiting in parking, held, or neither.
#[derive(sqlx::FromRow)]
struct Waiting {
    id: String,
    status: String,
    attempts: i32,
    parked: bool,
    held: bool,
}

/// The ids of an endpoint's messages standing as `which` says, in id order.
async fn waiting_of(app: &TestApp, ep: &Endpoint, which: fn(&Waiting) -> bool) -> Vec<String> {
    let all: Vec<Waiting> = sqlx::query_as(
        "SELECT m.id, m.status, m.attempts, k.message_id IS NOT NULL AS parked,
                (m.held_until IS NOT NULL OR k.taken_until IS NOT NULL) AS held
         FROM webhook_messages m LEFT JOIN webhook_parked k ON k.message_id = m.id
         WHERE m.endpoint_id = $1 ORDER BY m.id",
    )
    .bind(&ep.id)
    .fetch_all(&app.pool)
    .await
    .unwrap();
    all.into_iter().filter(which).map(|w| w.id).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_endpoints_messages_wait_held_and_go_when_it_answers() {
    let mut app = TestApp::spawn_with(
        TestConfig::default()
            .env("GUILDGATE_WEBHOOKS__TIMEOUT", "10s")
            .env("GUILDGATE_WEBHOOKS__WORKERS", "4")
            .env("GUILDGATE_WEBHOOKS__MAX_IN_FLIGHT_PER_ENDPOINT", "2"),
    )
    .await;
    with_entitlement(&app).await;
    let hang = Arc::new(AtomicBool::new(true));
    let receiver = {
        let hang = hang.clone();
        Receiver::start(&[SECRET], move |_| {
            if hang.load(Ordering::SeqCst) {
                Reply::Hang
            } else {
                Reply::Status(200)
            }
        })
        .await
    };
    let ep = add_endpoint(&app, &receiver.url, None, SECRET).await;
    pay_each(&app, 0..10).await;
    // Two requests hang; once no request has finished for a while, the other messages
    // are held in the database without an attempt (not cycled through retry tiers).
    let held = wait_for("the messages behind the hanging requests held", || async {
        let p = held_of(&app, &ep).await;
        (p.len() == 8).then_some(p)
    })
    .await;
    assert_eq!(
        receiver.count(),
        2,
        "only the in-flight cap was sent: {:?}",
        receiver
            .hits()
            .iter()
            .map(|h| (h.id.clone(), h.at))
            .collect::<Vec<_>>()
    );
    for id in &held {
        assert!(
            attempts_of(&app, id).await.is_empty(),
            "{id}: held, not attempted"
        );
    }
    // The endpoint answers again: everything is delivered, the held messages at their
    // first attempt, with the ids they were held with.
    hang.store(false, Ordering::SeqCst);
    let msgs = wait_messages(&app, &ep, 10, "delivered").await;
    all_verified(&receiver);
    for m in msgs.iter().filter(|m| held.contains(&m.id)) {
        assert_eq!(m.attempts, 1, "{}: one attempt, the delivery", m.id);
    }
    let ids: std::collections::HashSet<String> =
        receiver.hits().into_iter().map(|h| h.id).collect();
    assert_eq!(ids.len(), 10);
    assert!(held_of(&app, &ep).await.is_empty());
    app.cleanup().await;
}

/// An app with neither delivery workers nor relay: webhook jobs stay in the outbox to be
/// looked at.
async fn without_delivery() -> TestApp {
    TestApp::spawn_with(TestConfig {
        options: Some(Options {
            webhooks: false,
            relay: false,
            ..Options::default()
        }),
        ..TestConfig::default()
    })
    .await
}

/// The webhook jobs waiting in the outbox: message id and payload.
async fn webhook_jobs(conn: &mut sqlx::PgConnection) -> Vec<(String, serde_json::Value)> {
    sqlx::query_as(
        "SELECT message_id, convert_from(payload, 'UTF8')::jsonb FROM outbox WHERE kind = 'webhook' ORDER BY id",
    )
        .fetch_all(conn)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_messages_get_jobs_when_due_a_bounded_number_per_endpoint() {
    let mut app = without_delivery().await;
    let ep = add_endpoint(&app, "http://127.0.0.1:9/held", None, SECRET).await;
    let mut conn = app.pool.acquire().await.unwrap();
    let ids = messages_for(&mut conn, &ep, 4).await;
    sqlx::query("DELETE FROM outbox")
        .execute(&mut *conn)
        .await
        .unwrap();
    let now = chrono::Utc::now();
    let hold = |id: &str, secs: i64| messages::Held {
        message_id: id.to_string(),
        until: now + chrono::Duration::seconds(secs),
        attempt: 2,
        hold_count: 3,
    };
    // Three due, one an hour away.
    let batch = [
        hold(&ids[0], -3),
        hold(&ids[1], -2),
        hold(&ids[2], -1),
        hold(&ids[3], 3600),
    ];
    messages::hold_many(&mut conn, &batch).await.unwrap();

    // Two per endpoint per round, the longest-held first; each job carries the round's
    // attempt count and how often the message was held.
    assert_eq!(messages::release_due(&mut conn, 2, 100).await.unwrap(), 2);
    let got = webhook_jobs(&mut conn).await;
    assert_eq!(
        got.iter().map(|(id, _)| id.as_str()).collect::<Vec<_>>(),
        [ids[0].as_str(), ids[1].as_str()]
    );
    assert_eq!(
        got[0].1,
        serde_json::json!({"webhook_message_id": ids[0], "endpoint_id": ep.id, "attempt": 2, "holds": 3})
    );
    assert_eq!(messages::release_due(&mut conn, 2, 100).await.unwrap(), 1);
    assert_eq!(messages::release_due(&mut conn, 2, 100).await.unwrap(), 0);
    assert_eq!(webhook_jobs(&mut conn).await.len(), 3);

    // A message settled while held is let go without a job.
    messages::hold_many(&mut conn, &[hold(&ids[0], -1)])
        .await
        .unwrap();
    sqlx::query("UPDATE webhook_messages SET status = 'delivered' WHERE id = $1")
        .bind(&ids[0])
        .execute(&mut *conn)
        .await
        .unwrap();
    assert_eq!(messages::release_due(&mut conn, 2, 100).await.unwrap(), 1);
    assert_eq!(webhook_jobs(&mut conn).await.len(), 3);
    // And a settled message is never held.
    messages::hold_many(&mut conn, &[hold(&ids[0], -1)])
        .await
        .unwrap();
    assert_eq!(messages::release_due(&mut conn, 2, 100).await.unwrap(), 0);
    drop(conn);
    app.cleanup().await;
}

/// Creates `n` messages for an endpoint (with their jobs in the outbox, in the order
/// they are to be sent) and returns their ids.
/// Pulls up to `limit` parked messages of the endpoint, whenever they were parked,
/// each taken for a minute from `now`.
async fn pull_unbounded(
    conn: &mut sqlx::PgConnection,
    endpoint_id: &str,
    limit: i64,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<Vec<messages::Pulled>, sqlx::Error> {
    let secs = chrono::Duration::seconds;
    let any_time = chrono::DateTime::<chrono::Utc>::MAX_UTC;
    messages::pull_parked(
        conn,
        endpoint_id,
        limit,
        any_time,
        now + secs(60),
        now + secs(30),
    )
    .await
}

async fn messages_for(conn: &mut sqlx::PgConnection, ep: &Endpoint, n: usize) -> Vec<String> {
    let grants: Vec<String> = (0..n).map(|i| format!("grant_Park{i}")).collect();
    let events: Vec<messages::FanoutEvent<'_>> = grants
        .iter()
        .map(|g| messages::FanoutEvent {
            business_id: &ep.business_id,
            grant_id: g,
            event_type: "entitlement_grant.created",
            body: "{}",
        })
        .collect();
    messages::fan_out(conn, &events, &[]).await.unwrap();
    webhook_jobs(conn)
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect()
}

/// An app without delivery, an endpoint nobody answers at and `n` of its messages,
/// their jobs taken away: what the parking statements are tried on.
async fn parking_ground(
    n: usize,
) -> (
    TestApp,
    Endpoint,
    sqlx::pool::PoolConnection<sqlx::Postgres>,
    Vec<String>,
) {
    let app = without_delivery().await;
    let ep = add_endpoint(&app, "http://127.0.0.1:9/parked", None, SECRET).await;
    let mut conn = app.pool.acquire().await.unwrap();
    let ids = messages_for(&mut conn, &ep, n).await;
    sqlx::query("DELETE FROM outbox")
        .execute(&mut *conn)
        .await
        .unwrap();
    (app, ep, conn, ids)
}

/// How many messages are parked or taken from parking.
async fn parked_rows(conn: &mut sqlx::PgConnection) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM webhook_parked")
        .fetch_one(conn)
        .await
        .unwrap()
}

/// The upgrade to parked rows of their own moves what is parked, and what was taken from
/// parking and not yet recorded, in the same state; held and plain messages stay as they
/// were.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upgrade_moves_parked_and_taken_messages_to_their_own_rows() {
    let db = common::TestDb::create().await;
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    let migrator = &guildgate::store::MIGRATOR;
    migrator.run_to(38, &pool).await.unwrap();
    sqlx::query(
        "WITH b AS (INSERT INTO businesses (id) VALUES ('bus_A'))
         INSERT INTO webhook_endpoints (id, business_id, url, secret)
         VALUES ('ep_1', 'bus_A', 'http://127.0.0.1:9/hook', 'whsec_x')",
    )
    .execute(&pool)
    .await
    .unwrap();
    // Parked; taken to be sent (parked and held until its claim); held; plain;
    // delivered after it was parked by a job that ran twice.
    sqlx::query(
        "INSERT INTO webhook_messages (id, endpoint_id, business_id, grant_id, event_type, body,
                                       status, parked_at, held_until, held_attempt, hold_count)
         VALUES
         ('msg_p', 'ep_1', 'bus_A', 'g1', 't', '{}', 'pending', '2026-01-01T00:00:01Z', NULL, 2, 1),
         ('msg_t', 'ep_1', 'bus_A', 'g2', 't', '{}', 'pending', '2026-01-01T00:00:02Z',
          '2026-01-01T00:01:00Z', 0, 0),
         ('msg_h', 'ep_1', 'bus_A', 'g3', 't', '{}', 'pending', NULL, '2026-01-01T00:02:00Z', 1, 3),
         ('msg_n', 'ep_1', 'bus_A', 'g4', 't', '{}', 'pending', NULL, NULL, 0, 0),
         ('msg_d', 'ep_1', 'bus_A', 'g5', 't', '{}', 'delivered', '2026-01-01T00:00:03Z', NULL, 0, 0)",
    )
    .execute(&pool)
    .await
    .unwrap();
    migrator.run(&pool).await.unwrap();
    type Row = (String, String, Option<String>, i32, i32);
    let parked: Vec<Row> = sqlx::query_as(
        "SELECT message_id, to_char(parked_at AT TIME ZONE 'UTC', 'HH24:MI:SS'),
                to_char(taken_until AT TIME ZONE 'UTC', 'HH24:MI:SS'), attempt, hold_count
         FROM webhook_parked ORDER BY message_id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let row = |id: &str, at: &str, taken: Option<&str>, attempt, holds| -> Row {
        (id.into(), at.into(), taken.map(Into::into), attempt, holds)
    };
    assert_eq!(
        parked,
        vec![
            row("msg_p", "00:00:01", None, 2, 1),
            row("msg_t", "00:00:02", Some("00:01:00"), 0, 0),
        ]
    );
    let held: Vec<String> = sqlx::query_scalar(
        "SELECT id FROM webhook_messages WHERE held_until IS NOT NULL ORDER BY id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(held, vec!["msg_h"], "a taken message is no longer held");
    pool.close().await;
    db.drop_db().await;
}

/// Parking a message and taking it to be sent write a narrow row of its own, not the
/// message's row with its body: that is rewritten once, by the attempt's record, as
/// for a message sent at once, and the record ends the parking.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_messages_own_row_is_written_only_by_its_record() {
    let (mut app, ep, mut conn, mut ids) = parking_ground(1).await;
    let id = ids.remove(0);
    // The transaction that last wrote the message's row.
    async fn writer(conn: &mut sqlx::PgConnection, id: &str) -> String {
        sqlx::query_scalar("SELECT xmin::text FROM webhook_messages WHERE id = $1")
            .bind(id)
            .fetch_one(conn)
            .await
            .unwrap()
    }
    let created = writer(&mut conn, &id).await;
    let now = chrono::Utc::now();
    let secs = chrono::Duration::seconds;
    messages::park_many(
        &mut conn,
        &[messages::Parked {
            message_id: id.clone(),
            at: now,
            lease_until: now + secs(30),
            attempt: 0,
            hold_count: 0,
        }],
    )
    .await
    .unwrap();
    let pulled = pull_unbounded(&mut conn, &ep.id, 8, now).await.unwrap();
    assert_eq!(pulled.len(), 1);
    assert_eq!(
        writer(&mut conn, &id).await,
        created,
        "parking and taking rewrote the message's row"
    );
    let parked: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM webhook_parked WHERE message_id = $1 AND taken_until IS NOT NULL",
    )
    .bind(&id)
    .fetch_one(&mut *conn)
    .await
    .unwrap();
    assert_eq!(parked, 1, "taken, in its parked row");

    messages::record_attempts(
        &mut conn,
        &[messages::Recorded {
            message_id: id.clone(),
            attempt: messages::AttemptRecord {
                at: now,
                status_code: Some(200),
                ..Default::default()
            },
            status: messages::NewStatus::Delivered,
            disable: None,
            hold_retry: None,
        }],
    )
    .await
    .unwrap();
    assert_ne!(writer(&mut conn, &id).await, created);
    assert_eq!(
        messages::get(&mut conn, &id).await.unwrap().unwrap().status,
        "delivered"
    );
    let left = parked_rows(&mut conn).await;
    assert_eq!(left, 0, "the record ends the parking");
    drop(conn);
    app.cleanup().await;
}

/// A duplicate job of a message may record or hold it while its parked row is being
/// written, and leave that row behind: neither the puller nor the hold releaser sends
/// such a message a second time. Two jobs of one message parking in one batch park it
/// once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_row_left_beside_a_record_or_a_hold_sends_nothing_twice() {
    let (mut app, ep, mut conn, ids) = parking_ground(5).await;
    let now = chrono::Utc::now();
    let secs = chrono::Duration::seconds;
    let park = |id: &String, at| messages::Parked {
        message_id: id.clone(),
        at,
        lease_until: now + secs(30),
        attempt: 0,
        hold_count: 0,
    };
    let mut batch: Vec<messages::Parked> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| park(id, now + secs(i as i64)))
        .collect();
    batch.push(park(&ids[0], now + secs(10)));
    messages::park_many(&mut conn, &batch).await.unwrap();
    let parked_at: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT parked_at FROM webhook_parked WHERE message_id = $1")
            .bind(&ids[0])
            .fetch_one(&mut *conn)
            .await
            .unwrap();
    assert_eq!(
        parked_at.timestamp(),
        now.timestamp(),
        "its earlier parking"
    );
    // A duplicate job delivered the first; another held the second, due now.
    let settle = "UPDATE webhook_messages SET status = 'delivered' WHERE id = $1";
    let hold =
        "UPDATE webhook_messages SET held_until = now() - interval '1 second', hold_count = 1
                WHERE id = $1";
    for (sql, id) in [(settle, &ids[0]), (hold, &ids[1])] {
        sqlx::query(sql).bind(id).execute(&mut *conn).await.unwrap();
    }
    let pulled = pull_unbounded(&mut conn, &ep.id, 3, now).await.unwrap();
    assert_eq!(
        pulled.iter().map(|p| p.id.as_str()).collect::<Vec<_>>(),
        vec![ids[2].as_str()],
        "only what still waits for the puller"
    );
    let left: Vec<String> =
        sqlx::query_scalar("SELECT message_id FROM webhook_parked ORDER BY parked_at")
            .fetch_all(&mut *conn)
            .await
            .unwrap();
    assert_eq!(left, ids[2..].to_vec(), "the rows left behind are dropped");

    // The same for the hold releaser, once nobody pulls: the fourth is delivered and the
    // fifth held meanwhile; each message gets one job at most.
    for (sql, id) in [(settle, &ids[3]), (hold, &ids[4])] {
        sqlx::query(sql).bind(id).execute(&mut *conn).await.unwrap();
    }
    sqlx::query("UPDATE webhook_parking SET lease_until = now() - interval '1 second'")
        .execute(&mut *conn)
        .await
        .unwrap();
    messages::unclaim(&mut conn, &ep.id, &ids[2..3])
        .await
        .unwrap();
    messages::release_due(&mut conn, 10, 100).await.unwrap();
    let mut jobs: Vec<String> = webhook_jobs(&mut conn)
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    jobs.sort();
    let mut want = vec![ids[1].clone(), ids[2].clone(), ids[4].clone()];
    want.sort();
    assert_eq!(jobs, want);
    let left = parked_rows(&mut conn).await;
    assert_eq!(left, 0);
    drop(conn);
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_messages_are_pulled_in_order_and_released_once_nobody_pulls_them() {
    let (mut app, ep, mut conn, ids) = parking_ground(5).await;
    let now = chrono::Utc::now();
    let secs = chrono::Duration::seconds;
    // Parked in the reverse of their ids' order, on the third attempt of their round.
    let park = |i: usize| messages::Parked {
        message_id: ids[i].clone(),
        at: now - secs(10 - i as i64),
        lease_until: now + secs(30),
        attempt: 2,
        hold_count: 1,
    };
    let mut order: Vec<usize> = (0..5).collect();
    order.sort_by(|a, b| ids[*b].cmp(&ids[*a]));
    let batch: Vec<messages::Parked> = order.iter().map(|&i| park(i)).collect();
    let mut by_time = batch.clone();
    by_time.sort_by_key(|p| p.at);
    let in_order: Vec<String> = by_time.iter().map(|p| p.message_id.clone()).collect();
    messages::park_many(&mut conn, &batch).await.unwrap();
    // Leased: the hold releaser leaves them to the process that pulls them.
    assert_eq!(messages::release_due(&mut conn, 10, 100).await.unwrap(), 0);
    assert!(
        webhook_jobs(&mut conn).await.is_empty(),
        "no job while parked"
    );

    // A pull bounded at the first one's time takes nothing, and says what waits.
    let first = by_time[0].at;
    let none = messages::pull_parked(&mut conn, &ep.id, 5, first, now + secs(60), now)
        .await
        .unwrap();
    assert!(none.is_empty());
    assert!(
        messages::parked_from(&mut conn, &ep.id, first)
            .await
            .unwrap()
    );
    assert!(!messages::parked_from(&mut conn, &ep.id, now).await.unwrap());

    // Pulled oldest first, held until their claim runs out; bounded at the third
    // one's time, a pull of three takes two.
    let pulled = messages::pull_parked(
        &mut conn,
        &ep.id,
        3,
        by_time[2].at,
        now + secs(60),
        now + secs(30),
    )
    .await
    .unwrap();
    assert_eq!(
        pulled,
        vec![
            messages::Pulled {
                id: in_order[0].clone(),
                held_attempt: 2,
                hold_count: 1
            },
            messages::Pulled {
                id: in_order[1].clone(),
                held_attempt: 2,
                hold_count: 1
            },
        ]
    );
    assert_eq!(messages::release_due(&mut conn, 10, 100).await.unwrap(), 0);

    // The puller stopped: its lease runs out and the rest get jobs, in parked order.
    sqlx::query("UPDATE webhook_parking SET lease_until = now() - interval '1 second'")
        .execute(&mut *conn)
        .await
        .unwrap();
    assert_eq!(
        messages::drop_idle_leases(&mut conn).await.unwrap(),
        0,
        "messages are still parked"
    );
    assert_eq!(messages::release_due(&mut conn, 10, 100).await.unwrap(), 3);
    let jobs = webhook_jobs(&mut conn).await;
    assert_eq!(
        jobs.iter().map(|(id, _)| id.as_str()).collect::<Vec<_>>(),
        in_order[2..].iter().map(String::as_str).collect::<Vec<_>>()
    );
    assert_eq!(
        jobs[0].1,
        serde_json::json!({"webhook_message_id": in_order[2], "endpoint_id": ep.id, "attempt": 2, "holds": 1})
    );
    assert_eq!(messages::drop_idle_leases(&mut conn).await.unwrap(), 1);
    assert_eq!(messages::release_due(&mut conn, 10, 100).await.unwrap(), 0);

    // The two pulled ones were handed back (a stop): due now.
    assert_eq!(
        messages::unclaim(&mut conn, &ep.id, &in_order[..2])
            .await
            .unwrap(),
        2
    );
    assert_eq!(messages::release_due(&mut conn, 10, 100).await.unwrap(), 2);
    assert_eq!(webhook_jobs(&mut conn).await.len(), 5);

    // A pulled message's failed attempt holds it for its retry, with the attempt's number.
    let retry_at = now + secs(3600);
    messages::record_attempts(
        &mut conn,
        &[messages::Recorded {
            message_id: in_order[0].clone(),
            attempt: messages::AttemptRecord {
                at: now,
                status_code: Some(500),
                ..Default::default()
            },
            status: messages::NewStatus::Pending {
                next_attempt_at: retry_at,
            },
            disable: None,
            hold_retry: Some((retry_at, 3)),
        }],
    )
    .await
    .unwrap();
    let (held_until, held_attempt): (Option<chrono::DateTime<chrono::Utc>>, i32) =
        sqlx::query_as("SELECT held_until, held_attempt FROM webhook_messages WHERE id = $1")
            .bind(&in_order[0])
            .fetch_one(&mut *conn)
            .await
            .unwrap();
    assert_eq!(held_attempt, 3);
    assert_eq!(
        held_until.map(|t| t.timestamp_micros()),
        Some(retry_at.timestamp_micros())
    );

    // The endpoint answers again: what it has held for hanging is parked to be pulled,
    // not released to the broker; a retry keeps its schedule.
    messages::hold_many(
        &mut conn,
        &[messages::Held {
            message_id: in_order[2].clone(),
            until: now + secs(3600),
            attempt: 0,
            hold_count: 1,
        }],
    )
    .await
    .unwrap();
    assert_eq!(
        messages::park_held(&mut conn, &ep.id, now + secs(30))
            .await
            .unwrap(),
        1
    );
    let pulled: Vec<String> = pull_unbounded(&mut conn, &ep.id, 10, now)
        .await
        .unwrap()
        .into_iter()
        .map(|p| p.id)
        .collect();
    assert_eq!(pulled, [in_order[2].clone()]);
    assert_eq!(
        messages::park_held(&mut conn, &ep.id, now + secs(30))
            .await
            .unwrap(),
        0,
        "messages taken to be sent are not parked again"
    );

    // A settled message is never parked.
    sqlx::query("UPDATE webhook_messages SET status = 'delivered' WHERE id = $1")
        .bind(&in_order[1])
        .execute(&mut *conn)
        .await
        .unwrap();
    messages::park_many(
        &mut conn,
        &[park(ids.iter().position(|i| *i == in_order[1]).unwrap())],
    )
    .await
    .unwrap();
    assert!(
        pull_unbounded(&mut conn, &ep.id, 10, now)
            .await
            .unwrap()
            .is_empty()
    );
    drop(conn);
    app.cleanup().await;
}

/// Publishes `jobs` (message id and payload) to the webhook queue in their order, and
/// starts a deliverer of `workers` workers and `cap` requests per endpoint on it, until
/// the token is cancelled.
async fn deliver_jobs(
    app: &TestApp,
    jobs: &[(String, serde_json::Value)],
    workers: usize,
    cap: usize,
) -> (Deliverer, CancellationToken, tokio::task::JoinHandle<()>) {
    deliver_jobs_with(app, jobs, workers, cap, |d| d).await
}

/// [`deliver_jobs`] with the deliverer changed by `tune` before it runs.
async fn deliver_jobs_with(
    app: &TestApp,
    jobs: &[(String, serde_json::Value)],
    workers: usize,
    cap: usize,
    tune: impl FnOnce(Deliverer) -> Deliverer,
) -> (Deliverer, CancellationToken, tokio::task::JoinHandle<()>) {
    let queue = guildgate::amqp::Names::from_settings(&app.settings).webhooks();
    for (id, payload) in jobs {
        let body = serde_json::to_vec(payload).unwrap();
        publish_to(app, &queue, &body, Some(id)).await;
    }
    let mut settings = app.settings.webhooks.clone();
    settings.workers = workers;
    settings.max_in_flight_per_endpoint = cap;
    let deliverer = Deliverer::new(
        app.pool.clone(),
        guildgate::amqp::Broker::new(&app.settings, "test-deliverer"),
        &settings,
        app.metrics.clone(),
    )
    .unwrap();
    let deliverer = tune(deliverer);
    let stop = CancellationToken::new();
    let worker = tokio::spawn(deliverer.clone().run(stop.clone()));
    (deliverer, stop, worker)
}

/// The webhook attempts the app counted with `outcome`.
fn attempts(app: &TestApp, outcome: &str) -> u64 {
    app.metrics
        .webhook_attempts
        .get_or_create(&vec![("outcome", outcome.to_string())])
        .get()
}

/// An endpoint answering in 80 ms, `n` messages for it and their jobs (with a
/// connection of the test's): its message ids in order, and the jobs.
async fn busy_endpoint(
    app: &TestApp,
    n: usize,
) -> (
    Receiver,
    Endpoint,
    sqlx::pool::PoolConnection<sqlx::Postgres>,
    Vec<String>,
    Vec<(String, serde_json::Value)>,
) {
    let r = Receiver::start(&[SECRET], |_| {
        Reply::After(std::time::Duration::from_millis(80), 200)
    })
    .await;
    let ep = add_endpoint(app, &r.url, None, SECRET).await;
    let mut conn = app.pool.acquire().await.unwrap();
    let ids = messages_for(&mut conn, &ep, n).await;
    let jobs = webhook_jobs(&mut conn).await;
    (r, ep, conn, ids, jobs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_endpoints_jobs_wait_parked_in_order_not_republished() {
    let mut app = without_delivery().await;
    // 80 ms per request and one at a time: four workers and 12 jobs keep it busy.
    let (r, ep, mut conn, ids, jobs) = busy_endpoint(&app, 12).await;
    let (deliverer, stop, worker) = deliver_jobs_with(&app, &jobs, 4, 1, patient).await;
    wait_messages(&app, &ep, 12, "delivered").await;
    stop.cancel();
    worker.await.unwrap();
    deliverer.broker.close().await;

    // Each sent once, in the order of their jobs.
    let sent: Vec<String> = r.hits().into_iter().map(|h| h.id).collect();
    assert_eq!(sent, ids);
    all_verified(&r);
    let count = |outcome: &str| attempts(&app, outcome);
    assert!(count("parked") >= 5, "parked {}", count("parked"));
    assert_eq!(count("pulled"), count("parked"));
    // Nothing went through the broker again: no new job in the outbox, none left behind.
    assert_eq!(webhook_jobs(&mut conn).await.len(), 12);
    let waiting: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM webhook_messages WHERE held_until IS NOT NULL)
              + (SELECT count(*) FROM webhook_parked)",
    )
    .fetch_one(&mut *conn)
    .await
    .unwrap();
    assert_eq!(waiting, 0);
    drop(conn);
    app.cleanup().await;
}

/// The attempts of parked messages, which no job waits for, share commits while their
/// endpoint answers one request at a time, 80 ms apart; the attempt of a job, whose ack
/// waits for it, commits at once and takes the waiting ones along.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulled_attempts_of_an_endpoint_answering_one_at_a_time_share_commits() {
    let mut app = without_delivery().await;
    let (_r, ep, mut conn, _ids, jobs) = busy_endpoint(&app, 12).await;
    let pool = app.pool.clone();
    let lingering = move |d: Deliverer| {
        let mut d = patient(d);
        d.recorder = guildgate::webhooks::recorder::Recorder::spawn_lingering(
            pool,
            256,
            Duration::from_secs(3),
        );
        d
    };
    let (deliverer, stop, worker) = deliver_jobs_with(&app, &jobs, 4, 1, lingering).await;
    wait_messages(&app, &ep, 12, "delivered").await;
    stop.cancel();
    worker.await.unwrap();
    deliverer.broker.close().await;

    let pulled = attempts(&app, "pulled");
    assert!(pulled >= 5, "pulled {pulled}");
    let commits: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT a.xmin::text) FROM webhook_attempts a
         JOIN webhook_messages m ON m.id = a.message_id WHERE m.endpoint_id = $1",
    )
    .bind(&ep.id)
    .fetch_one(&mut *conn)
    .await
    .unwrap();
    // One commit per job sent at once; the pulled ones (one commit each before) share
    // them or a few more: all of them in one while sends take less than the linger.
    let pulled = i64::try_from(pulled).unwrap();
    assert!(
        commits <= (12 - pulled) + pulled / 2,
        "12 attempts ({pulled} pulled) took {commits} commits"
    );
    drop(conn);
    app.cleanup().await;
}

/// An endpoint of `r`, `n` messages for it and their jobs, the first of which is
/// delivered (by `workers` workers, `cap` requests at once): it tells how quick the
/// endpoint is.
struct Started {
    ep: Endpoint,
    conn: sqlx::pool::PoolConnection<sqlx::Postgres>,
    ids: Vec<String>,
    jobs: Vec<(String, serde_json::Value)>,
    deliverer: Deliverer,
    stop: CancellationToken,
    worker: tokio::task::JoinHandle<()>,
}

async fn first_of_many_delivered(
    app: &TestApp,
    r: &Receiver,
    n: usize,
    workers: usize,
    cap: usize,
    tune: impl FnOnce(Deliverer) -> Deliverer,
) -> Started {
    let ep = add_endpoint(app, &r.url, None, SECRET).await;
    let mut conn = app.pool.acquire().await.unwrap();
    let ids = messages_for(&mut conn, &ep, n).await;
    let jobs = webhook_jobs(&mut conn).await;
    let (deliverer, stop, worker) = deliver_jobs_with(app, &jobs[..1], workers, cap, tune).await;
    first_delivered(app, &ep).await;
    Started {
        ep,
        conn,
        ids,
        jobs,
        deliverer,
        stop,
        worker,
    }
}

/// A deliverer that takes an endpoint for hanging only after 60 times its typical
/// latency, for tests that hold requests while they look or check the order an
/// endpoint's messages arrive in, one at a time behind a cap: a request held or slowed
/// by a busy machine must not pass for a hang, whose held messages would go again in
/// another order. Not for tests of hanging.
fn patient(d: Deliverer) -> Deliverer {
    d.with_stall_factor(60)
}

/// Waits until every message of the endpoint is delivered; returns them.
async fn every_delivered(app: &TestApp, ep: &Endpoint) -> Vec<Message> {
    wait_for("every message delivered", || async {
        let m = messages_of(app, ep).await;
        (m.iter().all(|m| m.status == "delivered")).then_some(m)
    })
    .await
}

/// An endpoint that answers quickly has several in-flight caps of its parked messages
/// taken in one pull, as many as it answers in about a quarter of a second, rather than
/// one cap per pull; they still go in order, each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quick_endpoints_pull_takes_several_caps_in_order() {
    let mut app = without_delivery().await;
    // 40 ms per request, one at a time (so the order they arrive in is the order they
    // were sent in): quick, yet too slow for a job to wait for its slot, so the jobs
    // behind the one in flight park.
    let r = Receiver::start(&[SECRET], |_| {
        Reply::After(std::time::Duration::from_millis(40), 200)
    })
    .await;
    let Started {
        ep,
        mut conn,
        ids,
        jobs,
        deliverer,
        stop,
        worker,
    } = first_of_many_delivered(&app, &r, 30, 4, 1, patient).await;
    // Then the rest come, in order.
    publish_in_order(&app, &jobs[1..]).await;
    // A cap at a time, with the next pull taken ahead, has at most two caps taken and
    // unrecorded, and one more being recorded (its slot is given back first).
    let most = wait_for("more than two caps taken at once", || async {
        let taken = taken_of(&app, &ep).await.len();
        (taken > 3).then_some(taken)
    })
    .await;
    let all = every_delivered(&app, &ep).await;
    stop.cancel();
    worker.await.unwrap();
    deliverer.broker.close().await;

    assert_eq!(all.len(), 30);
    let sent: Vec<String> = r.hits().into_iter().map(|h| h.id).collect();
    assert_eq!(
        sent, ids,
        "each sent once, in order (at most {most} taken at once)"
    );
    all_verified(&r);
    let count = |outcome: &str| attempts(&app, outcome);
    assert!(count("parked") >= 20, "parked {}", count("parked"));
    assert_eq!(count("pulled"), count("parked"));
    assert_eq!(
        webhook_jobs(&mut conn).await.len(),
        30,
        "nothing republished"
    );
    drop(conn);
    app.cleanup().await;
}

/// An endpoint answering in 30 ms, four requests at once (so pulled up to 32 at a
/// time), that slows down after a large pull of its 60 parked messages, delivered with
/// `faults` until all are delivered: the receiver, the message ids, the test's
/// connection and the messages.
async fn slowed_down_after_a_large_pull(
    app: &TestApp,
    faults: guildgate::faults::SharedFaults,
) -> (
    Receiver,
    Vec<String>,
    sqlx::pool::PoolConnection<sqlx::Postgres>,
    Vec<Message>,
) {
    // From request `slow_from` on, each request takes half as long again as the one
    // before, up to 400 ms: gradually enough that the endpoint never looks hanging (its
    // typical latency follows), fast enough that the rest of the pull waits in hand for
    // more than half a second.
    let slow_from = Arc::new(AtomicU64::new(u64::MAX));
    let from = slow_from.clone();
    let r = Receiver::start(&[SECRET], move |n| {
        let ms = match (n as u64).checked_sub(from.load(Ordering::SeqCst)) {
            None => 30.0,
            Some(m) => (30.0 * 1.5f64.powi(i32::try_from(m.min(20)).unwrap())).min(400.0),
        };
        Reply::After(std::time::Duration::from_secs_f64(ms / 1000.0), 200)
    })
    .await;
    // More workers than the cap of four, so the jobs behind the four in flight park.
    let b = first_of_many_delivered(app, &r, 60, 16, 4, |d| d.with_faults(faults)).await;
    // Then the rest, all at once, faster than the endpoint takes them, so a backlog parks.
    let queue = guildgate::amqp::Names::from_settings(&app.settings).webhooks();
    let bodies: Vec<(&str, Vec<u8>)> = b.jobs[1..]
        .iter()
        .map(|(id, payload)| (id.as_str(), serde_json::to_vec(payload).unwrap()))
        .collect();
    futures_util::future::join_all(
        bodies
            .iter()
            .map(|(id, body)| app.publish_to_queue(&queue, id, body)),
    )
    .await;
    // A large pull taken, with more than four caps of it still to go (a cap at a time,
    // with one ahead and one being recorded, has at most 12 taken).
    wait_for("a large pull taken", || async {
        (taken_of(app, &b.ep).await.len() > 20).then_some(())
    })
    .await;
    slow_from.store(r.count() as u64, Ordering::SeqCst);
    let all = every_delivered(app, &b.ep).await;
    b.stop.cancel();
    b.worker.await.unwrap();
    b.deliverer.broker.close().await;
    (r, b.ids, b.conn, all)
}

/// Each of the endpoint's messages was sent once (four at once, so in no strict
/// order), and none went through the broker again.
async fn each_sent_once_none_republished(
    r: &Receiver,
    ids: &[String],
    conn: &mut sqlx::PgConnection,
    all: &[Message],
) {
    assert_eq!(all.len(), ids.len());
    let mut sent: Vec<String> = r.hits().into_iter().map(|h| h.id).collect();
    sent.sort();
    let mut want = ids.to_vec();
    want.sort();
    assert_eq!(sent, want, "each sent once");
    all_verified(r);
    assert_eq!(
        webhook_jobs(conn).await.len(),
        ids.len(),
        "nothing republished"
    );
}

/// An endpoint that slows down after a large pull of its parked messages: once the
/// rest of the pull has waited in hand for more than half a second, all but a cap of it
/// goes back to parking and is pulled again, so the next pull, which renews the
/// endpoint's lease, is never far off and no claim runs out on a message still waiting
/// to go. Each message is sent once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_pull_of_an_endpoint_that_slows_down_is_put_back_and_pulled_again() {
    let mut app = without_delivery().await;
    let (r, ids, mut conn, all) =
        slowed_down_after_a_large_pull(&app, guildgate::faults::none()).await;

    let count = |outcome: &str| attempts(&app, outcome);
    assert!(count("put_back") >= 1, "put back {}", count("put_back"));
    assert_eq!(count("held"), 0, "never taken for hanging");
    each_sent_once_none_republished(&r, &ids, &mut conn, &all).await;
    drop(conn);
    app.cleanup().await;
}

/// A put-back commits but its answer is lost: the puller cannot tell whether the
/// messages are back in parking, so it never sends them itself; they go once, pulled
/// again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_whose_put_back_answer_was_lost_are_not_sent_twice() {
    let mut app = without_delivery().await;
    let faults = Arc::new(common::Injected::default());
    faults.once(Point::PutBackAnswer);
    let (r, ids, mut conn, all) = slowed_down_after_a_large_pull(&app, faults.clone()).await;

    assert!(!faults.pending(Point::PutBackAnswer), "a put-back happened");
    each_sent_once_none_republished(&r, &ids, &mut conn, &all).await;
    drop(conn);
    app.cleanup().await;
}

/// The read of pulled messages' targets fails: the pull has taken them already, so
/// each reads its own when its slot frees, and none waits for its claim to run out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulled_messages_whose_read_failed_read_their_own_and_go() {
    let mut app = without_delivery().await;
    let (r, ep, conn, ids, jobs) = busy_endpoint(&app, 8).await;
    let faults = Arc::new(common::Injected::default());
    faults.set(Point::PulledRead);
    let (deliverer, stop, worker) =
        deliver_jobs_with(&app, &jobs, 4, 1, |d| patient(d.with_faults(faults))).await;
    wait_messages(&app, &ep, 8, "delivered").await;
    stop.cancel();
    worker.await.unwrap();
    deliverer.broker.close().await;

    let count = |outcome: &str| attempts(&app, outcome);
    assert!(count("pulled") >= 4, "pulled {}", count("pulled"));
    let sent: Vec<String> = r.hits().into_iter().map(|h| h.id).collect();
    assert_eq!(sent, ids, "each sent once, in order");
    all_verified(&r);
    drop(conn);
    app.cleanup().await;
}

/// A parked endpoint starts hanging and its puller cannot hold what waits for it, the
/// database failing under it: the puller tries again until the database answers, so the
/// messages are held within moments, not left parked until the endpoint's lease runs
/// out. Once the endpoint answers, they go in order, each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_puller_that_cannot_hold_its_parked_messages_tries_again() {
    let mut app = without_delivery().await;
    let faults = Arc::new(common::Injected::default());
    faults.once(Point::HandBack);
    let gate = CancellationToken::new();
    let answer = gate.clone();
    // The first request answers in 50 ms, so the endpoint is known; the next hangs until
    // the test opens the gate, and those after it answer at once.
    let r = Receiver::start(&[SECRET], move |n| match n {
        0 => Reply::After(std::time::Duration::from_millis(50), 200),
        _ => Reply::Until(answer.clone(), std::time::Duration::from_secs(60), 200),
    })
    .await;
    let b = first_of_many_delivered(&app, &r, 8, 4, 1, |d| d.with_faults(faults.clone())).await;
    publish_in_order(&app, &b.jobs[1..]).await;

    // One request in flight, hanging; the six behind it parked, then held.
    let held = wait_for("the parked messages held", || async {
        let held = held_of(&app, &b.ep).await;
        (held.len() == 6).then_some(held)
    })
    .await;
    assert!(
        !faults.pending(Point::HandBack),
        "the first hand-back failed"
    );
    assert_eq!(held, b.ids[2..], "all but the sent and the one in flight");
    assert_eq!(r.count(), 2);

    gate.cancel();
    every_delivered(&app, &b.ep).await;
    b.stop.cancel();
    b.worker.await.unwrap();
    b.deliverer.broker.close().await;
    let sent: Vec<String> = r.hits().into_iter().map(|h| h.id).collect();
    assert_eq!(sent, b.ids, "each sent once, in order");
    all_verified(&r);
    let mut conn = b.conn;
    assert_eq!(
        webhook_jobs(&mut conn).await.len(),
        8,
        "nothing republished"
    );
    drop(conn);
    app.cleanup().await;
}

/// Publishes `jobs` to the webhook queue one after the other, so they arrive in order.
async fn publish_in_order(app: &TestApp, jobs: &[(String, serde_json::Value)]) {
    let queue = guildgate::amqp::Names::from_settings(&app.settings).webhooks();
    for (id, payload) in jobs {
        app.publish_to_queue(&queue, id, &serde_json::to_vec(payload).unwrap())
            .await;
    }
}

/// Waits until one message of the endpoint is delivered.
async fn first_delivered(app: &TestApp, ep: &Endpoint) {
    wait_for("the first delivery", || async {
        let m = messages_of(app, ep).await;
        (m.iter().filter(|m| m.status == "delivered").count() == 1).then_some(())
    })
    .await;
}

/// Waits for the first of seven jobs (the only one published so far) to be delivered,
/// then publishes the other six: two go out and wait on an endpoint of an in-flight cap
/// of two, and four park.
async fn first_delivered_then_two_in_flight_four_parked(
    app: &TestApp,
    ep: &Endpoint,
    r: &Receiver,
    jobs: &[(String, serde_json::Value)],
) {
    first_delivered(app, ep).await;
    publish_in_order(app, &jobs[1..]).await;
    wait_for("two in flight and four parked", || async {
        let parked: i64 = sqlx::query_scalar("SELECT count(*) FROM webhook_parked")
            .fetch_one(&app.pool)
            .await
            .unwrap();
        (r.count() == 3 && parked == 4).then_some(())
    })
    .await;
}

/// A parked message's target is read with its pull, so the messages of a pull wait for
/// their slots ready to go; one that waited longer than `BUSY_WAIT` for its slot is
/// read again, so a change to the endpoint reaches its parked messages within that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pulled_message_that_waited_long_for_its_slot_goes_where_its_endpoint_points_now() {
    let mut app = without_delivery().await;
    // The first request answers in 2 s, so the endpoint is known to be slow (not to
    // hang while the next ones wait); the second when the test opens `first`, the
    // others when it opens `rest`.
    let (first, rest) = (CancellationToken::new(), CancellationToken::new());
    let (first_gate, rest_gate) = (first.clone(), rest.clone());
    let long = std::time::Duration::from_secs(30);
    let old = Receiver::start(&[SECRET], move |n| match n {
        0 => Reply::After(std::time::Duration::from_secs(2), 200),
        1 => Reply::Until(first_gate.clone(), long, 200),
        _ => Reply::Until(rest_gate.clone(), long, 200),
    })
    .await;
    let new = Receiver::start(&[SECRET], |_| Reply::Status(200)).await;
    let ep = add_endpoint(&app, &old.url, None, SECRET).await;
    let mut conn = app.pool.acquire().await.unwrap();
    messages_for(&mut conn, &ep, 7).await;
    let jobs = webhook_jobs(&mut conn).await;
    let (deliverer, stop, worker) = deliver_jobs(&app, &jobs[..1], 4, 2).await;
    first_delivered(&app, &ep).await;
    publish_in_order(&app, &jobs[1..]).await;
    // Two in flight and the four others parked. On a busy machine a job may park while
    // a slot is still being taken and be pulled into it, so one or both in flight, and
    // the message waiting for the next slot, can come from a pull (their parked rows
    // stay until their attempts are recorded): what this test needs holds either way,
    // the four behind waiting with their targets read before the change below.
    wait_for("two in flight and four waiting behind", || async {
        let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM webhook_parked")
            .fetch_one(&app.pool)
            .await
            .unwrap();
        (old.count() == 3 && rows >= 4).then_some(())
    })
    .await;
    // A slot frees: the puller pulls two (an in-flight cap), reading their targets,
    // and sends the first; the second waits for the next slot.
    first.cancel();
    wait_for("the first pulled message sent", || async {
        (old.count() == 4).then_some(())
    })
    .await;
    endpoints::update(
        &mut conn,
        &ep.business_id,
        &ep.id,
        endpoints::EndpointPatch {
            url: Some(new.url.clone()),
            ..Default::default()
        },
        LOCAL,
    )
    .await
    .unwrap();
    let waited = guildgate::webhooks::deliver::BUSY_WAIT + std::time::Duration::from_millis(200);
    tokio::time::sleep(waited).await;
    rest.cancel();
    wait_messages(&app, &ep, 7, "delivered").await;
    stop.cancel();
    worker.await.unwrap();
    deliverer.broker.close().await;

    // The first, the two in flight and the first pulled went to the old address; the
    // second pulled, read before the change but sent after waiting longer than
    // `BUSY_WAIT`, went to the new one, as did the two pulled after the change.
    assert_eq!(old.count(), 4, "sent to the old address");
    assert_eq!(new.count(), 3, "sent to the new address");
    all_verified(&old);
    all_verified(&new);
    drop(conn);
    app.cleanup().await;
}

/// Seven messages of an endpoint with an in-flight cap of two, with their first pull
/// taken ([`first_pull_taken`]).
struct Pulling {
    r: Receiver,
    ep: Endpoint,
    conn: sqlx::pool::PoolConnection<sqlx::Postgres>,
    ids: Vec<String>,
    deliverer: Deliverer,
    stop: CancellationToken,
    worker: tokio::task::JoinHandle<()>,
    /// Answers the third request (in flight) with its status.
    third: CancellationToken,
    /// Answers every later request with 200.
    rest: CancellationToken,
}

/// Delivers seven messages of an endpoint with an in-flight cap of two up to its first
/// pull: the first answered in 150 ms (slow enough to park behind and for a pull of one
/// cap), the second answered once the other six were two in flight and four parked, so
/// the puller took the next two (an in-flight cap) and sent the first of them, while
/// the second waits for a slot. The third request answers `third_status` when the test
/// opens `third`. The test holds two requests while it looks, which on a busy machine
/// may take seconds, so its deliverer is patient: it takes the endpoint for hanging
/// only after 60 times its typical latency (9 s, not the 1.2 s of service, after which
/// the parked messages would be held), and pulls ahead while that latency, which the
/// held requests raise once they answer, is under 5 s (not half a second).
async fn first_pull_taken(app: &TestApp, third_status: u16) -> Pulling {
    let gates = [(); 3].map(|_| CancellationToken::new());
    let [second, third, rest] = gates.clone();
    let long = std::time::Duration::from_secs(30);
    let r = Receiver::start(&[SECRET], move |n| match n {
        0 => Reply::After(std::time::Duration::from_millis(150), 200),
        1 => Reply::Until(gates[0].clone(), long, 200),
        2 => Reply::Until(gates[1].clone(), long, third_status),
        _ => Reply::Until(gates[2].clone(), long, 200),
    })
    .await;
    let ep = add_endpoint(app, &r.url, None, SECRET).await;
    let mut conn = app.pool.acquire().await.unwrap();
    let ids = messages_for(&mut conn, &ep, 7).await;
    let jobs = webhook_jobs(&mut conn).await;
    let (deliverer, stop, worker) = deliver_jobs_with(app, &jobs[..1], 4, 2, |d| {
        patient(d).with_pull_ahead_below(std::time::Duration::from_secs(5))
    })
    .await;
    first_delivered_then_two_in_flight_four_parked(app, &ep, &r, &jobs).await;
    second.cancel();
    wait_for("the first pulled message sent", || async {
        (r.count() == 4).then_some(())
    })
    .await;
    Pulling {
        r,
        ep,
        conn,
        ids,
        deliverer,
        stop,
        worker,
        third,
        rest,
    }
}

/// The messages of an endpoint pulled from parking and not yet recorded (being sent or
/// waiting for their slot), by id.
async fn taken_of(app: &TestApp, ep: &Endpoint) -> Vec<String> {
    waiting_of(app, ep, |w| {
        w.parked && w.held && w.status == "pending" && w.attempts == 0
    })
    .await
}

/// An endpoint answering within its pull-ahead bound (`PULL_AHEAD_BELOW` in service,
/// raised here: see [`first_pull_taken`]) has its next pull taken while the last
/// message of the pull before is sent, so a freed slot does not wait for the database;
/// the order holds, and what was taken ahead is handed back, due at once, when the
/// process stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quick_endpoints_next_pull_is_taken_ahead_and_handed_back_on_stop() {
    let mut app = without_delivery().await;
    let mut p = first_pull_taken(&app, 200).await;
    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };
    assert_eq!(taken_of(&app, &p.ep).await, sorted(p.ids[3..5].to_vec()));
    // Another frees: the second goes, and with it the next pull is taken, while both
    // slots are still busy.
    p.third.cancel();
    wait_for("the next pull taken ahead", || async {
        let taken = taken_of(&app, &p.ep).await;
        (p.r.count() == 5 && taken.len() == 4).then_some(())
    })
    .await;
    assert_eq!(taken_of(&app, &p.ep).await, sorted(p.ids[3..].to_vec()));
    let ahead = sorted(p.ids[5..].to_vec());

    // Stopping hands them back due at once (from when they were parked), for the hold
    // releaser, not when their claim runs out; the two in flight finish and are
    // recorded.
    p.stop.cancel();
    wait_for("the pull taken ahead handed back", || async {
        // Due from when they were parked, so that they keep their place.
        let due: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM webhook_parked WHERE message_id = ANY ($1) AND taken_until = parked_at",
        )
        .bind(&ahead)
        .fetch_one(&app.pool)
        .await
        .unwrap();
        (due == 2).then_some(())
    })
    .await;
    p.rest.cancel();
    p.worker.await.unwrap();
    p.deliverer.broker.close().await;
    assert_eq!(p.r.count(), 5, "nothing sent after the stop");
    let delivered: Vec<String> = messages_of(&app, &p.ep)
        .await
        .into_iter()
        .filter(|m| m.status == "delivered")
        .map(|m| m.id)
        .collect();
    assert_eq!(delivered.len(), 5);
    assert!(ahead.iter().all(|id| !delivered.contains(id)));
    sqlx::query("DELETE FROM outbox")
        .execute(&mut *p.conn)
        .await
        .unwrap();
    assert_eq!(
        messages::release_due(&mut p.conn, 10, 100).await.unwrap(),
        2
    );
    let released: Vec<String> = webhook_jobs(&mut p.conn)
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(released, p.ids[5..].to_vec(), "given jobs again, in order");
    // Each sent once so far, in the order of their jobs.
    let sent: Vec<String> = p.r.hits().into_iter().map(|h| h.id).collect();
    assert_eq!(sent, p.ids[..5].to_vec());
    all_verified(&p.r);
    drop(p.conn);
    app.cleanup().await;
}

/// An endpoint that answers its first request at once (a quick endpoint: a pull asks
/// for several in-flight caps), its next two when the first two gates open and every
/// later one when the third does; `n` messages for it, and the first delivered by a
/// deliverer of four workers and an in-flight cap of two.
struct Gated {
    r: Receiver,
    gates: [CancellationToken; 3],
    s: Started,
}

async fn quick_and_gated(app: &TestApp, n: usize, tune: fn(Deliverer) -> Deliverer) -> Gated {
    let gates = [(); 3].map(|_| CancellationToken::new());
    let script = gates.clone();
    let long = std::time::Duration::from_secs(30);
    let r = Receiver::start(&[SECRET], move |n| match n {
        0 => Reply::Status(200),
        1 => Reply::Until(script[0].clone(), long, 200),
        2 => Reply::Until(script[1].clone(), long, 200),
        _ => Reply::Until(script[2].clone(), long, 200),
    })
    .await;
    let s = first_of_many_delivered(app, &r, n, 4, 2, tune).await;
    Gated { r, gates, s }
}

impl Gated {
    /// Publishes jobs 1 to 4: two go out, two park. Then the first gate opens: the
    /// pull takes both parked messages and the first of them goes, the other is left in
    /// hand.
    async fn one_in_hand(&self, app: &TestApp) {
        publish_in_order(app, &self.s.jobs[1..5]).await;
        wait_for("two in flight and two parked", || async {
            (self.r.count() == 3 && waiting_parked(app).await == 2).then_some(())
        })
        .await;
        self.gates[0].cancel();
        wait_for("the first pulled message sent", || async {
            (self.r.count() == 4).then_some(())
        })
        .await;
        assert_eq!(
            taken_of(app, &self.s.ep).await,
            sorted(self.s.ids[3..5].to_vec())
        );
    }

    /// Opens the last gate, waits for every message to be delivered and stops.
    async fn finish(self, app: &TestApp) -> Receiver {
        self.gates[2].cancel();
        every_delivered(app, &self.s.ep).await;
        self.s.stop.cancel();
        self.s.worker.await.unwrap();
        self.s.deliverer.broker.close().await;
        drop(self.s.conn);
        self.r
    }
}

/// Parked messages not taken by a pull.
async fn waiting_parked(app: &TestApp) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM webhook_parked WHERE taken_until IS NULL")
        .fetch_one(&app.pool)
        .await
        .unwrap()
}

fn sorted(mut ids: Vec<String>) -> Vec<String> {
    ids.sort();
    ids
}

/// Each message sent once and in the order of its job, but for the pairs starting at
/// the indexes in `pairs`, which went out at once into two free slots and may arrive in
/// either order.
fn sent_in_order(r: &Receiver, ids: &[String], pairs: &[usize]) {
    let sent: Vec<String> = r.hits().into_iter().map(|h| h.id).collect();
    assert_eq!(sent.len(), ids.len(), "sent {sent:?}");
    let mut i = 0;
    while i < ids.len() {
        let end = if pairs.contains(&i) { i + 2 } else { i + 1 };
        assert_eq!(
            sorted(sent[i..end].to_vec()),
            sorted(ids[i..end].to_vec()),
            "sent {sent:?}"
        );
        i = end;
    }
    all_verified(r);
}

/// A message in the puller's hand goes when a slot frees, without waiting for the jobs
/// of its endpoint that arrived since and are still writing their parks: they park
/// behind it anyway. Here a later job's park waits on a lock of its message's row; the
/// message in hand goes meanwhile, and the later one after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_in_hand_goes_while_later_jobs_write_their_parks() {
    let mut app = without_delivery().await;
    let g = quick_and_gated(&app, 6, patient).await;
    g.one_in_hand(&app).await;
    // A later job whose park cannot be written yet: its message's row is locked.
    let mut lock = app.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM webhook_messages WHERE id = $1 FOR UPDATE")
        .bind(&g.s.ids[5])
        .execute(&mut *lock)
        .await
        .unwrap();
    publish_in_order(&app, &g.s.jobs[5..]).await;
    wait_for("the later job writing its park", || async {
        park_waits_on_a_lock(&app).await.then_some(())
    })
    .await;
    // The other slot frees: the message in hand goes while the park still waits.
    g.gates[1].cancel();
    wait_for("the message in hand sent", || async {
        (g.r.count() == 5).then_some(())
    })
    .await;
    lock.rollback().await.unwrap();
    let ids = g.s.ids.clone();
    let r = g.finish(&app).await;
    // The second and third went out together into two free slots.
    sent_in_order(&r, &ids, &[1]);
    app.cleanup().await;
}

/// A pull takes only what was parked before the first job of its endpoint still
/// deciding here: a later job's park, written while that one's is still being written,
/// waits behind it. Here the puller is finishing (its last pull took less than a cap of
/// a quick endpoint), so it pulls without waiting for the line; the test holds a place
/// in the line (job A, deciding) and writes the park of a later job (B) itself. B goes
/// only once A has parked, after it. (Should the machine be so slow that the endpoint
/// no longer counts as quick, the puller waits for the line anyway.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_later_jobs_park_waits_for_an_earlier_job_still_deciding() {
    let mut app = without_delivery().await;
    let g = quick_and_gated(&app, 6, patient).await;
    let ep = g.s.ep.id.clone();
    // Two go out, one parks; the first gate opens and the pull takes the one parked:
    // less than a cap, so the puller is finishing.
    publish_in_order(&app, &g.s.jobs[1..4]).await;
    wait_for("two in flight and one parked", || async {
        (g.r.count() == 3 && waiting_parked(&app).await == 1).then_some(())
    })
    .await;
    g.gates[0].cancel();
    wait_for("the parked message sent", || async {
        (g.r.count() == 4).then_some(())
    })
    .await;
    // A is deciding; B, which arrived after it, has its park written.
    let (a, b) = (g.s.ids[5].clone(), g.s.ids[4].clone());
    let place = g.s.deliverer.line().join(&ep);
    let a_at = chrono::DateTime::from_timestamp_micros(place.at()).unwrap();
    park_row(&app, &b, a_at + chrono::Duration::milliseconds(1)).await;
    // A slot frees: the puller looks, and must not take B.
    g.gates[1].cancel();
    wait_for("the second request answered", || async {
        (attempts(&app, "delivered") >= 3).then_some(())
    })
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(g.r.count(), 4, "B was sent ahead of A");
    assert!(!taken_of(&app, &g.s.ep).await.contains(&b), "B was taken");
    // A parks and leaves the line; both go, A first.
    park_row(&app, &a, a_at).await;
    drop(place);
    // A goes into the free slot; B waits for the next.
    wait_for("A sent", || async { (g.r.count() == 5).then_some(()) }).await;
    let ids = g.s.ids.clone();
    let r = g.finish(&app).await;
    let order = [&ids[..4], &[a, b]].concat();
    // The second and third went out together into two free slots.
    sent_in_order(&r, &order, &[1]);
    app.cleanup().await;
}

/// Writes the park of a message stamped `at`, as its job would.
async fn park_row(app: &TestApp, id: &str, at: chrono::DateTime<chrono::Utc>) {
    let mut conn = app.pool.acquire().await.unwrap();
    let park = messages::Parked {
        message_id: id.to_string(),
        at,
        lease_until: guildgate::webhooks::parking::lease_until(chrono::Utc::now()),
        attempt: 0,
        hold_count: 0,
    };
    messages::park_many(&mut conn, &[park]).await.unwrap();
}

/// Whether a park being written waits on a lock.
async fn park_waits_on_a_lock(app: &TestApp) -> bool {
    sqlx::query_scalar(
        "SELECT count(*) > 0 FROM pg_stat_activity
         WHERE datname = current_database() AND wait_event_type = 'Lock'
           AND query LIKE '%INSERT INTO webhook_parked%'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap()
}

/// A pull that took less than it asked for is followed by one taken ahead when more
/// messages were parked since it looked: an endpoint whose backlog is still arriving
/// (its jobs parking behind the ones pulled) has its next pull ready when a slot frees,
/// rather than after a trip to the database with the slot empty. The order holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_parked_since_a_short_pull_is_pulled_ahead() {
    let mut app = without_delivery().await;
    let g = quick_and_gated(&app, 7, |d| {
        patient(d).with_pull_ahead_below(std::time::Duration::from_secs(5))
    })
    .await;
    // The pull took two, less than it asks for.
    g.one_in_hand(&app).await;
    // Two more park behind them, after the pull looked (counted once the worker has
    // seen their parks written, which is what the puller looks at).
    let parked = attempts(&app, "parked");
    publish_in_order(&app, &g.s.jobs[5..]).await;
    wait_for("two more parked", || async {
        (waiting_parked(&app).await == 2 && attempts(&app, "parked") == parked + 2).then_some(())
    })
    .await;
    // The other slot frees: the last message in hand goes, and the next pull is taken
    // with it, while both slots are busy again.
    g.gates[1].cancel();
    wait_for("the next pull taken ahead", || async {
        let taken = taken_of(&app, &g.s.ep).await;
        (g.r.count() == 5 && taken.len() == 4).then_some(())
    })
    .await;
    assert_eq!(taken_of(&app, &g.s.ep).await, sorted(g.s.ids[3..].to_vec()));
    let ids = g.s.ids.clone();
    let r = g.finish(&app).await;
    // The second and third, and the last two, went out together into two free slots.
    sent_in_order(&r, &ids, &[1, 5]);
    app.cleanup().await;
}

/// A 410 Gone from one request: nothing is sent to the endpoint after it, neither a
/// parked message pulled before it (its target read while the endpoint was enabled) on
/// a slot that another request frees while the 410 is being recorded, nor what is parked
/// behind. Requests wait for the record (which disables the endpoint) and read their
/// targets again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_pulled_before_a_410_is_sent_after_it() {
    let mut app = without_delivery().await;
    // The next two were pulled with their targets (the endpoint enabled).
    let p = first_pull_taken(&app, 410).await;
    // The record of the 410 is held up (the test holds the endpoint's row, which it
    // disables). Meanwhile the 410's slot frees, and the other request in flight answers
    // 200 and frees another: the message waiting with its old target must not go.
    let mut hold_up = app.pool.begin().await.unwrap();
    sqlx::query("SELECT id FROM webhook_endpoints WHERE id = $1 FOR UPDATE")
        .bind(&p.ep.id)
        .execute(&mut *hold_up)
        .await
        .unwrap();
    p.third.cancel();
    wait_for("the 410 answered", || async {
        (attempts(&app, "gone") == 1).then_some(())
    })
    .await;
    p.rest.cancel();
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(
        p.r.count(),
        4,
        "nothing sent while the 410 is being recorded"
    );
    hold_up.commit().await.unwrap();
    let status_of = |ms: &[Message], id: &str| {
        let m = ms.iter().find(|m| m.id == id).expect("the message");
        (m.status.clone(), m.last_error.clone().unwrap_or_default())
    };
    wait_for("the messages after the 410 failed unsent", || async {
        let ms = messages_of(&app, &p.ep).await;
        p.ids[4..]
            .iter()
            .all(|id| status_of(&ms, id).0 == "failed")
            .then_some(())
    })
    .await;
    wait_for("the one in flight delivered", || async {
        let ms = messages_of(&app, &p.ep).await;
        (status_of(&ms, &p.ids[3]).0 == "delivered").then_some(())
    })
    .await;
    p.stop.cancel();
    p.worker.await.unwrap();
    p.deliverer.broker.close().await;

    let sent: Vec<String> = p.r.hits().into_iter().map(|h| h.id).collect();
    assert_eq!(sent, p.ids[..4].to_vec(), "nothing sent after the 410");
    let ms = messages_of(&app, &p.ep).await;
    assert_eq!(status_of(&ms, &p.ids[2]).0, "failed");
    let answered: Vec<Option<i32>> = attempts_of(&app, &p.ids[2])
        .await
        .into_iter()
        .map(|a| a.status_code)
        .collect();
    assert_eq!(answered, vec![Some(410)]);
    for id in &p.ids[4..] {
        assert_eq!(
            status_of(&ms, id),
            ("failed".into(), "the endpoint is disabled".into())
        );
    }
    drop(p.conn);
    app.cleanup().await;
}

/// `n` messages for business A's endpoints (that of `ep_a` and any other of A's), then
/// one for B's `ep_b`: A's message ids, and the jobs of all of them, A's first.
async fn jobs_of_a_then_b(
    conn: &mut sqlx::PgConnection,
    ep_a: &Endpoint,
    n: usize,
    ep_b: &Endpoint,
) -> (Vec<String>, Vec<(String, serde_json::Value)>) {
    let ids_a = messages_for(conn, ep_a, n).await;
    let mut jobs = webhook_jobs(conn).await;
    sqlx::query("DELETE FROM outbox")
        .execute(&mut *conn)
        .await
        .unwrap();
    messages_for(conn, ep_b, 1).await;
    jobs.extend(webhook_jobs(conn).await);
    (ids_a, jobs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_business_holds_its_share_of_the_workers_and_another_is_served_meanwhile() {
    let mut app = without_delivery().await;
    // Business A's endpoint holds its answers (each under the second after which a
    // request gives its worker back anyway) until business B's message has arrived.
    let b_arrived = CancellationToken::new();
    let gate = b_arrived.clone();
    let a = Receiver::start(&[SECRET], move |_| {
        Reply::Until(gate.clone(), std::time::Duration::from_secs(5), 200)
    })
    .await;
    let opens = b_arrived.clone();
    let b = Receiver::start(&[SECRET], move |_| {
        opens.cancel();
        Reply::Status(200)
    })
    .await;
    let ep_a = add_endpoint(&app, &a.url, None, SECRET).await;
    let ep_b = add_endpoint_of(&app, "bus_Other00001", &b.url, None, SECRET).await;
    let mut conn = app.pool.acquire().await.unwrap();
    let (ids_a, jobs) = jobs_of_a_then_b(&mut conn, &ep_a, 4, &ep_b).await;
    // A's four jobs first, then B's: four workers, and A's endpoint takes four at once.
    let (deliverer, stop, worker) = deliver_jobs(&app, &jobs, 4, 4).await;
    assert_eq!(deliverer.shares.share(), 1, "a quarter of four workers");
    wait_messages(&app, &ep_a, 4, "delivered").await;
    wait_messages(&app, &ep_b, 1, "delivered").await;
    stop.cancel();
    worker.await.unwrap();
    deliverer.broker.close().await;

    // A's requests held one worker between them: B's message went out while they were
    // all still waiting, not once a second had given their workers back.
    let a_hits = a.hits();
    assert_eq!(a_hits.len(), 4, "each of A's sent once");
    let mut sent_a: Vec<String> = a_hits.iter().map(|h| h.id.clone()).collect();
    sent_a.sort();
    let mut want = ids_a.clone();
    want.sort();
    assert_eq!(sent_a, want);
    let first_a = a_hits.iter().map(|h| h.at).min().unwrap();
    let b_at = b.hits()[0].at;
    assert!(
        b_at.saturating_duration_since(first_a) < guildgate::webhooks::deliver::STALLED_AFTER,
        "B's message waited {:?} behind A's requests",
        b_at.saturating_duration_since(first_a)
    );
    all_verified(&a);
    all_verified(&b);
    assert_eq!(
        deliverer.shares.held(&ep_a.business_id),
        0,
        "shares given back"
    );
    drop(conn);
    app.cleanup().await;
}

/// Jobs waiting for their turn of an endpoint's `rate_limit` (and the jobs in line
/// behind them) hold workers, as requests do: together they hold only their business's
/// share, and another business's message is not kept behind them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_waiting_for_a_rate_limit_hold_only_their_business_share_of_the_workers() {
    let mut app = without_delivery().await;
    let a = Receiver::start(&[SECRET], |_| Reply::Status(200)).await;
    let b = Receiver::start(&[SECRET], |_| Reply::Status(200)).await;
    // Three endpoints of A's, one delivery a second each, three messages each: every
    // endpoint's second message waits for its turn, its third in line behind it.
    let mut eps_a = Vec::new();
    for _ in 0..3 {
        let ep = add_endpoint(&app, &a.url, None, SECRET).await;
        let mut conn = app.pool.acquire().await.unwrap();
        endpoints::update(
            &mut conn,
            &ep.business_id,
            &ep.id,
            guildgate::webhooks::endpoints::EndpointPatch {
                rate_limit: Some(Some(1)),
                ..Default::default()
            },
            LOCAL,
        )
        .await
        .unwrap();
        eps_a.push(ep);
    }
    let ep_b = add_endpoint_of(&app, "bus_Other00001", &b.url, None, SECRET).await;
    let mut conn = app.pool.acquire().await.unwrap();
    let (ids_a, jobs) = jobs_of_a_then_b(&mut conn, &eps_a[0], 3, &ep_b).await;
    assert_eq!(ids_a.len(), 9, "three messages for each of A's endpoints");
    // A's nine jobs first, then B's: four workers.
    let (deliverer, stop, worker) = deliver_jobs(&app, &jobs, 4, 4).await;
    assert_eq!(deliverer.shares.share(), 1, "a quarter of four workers");
    wait_messages(&app, &ep_b, 1, "delivered").await;
    // Every endpoint of A's has had its first turn.
    for ep in &eps_a {
        wait_for("the first message of each of A's endpoints", || async {
            let m = messages_of(&app, ep).await;
            m.iter().any(|m| m.status == "delivered").then_some(())
        })
        .await;
    }
    stop.cancel();
    worker.await.unwrap();
    deliverer.broker.close().await;

    // B's message went out while A's jobs waited for their turns, not a turn later.
    let a_hits = a.hits();
    let first_a = a_hits.iter().map(|h| h.at).min().unwrap();
    let b_at = b.hits()[0].at;
    assert!(
        b_at.saturating_duration_since(first_a) < std::time::Duration::from_millis(500),
        "B's message waited {:?} behind A's jobs waiting for their turns",
        b_at.saturating_duration_since(first_a)
    );
    // None of A's lost or sent twice: the ones not sent yet are held until their turns.
    let mut sent_a: Vec<String> = a_hits.iter().map(|h| h.id.clone()).collect();
    sent_a.sort();
    sent_a.dedup();
    assert_eq!(sent_a.len(), a_hits.len(), "each of A's sent once at most");
    for ep in &eps_a {
        let m = messages_of(&app, ep).await;
        assert_eq!(m.len(), 3);
        assert!(
            m.iter()
                .all(|m| m.status == "delivered" || m.status == "pending"),
            "{m:?}"
        );
    }
    all_verified(&a);
    all_verified(&b);
    assert_eq!(
        deliverer.shares.held(&eps_a[0].business_id),
        0,
        "shares given back"
    );
    drop(conn);
    app.cleanup().await;
}

/// A deliverer of `app` whose endpoints take at most `cap` requests at once, not
/// running: tests drive its view of the endpoints.
fn idle_deliverer(app: &TestApp, cap: usize) -> Deliverer {
    let mut settings = app.settings.webhooks.clone();
    settings.max_in_flight_per_endpoint = cap;
    Deliverer::new(
        app.pool.clone(),
        guildgate::amqp::Broker::new(&app.settings, "test-deliverer"),
        &settings,
        app.metrics.clone(),
    )
    .unwrap()
}

/// A fan-out of `app` beside the delivery workers `deliverer`.
fn fanout_beside(app: &TestApp, deliverer: &Deliverer) -> Fanout {
    Fanout {
        pool: app.pool.clone(),
        broker: guildgate::amqp::Broker::new(&app.settings, "test-fanout"),
        prefetch: 1,
        batch_size: 1,
        batch_linger: std::time::Duration::ZERO,
        metrics: app.metrics.clone(),
        holds: Some(deliverer.clone()),
    }
}

/// A grant event of `app`'s business, as the fan-out consumes it.
fn grant_event(app: &TestApp) -> Vec<u8> {
    let mut body = common::events::fixture("../webhooks/entitlement_grant.created.json");
    body["business_id"] = serde_json::json!(app.business());
    serde_json::to_vec(&body).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_out_creates_the_messages_of_an_endpoint_known_to_fail_held() {
    use guildgate::webhooks::deliver::{BREAKER_COOL_DOWN, BREAKER_THRESHOLD};
    use guildgate::webhooks::isolation::Admission;
    let mut app = without_delivery().await;
    let failing = add_endpoint(&app, "http://127.0.0.1:9/failing", None, SECRET).await;
    let fine = add_endpoint(&app, "http://127.0.0.1:9/fine", None, SECRET).await;
    // The delivery workers' view: `failing` failed often enough to open its circuit.
    let deliverer = idle_deliverer(&app, BREAKER_THRESHOLD as usize);
    for _ in 0..BREAKER_THRESHOLD {
        let Admission::Go(permit) = deliverer
            .isolation
            .admit(&failing.id, std::time::Instant::now())
        else {
            panic!("admitted until its circuit opens");
        };
        permit.finish(false, std::time::Instant::now());
    }
    let fanout = fanout_beside(&app, &deliverer);
    assert_eq!(
        fanout.handle(&grant_event(&app)).await.unwrap(),
        Fanned::Messages(2)
    );

    // Both messages exist; only the healthy endpoint's has a job, the other is held
    // until the circuit closes, with no attempt.
    let held = held_of(&app, &failing).await;
    assert_eq!(held.len(), 1);
    assert!(held_of(&app, &fine).await.is_empty());
    let mut conn = app.pool.acquire().await.unwrap();
    let jobs = webhook_jobs(&mut conn).await;
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].1["endpoint_id"], serde_json::json!(fine.id));
    let until: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT held_until FROM webhook_messages WHERE id = $1")
            .bind(&held[0])
            .fetch_one(&mut *conn)
            .await
            .unwrap();
    let wait = (until - chrono::Utc::now()).to_std().unwrap();
    assert!(
        wait > BREAKER_COOL_DOWN - std::time::Duration::from_secs(10) && wait <= BREAKER_COOL_DOWN,
        "held until the circuit closes: {wait:?}"
    );
    assert_eq!(messages_of(&app, &failing).await[0].attempts, 0);
    drop(conn);
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fan_out_hold_written_as_its_endpoint_answers_is_parked_for_its_puller() {
    use guildgate::webhooks::isolation::Admission;
    let mut app = without_delivery().await;
    let receiver = Receiver::start(&[SECRET], |_| Reply::Status(200)).await;
    let ep = add_endpoint(&app, &receiver.url, None, SECRET).await;
    // The endpoint's one slot has been taken for two seconds with no answer: longer
    // than an endpoint none of whose requests has answered may go before it counts as
    // hanging, so what the fan-out creates for it is held.
    let deliverer = idle_deliverer(&app, 1);
    let two_seconds_ago = std::time::Instant::now()
        .checked_sub(std::time::Duration::from_secs(2))
        .unwrap();
    let Admission::Go(permit) = deliverer.isolation.admit(&ep.id, two_seconds_ago) else {
        panic!("a fresh endpoint is admitted");
    };
    // The fan-out's statement waits behind a lock, so the endpoint answers while its
    // hold is being written: that success comes too early to park the hold, and no
    // request of the endpoint is left to answer after it.
    let mut locker = app.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE webhook_messages IN SHARE MODE")
        .execute(&mut *locker)
        .await
        .unwrap();
    let fanout = fanout_beside(&app, &deliverer);
    let body = grant_event(&app);
    let fanning = tokio::spawn(async move { fanout.handle(&body).await });
    wait_for("the fan-out waiting for its write", || async {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_locks
             WHERE NOT granted AND relation = 'webhook_messages'::regclass",
        )
        .fetch_one(&app.pool)
        .await
        .unwrap();
        (waiting > 0).then_some(())
    })
    .await;
    assert!(
        !permit.finish(true, std::time::Instant::now()),
        "nothing was held when it answered"
    );
    locker.commit().await.unwrap();
    assert_eq!(fanning.await.unwrap().unwrap(), Fanned::Messages(1));

    // The fan-out saw the answer once its hold was written and parked the message for
    // this process's puller, which sends it: no hold releaser runs here, and no job
    // goes through the broker for it.
    let delivered = wait_messages(&app, &ep, 1, "delivered").await;
    assert_eq!(delivered[0].attempts, 1);
    assert_eq!(receiver.count(), 1);
    all_verified(&receiver);
    let mut conn = app.pool.acquire().await.unwrap();
    assert!(webhook_jobs(&mut conn).await.is_empty(), "no job for it");
    drop(conn);
    deliverer.stop.cancel();
    deliverer.pullers.close();
    deliverer.pullers.wait().await;
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_of_the_deliverer_made_before_it_runs_stops_with_it() {
    // The fan-out holds such a copy and starts pullers through it: they must see the
    // process stop, or a graceful shutdown waits for them to drain their endpoints.
    let mut app = without_delivery().await;
    let deliverer = idle_deliverer(&app, 1);
    let copy = deliverer.clone();
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(deliverer.run(shutdown.clone()));
    assert!(!copy.stop.is_cancelled(), "running");
    shutdown.cancel();
    tokio::time::timeout(std::time::Duration::from_secs(30), running)
        .await
        .expect("the deliverer stops")
        .unwrap();
    assert!(copy.stop.is_cancelled(), "the copy's pullers stop too");
    app.cleanup().await;
}

/// A merchant's client of the REST API, as the platform's SDKs call it.
struct Api {
    base: String,
    key: String,
    http: reqwest::Client,
}

impl Api {
    /// A key for `business` (created if new).
    async fn of(app: &TestApp, business: &str) -> Self {
        let mut conn = app.pool.acquire().await.unwrap();
        let (_, key) = guildgate::web::api::auth::create_api_key(
            &mut conn,
            &guildgate::domain::ids::BusinessId::parse(business).unwrap(),
            Some("test"),
        )
        .await
        .unwrap();
        use secrecy::ExposeSecret;
        Self {
            base: format!("http://{}", app.addr),
            key: key.expose_secret().to_string(),
            http: reqwest::Client::new(),
        }
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.key);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req.send().await.expect("guildgate answers");
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        let v = if text.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text))
        };
        (status, v)
    }

    async fn get(&self, path: &str) -> (u16, serde_json::Value) {
        self.call(reqwest::Method::GET, path, None).await
    }

    async fn post(&self, path: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }

    async fn patch(&self, path: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
        self.call(reqwest::Method::PATCH, path, Some(body)).await
    }
}

/// An app whose API budget does not get in the way of a test that makes many calls.
async fn api_app() -> TestApp {
    TestApp::spawn_with(
        TestConfig::default()
            .env("GUILDGATE_API__REQUESTS_PER_SECOND", "1000")
            .env("GUILDGATE_API__BURST", "1000"),
    )
    .await
}

/// Asserts a 422 whose message names `what`.
fn refused_naming(got: (u16, serde_json::Value), code: &str, what: &str) {
    let (s, v) = got;
    assert_eq!(s, 422, "{what}: {v}");
    assert_eq!(v["code"], code, "{what}: {v}");
    assert!(
        v["message"].as_str().unwrap().contains(what),
        "the message names {what}: {v}"
    );
}

/// The fields of the SDK's `WebhookDetails`, each of the type it reads.
fn assert_webhook_details(v: &serde_json::Value) {
    for field in ["id", "created_at", "description", "updated_at", "url"] {
        assert!(v[field].is_string(), "{field} is a string: {v}");
    }
    assert!(v["metadata"].is_object(), "metadata is an object: {v}");
    assert!(
        v["metadata"]
            .as_object()
            .unwrap()
            .values()
            .all(|x| x.is_string()),
        "{v}"
    );
    assert!(v["disabled"].is_boolean(), "{v}");
    assert!(
        v["filter_types"].is_null() || v["filter_types"].is_array(),
        "{v}"
    );
    assert!(v["rate_limit"].is_null() || v["rate_limit"].is_u64(), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_endpoints_are_listed_in_cursor_pages() {
    let app = api_app().await;
    let api = Api::of(&app, &app.business()).await;
    let mut made = Vec::new();
    for n in 0..5 {
        let (s, ep) = api
            .post(
                "/webhooks",
                json!({"url": format!("http://127.0.0.1:9/{n}")}),
            )
            .await;
        assert_eq!(s, 201, "{ep}");
        made.push(ep["id"].as_str().unwrap().to_string());
    }

    // As the SDK's cursor pagination walks it: `iterator` of each page until `done`.
    let mut seen = Vec::new();
    let mut pages = 0;
    let mut query = "?limit=2".to_string();
    loop {
        let (s, page) = api.get(&format!("/webhooks{query}")).await;
        assert_eq!(s, 200, "{page}");
        pages += 1;
        let data = page["data"].as_array().unwrap();
        assert!(data.len() <= 2, "{page}");
        for ep in data {
            assert_webhook_details(ep);
            seen.push(ep["id"].as_str().unwrap().to_string());
        }
        if page["done"] == json!(true) {
            break;
        }
        assert_eq!(page["done"], json!(false), "{page}");
        let it = page["iterator"]
            .as_str()
            .expect("an iterator to go on with");
        query = format!("?limit=2&iterator={it}");
        assert!(pages < 10, "the pages never end");
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, made, "every endpoint once, oldest first");

    // Without a limit, one page holds all of them.
    let (_, all) = api.get("/webhooks").await;
    assert_eq!(all["data"].as_array().unwrap().len(), 5);
    assert_eq!(all["done"], json!(true));
    // A page past the last is empty and done.
    let last = all["iterator"].as_str().unwrap().to_string();
    let (s, after) = api.get(&format!("/webhooks?iterator={last}")).await;
    assert_eq!(s, 200, "{after}");
    assert_eq!(
        (after["data"].clone(), after["done"].clone()),
        (json!([]), json!(true))
    );

    for bad in [
        "limit=0",
        "limit=251",
        "limit=two",
        "iterator=nope",
        "iterator=ep_1",
    ] {
        let (s, v) = api.get(&format!("/webhooks?{bad}")).await;
        assert_eq!(
            (s, v["code"].as_str()),
            (422, Some("invalid_query")),
            "{bad}: {v}"
        );
    }
    // An empty iterator is the first page.
    let (s, first) = api.get("/webhooks?limit=2&iterator=").await;
    assert_eq!(s, 200, "{first}");
    let (_, start) = api.get("/webhooks?limit=2").await;
    assert_eq!(first["data"], start["data"]);
    // Another business's list is its own.
    let other = Api::of(&app, "bus_Other").await;
    let (_, theirs) = other.get("/webhooks").await;
    assert_eq!(theirs["data"], json!([]));
    assert_eq!(theirs["done"], json!(true));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_details_carry_metadata_description_and_rate_limit() {
    let app = api_app().await;
    let api = Api::of(&app, &app.business()).await;
    // The fields an SDK's create sends.
    let (s, ep) = api
        .post(
            "/webhooks",
            json!({"url": "http://127.0.0.1:9/hook", "description": null, "disabled": false,
                   "filter_types": ["entitlement_grant.created"],
                   "metadata": {"team": "billing", "env": "prod"}, "rate_limit": 25}),
        )
        .await;
    assert_eq!(s, 201, "{ep}");
    assert_webhook_details(&ep);
    assert_eq!(ep["description"], "");
    assert_eq!(ep["metadata"], json!({"team": "billing", "env": "prod"}));
    assert_eq!(ep["rate_limit"], 25);
    let id = ep["id"].as_str().unwrap();
    assert_eq!(api.get(&format!("/webhooks/{id}")).await.1, ep);

    // Defaults: empty metadata and description, no rate limit.
    let (s, bare) = api
        .post("/webhooks", json!({"url": "http://127.0.0.1:9/bare"}))
        .await;
    assert_eq!(s, 201, "{bare}");
    assert_webhook_details(&bare);
    assert_eq!(
        (&bare["description"], &bare["metadata"], &bare["rate_limit"]),
        (&json!(""), &json!({}), &serde_json::Value::Null)
    );

    // The fields an SDK's update sends; those absent stay.
    let path = format!("/webhooks/{id}");
    let (s, up) = api
        .patch(
            &path,
            json!({"metadata": {"team": "growth"}, "rate_limit": 3, "description": "main"}),
        )
        .await;
    assert_eq!(s, 200, "{up}");
    assert_webhook_details(&up);
    assert_eq!(up["metadata"], json!({"team": "growth"}));
    assert_eq!(up["rate_limit"], 3);
    assert_eq!(up["description"], "main");
    assert_eq!(up["filter_types"], json!(["entitlement_grant.created"]));
    let (_, up) = api.patch(&path, json!({"disabled": true})).await;
    assert_eq!(
        (&up["metadata"], &up["rate_limit"]),
        (&json!({"team": "growth"}), &json!(3))
    );
    let (s, up) = api
        .patch(
            &path,
            json!({"rate_limit": null, "metadata": null, "description": null}),
        )
        .await;
    assert_eq!(s, 200, "{up}");
    assert_eq!(
        (&up["description"], &up["metadata"], &up["rate_limit"]),
        (&json!(""), &json!({}), &serde_json::Value::Null)
    );
    assert_eq!(api.get(&path).await.1, up);

    for (body, field) in [
        (json!({"rate_limit": 0}), "rate_limit"),
        (json!({"rate_limit": 10001}), "rate_limit"),
        (json!({"metadata": {"n": 1}}), "metadata"),
        (json!({"metadata": "x"}), "metadata"),
    ] {
        refused_naming(api.patch(&path, body.clone()).await, "invalid_field", field);
        let mut create = body;
        create["url"] = json!("http://127.0.0.1:9/x");
        refused_naming(api.post("/webhooks", create).await, "invalid_field", field);
    }
    assert_eq!(api.get(&path).await.1, up, "nothing refused was saved");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_headers_round_trip_and_go_with_every_delivery() {
    let app = api_app().await;
    with_entitlement(&app).await;
    let r = Receiver::start(&[SECRET], |_| Reply::Status(200)).await;
    let api = Api::of(&app, &app.business()).await;
    let (s, ep) = api
        .post(
            "/webhooks",
            json!({"url": r.url, "secret": SECRET, "headers": {"X-Tenant": "acme"}}),
        )
        .await;
    assert_eq!(s, 201, "{ep}");
    assert!(
        ep.get("headers").is_none(),
        "headers are read on their own route"
    );
    let id = ep["id"].as_str().unwrap();
    let path = format!("/webhooks/{id}/headers");
    assert_eq!(
        api.get(&path).await,
        (
            200,
            json!({"headers": {"X-Tenant": "acme"}, "sensitive": []})
        )
    );

    // PATCH replaces them all; credentials are listed by name only.
    let (s, v) = api
        .patch(
            &path,
            json!({"headers": {"X-Region": "eu west", "Authorization": "Bearer s3cret", "X-Api-Key": "k"}}),
        )
        .await;
    assert_eq!((s, v), (204, serde_json::Value::Null));
    let (s, got) = api.get(&path).await;
    assert_eq!(s, 200, "{got}");
    assert_eq!(got["headers"], json!({"X-Region": "eu west"}));
    let mut sensitive: Vec<&str> = got["sensitive"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    sensitive.sort();
    assert_eq!(sensitive, ["Authorization", "X-Api-Key"]);

    // A delivery carries every one of them, next to a valid signature.
    pay(&app, "pay_1", "cus_1", "evt_1").await;
    wait_for("a delivery", || async { (r.count() > 0).then_some(()) }).await;
    all_verified(&r);
    let hit = &r.hits()[0];
    let h = |k: &str| {
        hit.headers
            .get(k)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    assert_eq!(h("x-region").as_deref(), Some("eu west"));
    assert_eq!(h("authorization").as_deref(), Some("Bearer s3cret"));
    assert_eq!(h("x-api-key").as_deref(), Some("k"));
    assert_eq!(h("x-tenant"), None, "replaced headers are not sent");
    assert_eq!(h("content-type").as_deref(), Some("application/json"));

    // `{}` removes them.
    assert_eq!(api.patch(&path, json!({"headers": {}})).await.0, 204);
    assert_eq!(
        api.get(&path).await,
        (200, json!({"headers": {}, "sensitive": []}))
    );

    // Another business's endpoint is not found, and untouched.
    let other = Api::of(&app, "bus_Other").await;
    assert_eq!(other.get(&path).await.0, 404);
    let (s, v) = other
        .patch(&path, json!({"headers": {"X-Evil": "1"}}))
        .await;
    assert_eq!((s, v["code"].as_str()), (404, Some("not_found")), "{v}");
    assert_eq!(api.get(&path).await.1["headers"], json!({}));
    assert_eq!(api.get("/webhooks/ep_nope/headers").await.0, 404);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_guildgate_or_the_connection_owns_are_refused() {
    let app = api_app().await;
    let api = Api::of(&app, &app.business()).await;
    let (s, ep) = api
        .post(
            "/webhooks",
            json!({"url": "http://127.0.0.1:9/hook", "headers": {"X-Keep": "1"}}),
        )
        .await;
    assert_eq!(s, 201, "{ep}");
    let path = format!("/webhooks/{}/headers", ep["id"].as_str().unwrap());
    for name in [
        "webhook-id",
        "Webhook-Timestamp",
        "WEBHOOK-SIGNATURE",
        "Connection",
        "keep-alive",
        "Transfer-Encoding",
        "te",
        "trailer",
        "upgrade",
        "Proxy-Authorization",
        "proxy-connection",
        "Host",
        "content-length",
        "Content-Type",
        "bad name",
        "x:colon",
        "",
    ] {
        let body = json!({"headers": {name: "v"}});
        refused_naming(
            api.patch(&path, body).await,
            "invalid_field",
            &format!("headers.{name}"),
        );
    }
    for value in ["a\r\nX-Injected: 1", "tab\u{7f}", "caf\u{e9}"] {
        let body = json!({"headers": {"X-Ok": value}});
        refused_naming(
            api.patch(&path, body).await,
            "invalid_field",
            "headers.X-Ok",
        );
    }
    refused_naming(
        api.patch(&path, json!({"headers": {"X-Dup": "1", "x-dup": "2"}}))
            .await,
        "invalid_field",
        "headers.x-dup",
    );
    refused_naming(
        api.post(
            "/webhooks",
            json!({"url": "http://127.0.0.1:9/x", "headers": {"webhook-signature": "v1,forged"}}),
        )
        .await,
        "invalid_field",
        "headers.webhook-signature",
    );
    assert_eq!(
        api.patch(&path, json!({})).await.0,
        422,
        "headers is required"
    );
    assert_eq!(
        api.get(&path).await,
        (200, json!({"headers": {"X-Keep": "1"}, "sensitive": []})),
        "nothing refused was saved"
    );
    assert_eq!(
        api.get("/webhooks").await.1["data"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_repeated_with_its_idempotency_key_returns_the_first_endpoint() {
    let app = api_app().await;
    let api = Api::of(&app, &app.business()).await;
    let body = json!({"url": "http://127.0.0.1:9/hook", "idempotency_key": "create-1", "metadata": {"a": "1"}});
    let (s, first) = api.post("/webhooks", body.clone()).await;
    assert_eq!(s, 201, "{first}");
    let (s, again) = api.post("/webhooks", body.clone()).await;
    assert_eq!((s, &again), (200, &first));
    // Whatever else the repeat says, it changes nothing.
    let mut changed = body.clone();
    changed["url"] = json!("http://127.0.0.1:9/other");
    changed["disabled"] = json!(true);
    let (s, again) = api.post("/webhooks", changed).await;
    assert_eq!((s, &again), (200, &first));
    assert_eq!(
        api.get("/webhooks").await.1["data"]
            .as_array()
            .unwrap()
            .len(),
        1
    );

    // At the limit, a repeat still answers its endpoint rather than 409.
    for n in 0..4 {
        let (s, v) = api
            .post("/webhooks", json!({"url": format!("http://127.0.0.1:9/{n}"), "idempotency_key": format!("fill-{n}")}))
            .await;
        assert_eq!(s, 201, "{v}");
    }
    let (s, again) = api.post("/webhooks", body.clone()).await;
    assert_eq!((s, &again["id"]), (200, &first["id"]));
    let (s, v) = api
        .post(
            "/webhooks",
            json!({"url": "http://127.0.0.1:9/6", "idempotency_key": "create-2"}),
        )
        .await;
    assert_eq!((s, v["code"].as_str()), (409, Some("limit_reached")), "{v}");

    // Keys are per business.
    let other = Api::of(&app, "bus_Other").await;
    let (s, theirs) = other.post("/webhooks", body.clone()).await;
    assert_eq!(s, 201, "{theirs}");
    assert_ne!(theirs["id"], first["id"]);
    refused_naming(
        api.post(
            "/webhooks",
            json!({"url": "http://127.0.0.1:9/x", "idempotency_key": ""}),
        )
        .await,
        "invalid_field",
        "idempotency_key",
    );
    // Once its endpoint is deleted, the key creates anew.
    let id = first["id"].as_str().unwrap();
    assert_eq!(
        api.call(reqwest::Method::DELETE, &format!("/webhooks/{id}"), None)
            .await
            .0,
        204
    );
    let (s, fresh) = api.post("/webhooks", body).await;
    assert_eq!(s, 201, "{fresh}");
    assert_ne!(fresh["id"], first["id"]);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_low_rate_limit_is_obeyed() {
    const RATE: usize = 2;
    const N: usize = 12;
    let app = api_app().await;
    with_entitlement(&app).await;
    let r = Receiver::start(&[SECRET], |_| Reply::Status(200)).await;
    let api = Api::of(&app, &app.business()).await;
    let (s, ep) = api
        .post(
            "/webhooks",
            json!({"url": r.url, "secret": SECRET, "rate_limit": RATE,
                   "filter_types": ["entitlement_grant.created"]}),
        )
        .await;
    assert_eq!(s, 201, "{ep}");
    let id = ep["id"].as_str().unwrap();
    // A burst: N messages due at once.
    pay_each(&app, 0..N).await;
    wait_for("every message delivered", || async {
        let (_, v) = api
            .get(&format!("/webhooks/{id}/messages?page_size=100"))
            .await;
        let items = v["items"].as_array()?;
        (items.len() == N && items.iter().all(|m| m["status"] == "delivered")).then_some(())
    })
    .await;

    assert_eq!(
        r.count(),
        N,
        "each message once: none lost, none sent twice"
    );
    all_verified(&r);
    // When guildgate sent each (an attempt's time is taken as its request goes out):
    // what the receiver saw also carries the machine's scheduling delays, which bunch
    // requests up under load.
    let sent: Vec<chrono::DateTime<chrono::Utc>> = sqlx::query_scalar(
        "SELECT a.attempted_at FROM webhook_attempts a
         JOIN webhook_messages m ON m.id = a.message_id
         WHERE m.endpoint_id = $1 ORDER BY a.attempted_at",
    )
    .bind(id)
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(sent.len(), N);
    let t0 = std::time::Instant::now();
    let at: Vec<std::time::Instant> = sent
        .iter()
        .map(|t| t0 + (*t - sent[0]).to_std().unwrap())
        .collect();
    let second = std::time::Duration::from_secs(1);
    for (i, start) in at.iter().enumerate() {
        let within = at[i..].iter().take_while(|t| **t < *start + second).count();
        // One more than the rate for timer slack at the window's edges.
        assert!(
            within <= RATE + 1,
            "{within} deliveries within a second of delivery {i}: {:?}",
            at.iter()
                .map(|t| t.duration_since(at[0]))
                .collect::<Vec<_>>()
        );
    }
    // At RATE a second, N deliveries take (N - 1) / RATE seconds at least; allow for
    // timer slack.
    let span = at[N - 1].duration_since(at[0]);
    let least = second * u32::try_from(N - 1).unwrap() / u32::try_from(RATE).unwrap();
    assert!(span >= least * 4 / 5, "{N} deliveries in {span:?}");

    // Without the limit, the backlog goes at once.
    let (s, v) = api
        .patch(&format!("/webhooks/{id}"), json!({"rate_limit": null}))
        .await;
    assert_eq!(
        (s, &v["rate_limit"]),
        (200, &serde_json::Value::Null),
        "{v}"
    );
    let before = r.count();
    let started = std::time::Instant::now();
    pay_each(&app, N..2 * N).await;
    wait_for("the second burst", || async {
        (r.count() == before + N).then_some(())
    })
    .await;
    let hits = r.hits();
    let last = hits.iter().map(|h| h.at).max().unwrap();
    assert!(
        last.duration_since(started) < least,
        "unlimited, the burst takes less"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settled_messages_past_their_retention_are_pruned_with_their_attempts_pending_ones_never() {
    let app = TestApp::spawn_with(TestConfig::ingest_only()).await;
    let ep = add_endpoint(&app, "http://127.0.0.1:9/hook", None, SECRET).await;
    // (id, status, age in days)
    let rows = [
        ("msg_old_delivered", "delivered", 100),
        ("msg_old_failed", "failed", 95),
        ("msg_old_pending", "pending", 120),
        ("msg_young_delivered", "delivered", 80),
    ];
    for (id, status, days) in rows {
        sqlx::query(
            "INSERT INTO webhook_messages (id, endpoint_id, business_id, grant_id, event_type, body,
                 status, created_at, updated_at)
             VALUES ($1, $2, $3, 'grant_' || $1, 'entitlement_grant.created', '{}', $4,
                 now() - make_interval(days => $5), now() - make_interval(days => $5))",
        )
        .bind(id)
        .bind(&ep.id)
        .bind(app.business())
        .bind(status)
        .bind(days)
        .execute(&app.pool)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO webhook_attempts (message_id, status_code, latency_ms) VALUES ($1, 200, 5)",
        )
        .bind(id)
        .execute(&app.pool)
        .await
        .unwrap();
    }
    let pruner = guildgate::events::retention::Pruner {
        pool: app.pool.clone(),
        retention: std::time::Duration::from_secs(90 * 86400),
        metrics: app.metrics.clone(),
        target: guildgate::events::retention::Target::WebhookMessages,
    };
    let pruned = pruner
        .prune(chrono::Utc::now(), &CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(pruned, 2);
    let left: Vec<String> = sqlx::query_scalar("SELECT id FROM webhook_messages ORDER BY id")
        .fetch_all(&app.pool)
        .await
        .unwrap();
    assert_eq!(left, ["msg_old_pending", "msg_young_delivered"]);
    let attempts: Vec<String> =
        sqlx::query_scalar("SELECT message_id FROM webhook_attempts ORDER BY message_id")
            .fetch_all(&app.pool)
            .await
            .unwrap();
    assert_eq!(
        attempts, left,
        "the pruned messages' attempts went with them"
    );
    assert_eq!(
        common::worker::sample(
            &app.metrics.render(),
            "guildgate_webhook_messages_pruned_total",
            &[]
        ),
        2.0
    );
    app.stop().await;
}

/// A write for the recorder tests: each statement stamps its rows with its transaction.
struct Noted(i32);

impl guildgate::webhooks::recorder::GroupWrite for Noted {
    async fn write_all(conn: &mut sqlx::PgConnection, batch: &[Self]) -> Result<(), sqlx::Error> {
        let values: Vec<i32> = batch.iter().map(|n| n.0).collect();
        sqlx::query("INSERT INTO noted (v, tx) SELECT unnest($1::int[]), txid_current()")
            .bind(&values)
            .execute(conn)
            .await
            .map(|_| ())
    }
}

/// A recorder of [`Noted`] lingering `linger`, over a database of its own.
async fn noted_recorder(
    linger: std::time::Duration,
) -> (
    common::TestDb,
    sqlx::PgPool,
    guildgate::webhooks::recorder::Recorder<Noted>,
) {
    let db = common::TestDb::create().await;
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    sqlx::query("CREATE TABLE noted (v int PRIMARY KEY, tx bigint NOT NULL)")
        .execute(&pool)
        .await
        .unwrap();
    let recorder =
        guildgate::webhooks::recorder::Recorder::spawn_lingering(pool.clone(), 256, linger);
    (db, pool, recorder)
}

/// The commits the recorder took, each as the values it wrote.
async fn noted_commits(pool: &sqlx::PgPool) -> Vec<Vec<i32>> {
    sqlx::query_scalar("SELECT array_agg(v ORDER BY v) FROM noted GROUP BY tx ORDER BY min(v)")
        .fetch_all(pool)
        .await
        .unwrap()
}

/// Records that nothing but their own task waits for (a pulled message's attempt) and
/// that come milliseconds apart, as a slow endpoint's answers do, share one commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patient_records_coming_apart_share_one_commit() {
    let (_db, pool, recorder) = noted_recorder(Duration::from_secs(3)).await;
    let mut tasks = Vec::new();
    for v in 1..=3 {
        let r = recorder.clone();
        tasks.push(tokio::spawn(
            async move { r.record_patient(Noted(v)).await },
        ));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(30), t)
            .await
            .expect("a patient record waited beyond its linger")
            .unwrap()
            .unwrap();
    }
    assert_eq!(noted_commits(&pool).await, vec![vec![1, 2, 3]]);
}

/// A record that someone waits for (a job's ack) never waits for the linger: alone it
/// commits at once, and joining patient ones it takes them along at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_someone_waits_for_ends_the_linger() {
    use futures_util::FutureExt;
    let (_db, pool, recorder) = noted_recorder(Duration::from_secs(600)).await;
    let within = Duration::from_secs(30);
    tokio::time::timeout(within, recorder.record(Noted(1)))
        .await
        .expect("a lone record waited for the linger")
        .unwrap();
    let patient = recorder.record_patient(Noted(2));
    tokio::pin!(patient);
    // Polled once, it is in the recorder's channel (which has room), ahead of the next.
    assert!((&mut patient).now_or_never().is_none());
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (urgent, patient) = tokio::join!(
        tokio::time::timeout(within, recorder.record(Noted(3))),
        tokio::time::timeout(within, patient),
    );
    urgent
        .expect("a record waited for the linger of the patient one before it")
        .unwrap();
    patient
        .expect("the patient record was not taken along")
        .unwrap();
    assert_eq!(noted_commits(&pool).await, vec![vec![1], vec![2, 3]]);
}
