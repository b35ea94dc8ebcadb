//! Ingest under faults: database and broker connections cut mid-stream, shutdown with
//! messages in flight, and a relay crash between publish and delete.

use crate::common;

use std::net::SocketAddr;
use std::sync::Arc;

use common::proxy::Proxy;
use common::{Injected, TestApp, TestConfig, wait_for};
use guildgate::faults::Point;

const GUILD: &str = "123456789012345678";

fn addr_of(url: &str) -> SocketAddr {
    let u = url::Url::parse(url).unwrap();
    format!("{}:{}", u.host_str().unwrap(), u.port().unwrap_or(5432))
        .parse()
        .unwrap()
}

async fn live_grants(app: &TestApp) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM grants WHERE status <> 'Revoked'")
        .fetch_one(&app.pool)
        .await
        .unwrap()
}

/// An app running ingest only with `config`'s routes, and the first `n` payments of a
/// lifetime entitlement recorded.
async fn ingesting(config: TestConfig, n: usize) -> TestApp {
    let app = TestApp::spawn_with(TestConfig {
        options: TestConfig::ingest_only().options,
        ..config
    })
    .await;
    app.entitlement_for("pdt_life", GUILD, None).await;
    app.publish_payments(0..n).await;
    app.wait_processed(n as i64).await;
    app
}

