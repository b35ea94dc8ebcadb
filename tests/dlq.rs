//! Dead-letter tooling (`guildgate dlq …`), through the real binary and the library.

use crate::common;

use std::process::Command;

use common::events::payment;
use common::{TestApp, wait_for};
use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString};

fn guildgate(app: &TestApp, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_guildgate"))
        .args(args)
        .env(
            "GUILDGATE_AMQP__QUEUE_PREFIX",
            &app.settings.amqp.queue_prefix,
        )
        .env("GUILDGATE_AMQP__EXCHANGE", &app.settings.amqp.exchange)
        .env("GUILDGATE_AMQP__URL", common::amqp_url())
        .env("GUILDGATE_DATABASE__URL", &app.db.url)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Waits for a queue to hold `n` messages: messages a tool looked at but left return to
/// the queue asynchronously once its channel closes.
async fn wait_len(app: &TestApp, queue: &str, n: u32) {
    wait_for(&format!("{queue} to hold {n}"), || async {
        (app.queue_len(queue).await == n).then_some(())
    })
    .await
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("{e}: {s}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_replay_and_the_replay_ceiling() {
    let app = TestApp::spawn_ingest().await;
    let dead = format!("{}.dead", app.names.payment_events());
    app.publish_raw("payment.succeeded", b"{broken", Some("bad_1"))
        .await;
    wait_for("the poison message to be parked", || async {
        (app.queue_len(&dead).await == 1).then_some(())
    })
    .await;

    let (ok, out, err) = guildgate(&app, &["dlq", "list", "--json"]);
    assert!(ok, "{err}");
    let depths = json(&out);
    let row = depths
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["queue"] == dead.as_str())
        .unwrap();
    assert_eq!(row["messages"], 1);

    let (ok, out, err) = guildgate(&app, &["dlq", "list", "payment-events", "--json"]);
    assert!(ok, "{err}");
    let parked = json(&out);
    assert_eq!(parked[0]["message_id"], "bad_1");
    assert_eq!(parked[0]["reason_code"], "invalid_json");
    assert_eq!(
        parked[0]["source_queue"],
        app.names.payment_events().as_str()
    );
    // Listing removes nothing: the peeked message returns to the queue (the broker
    // settles the return asynchronously, so wait for it rather than read once).
    wait_for("the peeked message to be back", || async {
        (app.queue_len(&dead).await == 1).then_some(())
    })
    .await;

    // Replayed, it fails again and comes back with its replay count.
    let (ok, out, err) = guildgate(
        &app,
        &[
            "dlq",
            "replay",
            "payment-events",
            "--max-replays",
            "1",
            "--json",
        ],
    );
    assert!(ok, "{err}");
    assert_eq!(json(&out)["replayed"][0], "bad_1");
    wait_for(
        "the message to be parked again, counting its replay",
        || async {
            let (_, out, _) = guildgate(&app, &["dlq", "list", "payment-events", "--json"]);
            let parked = json(&out);
            (parked.as_array().map(|a| a.len()) == Some(1) && parked[0]["replays"] == 1)
                .then_some(())
        },
    )
    .await;

    // At the ceiling it stays parked.
    let (ok, out, _) = guildgate(
        &app,
        &[
            "dlq",
            "replay",
            "payment-events",
            "--max-replays",
            "1",
            "--json",
        ],
    );
    assert!(ok);
    let report = json(&out);
    assert_eq!(report["replayed"].as_array().unwrap().len(), 0);
    assert_eq!(report["left_parked_too_often"][0], "bad_1");
    wait_len(&app, &dead, 1).await;

    // Purge needs --yes.
    let (ok, _, err) = guildgate(&app, &["dlq", "purge", "payment-events"]);
    assert!(!ok);
    assert!(err.contains("--yes"), "{err}");
    let (ok, out, _) = guildgate(&app, &["dlq", "purge", "payment-events", "--yes"]);
    assert!(ok);
    assert!(out.contains("purged 1"), "{out}");
    assert_eq!(app.queue_len(&dead).await, 0);

    let (ok, _, err) = guildgate(&app, &["dlq", "list", "nope"]);
    assert!(!ok);
    assert!(
        err.contains("not one of guildgate's dead-letter queues"),
        "{err}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_good_event_is_applied_when_replayed_with_filters() {
    let app = TestApp::spawn_ingest().await;
    app.entitlement_for("pdt_life", "123456789012345678", None)
        .await;
    let dead = format!("{}.dead", app.names.payment_events());
    // Two events as the broker parks them after its delivery limit: routed to the dead
    // queue with an x-death record naming the queue and the original routing key.
    let conn = lapin::Connection::connect(&common::amqp_url(), Default::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    for (id, pay, cus) in [("evt_a", "pay_a", "cus_a"), ("evt_b", "pay_b", "cus_b")] {
        let mut death = FieldTable::default();
        death.insert(
            "reason".into(),
            AMQPValue::LongString(LongString::from("delivery_limit")),
        );
        death.insert(
            "queue".into(),
            AMQPValue::LongString(LongString::from(app.names.payment_events().as_str())),
        );
        death.insert("count".into(), AMQPValue::LongLongInt(1));
        death.insert(
            "routing-keys".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::LongString(
                LongString::from("payment.succeeded"),
            )])),
        );
        let mut headers = FieldTable::default();
        headers.insert(
            "x-death".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(death)])),
        );
        let body = serde_json::to_vec(&payment(
            &app.business(),
            pay,
            cus,
            &["pdt_life"],
            "2026-05-01T10:00:00Z",
        ))
        .unwrap();
        ch.basic_publish(
            "".into(),
            dead.as_str().into(),
            Default::default(),
            &body,
            lapin::BasicProperties::default()
                .with_message_id(id.into())
                .with_headers(headers),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }

    let (ok, out, err) = guildgate(
        &app,
        &[
            "dlq",
            "replay",
            "payment-events",
            "--id",
            "evt_b",
            "--dry-run",
            "--json",
        ],
    );
    assert!(ok, "{err}");
    assert_eq!(json(&out)["replayed"][0], "evt_b");
    wait_len(&app, &dead, 2).await; // a dry run changes nothing

    let (ok, out, err) = guildgate(
        &app,
        &[
            "dlq",
            "replay",
            "payment-events",
            "--type",
            "payment.succeeded",
            "--id",
            "evt_b",
            "--json",
        ],
    );
    assert!(ok, "{err}");
    assert_eq!(json(&out)["replayed"].as_array().unwrap().len(), 1);
    app.wait_processed(1).await;
    assert_eq!(
        app.grants_of("cus_b").await.len(),
        1,
        "the replayed event applied"
    );
    assert!(
        app.grants_of("cus_a").await.is_empty(),
        "the other one stays parked"
    );
    wait_len(&app, &dead, 1).await;
    app.stop().await;
}

