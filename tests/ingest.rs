//! Ingest: payment events from RabbitMQ into grants, exactly once (real RabbitMQ and
//! PostgreSQL; each test has its own database, exchange and queue prefix).

use crate::common;

use common::events::*;
use common::{TestApp, wait_for};

const T0: &str = "2026-05-01T10:31:00Z";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_time_payment_creates_a_pending_grant_with_its_webhook_and_a_sync_job_once_linked() {
    let app = TestApp::spawn_ingest().await;
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
        let m = app.drain_grant_events().await;
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
    // The customer never linked Discord: nothing to do there until the OAuth callback.
    assert_eq!(app.queue_len(&app.names.discord_sync()).await, 0);

    // A customer who linked Discord before gets a sync job with the grant.
    app.mark_linked("cus_2").await;
    app.publish(
        &payment(&app.business(), "pay_2", "cus_2", &["pdt_lifetime"], T0),
        "evt_2",
    )
    .await;
    app.wait_processed(2).await;
    app.wait_outbox_empty().await;
    let g2 = app.grants_of("cus_2").await.remove(0);
    let jobs = app.drain_queue(&app.names.discord_sync()).await;
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].json()["grant_id"], g2.id.as_str());
    app.stop().await;
}

const GUILD: &str = "123456789012345678";
const ROLE: &str = "987654321098765432";

fn t(day: u32) -> String {
    format!("2026-05-{day:02}T10:00:00Z")
}

async fn statuses(app: &TestApp, customer: &str) -> Vec<(String, Option<String>)> {
    let mut v: Vec<_> = app
        .grants_of(customer)
        .await
        .into_iter()
        .map(|g| {
            (
                g.status.to_string(),
                g.revocation_reason.map(|r| r.to_string()),
            )
        })
        .collect();
    v.sort();
    v
}

fn pending() -> (String, Option<String>) {
    ("Pending".into(), None)
}

fn revoked(reason: &str) -> (String, Option<String>) {
    ("Revoked".into(), Some(reason.into()))
}

