//! Scenario 4, hostile input: every message of the corpus in `tests/hostile/` (plus a
//! few bodies too large to commit, generated here) goes through RabbitMQ into one running
//! guildgate, interleaved with good events. Each bad message must be dead-lettered with
//! the reason code `tests/hostile/expected.txt` names, or deliberately ignored; the good
//! ones around them must be applied, and the process must keep going.
//!
//! The expected outcomes are written by hand from the rules (docs/architecture.md,
//! "Transient and permanent failures"), never asked of the code under test.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::time::Instant;

use crate::common::events::payment;
use crate::common::{TestApp, wait_for};
use crate::scenarios::{GrantCounts, Report};

const GUILD: &str = "123456789012345678";
const ROLE: &str = "987654321098765432";
const T0: &str = "2026-05-01T10:31:00Z";
const CORPUS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/hostile");

/// Outcomes that are not dead letters.
const ACKED: [&str; 3] = ["ignored", "irrelevant", "applied"];

struct Case {
    name: String,
    routing_key: String,
    body: Vec<u8>,
    expected: String,
}

/// The committed corpus, as listed in `expected.txt` (which must list every file).
fn committed() -> Vec<Case> {
    let manifest = std::fs::read_to_string(format!("{CORPUS}/expected.txt")).unwrap();
    let mut cases = Vec::new();
    for line in manifest.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut parts = line.split_whitespace();
        let (file, expected) = (parts.next().unwrap(), parts.next().unwrap());
        assert!(parts.next().is_none(), "bad manifest line: {line}");
        let (routing_key, _) = file
            .split_once("__")
            .unwrap_or_else(|| panic!("{file}: name must be <routing key>__<what>"));
        cases.push(Case {
            name: file.to_string(),
            routing_key: routing_key.to_string(),
            body: std::fs::read(format!("{CORPUS}/{file}"))
                .unwrap_or_else(|e| panic!("{file}: {e}")),
            expected: expected.to_string(),
        });
    }
    let listed: BTreeSet<String> = cases.iter().map(|c| c.name.clone()).collect();
    assert_eq!(listed.len(), cases.len(), "a file is listed twice");
    let on_disk: BTreeSet<String> = std::fs::read_dir(CORPUS)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n != "expected.txt")
        .collect();
    assert_eq!(on_disk, listed, "expected.txt must list every corpus file");
    cases
}

/// Bodies over the size limit, generated rather than committed.
fn generated(limit: usize) -> Vec<Case> {
    let huge_name = {
        let mut e = payment("bus_H4ekzPSlcg", "pay_hbig", "cus_hbig", &["pdt_life"], T0);
        e["data"]["customer"]["name"] = serde_json::json!("A".repeat(1024 * 1024));
        serde_json::to_vec(&e).unwrap()
    };
    let just_over = {
        let e = payment(
            "bus_H4ekzPSlcg",
            "pay_hover",
            "cus_hover",
            &["pdt_life"],
            T0,
        );
        let mut b = serde_json::to_vec(&e).unwrap();
        b.resize(limit + 1, b' ');
        b
    };
    let just_under = {
        let e = payment(
            "bus_H4ekzPSlcg",
            "pay_hunder",
            "cus_hunder",
            &["pdt_life"],
            T0,
        );
        let mut b = serde_json::to_vec(&e).unwrap();
        b.resize(limit, b' ');
        b
    };
    let deep_huge = format!("{}{}", "[".repeat(400_000), "]".repeat(400_000)).into_bytes();
    [
        ("whitespace_300k", vec![b' '; 300 * 1024], "too_large"),
        ("valid_payment_with_1mib_name", huge_name, "too_large"),
        ("valid_payment_one_byte_over_limit", just_over, "too_large"),
        ("valid_payment_exactly_at_limit", just_under, "applied"),
        ("nesting_800k_brackets", deep_huge, "too_large"),
        ("binary_4mib", vec![0xA5; 4 * 1024 * 1024], "too_large"),
    ]
    .into_iter()
    .map(|(name, body, expected)| Case {
        name: format!("generated:{name}"),
        routing_key: "payment.succeeded".into(),
        body,
        expected: expected.into(),
    })
    .collect()
}