#[test]
fn every_command_has_help() {
    /// `guildgate <path> --help`, which must succeed and show a usage line.
    fn help(path: &[String]) -> String {
        let out = Command::new(env!("CARGO_BIN_EXE_guildgate"))
            .args(path)
            .arg("--help")
            .output()
            .unwrap();
        assert!(out.status.success(), "{path:?}");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(text.contains("Usage:"), "{path:?}: {text}");
        text
    }
    /// The subcommands a help text lists under `Commands:` (clap's own `help` aside).
    fn subcommands(text: &str) -> Vec<String> {
        text.lines()
            .skip_while(|l| !l.starts_with("Commands:"))
            .skip(1)
            .take_while(|l| !l.trim().is_empty())
            .filter_map(|l| l.split_whitespace().next())
            .filter(|c| *c != "help")
            .map(str::to_string)
            .collect()
    }
    // Every command and subcommand clap knows, walked from the top, so a new command
    // cannot be left out.
    let mut seen = Vec::new();
    let mut todo = vec![Vec::<String>::new()];
    while let Some(path) = todo.pop() {
        let text = help(&path);
        for sub in subcommands(&text) {
            let mut next = path.clone();
            next.push(sub);
            todo.push(next);
        }
        seen.push(path.join(" "));
    }
    for wanted in [
        "serve",
        "migrate",
        "dlq replay",
        "reconcile",
        "keys rotate-tokens",
        "guilds release",
    ] {
        assert!(seen.iter().any(|s| s == wanted), "{wanted} in {seen:?}");
    }
}