/// [`ingesting`] with the broker connection through a proxy of its own, asking for
/// RabbitMQ's default heartbeat (60 s) whatever the test broker's setting: lapin then
/// takes two minutes to notice a connection that went quiet.
async fn ingesting_through_a_broker_proxy(n: usize) -> (Proxy, TestApp) {
    let amqp = Proxy::start(addr_of(&common::amqp_url())).await;
    let mut url = url::Url::parse(&common::replace_host(&common::amqp_url(), amqp.addr)).unwrap();
    url.query_pairs_mut().append_pair("heartbeat", "60");
    let app = ingesting(
        TestConfig::default().env("GUILDGATE_AMQP__URL", url.as_str()),
        n,
    )
    .await;
    (amqp, app)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_cut_and_restored_mid_stream_loses_and_dead_letters_nothing() {
    let pg = Proxy::start(addr_of(&common::database_base_url())).await;
    let app = ingesting(
        TestConfig {
            db_via: Some(pg.addr),
            ..TestConfig::default()
        },
        50,
    )
    .await;
    pg.cut();
    app.publish_payments(50..150).await;
    // Nothing can be applied while the database is unreachable...
    wait_for("the consumers to hold their batches", || async {
        (app.queue_len(&app.names.payment_events()).await < 100).then_some(())
    })
    .await;
    assert_eq!(app.processed_count().await, 50);
    pg.restore();
    // ...and everything is applied once it is back, exactly once.
    app.wait_processed(150).await;
    assert_eq!(live_grants(&app).await, 150);
    app.wait_outbox_empty().await;
    assert_eq!(
        app.queue_len(&format!("{}.dead", app.names.payment_events()))
            .await,
        0
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_cut_and_restored_resubscribes_and_loses_nothing() {
    let (amqp, app) = ingesting_through_a_broker_proxy(50).await;
    amqp.cut();
    // The test publishes directly (not through the proxy): the queue fills meanwhile.
    app.publish_payments(50..150).await;
    amqp.restore();
    app.wait_processed(150).await;
    assert_eq!(live_grants(&app).await, 150);
    // The relay reconnects too: every grant's webhook and sync job reach their queues.
    app.wait_outbox_empty().await;
    let grant_events = app.drain_grant_events().await;
    let mut ids: Vec<_> = grant_events.iter().map(|m| m.message_id.clone()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 150);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_connection_that_stops_answering_is_replaced_and_loses_nothing() {
    let (amqp, app) = ingesting_through_a_broker_proxy(20).await;
    let connections = amqp.accepted();
    // The connection stays open, and the broker hears guildgate, but nothing it
    // sends arrives: the deliveries below go to a consumer that never sees them,
    // and nothing breaks until the missed heartbeats are noticed (two minutes).
    amqp.mute_replies();
    app.publish_payments(20..60).await;
    let began = std::time::Instant::now();
    while app.processed_count().await < 60 {
        assert!(
            began.elapsed() < std::time::Duration::from_secs(60),
            "only {} of 60 events recorded a minute after the connection went quiet",
            app.processed_count().await
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(
        amqp.accepted() - connections,
        1,
        "the quiet connection was replaced by one other"
    );
    assert_eq!(live_grants(&app).await, 60);
    assert_eq!(
        app.queue_len(&format!("{}.dead", app.names.payment_events()))
            .await,
        0
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_probe_that_gets_no_answer_gives_up_its_connection() {
    use guildgate::amqp::{Broker, Names};
    let (amqp, app) = ingesting_through_a_broker_proxy(0).await;
    let broker = Broker::new(&app.settings, "test-probe");
    let shutdown = tokio_util::sync::CancellationToken::new();
    // A queue nothing else reads (nothing is dead-lettered here).
    let queue = Names::dead(&app.names.payment_events());
    let sub = broker
        .subscribe(&queue, "test-probe", 1, &shutdown)
        .await
        .unwrap();
    broker
        .probe(&sub.channel, sub.generation, &queue)
        .await
        .expect("an answering channel passes its probe");
    assert!(broker.is_ready());
    amqp.mute_replies();
    let quiet = broker.probe(&sub.channel, sub.generation, &queue).await;
    assert!(quiet.is_err(), "a probe without an answer fails");
    // The connection is given up (readiness says so) and the next channel comes from a
    // new one, which answers.
    assert!(!broker.is_ready());
    let ch = broker.try_channel().await.unwrap();
    assert!(broker.is_ready());
    let answered = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        ch.queue_declare(
            queue.as_str().into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            Default::default(),
        ),
    )
    .await;
    assert!(matches!(answered, Ok(Ok(_))), "the new connection answers");
    broker.close().await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_broker_that_still_answers_keeps_its_connection() {
    let (amqp, app) = ingesting_through_a_broker_proxy(20).await;
    let connections = amqp.accepted();
    // Every answer takes 3 s or more: slow, but within every bound, so the probes (one each
    // 5 s) must not take the connection for one that stopped answering.
    amqp.delay_replies(std::time::Duration::from_secs(3));
    app.publish_payments(20..40).await;
    let began = std::time::Instant::now();
    while app.processed_count().await < 40 {
        assert!(
            began.elapsed() < std::time::Duration::from_secs(60),
            "only {} of 40 events recorded a minute into the slow answers",
            app.processed_count().await
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // Long enough for two probes of every consumer to be answered late.
    tokio::time::sleep(std::time::Duration::from_secs(12)).await;
    assert_eq!(
        amqp.accepted(),
        connections,
        "no new connection to a broker that answers, however slowly"
    );
    amqp.delay_replies(std::time::Duration::ZERO);
    assert_eq!(live_grants(&app).await, 40);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_with_messages_in_flight_acks_only_what_committed() {
    let mut app = TestApp::spawn_ingest().await;
    app.entitlement_for("pdt_life", GUILD, None).await;
    app.publish_payments(0..400).await;
    wait_for("some progress", || async {
        (app.processed_count().await > 0).then_some(())
    })
    .await;
    assert_eq!(app.shutdown().await, Ok(()), "a clean stop");
    let processed = app.processed_count().await;
    let left = app.queue_len(&app.names.payment_events()).await as i64;
    // Every message is either applied-and-acked or still queued: none lost, none both.
    assert_eq!(processed + left, 400, "processed {processed}, left {left}");
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_crash_between_publish_and_delete_republishes_with_the_same_ids() {
    let faults = Arc::new(Injected::default());
    faults.once(Point::AfterPublish);
    let app = TestApp::spawn_with(TestConfig::ingest_only().faults(faults.clone())).await;
    app.entitlement_for("pdt_life", GUILD, None).await;
    app.mark_linked("cus_0").await; // so the grant also gets a sync job
    app.publish_payments(0..1).await;
    app.wait_processed(1).await;
    app.wait_outbox_empty().await;
    assert!(!faults.pending(Point::AfterPublish), "the fault fired");
    let events = app.drain_grant_events().await;
    assert_eq!(events.len(), 2, "published, 'crashed', published again");
    assert_eq!(events[0].message_id, events[1].message_id);
    assert_eq!(events[0].body, events[1].body);
    let jobs = app.drain_queue(&app.names.discord_sync()).await;
    assert_eq!(jobs.len(), 2);
    assert_eq!(jobs[0].message_id, jobs[1].message_id);
    app.stop().await;
}

/// Commits one outbox row of a sync job, in a transaction of its own (which notifies the
/// relay).
async fn commit_sync_row(pool: &sqlx::PgPool, message_id: &str) {
    use guildgate::store::outbox::{self, OutboxKind};
    let mut tx = pool.begin().await.unwrap();
    outbox::insert(
        &mut tx,
        OutboxKind::Sync,
        message_id,
        br#"{"grant_id":"grant_t"}"#,
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
}

/// A batch whose delete is slow to commit does not hold up the rows committed after it:
/// the relay publishes them while that delete still waits, and the deletes commit in
/// order once it can. Here a trigger makes the first row's delete wait for a lock the
/// test holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_committed_during_a_slow_delete_are_published_without_waiting_for_it() {
    let app = TestApp::spawn_with(TestConfig::ingest_only()).await;
    sqlx::raw_sql(
        "CREATE FUNCTION wait_for_the_test() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN PERFORM pg_advisory_xact_lock_shared(4242); RETURN OLD; END $$;
         CREATE TRIGGER slow_delete BEFORE DELETE ON outbox FOR EACH ROW
         WHEN (OLD.message_id = 'sync:slow') EXECUTE FUNCTION wait_for_the_test();",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    let mut lock = app.pool.acquire().await.unwrap();
    sqlx::query("SELECT pg_advisory_lock(4242)")
        .execute(&mut *lock)
        .await
        .unwrap();
    let queue = app.names.discord_sync();
    let published = |n: u32| {
        let queue = &queue;
        let app = &app;
        move || async move { (app.queue_len(queue).await == n).then_some(()) }
    };
    commit_sync_row(&app.pool, "sync:slow").await;
    wait_for("the first row published", published(1)).await;
    // Its delete now waits for the lock.
    commit_sync_row(&app.pool, "sync:next").await;
    wait_for(
        "the next row published while the delete before it waits",
        published(2),
    )
    .await;
    let left: Vec<String> = sqlx::query_scalar("SELECT message_id FROM outbox ORDER BY id")
        .fetch_all(&app.pool)
        .await
        .unwrap();
    assert_eq!(
        left,
        ["sync:slow", "sync:next"],
        "neither delete committed yet"
    );
    sqlx::query("SELECT pg_advisory_unlock(4242)")
        .execute(&mut *lock)
        .await
        .unwrap();
    drop(lock);
    app.wait_outbox_empty().await;
    let ids: Vec<String> = app
        .drain_queue(&queue)
        .await
        .into_iter()
        .map(|m| m.message_id)
        .collect();
    assert_eq!(ids, ["sync:slow", "sync:next"], "each once, in order");
    app.stop().await;
}

/// Transactions that commit within `outbox.linger` of the relay's last drain wait for it
/// and leave together: under load one relay transaction (and one commit, one confirm
/// round) carries the rows of many, instead of one drain per notifying commit. And the
/// notifications a drain covered are read and dropped, not left to wake the relay once
/// per linger long after the load has stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_takes_rows_committed_close_together_in_one_drain() {
    // With a linger of 0s the same commits took 19 drains. No sweeps: every claim the
    // relay runs is a drain a notification asked for.
    let app = TestApp::spawn_with(
        TestConfig::ingest_only()
            .env("GUILDGATE_OUTBOX__LINGER", "1s")
            .env("GUILDGATE_OUTBOX__SWEEP_INTERVAL", "1h"),
    )
    .await;
    // Twenty commits 10 ms apart, each notifying the relay.
    let started = std::time::Instant::now();
    for i in 0..20 {
        commit_sync_row(&app.pool, &format!("sync:t{i}")).await;
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let span = started.elapsed();
    app.wait_outbox_empty().await;
    let queue = app.names.discord_sync();
    wait_for("all 20 sync jobs queued", || async {
        (app.queue_len(&queue).await == 20).then_some(())
    })
    .await;
    // One drain at the first commit, one a linger after each drain while the commits
    // come, and one for those of the last: 3 when they take well under a second, as
    // they do on an idle machine, more only when a busy machine spreads them out.
    let drains = app.metrics.outbox_drains.get();
    let most = 2 + span.as_secs_f64().ceil() as u64;
    assert!(
        (1..=most).contains(&drains),
        "20 commits over {span:?} took {drains} drains (at most {most})"
    );
    // Quiet once the rows are out: at most one more claim (for notifications that came
    // during the last drain) in three and a half lingers. When the relay read one
    // notification per linger, the 20 kept it claiming once a second.
    let claims = app.metrics.outbox_claims.get();
    tokio::time::sleep(std::time::Duration::from_millis(3500)).await;
    let later = app.metrics.outbox_claims.get() - claims;
    assert!(later <= 1, "{later} claims after the load had stopped");
    app.stop().await;
}