/// Runs the corpus through a guildgate (in this process) and reports what happened.
pub async fn hostile() -> Report {
    let app = TestApp::spawn_ingest().await;
    app.entitlement_for("pdt_life", GUILD, Some(ROLE)).await;
    app.entitlement_for("pdt_monthly", GUILD, Some(ROLE)).await;
    let b = app.business();

    let began = Instant::now();
    let mut cases = committed();
    let mut problems = Vec::new();
    if cases.len() < 50 {
        problems.push(format!("the corpus holds {} messages, not 50", cases.len()));
    }
    cases.extend(generated(app.settings.amqp.max_message_bytes));

    // Good, bad, good, bad, … and a final good one after the last bad one.
    for (i, case) in cases.iter().enumerate() {
        app.publish(
            &payment(
                &b,
                &format!("pay_good{i}"),
                &format!("cus_good{i}"),
                &["pdt_life"],
                T0,
            ),
            &format!("good-{i}"),
        )
        .await;
        app.publish_raw(&case.routing_key, &case.body, Some(&format!("hostile-{i}")))
            .await;
    }
    app.publish(
        &payment(&b, "pay_final", "cus_final", &["pdt_life"], T0),
        "good-final",
    )
    .await;

    let applied_bad = cases.iter().filter(|c| c.expected == "applied").count();
    let expected_dead: BTreeMap<String, &Case> = cases
        .iter()
        .enumerate()
        .filter(|(_, c)| !ACKED.contains(&c.expected.as_str()))
        .map(|(i, c)| (format!("hostile-{i}"), c))
        .collect();
    let total = 2 * cases.len() as u64 + 1;

    // Everything is settled: nothing stalls behind a bad message.
    wait_for("every message settled", || async {
        (app.metrics.events_settled.load(Ordering::Relaxed) >= total).then_some(())
    })
    .await;
    app.wait_processed((cases.len() + 1 + applied_bad) as i64)
        .await;
    let dead_q = format!("{}.dead", app.names.payment_events());
    wait_for("dead letters", || async {
        (app.queue_len(&dead_q).await as usize >= expected_dead.len()).then_some(())
    })
    .await;

    // Dead letters: the expected reason code, a readable reason, the original body.
    let parked = app.drain_queue(&dead_q).await;
    let mut seen = BTreeSet::new();
    let mut dead_lettered: BTreeMap<String, u64> = BTreeMap::new();
    for m in &parked {
        let code = m.header("x-guildgate-reason-code").unwrap_or_default();
        let reason = m.header("x-guildgate-reason").unwrap_or_default();
        *dead_lettered.entry(code.clone()).or_default() += 1;
        match expected_dead.get(&m.message_id) {
            Some(c) => {
                if code != c.expected {
                    problems.push(format!(
                        "{}: dead-lettered as {code} ({reason}), expected {}",
                        c.name, c.expected
                    ));
                }
                if reason.is_empty() {
                    problems.push(format!("{}: no readable reason", c.name));
                }
                if m.body != c.body {
                    problems.push(format!("{}: body altered in the dead letter", c.name));
                }
                seen.insert(m.message_id.clone());
            }
            None => problems.push(format!(
                "{} dead-lettered unexpectedly as {code} ({reason})",
                m.message_id
            )),
        }
    }
    for (id, c) in &expected_dead {
        if !seen.contains(id) {
            problems.push(format!(
                "{}: expected {}, not dead-lettered",
                c.name, c.expected
            ));
        }
    }

    // Acked bad messages: applied ones are recorded as applied, the rest not at all.
    let recorded: BTreeMap<String, String> =
        sqlx::query_as("SELECT event_id, outcome FROM processed_events")
            .fetch_all(&app.pool)
            .await
            .unwrap()
            .into_iter()
            .collect();
    let mut counted: BTreeMap<(String, &str), u64> = BTreeMap::new();
    for (i, c) in cases.iter().enumerate() {
        let got = recorded.get(&format!("hostile-{i}")).map(String::as_str);
        let want = (c.expected == "applied").then_some("applied");
        if got != want {
            problems.push(format!(
                "{}: recorded as {got:?}, expected {want:?}",
                c.name
            ));
        }
        if c.expected == "ignored" || c.expected == "irrelevant" {
            // Types guildgate does not act on share one label.
            let label = guildgate::domain::event::known_type(&c.routing_key)
                .unwrap_or(guildgate::metrics::OTHER_TYPE);
            *counted
                .entry((label.to_string(), c.expected.as_str()))
                .or_default() += 1;
        }
    }
    for ((event_type, outcome), n) in &counted {
        let got = app.metrics.event_count(event_type, outcome);
        if got != *n {
            problems.push(format!(
                "{event_type} counted {got} times as {outcome}, expected {n}"
            ));
        }
    }
    // Every good event around them was applied, and the last one too.
    // Every good event around them was applied, and the last one too, and so were the
    // bad-looking but valid ones (SQL, HTML, an escaped backslash before `u0000`, huge and
    // deep strings in fields).
    let mut grants = GrantCounts::default();
    let mut customers: Vec<String> = (0..cases.len()).map(|i| format!("cus_good{i}")).collect();
    customers.extend(
        [
            "cus_final",
            "cus_hsql",
            "cus_hhtml",
            "cus_hbslash",
            "cus_hhuge",
            "cus_hdeep",
            "cus_hsubhtml",
        ]
        .map(String::from),
    );
    for customer in &customers {
        let got = app.grants_of(customer).await;
        grants.expected += 1;
        match got.len() {
            1 if got[0].status == "Pending" => grants.found += 1,
            0 => {
                grants.missing += 1;
                problems.push(format!("{customer}: no grant"));
            }
            1 => {
                grants.missing += 1;
                problems.push(format!("{customer}: grant {}", got[0].status));
            }
            n => {
                grants.found += 1;
                grants.duplicated += n - 1;
                problems.push(format!("{customer}: {n} grants"));
            }
        }
    }
    let left = app.queue_len(&app.names.payment_events()).await;
    if left != 0 {
        problems.push(format!("{left} messages stuck in the queue"));
    }
    let applied = app.metrics.event_count("payment.succeeded", "applied");
    // good ones, the final one, and the bad-looking but valid payments
    let want = (cases.len() + 1 + applied_bad - 1) as u64;
    if applied != want {
        problems.push(format!(
            "{applied} payments counted as applied, expected {want}"
        ));
    }

    // Still alive and still serving.
    let healthy = matches!(
        reqwest::get(format!("http://{}/healthz", app.addr)).await,
        Ok(r) if r.status() == 200
    );
    if !healthy {
        problems.push("/healthz does not answer 200 any more".into());
    }
    app.stop().await;
    Report {
        scenario: "hostile input",
        events_sent: total as usize,
        grants: Some(grants),
        dead_lettered,
        notes: vec![format!(
            "{} bad messages ({} committed in tests/hostile/, {} generated), each between two good ones",
            cases.len(),
            cases
                .iter()
                .filter(|c| !c.name.starts_with("generated:"))
                .count(),
            cases
                .iter()
                .filter(|c| c.name.starts_with("generated:"))
                .count(),
        )],
        problems,
        elapsed: began.elapsed(),
        ..Report::default()
    }
}