/// `subscription.active` of a `pdt_monthly` subscription, stamped on day `day`.
fn monthly_active(business: &str, sub: &str, customer: &str, day: u32) -> serde_json::Value {
    subscription(
        "active",
        business,
        sub,
        customer,
        "pdt_monthly",
        "active",
        &t(day),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscription_payment_grants_nothing_itself() {
    let app = TestApp::spawn_ingest().await;
    app.entitlement_for("pdt_monthly", GUILD, Some(ROLE)).await;
    let b = app.business();
    app.publish(&monthly_active(&b, "sub_1", "cus_1", 1), "e1")
        .await;
    app.wait_processed(1).await;
    app.publish(
        &subscription_payment(&b, "pay_1", "cus_1", "sub_1", "pdt_monthly", &t(1)),
        "e2",
    )
    .await;
    app.wait_processed(2).await;
    assert_eq!(
        statuses(&app, "cus_1").await,
        [pending()],
        "only the subscription's grant"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscription_active_grants_and_renewed_updated_change_nothing() {
    let app = TestApp::spawn_ingest().await;
    app.entitlement_for("pdt_monthly", GUILD, Some(ROLE)).await;
    app.entitlement_for("pdt_monthly", GUILD, None).await;
    let b = app.business();
    app.publish(
        &subscription(
            "active",
            &b,
            "sub_1",
            "cus_1",
            "pdt_monthly",
            "active",
            &t(1),
        ),
        "e1",
    )
    .await;
    app.publish(
        &subscription(
            "renewed",
            &b,
            "sub_1",
            "cus_1",
            "pdt_monthly",
            "active",
            &t(2),
        ),
        "e2",
    )
    .await;
    app.publish(
        &subscription(
            "updated",
            &b,
            "sub_1",
            "cus_1",
            "pdt_monthly",
            "active",
            &t(3),
        ),
        "e3",
    )
    .await;
    app.wait_processed(3).await;
    assert_eq!(
        statuses(&app, "cus_1").await,
        [pending(), pending()],
        "one grant per entitlement"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_ending_of_a_subscription_revokes_with_its_reason() {
    let app = TestApp::spawn_ingest().await;
    app.entitlement_for("pdt_monthly", GUILD, Some(ROLE)).await;
    let b = app.business();
    let cases = [
        ("on_hold", "on_hold", "subscription_on_hold"),
        ("paused", "paused", "subscription_paused"),
        ("cancelled", "cancelled", "subscription_cancelled"),
        ("expired", "expired", "subscription_expired"),
        ("failed", "failed", "subscription_failed"),
        ("updated", "cancelled", "subscription_cancelled"),
    ];
    // Competing consumers may apply two events of one subscription in either order (an
    // older one then changes nothing), so each ending is published after its start.
    for (i, _) in cases.iter().enumerate() {
        let (sub, cus) = (format!("sub_{i}"), format!("cus_{i}"));
        app.publish(
            &subscription("active", &b, &sub, &cus, "pdt_monthly", "active", &t(1)),
            &format!("a{i}"),
        )
        .await;
    }
    app.wait_processed(cases.len() as i64).await;
    for (i, (kind, status, _)) in cases.iter().enumerate() {
        let (sub, cus) = (format!("sub_{i}"), format!("cus_{i}"));
        app.publish(
            &subscription(kind, &b, &sub, &cus, "pdt_monthly", status, &t(2)),
            &format!("r{i}"),
        )
        .await;
    }
    app.wait_processed(2 * cases.len() as i64).await;
    for (i, (kind, _, reason)) in cases.iter().enumerate() {
        let grants = app.grants_of(&format!("cus_{i}")).await;
        assert_eq!(grants.len(), 1, "{kind}");
        assert_eq!(grants[0].status, "Revoked", "{kind}");
        assert_eq!(
            grants[0].revocation_reason.map(|r| r.as_str()),
            Some(*reason),
            "{kind}"
        );
        assert!(grants[0].revoked_at.is_some());
    }
    // Every grant emitted created then revoked, with stable ids.
    app.wait_outbox_empty().await;
    let events = app.drain_grant_events().await;
    assert_eq!(events.len(), 2 * cases.len());
    let revoked_events: Vec<_> = events
        .iter()
        .filter(|m| m.json()["type"] == "entitlement_grant.revoked")
        .collect();
    assert_eq!(revoked_events.len(), cases.len());
    for m in revoked_events {
        assert_eq!(m.json()["data"]["status"], "Revoked");
        assert!(m.message_id.ends_with(":entitlement_grant.revoked"));
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_change_keeps_shared_revokes_lacking_adds_new() {
    let app = TestApp::spawn_ingest().await;
    let shared = app.entitlement_for("pdt_basic", GUILD, Some("1")).await;
    let basic_only = app.entitlement_for("pdt_basic", GUILD, Some("2")).await;
    let vip_only = app.entitlement_for("pdt_vip", GUILD, Some("3")).await;
    app.attach("pdt_vip", &[&shared, &vip_only]).await;
    let b = app.business();
    app.publish(
        &subscription("active", &b, "sub_1", "cus_1", "pdt_basic", "active", &t(1)),
        "e1",
    )
    .await;
    app.wait_processed(1).await;
    let before = app.grants_of("cus_1").await;
    let shared_grant = before
        .iter()
        .find(|g| g.entitlement_id == shared)
        .unwrap()
        .id
        .clone();
    app.publish(
        &subscription(
            "plan_changed",
            &b,
            "sub_1",
            "cus_1",
            "pdt_vip",
            "active",
            &t(2),
        ),
        "e2",
    )
    .await;
    app.wait_processed(2).await;
    let after = app.grants_of("cus_1").await;
    let by_ent = |e: &str| {
        after
            .iter()
            .filter(|g| g.entitlement_id == e)
            .cloned()
            .collect::<Vec<_>>()
    };
    assert_eq!(by_ent(&shared).len(), 1);
    assert_eq!(
        by_ent(&shared)[0].id,
        shared_grant,
        "the shared grant is kept, not re-created"
    );
    assert_eq!(by_ent(&shared)[0].status, "Pending");
    assert_eq!(by_ent(&basic_only)[0].status, "Revoked");
    assert_eq!(
        by_ent(&basic_only)[0].revocation_reason.map(|r| r.as_str()),
        Some("plan_changed")
    );
    assert_eq!(by_ent(&vip_only).len(), 1);
    assert_eq!(by_ent(&vip_only)[0].status, "Pending");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_time_purchase_then_full_refund_revokes_partial_does_not() {
    let app = TestApp::spawn_ingest().await;
    app.entitlement_for("pdt_life", GUILD, Some(ROLE)).await;
    let b = app.business();
    app.publish(&payment(&b, "pay_1", "cus_1", &["pdt_life"], &t(1)), "p1")
        .await;
    app.publish(&payment(&b, "pay_2", "cus_2", &["pdt_life"], &t(1)), "p2")
        .await;
    app.wait_processed(2).await;
    app.publish(&refund(&b, "pay_1", false, &t(2)), "r1").await;
    app.publish(&refund(&b, "pay_2", true, &t(2)), "r2").await;
    app.wait_processed(3).await;
    wait_for("partial refund counted", || async {
        (app.metrics.event_count("refund.succeeded", "irrelevant") == 1).then_some(())
    })
    .await;
    assert_eq!(statuses(&app, "cus_1").await, [revoked("refund")]);
    assert_eq!(statuses(&app, "cus_2").await, [pending()]);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dispute_lost_revokes_the_payments_grants() {
    let app = TestApp::spawn_ingest().await;
    app.entitlement_for("pdt_life", GUILD, Some(ROLE)).await;
    let b = app.business();
    app.publish(&payment(&b, "pay_1", "cus_1", &["pdt_life"], &t(1)), "p1")
        .await;
    app.wait_processed(1).await;
    app.publish(&dispute_lost(&b, "pay_1", &t(3)), "d1").await;
    app.wait_processed(2).await;
    assert_eq!(statuses(&app, "cus_1").await, [revoked("dispute_lost")]);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refund_or_dispute_before_payment_makes_the_late_payment_grant_nothing() {
    let app = TestApp::spawn_ingest().await;
    app.entitlement_for("pdt_life", GUILD, Some(ROLE)).await;
    let b = app.business();
    app.publish(&refund(&b, "pay_1", false, &t(2)), "r1").await;
    app.publish(&dispute_lost(&b, "pay_2", &t(2)), "d2").await;
    app.wait_processed(2).await;
    app.publish(&payment(&b, "pay_1", "cus_1", &["pdt_life"], &t(1)), "p1")
        .await;
    app.publish(&payment(&b, "pay_2", "cus_2", &["pdt_life"], &t(1)), "p2")
        .await;
    app.wait_processed(4).await;
    assert!(app.grants_of("cus_1").await.is_empty());
    assert!(app.grants_of("cus_2").await.is_empty());
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_revoke_is_never_followed_by_a_new_grant() {
    let app = TestApp::spawn_ingest().await;
    app.entitlement_for("pdt_monthly", GUILD, Some(ROLE)).await;
    let b = app.business();
    app.publish(
        &subscription(
            "active",
            &b,
            "sub_1",
            "cus_1",
            "pdt_monthly",
            "active",
            &t(1),
        ),
        "e1",
    )
    .await;
    app.wait_processed(1).await;
    let g = app.grants_of("cus_1").await.remove(0);
    {
        let mut conn = app.pool.acquire().await.unwrap();
        guildgate::store::grants::revoke(
            &mut conn,
            &g.id,
            guildgate::domain::RevocationReason::Manual,
            chrono::Utc::now(),
        )
        .await
        .unwrap()
        .unwrap();
    }
    app.publish(
        &subscription(
            "active",
            &b,
            "sub_1",
            "cus_1",
            "pdt_monthly",
            "active",
            &t(2),
        ),
        "e2",
    )
    .await;
    app.publish(
        &subscription(
            "renewed",
            &b,
            "sub_1",
            "cus_1",
            "pdt_monthly",
            "active",
            &t(3),
        ),
        "e3",
    )
    .await;
    app.publish(
        &subscription(
            "unpaused",
            &b,
            "sub_1",
            "cus_1",
            "pdt_monthly",
            "active",
            &t(4),
        ),
        "e4",
    )
    .await;
    app.wait_processed(4).await;
    assert_eq!(statuses(&app, "cus_1").await, [revoked("manual")]);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_then_unpause_creates_a_new_grant() {
    let app = TestApp::spawn_ingest().await;
    app.entitlement_for("pdt_monthly", GUILD, Some(ROLE)).await;
    let b = app.business();
    app.publish(
        &subscription(
            "active",
            &b,
            "sub_1",
            "cus_1",
            "pdt_monthly",
            "active",
            &t(1),
        ),
        "e1",
    )
    .await;
    app.wait_processed(1).await;
    app.publish(
        &subscription(
            "paused",
            &b,
            "sub_1",
            "cus_1",
            "pdt_monthly",
            "paused",
            &t(2),
        ),
        "e2",
    )
    .await;
    app.wait_processed(2).await;
    app.publish(
        &subscription(
            "unpaused",
            &b,
            "sub_1",
            "cus_1",
            "pdt_monthly",
            "active",
            &t(3),
        ),
        "e3",
    )
    .await;
    app.wait_processed(3).await;
    let grants = app.grants_of("cus_1").await;
    assert_eq!(
        grants.len(),
        2,
        "the revoked grant is not revived; a new one is made"
    );
    assert_eq!(grants[0].status, "Pending");
    assert_eq!(grants[1].status, "Revoked");
    assert_eq!(
        grants[1].revocation_reason.map(|r| r.as_str()),
        Some("subscription_paused")
    );
    assert_ne!(grants[0].id, grants[1].id);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_and_redeliveries_change_nothing() {
    let app = TestApp::spawn_ingest().await;
    app.entitlement_for("pdt_life", GUILD, Some(ROLE)).await;
    let b = app.business();
    let p = payment(&b, "pay_1", "cus_1", &["pdt_life"], &t(1));
    for _ in 0..3 {
        app.publish(&p, "evt_same").await;
    }
    // Without a message_id, the body's hash is the id.
    let body = serde_json::to_vec(&payment(&b, "pay_2", "cus_2", &["pdt_life"], &t(1))).unwrap();
    app.publish_raw("payment.succeeded", &body, None).await;
    app.publish_raw("payment.succeeded", &body, None).await;
    // The same payment under another event id grants nothing twice either.
    app.publish(&p, "evt_other_id").await;
    app.wait_payments_decided(6).await;
    // Two redeliveries of each id, and the payment under another id: recognised by the
    // payment it records, not by its id.
    assert_eq!(app.metrics.event_count("payment.succeeded", "duplicate"), 4);
    assert_eq!(statuses(&app, "cus_1").await, [pending()]);
    assert_eq!(statuses(&app, "cus_2").await, [pending()]);
    app.wait_outbox_empty().await;
    assert_eq!(
        app.drain_grant_events().await.len(),
        2,
        "one created webhook per grant"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_order_subscription_events_change_nothing() {
    let app = TestApp::spawn_ingest().await;
    app.entitlement_for("pdt_monthly", GUILD, Some(ROLE)).await;
    let b = app.business();
    app.publish(
        &subscription(
            "cancelled",
            &b,
            "sub_1",
            "cus_1",
            "pdt_monthly",
            "cancelled",
            &t(5),
        ),
        "late",
    )
    .await;
    app.wait_processed(1).await;
    app.publish(
        &subscription(
            "active",
            &b,
            "sub_1",
            "cus_1",
            "pdt_monthly",
            "active",
            &t(1),
        ),
        "early",
    )
    .await;
    app.wait_processed(2).await;
    assert!(
        app.grants_of("cus_1").await.is_empty(),
        "the older active event is stale"
    );
    let outcome: String =
        sqlx::query_scalar("SELECT outcome FROM processed_events WHERE event_id = 'early'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(outcome, "stale");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_without_entitlements_are_acked_and_counted() {
    let app = TestApp::spawn_ingest().await;
    app.entitlement_for("pdt_life", GUILD, Some(ROLE)).await;
    let b = app.business();
    app.publish(&payment(&b, "pay_1", "cus_1", &["pdt_other"], &t(1)), "p1")
        .await;
    app.publish(
        &payment("bus_someone_else", "pay_2", "cus_2", &["pdt_life"], &t(1)),
        "p2",
    )
    .await;
    app.publish(
        &subscription(
            "active",
            "bus_someone_else",
            "sub_9",
            "cus_9",
            "pdt_x",
            "active",
            &t(1),
        ),
        "s1",
    )
    .await;
    // A type the binding `subscription.#` lets through but guildgate does not act on.
    let mut unknown = subscription("active", &b, "sub_3", "cus_3", "pdt_life", "active", &t(1));
    unknown["type"] = serde_json::json!("subscription.trial_reminder");
    app.publish(&unknown, "u1").await;
    wait_for("four events counted", || async {
        let m = &app.metrics;
        (m.event_count("payment.succeeded", "irrelevant") == 1
            && m.event_count("payment.succeeded", "applied") == 1
            && m.event_count("subscription.active", "irrelevant") == 1
            && m.event_count("other", "ignored") == 1)
            .then_some(())
    })
    .await;
    // Only the purchase of a business with entitlements is recorded, with its products
    // (a later backfill reaches it), and it grants nothing.
    assert_eq!(app.processed_count().await, 1);
    let recorded: Vec<(String, Option<String>)> =
        sqlx::query_as("SELECT payment_id, product_ids FROM payments")
            .fetch_all(&app.pool)
            .await
            .unwrap();
    assert_eq!(
        recorded,
        [("pay_1".to_string(), Some("pdt_other".to_string()))]
    );
    assert!(app.grants_of("cus_1").await.is_empty());
    assert_eq!(app.queue_len(&app.names.payment_events()).await, 0);
    assert_eq!(
        app.queue_len(&format!("{}.dead", app.names.payment_events()))
            .await,
        0
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_messages_are_dead_lettered_with_a_reason_and_good_ones_flow() {
    let app = TestApp::spawn_ingest().await;
    app.entitlement_for("pdt_life", GUILD, Some(ROLE)).await;
    let b = app.business();
    let mut missing = payment(&b, "pay_x", "cus_x", &["pdt_life"], &t(1));
    missing["data"]
        .as_object_mut()
        .unwrap()
        .remove("payment_id");
    let mut wrong = payment(&b, "pay_y", "cus_y", &["pdt_life"], &t(1));
    wrong["data"]["product_cart"] = serde_json::json!("not a list");
    let poison: Vec<(&str, Vec<u8>)> = vec![
        ("payment.succeeded", b"{not json".to_vec()),
        ("payment.succeeded", vec![0xff, 0xfe, 0x00]),
        ("payment.succeeded", serde_json::to_vec(&missing).unwrap()),
        ("payment.succeeded", serde_json::to_vec(&wrong).unwrap()),
        ("payment.succeeded", vec![b' '; 300 * 1024]),
    ];
    for (i, (rk, body)) in poison.iter().enumerate() {
        app.publish(
            &payment(
                &b,
                &format!("pay_ok{i}"),
                &format!("cus_ok{i}"),
                &["pdt_life"],
                &t(1),
            ),
            &format!("ok{i}"),
        )
        .await;
        app.publish_raw(rk, body, Some(&format!("bad{i}"))).await;
    }
    app.wait_processed(poison.len() as i64).await;
    let dead_q = format!("{}.dead", app.names.payment_events());
    wait_for("dead letters", || async {
        (app.queue_len(&dead_q).await as usize == poison.len()).then_some(())
    })
    .await;
    let parked = app.drain_queue(&dead_q).await;
    let mut codes: Vec<String> = parked
        .iter()
        .map(|m| m.header("x-guildgate-reason-code").unwrap())
        .collect();
    codes.sort();
    assert_eq!(
        codes,
        [
            "invalid_json",
            "invalid_json",
            "missing_field",
            "too_large",
            "wrong_type"
        ]
    );
    for m in &parked {
        assert!(m.message_id.starts_with("bad"));
        assert!(!m.header("x-guildgate-reason").unwrap().is_empty());
    }
    let missing_reason = parked
        .iter()
        .find(|m| m.message_id == "bad2")
        .unwrap()
        .header("x-guildgate-reason")
        .unwrap();
    assert_eq!(missing_reason, "missing field `data.payment_id`");
    for i in 0..poison.len() {
        assert_eq!(statuses(&app, &format!("cus_ok{i}")).await, [pending()]);
    }
    app.stop().await;
}

/// A unique violation is retried with the event alone, once: an event that collides
/// again is parked with its reason and the rest of its batch applies; one whose
/// collision passes (a race lost) is applied by the retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_that_keeps_hitting_a_unique_violation_is_parked_alone() {
    let app = TestApp::spawn_ingest().await;
    app.entitlement_for("pdt_life", GUILD, Some(ROLE)).await;
    let b = app.business();
    // The fault: recording `evt_always` always collides; recording `evt_twice` collides
    // the first two times (a sequence, which a rollback does not undo).
    sqlx::raw_sql(
        "CREATE SEQUENCE test_twice;
         CREATE FUNCTION test_collide() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
            IF NEW.event_id = 'evt_always'
               OR (NEW.event_id = 'evt_twice' AND nextval('test_twice') <= 2) THEN
                RAISE unique_violation USING MESSAGE = 'injected collision';
            END IF;
            RETURN NEW;
         END $$;
         CREATE TRIGGER test_collide BEFORE INSERT ON processed_events
            FOR EACH ROW EXECUTE FUNCTION test_collide();",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    let dead_q = format!("{}.dead", app.names.payment_events());

    app.publish(
        &payment(&b, "pay_1", "cus_1", &["pdt_life"], &t(1)),
        "evt_1",
    )
    .await;
    app.publish(
        &payment(&b, "pay_2", "cus_2", &["pdt_life"], &t(1)),
        "evt_always",
    )
    .await;
    app.publish(
        &payment(&b, "pay_3", "cus_3", &["pdt_life"], &t(1)),
        "evt_3",
    )
    .await;
    wait_for("the colliding event parked", || async {
        (app.queue_len(&dead_q).await == 1).then_some(())
    })
    .await;
    app.wait_processed(2).await;
    assert_eq!(statuses(&app, "cus_1").await, [pending()]);
    assert_eq!(statuses(&app, "cus_3").await, [pending()]);
    assert!(statuses(&app, "cus_2").await.is_empty());
    let parked = app.drain_queue(&dead_q).await;
    assert_eq!(parked.len(), 1);
    assert_eq!(parked[0].message_id, "evt_always");
    assert_eq!(
        parked[0].header("x-guildgate-reason-code").as_deref(),
        Some("database_rejected")
    );
    let reason = parked[0].header("x-guildgate-reason").unwrap();
    assert!(reason.contains("unique violation"), "{reason}");

    app.publish(
        &payment(&b, "pay_4", "cus_4", &["pdt_life"], &t(1)),
        "evt_twice",
    )
    .await;
    app.publish(
        &payment(&b, "pay_5", "cus_5", &["pdt_life"], &t(1)),
        "evt_5",
    )
    .await;
    app.wait_processed(4).await;
    assert_eq!(statuses(&app, "cus_4").await, [pending()]);
    assert_eq!(statuses(&app, "cus_5").await, [pending()]);
    assert_eq!(app.queue_len(&dead_q).await, 0);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batchs_grant_events_leave_as_one_bundle_each_exactly_once() {
    // One consumer lingering long enough for the ten events to share a batch, and the
    // relay off, so the outbox rows stay to be looked at.
    let app = TestApp::spawn_with(
        common::TestConfig {
            options: Some(guildgate::app::Options {
                relay: false,
                sync: false,
                webhooks: false,
                ..Default::default()
            }),
            ..Default::default()
        }
        .env("GUILDGATE_AMQP__CONSUMERS", "1")
        .env("GUILDGATE_AMQP__BATCH_LINGER", "2s"),
    )
    .await;
    app.entitlement_for("pdt_life", "123456789012345678", None)
        .await;
    app.publish_payments(0..10).await;
    app.wait_processed(10).await;
    let rows: Vec<(String, serde_json::Value)> =
        sqlx::query_as("SELECT kind, convert_from(payload, 'UTF8')::jsonb FROM outbox ORDER BY id")
            .fetch_all(&app.pool)
            .await
            .unwrap();
    assert!(
        rows.iter().all(|(kind, _)| kind == "grant_events"),
        "ingest writes grant events only as bundles: {rows:?}"
    );
    assert!(
        rows.len() < 10,
        "the batch's events share a bundle: {} rows",
        rows.len()
    );
    let mut customers: Vec<String> = rows
        .iter()
        .flat_map(|(_, p)| p.as_array().unwrap().clone())
        .map(|e| {
            assert_eq!(e["type"], "entitlement_grant.created");
            e["data"]["customer_id"].as_str().unwrap().to_string()
        })
        .collect();
    customers.sort();
    let expected: Vec<String> = {
        let mut c: Vec<String> = (0..10).map(|i| format!("cus_{i}")).collect();
        c.sort();
        c
    };
    assert_eq!(customers, expected, "each grant's event exactly once");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_refuses_a_grant_of_another_business_entitlement() {
    use guildgate::store::{businesses, grants};
    fn grant<'a>(business: &'a str, entitlement: &'a str) -> grants::NewGrant<'a> {
        let now = chrono::Utc::now();
        grants::NewGrant {
            business_id: business,
            brand_id: "brd_1",
            entitlement_id: entitlement,
            customer_id: "cus_1",
            payment_id: Some("pay_1"),
            subscription_id: None,
            oauth_nonce: "n",
            oauth_expires_at: now,
            now,
        }
    }
    let app = TestApp::spawn_ingest().await;
    let ent = app
        .entitlement_for("pdt_life", "123456789012345678", None)
        .await;
    let mut conn = app.pool.acquire().await.unwrap();
    businesses::ensure_business(&mut conn, "bus_Other")
        .await
        .unwrap();
    let err = grants::insert(&mut conn, grant("bus_Other", &ent))
        .await
        .expect_err("another business's entitlement");
    let code = err.as_database_error().and_then(|e| e.code());
    assert_eq!(code.as_deref(), Some("23503"), "{err}");
    grants::insert(&mut conn, grant(&app.business(), &ent))
        .await
        .unwrap();
    drop(conn);
    app.stop().await;
}

/// A pause and an unpause of a subscription whose grant an earlier batch created, in one
/// batch: the batch revokes the old grant before it inserts the new one, so the
/// live-grant unique index never sees two live grants and the batch applies as a whole
/// (it used to be refused and applied event by event).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_and_an_unpause_in_one_batch_apply_together() {
    use guildgate::domain::decide::Policy;
    use guildgate::events::apply::{Applied, Applier};
    use guildgate::events::decode::{DecodeLimits, Decoded, decode};
    use guildgate::grants::link::LinkBuilder;

    let app = TestApp::spawn_ingest().await;
    app.entitlement_for("pdt_monthly", "123456789012345678", None)
        .await;
    let b = app.business();
    let applier = Applier {
        links: LinkBuilder::from_settings(&app.settings),
        policy: Policy::default(),
        processed_retention: None,
        email: false,
    };
    let limits = DecodeLimits::from_settings(&app.settings);
    let event = |kind: &str, status: &str, day: u32, id: &str| {
        let body = subscription(kind, &b, "sub_1", "cus_1", "pdt_monthly", status, &t(day));
        let body = serde_json::to_vec(&body).unwrap();
        match decode(
            Some(id),
            &format!("subscription.{kind}"),
            &body,
            limits,
            chrono::Utc::now(),
        ) {
            Ok(Decoded::Event(e)) => e,
            other => panic!("{id} decodes to an event: {other:?}"),
        }
    };
    // One batch in one transaction, as the consumer applies it.
    let apply = async |events: &[&guildgate::domain::event::Event]| {
        let mut tx = app.pool.begin().await.unwrap();
        let out = applier
            .apply_batch(&mut tx, events, chrono::Utc::now())
            .await;
        tx.commit().await.unwrap();
        out
    };
    let first = apply(&[&event("active", "active", 1, "e1")]).await;
    assert_eq!(first.unwrap(), vec![Applied::Applied]);
    let (paused, unpaused) = (
        event("paused", "paused", 2, "e2"),
        event("unpaused", "active", 3, "e3"),
    );
    let second = apply(&[&paused, &unpaused])
        .await
        .expect("the batch applies as a whole");
    assert_eq!(second, vec![Applied::Applied, Applied::Applied]);
    let grants = app.grants_of("cus_1").await;
    assert_eq!(grants.len(), 2);
    assert_eq!(grants[0].status, "Pending");
    assert_eq!(grants[1].status, "Revoked");
    assert_eq!(
        grants[1].revocation_reason.map(|r| r.as_str()),
        Some("subscription_paused")
    );
    app.stop().await;
}

/// Grants of a business as (id, status, revocation reason), in a stable order.
async fn all_grants(app: &TestApp) -> Vec<(String, String, Option<String>)> {
    sqlx::query_as(
        "SELECT id, status, revocation_reason FROM grants WHERE business_id = $1 ORDER BY id",
    )
    .bind(app.business())
    .fetch_all(&app.pool)
    .await
    .unwrap()
}

/// A pruner of the applied event ids recorded more than 30 days ago.
fn pruner_30_days(app: &TestApp) -> guildgate::events::retention::Pruner {
    guildgate::events::retention::Pruner {
        pool: app.pool.clone(),
        retention: std::time::Duration::from_secs(30 * 86400),
        metrics: app.metrics.clone(),
        target: guildgate::events::retention::Target::EventIds,
    }
}

/// Prunes the applied event ids recorded more than 30 days ago, now; returns how many.
async fn prune_30_days_old(app: &TestApp) -> u64 {
    let never = tokio_util::sync::CancellationToken::new();
    pruner_30_days(app)
        .prune(chrono::Utc::now(), &never)
        .await
        .unwrap()
}

/// Ages every applied event id past a 30-day retention and prunes them; returns how many.
async fn age_and_prune_every_id(app: &TestApp) -> u64 {
    sqlx::query("UPDATE processed_events SET processed_at = processed_at - interval '31 days'")
        .execute(&app.pool)
        .await
        .unwrap();
    prune_30_days_old(app).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn applied_event_ids_older_than_the_retention_are_pruned_in_chunks() {
    use guildgate::events::retention::PRUNE_CHUNK;
    let app = TestApp::spawn_ingest().await;
    let b = app.business();
    // More old ids than two chunks, and recent ones on both sides of the cutoff's day.
    let old = 2 * PRUNE_CHUNK + 345;
    sqlx::query(
        "INSERT INTO processed_events (event_id, event_type, business_id, outcome, processed_at)
         SELECT 'old_' || i, 'payment.succeeded', $1, 'applied', now() - interval '31 days' - i * interval '1 second'
         FROM generate_series(1, $2) AS i",
    )
    .bind(&b)
    .bind(old)
    .execute(&app.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO processed_events (event_id, event_type, business_id, outcome, processed_at)
         SELECT 'new_' || i, 'payment.succeeded', $1, 'applied', now() - interval '29 days' + i * interval '1 hour'
         FROM generate_series(1, 10) AS i",
    )
    .bind(&b)
    .execute(&app.pool)
    .await
    .unwrap();
    let pruned = prune_30_days_old(&app).await;
    assert_eq!(pruned, old as u64);
    assert_eq!(app.metrics.processed_pruned.get(), old as u64);
    let left: Vec<String> =
        sqlx::query_scalar("SELECT event_id FROM processed_events ORDER BY processed_at")
            .fetch_all(&app.pool)
            .await
            .unwrap();
    assert_eq!(left.len(), 10);
    assert!(left.iter().all(|id| id.starts_with("new_")), "{left:?}");
    assert_eq!(prune_30_days_old(&app).await, 0);
    // The migration built its index (concurrently) and it is usable.
    let valid: bool = sqlx::query_scalar(
        "SELECT indisvalid FROM pg_index WHERE indexrelid = 'processed_events_processed_at'::regclass",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert!(valid);
    // A prune stopped by shutdown ends after the chunk in hand: the rest waits for the
    // next pass.
    sqlx::query(
        "INSERT INTO processed_events (event_id, event_type, business_id, outcome, processed_at)
         SELECT 'later_' || i, 'payment.succeeded', $1, 'applied', now() - interval '40 days'
         FROM generate_series(1, $2) AS i",
    )
    .bind(&b)
    .bind(PRUNE_CHUNK + 7)
    .execute(&app.pool)
    .await
    .unwrap();
    let stopped = tokio_util::sync::CancellationToken::new();
    stopped.cancel();
    let first = pruner_30_days(&app)
        .prune(chrono::Utc::now(), &stopped)
        .await
        .unwrap();
    assert_eq!(first, PRUNE_CHUNK as u64);
    assert_eq!(prune_30_days_old(&app).await, 7);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_of_an_event_whose_id_was_pruned_changes_nothing() {
    let app = TestApp::spawn_ingest().await;
    app.entitlement_for("pdt_life", GUILD, Some(ROLE)).await;
    app.entitlement_for("pdt_monthly", GUILD, Some(ROLE)).await;
    let b = app.business();
    let events = [
        (payment(&b, "pay_1", "cus_1", &["pdt_life"], &t(1)), "p1"),
        (refund(&b, "pay_2", false, &t(2)), "r2"),
        (payment(&b, "pay_2", "cus_2", &["pdt_life"], &t(1)), "p2"),
        (payment(&b, "pay_3", "cus_3", &["pdt_life"], &t(1)), "p3"),
        (dispute_lost(&b, "pay_3", &t(3)), "d3"),
        (
            subscription(
                "active",
                &b,
                "sub_1",
                "cus_4",
                "pdt_monthly",
                "active",
                &t(1),
            ),
            "s1",
        ),
        (
            subscription(
                "active",
                &b,
                "sub_2",
                "cus_5",
                "pdt_monthly",
                "active",
                &t(1),
            ),
            "s2a",
        ),
        (
            subscription(
                "cancelled",
                &b,
                "sub_2",
                "cus_5",
                "pdt_monthly",
                "cancelled",
                &t(4),
            ),
            "s2c",
        ),
    ];
    for (e, id) in &events {
        app.publish(e, id).await;
        // In order: the refund before its late payment, the cancellation last.
        app.wait_processed(events.iter().position(|(_, i)| i == id).unwrap() as i64 + 1)
            .await;
    }
    let before = all_grants(&app).await;
    assert_eq!(before.len(), 4, "{before:?}");
    app.wait_outbox_empty().await;
    let first_webhooks = app.drain_grant_events().await.len();
    assert_eq!(first_webhooks, 6, "four created, two revoked");

    // Every id ages past the retention and is pruned.
    assert_eq!(age_and_prune_every_id(&app).await, events.len() as u64);

    // The platform publishes every one of them again.
    for (e, id) in &events {
        app.publish(e, id).await;
    }
    app.wait_settled(2 * events.len() as u64).await;
    assert_eq!(all_grants(&app).await, before);
    // The state recognises all but the cancelled subscription's first event, which is
    // older than its last and so stale again (recorded as such).
    assert_eq!(app.processed_count().await, 1);
    app.wait_outbox_empty().await;
    assert_eq!(app.drain_grant_events().await.len(), 0, "no webhook again");
    assert_eq!(app.queue_len(&app.names.discord_sync()).await, 0);
    app.stop().await;
}

/// The cases where a pruned id alone let a duplicate change state:
/// each is now recognised by the state its first application recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_after_pruning_is_recognised_by_the_state_it_recorded() {
    let app = TestApp::spawn_with(
        common::TestConfig::ingest_only()
            .env("GUILDGATE_GRANTS__REVOKE_ON_SUBSCRIPTION_REFUND", "true"),
    )
    .await;
    app.entitlement_for("pdt_life", GUILD, Some(ROLE)).await;
    app.entitlement_for("pdt_monthly", GUILD, Some(ROLE)).await;
    let b = app.business();
    let active = |sub: &str, cus: &str, at: &str| {
        subscription("active", &b, sub, cus, "pdt_monthly", "active", at)
    };
    let first = [
        // A subscription payment refunded (revoking, by policy), then the subscription
        // active again: a repeat of the refund must not revoke the new grant.
        (active("sub_1", "cus_1", &t(1)), "s1a"),
        (
            subscription_payment(&b, "pay_1", "cus_1", "sub_1", "pdt_monthly", &t(1)),
            "p1",
        ),
        (refund(&b, "pay_1", false, &t(2)), "r1"),
        (active("sub_1", "cus_1", &t(3)), "s1b"),
        // Two events stamped alike, the second revoking: a repeat of the first must not
        // grant again.
        (active("sub_2", "cus_2", &t(1)), "s2a"),
        (
            subscription(
                "on_hold",
                &b,
                "sub_2",
                "cus_2",
                "pdt_monthly",
                "on_hold",
                &t(1),
            ),
            "s2h",
        ),
        // A one-time payment whose product gains an entitlement afterwards.
        (payment(&b, "pay_3", "cus_3", &["pdt_life"], &t(1)), "p3"),
    ];
    for (i, (e, id)) in first.iter().enumerate() {
        app.publish(e, id).await;
        app.wait_processed(i as i64 + 1).await;
    }
    let s1 = statuses(&app, "cus_1").await;
    assert_eq!(s1, [pending(), revoked("refund")]);
    assert_eq!(
        statuses(&app, "cus_2").await,
        [revoked("subscription_on_hold")]
    );
    assert_eq!(statuses(&app, "cus_3").await, [pending()]);
    app.entitlement_for("pdt_life", GUILD, Some("222222222222222222"))
        .await;
    let before = all_grants(&app).await;
    app.wait_outbox_empty().await;
    let webhooks = app.drain_grant_events().await.len();
    assert_eq!(webhooks, 6, "four created, two revoked");

    assert_eq!(age_and_prune_every_id(&app).await, first.len() as u64);

    let repeats = ["r1", "p1", "s2a", "s2h", "p3"];
    for (e, id) in first.iter().filter(|(_, id)| repeats.contains(id)) {
        app.publish(e, id).await;
    }
    // The refund again under a new event id, as the platform might send it.
    app.publish(&refund(&b, "pay_1", false, &t(2)), "r1_new_id")
        .await;
    app.wait_settled((first.len() + repeats.len() + 1) as u64)
        .await;
    assert_eq!(all_grants(&app).await, before);
    // Repeats are counted as duplicates and not recorded again.
    assert_eq!(app.processed_count().await, 0);
    let m = &app.metrics;
    for (kind, n) in [
        ("payment.succeeded", 2),
        ("refund.succeeded", 2),
        ("subscription.active", 1),
        ("subscription.on_hold", 1),
    ] {
        assert_eq!(m.event_count(kind, "duplicate"), n, "{kind}");
    }
    app.wait_outbox_empty().await;
    assert_eq!(app.drain_grant_events().await.len(), 0, "no webhook again");

    // A new event stamped like a subscription's last is still applied, and so is a
    // reversal of another kind.
    app.publish(&active("sub_2", "cus_2", &t(1)), "s2x").await;
    app.publish(&dispute_lost(&b, "pay_3", &t(4)), "d3").await;
    app.wait_processed(2).await;
    assert_eq!(
        statuses(&app, "cus_2").await,
        [pending(), revoked("subscription_on_hold")]
    );
    assert_eq!(statuses(&app, "cus_3").await, [revoked("dispute_lost")]);

    // A lost dispute and then a refund, both before the subscription's payment: the
    // refund is what the policy revokes for, whichever was recorded first.
    app.publish(&active("sub_4", "cus_4", &t(1)), "s4a").await;
    app.publish(&dispute_lost(&b, "pay_4", &t(2)), "d4").await;
    app.wait_processed(4).await;
    app.publish(&refund(&b, "pay_4", false, &t(2)), "r4").await;
    app.wait_processed(5).await;
    app.publish(
        &subscription_payment(&b, "pay_4", "cus_4", "sub_4", "pdt_monthly", &t(1)),
        "p4",
    )
    .await;
    app.wait_processed(6).await;
    assert_eq!(statuses(&app, "cus_4").await, [revoked("refund")]);

    // The subscription's first payment ahead of its first event, as the platform may
    // send it: remembered, so its refund revokes (by policy) the grants that followed.
    app.publish(
        &subscription_payment(&b, "pay_5", "cus_5", "sub_5", "pdt_monthly", &t(1)),
        "p5",
    )
    .await;
    app.wait_processed(7).await;
    app.publish(&active("sub_5", "cus_5", &t(1)), "s5a").await;
    app.wait_processed(8).await;
    assert_eq!(statuses(&app, "cus_5").await, [pending()]);
    app.publish(&refund(&b, "pay_5", false, &t(2)), "r5").await;
    app.wait_processed(9).await;
    assert_eq!(statuses(&app, "cus_5").await, [revoked("refund")]);
    app.stop().await;
}

/// A snapshot written before ids were recorded (migration 0012): an event at its time is
/// applied while the ids of that time are still kept, and taken as a repeat once they
/// may have been pruned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_without_ids_takes_an_event_at_its_time_as_a_repeat_once_ids_may_be_pruned() {
    let app = TestApp::spawn_ingest().await;
    app.entitlement_for("pdt_monthly", GUILD, Some(ROLE)).await;
    let b = app.business();
    let sub = |kind: &str, status: &str, day: u32| {
        subscription(kind, &b, "sub_1", "cus_1", "pdt_monthly", status, &t(day))
    };
    app.publish(&sub("active", "active", 1), "a1").await;
    app.wait_processed(1).await;
    app.publish(&sub("on_hold", "on_hold", 2), "h2").await;
    app.wait_processed(2).await;
    // As an older release left it.
    let legacy = |age: &'static str| {
        sqlx::query(
            "UPDATE subscriptions SET last_event_ids = NULL, updated_at = now() - $1::interval",
        )
        .bind(age)
    };
    legacy("1 hour").execute(&app.pool).await.unwrap();

    // Within the retention the last event's id is still kept: a new event at its time
    // is applied, and the snapshot still has no ids nor a newer write time.
    app.publish(&sub("active", "active", 2), "a2").await;
    app.wait_processed(3).await;
    assert_eq!(
        statuses(&app, "cus_1").await,
        [pending(), revoked("subscription_on_hold")]
    );
    let (ids, age): (Option<Vec<String>>, bool) = sqlx::query_as(
        "SELECT last_event_ids, updated_at < now() - interval '30 minutes' FROM subscriptions",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!((ids, age), (None, true));

    // Written longer ago than ids are kept (30 days by default), and the ids pruned: the
    // on-hold event again is taken as the one applied, and revokes nothing.
    legacy("31 days").execute(&app.pool).await.unwrap();
    assert_eq!(age_and_prune_every_id(&app).await, 3);
    app.publish(&sub("on_hold", "on_hold", 2), "h2").await;
    app.wait_settled(4).await;
    assert_eq!(
        app.metrics.event_count("subscription.on_hold", "duplicate"),
        1
    );
    assert_eq!(
        statuses(&app, "cus_1").await,
        [pending(), revoked("subscription_on_hold")]
    );
    // A later event starts the ids afresh.
    app.publish(&sub("cancelled", "cancelled", 3), "c3").await;
    app.wait_processed(1).await;
    let ids: Option<Vec<String>> = sqlx::query_scalar("SELECT last_event_ids FROM subscriptions")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(ids, Some(vec!["c3".to_string()]));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_prunes_applied_event_ids_on_its_interval() {
    let app = TestApp::spawn_with(
        common::TestConfig::ingest_only()
            .env("GUILDGATE_INGEST__PROCESSED_RETENTION", "1d")
            .env("GUILDGATE_INGEST__PRUNE_INTERVAL", "200ms"),
    )
    .await;
    app.entitlement_for("pdt_life", GUILD, Some(ROLE)).await;
    let b = app.business();
    app.publish(&payment(&b, "pay_1", "cus_1", &["pdt_life"], &t(1)), "p1")
        .await;
    app.wait_processed(1).await;
    sqlx::query(
        "INSERT INTO processed_events (event_id, event_type, business_id, outcome, processed_at)
         VALUES ('ancient', 'payment.succeeded', $1, 'applied', now() - interval '2 days')",
    )
    .bind(&b)
    .execute(&app.pool)
    .await
    .unwrap();
    wait_for("the old id pruned", || async {
        (app.metrics.processed_pruned.get() == 1).then_some(())
    })
    .await;
    let left: Vec<String> = sqlx::query_scalar("SELECT event_id FROM processed_events")
        .fetch_all(&app.pool)
        .await
        .unwrap();
    assert_eq!(left, ["p1"]);
    app.stop().await;
}

/// Payments and reversals are remembered per business: a payment id another business
/// used first is still recorded, and its refund finds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payment_id_another_business_used_is_recorded_and_refunded_per_business() {
    let app = TestApp::spawn_ingest().await;
    app.entitlement_for("pdt_life", GUILD, Some(ROLE)).await;
    let (a, b) = (app.business(), format!("{}_b", app.business()));
    {
        let mut conn = app.pool.acquire().await.unwrap();
        guildgate::store::businesses::ensure_business(&mut conn, &b)
            .await
            .unwrap();
        let e = guildgate::store::entitlements::insert_entitlement(
            &mut conn,
            &b,
            "B's role",
            GUILD,
            Some(ROLE),
        )
        .await
        .unwrap();
        guildgate::store::entitlements::set_product_entitlements(
            &mut conn,
            &b,
            "pdt_life",
            &[e.id],
        )
        .await
        .unwrap();
    }
    app.publish(
        &payment(&a, "pay_same", "cus_a", &["pdt_life"], &t(1)),
        "pa",
    )
    .await;
    app.wait_processed(1).await;
    app.publish(
        &payment(&b, "pay_same", "cus_b", &["pdt_life"], &t(1)),
        "pb",
    )
    .await;
    app.wait_processed(2).await;
    app.publish(&refund(&b, "pay_same", false, &t(2)), "rb")
        .await;
    app.wait_processed(3).await;
    let grants: Vec<(String, String, Option<String>)> = sqlx::query_as(
        "SELECT business_id, status, revocation_reason FROM grants ORDER BY business_id",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(
        grants,
        [
            (a.clone(), "Pending".to_string(), None),
            (b.clone(), "Revoked".to_string(), Some("refund".to_string())),
        ]
    );
    let recorded: i64 =
        sqlx::query_scalar("SELECT count(*) FROM payments WHERE payment_id = 'pay_same'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(recorded, 2);
    app.stop().await;
}

/// Subscription snapshots are kept per business: a subscription id another business
/// used, later, does not make this business's events stale, and neither business's
/// events change the other's snapshot or grants.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_id_another_business_used_has_its_own_state() {
    let app = TestApp::spawn_ingest().await;
    app.entitlement_for("pdt_monthly", GUILD, Some(ROLE)).await;
    let (a, b) = (app.business(), format!("{}_b", app.business()));
    {
        let mut conn = app.pool.acquire().await.unwrap();
        guildgate::store::businesses::ensure_business(&mut conn, &b)
            .await
            .unwrap();
        let e = guildgate::store::entitlements::insert_entitlement(
            &mut conn,
            &b,
            "B's role",
            GUILD,
            Some(ROLE),
        )
        .await
        .unwrap();
        guildgate::store::entitlements::set_product_entitlements(
            &mut conn,
            &b,
            "pdt_monthly",
            &[e.id],
        )
        .await
        .unwrap();
    }
    app.publish(&monthly_active(&a, "sub_same", "cus_a", 5), "sa")
        .await;
    app.wait_processed(1).await;
    // Older than A's last event, but B's own first one.
    app.publish(&monthly_active(&b, "sub_same", "cus_b", 1), "sb")
        .await;
    app.wait_processed(2).await;
    app.publish(
        &subscription(
            "cancelled",
            &b,
            "sub_same",
            "cus_b",
            "pdt_monthly",
            "cancelled",
            &t(2),
        ),
        "sb_cancel",
    )
    .await;
    app.wait_processed(3).await;
    let grants: Vec<(String, String, Option<String>)> = sqlx::query_as(
        "SELECT business_id, status, revocation_reason FROM grants ORDER BY business_id",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(
        grants,
        [
            (a.clone(), "Pending".to_string(), None),
            (
                b.clone(),
                "Revoked".to_string(),
                Some("subscription_cancelled".to_string())
            ),
        ]
    );
    let snapshots: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT business_id, customer_id, status FROM subscriptions
         WHERE subscription_id = 'sub_same' ORDER BY business_id",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(
        snapshots,
        [
            (a.clone(), "cus_a".to_string(), "active".to_string()),
            (b.clone(), "cus_b".to_string(), "cancelled".to_string()),
        ]
    );
    app.stop().await;
}

/// A subscription's payment takes its payment's lock as well as its subscription's, so a
/// refund of it (which locks only the payment) is never decided beside it, each missing
/// the other's row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_payment_waits_for_its_payments_lock() {
    let app = TestApp::spawn_ingest().await;
    app.entitlement_for("pdt_monthly", GUILD, Some(ROLE)).await;
    let b = app.business();
    app.publish(&monthly_active(&b, "sub_1", "cus_1", 1), "s1")
        .await;
    app.wait_processed(1).await;
    // Another transaction holds the payment's lock, as a batch applying its refund would.
    let mut other = app.pool.begin().await.unwrap();
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('pay:pay_1', 0))")
        .execute(&mut *other)
        .await
        .unwrap();
    app.publish(
        &subscription_payment(&b, "pay_1", "cus_1", "sub_1", "pdt_monthly", &t(1)),
        "p1",
    )
    .await;
    // Deferred, then waiting for the lock: a request for it is queued behind ours.
    wait_for("the payment's lock requested", || async {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_locks
             WHERE locktype = 'advisory' AND NOT granted
               AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        )
        .fetch_one(&app.pool)
        .await
        .unwrap();
        (waiting > 0).then_some(())
    })
    .await;
    assert_eq!(app.processed_count().await, 1, "not applied while locked");
    other.commit().await.unwrap();
    app.wait_processed(2).await;
    app.stop().await;
}

/// A grant another transaction revokes while a batch is revoking it (the merchant's
/// manual revoke through the API, say) keeps that revocation, and the batch emits no
/// webhook of its own for it: one grant, one `entitlement_grant.revoked`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_revoked_elsewhere_meanwhile_gets_no_second_revoked_webhook() {
    let app = TestApp::spawn_ingest().await;
    app.entitlement_for("pdt_life", GUILD, Some(ROLE)).await;
    let b = app.business();
    app.publish(&payment(&b, "pay_1", "cus_1", &["pdt_life"], &t(1)), "p1")
        .await;
    app.wait_processed(1).await;
    app.wait_outbox_empty().await;
    assert_eq!(app.drain_grant_events().await.len(), 1, "created");
    // Revoked by hand in a transaction still open when the refund's batch reads the
    // grant as live and goes to revoke it.
    let mut other = app.pool.begin().await.unwrap();
    sqlx::query(
        "UPDATE grants SET status = 'Revoked', revoked_at = now(), revocation_reason = 'manual',
             updated_at = now()
         WHERE customer_id = 'cus_1'",
    )
    .execute(&mut *other)
    .await
    .unwrap();
    app.publish(&refund(&b, "pay_1", false, &t(2)), "r1").await;
    wait_for("the batch waiting for the grant's row", || async {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(&app.pool)
        .await
        .unwrap();
        (waiting > 0).then_some(())
    })
    .await;
    other.commit().await.unwrap();
    app.wait_processed(2).await;
    assert_eq!(statuses(&app, "cus_1").await, [revoked("manual")]);
    app.wait_outbox_empty().await;
    let webhooks = app.drain_grant_events().await;
    assert!(
        webhooks.is_empty(),
        "{:?}",
        webhooks.iter().map(|w| &w.message_id).collect::<Vec<_>>()
    );
    app.stop().await;
}

/// An ingest transaction runs its statements' generic plans from the first execution
/// (PostgreSQL would otherwise plan the first five anew and, for small arrays of keys,
/// keep doing so), and only it: the setting ends with the transaction, so the connection
/// goes back to the pool as it came.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ingest_transaction_runs_generic_plans_and_leaves_its_connection_as_it_was() {
    let db = common::TestDb::create().await;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&db.url)
        .await
        .unwrap();
    let probe = "SELECT count(*) FROM pg_class WHERE relname = ANY($1::text[])";
    let mut tx = guildgate::store::ingest::begin(&pool).await.unwrap();
    for _ in 0..6 {
        let _: i64 = sqlx::query_scalar(probe)
            .bind(vec!["pg_class".to_string()])
            .fetch_one(&mut *tx)
            .await
            .unwrap();
    }
    let (generic, custom): (i64, i64) = sqlx::query_as(
        "SELECT generic_plans, custom_plans FROM pg_prepared_statements WHERE statement = $1",
    )
    .bind(probe)
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    assert_eq!((generic, custom), (6, 0), "generic and custom plans");
    tx.commit().await.unwrap();
    let mode: String = sqlx::query_scalar("SHOW plan_cache_mode")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(mode, "auto", "the pool's one connection after the commit");
    pool.close().await;
    db.drop_db().await;
}
