//! Ingest: payment events from RabbitMQ into grants, exactly once (real RabbitMQ and
//! PostgreSQL; each test has its own database, exchange and queue prefix).

mod common;

use common::events::*;
use common::{TestApp, wait_for};

const T0: &str = "2026-05-01T10:31:00Z";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_time_payment_creates_a_pending_grant_with_webhook_and_sync_job() {
    let app = TestApp::spawn().await;
    let ent = app
        .entitlement_for(
            "pdt_lifetime",
            "123456789012345678",
            Some("987654321098765432"),
        )
        .await;
    app.publish(
        &payment(&app.business(), "pay_1", "cus_1", &["pdt_lifetime"], T0),
        "evt_1",
    )
    .await;
    app.wait_processed(1).await;
    let grants = app.grants_of("cus_1").await;
    assert_eq!(grants.len(), 1);
    let g = &grants[0];
    assert_eq!(g.status, "Pending");
    assert_eq!(g.entitlement_id, ent);
    assert_eq!(g.payment_id.as_deref(), Some("pay_1"));
    assert_eq!(g.subscription_id, None);

    app.wait_outbox_empty().await;
    let events = wait_for("grant event", || async {
        let m = app.drain_queue(&app.names.grant_events()).await;
        (!m.is_empty()).then_some(m)
    })
    .await;
    assert_eq!(events.len(), 1);
    let body = events[0].json();
    assert_eq!(body["type"], "entitlement_grant.created");
    assert_eq!(body["data"]["payload_type"], "EntitlementGrant");
    assert_eq!(body["data"]["id"], g.id.as_str());
    assert_eq!(body["data"]["status"], "Pending");
    assert_eq!(
        events[0].message_id,
        format!("{}:entitlement_grant.created", g.id)
    );
    let oauth = body["data"]["oauth_url"].as_str().unwrap();
    assert!(oauth.contains("scope=identify+guilds.join"), "{oauth}");
    assert!(oauth.contains(&format!(
        "redirect_uri=http%3A%2F%2F127.0.0.1%3A{}%2Foauth%2Fdiscord%2Fcallback",
        app.addr.port()
    )));
    let jobs = app.drain_queue(&app.names.discord_sync()).await;
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].json()["grant_id"], g.id.as_str());
    app.stop().await;
}
