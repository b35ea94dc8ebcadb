//! The merchant API against its own OpenAPI document, by a schema fuzzer: Schemathesis
//! (pinned in `tests/schemathesis/requirements.txt`) reads `GET /openapi.json` of a real
//! guildgate and sends every operation generated requests, valid and invalid, with a
//! valid API key. It fails on any server error, any answer the document does not
//! describe (status, content type, headers, body schema), valid data refused or invalid
//! data accepted. A short, seeded run: the same requests every time, well under two
//! minutes.
//!
//! The CLI is `GUILDGATE_SCHEMATHESIS` if set (`.ci/run` prepares it), else a virtualenv
//! this test makes once under the cargo target directory (`python3 -m venv`, `pip
//! install` from PyPI). Without either the test fails, saying so: it never skips.

use crate::python;
use crate::seed;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use guildgate::domain::ids::BusinessId;
use python::{TMP, Tool};
use reqwest::Method;
use secrecy::ExposeSecret;
use seed::{Endpoint, Seeded, seeded};
use serde_json::{Value, json};

/// The fuzzer's CLI and every Python package it imports, pinned.
const SCHEMATHESIS: Tool = Tool {
    env_var: "GUILDGATE_SCHEMATHESIS",
    requirements_path: "tests/schemathesis/requirements.txt",
    requirements: include_str!("schemathesis/requirements.txt"),
    package: "schemathesis",
    program: "schemathesis",
    // `schemathesis, version 4.32.5`
    version_args: &["--version"],
};
/// Far beyond a run's 10 to 20 s, even on a busy machine.
const RUN_DEADLINE: Duration = Duration::from_secs(600);

/// What the default `positive_data_acceptance` check allows a schema-valid request.
const ACCEPTED: &[&str] = &["2xx", "3xx", "401", "403", "404", "409", "429", "5xx"];

const SAVES_CHECK_DISCORD: &str = "saving checks that the server is connected to this business and asks Discord whether the bot can give the role";
const URLS_NEED_DNS: &str =
    "the URL must be https and resolve to public addresses only, which DNS decides";

/// Operations that refuse some schema-valid requests for reasons no schema can state
/// (what is stored, what Discord or DNS says): the status they may also answer a valid
/// request, and why. Every other operation is held to [`ACCEPTED`].
const DEPENDS_ON_STATE: &[(&str, &str, &str)] = &[
    ("POST /entitlements", "422", SAVES_CHECK_DISCORD),
    ("PATCH /entitlements/{id}", "422", SAVES_CHECK_DISCORD),
    (
        "PUT /products/{product_id}/entitlements",
        "422",
        "each entitlement listed must exist, be this business's and be listed once",
    ),
    (
        "PATCH /products/{product_id}",
        "422",
        "each entitlement listed must exist, be this business's and be listed once",
    ),
    (
        "GET /webhooks",
        "422",
        "an `iterator` must be one a previous page returned (it is opaque: any other string is refused)",
    ),
    (
        "PUT /discord/application",
        "422",
        "the bot token and the client secret must be the application's, which Discord decides",
    ),
    ("POST /webhooks", "422", URLS_NEED_DNS),
    ("PATCH /webhooks/{id}", "422", URLS_NEED_DNS),
    (
        "PATCH /webhooks/{id}/headers",
        "422",
        "a header's name must be an HTTP token and not one guildgate or the connection owns (the document says so in words: JSON Schema's propertyNames is not generated)",
    ),
    (
        "GET /discord/bot/callback",
        "400",
        "only an unused `state` signed by GET /discord/install-url, with Discord's code, connects a server",
    ),
    (
        "POST /entitlements/{id}/grants",
        "422",
        "`expires_at` must be in the future, which the clock decides",
    ),
    (
        "GET /oauth/discord/callback",
        "400",
        "only the `state` of a grant's own `oauth_url`, with Discord's code, links an account",
    ),
    ("GET /access", "400", ACCESS_TOKEN),
    ("POST /access/connect", "400", ACCESS_TOKEN),
    ("POST /access/restore", "400", ACCESS_TOKEN),
    ("POST /access/switch", "400", ACCESS_TOKEN),
    (
        "POST /access/switch/confirm",
        "400",
        "only a confirmation signed by the page Discord sent the customer back to is accepted",
    ),
];

const ACCESS_TOKEN: &str = "only the signed token of a customer's email link (and one of their own live grants) is accepted";

/// Path parameters that are given the id of a seeded object half of the time (a
/// generated id is never found), so that operations on one object reach past their 404:
/// operation → (parameter, kind of object). The deletes of entitlements, endpoints and
/// servers are left to generated ids: they would take away what the other operations
/// are given (the stateful phase, which runs last, may still find the real ids), and
/// tests/api.rs covers them.
const SEEDED_IDS: &[(&str, &[(&str, &str)])] = &[
    ("GET /entitlements/{id}", &[("id", "entitlement")]),
    ("PATCH /entitlements/{id}", &[("id", "entitlement")]),
    ("GET /entitlements/{id}/grants", &[("id", "entitlement")]),
    ("POST /entitlements/{id}/grants", &[("id", "entitlement")]),
    (
        "GET /entitlements/{id}/translations",
        &[("id", "entitlement")],
    ),
    (
        "PUT /entitlements/{id}/translations/{locale}",
        &[("id", "entitlement")],
    ),
    (
        "DELETE /entitlements/{id}/translations/{locale}",
        &[("id", "entitlement")],
    ),
    (
        "GET /entitlements/{id}/grants/{grant_id}",
        &[("id", "entitlement"), ("grant_id", "grant")],
    ),
    (
        "DELETE /entitlements/{id}/grants/{grant_id}",
        &[("id", "entitlement"), ("grant_id", "grant")],
    ),
    (
        "GET /customers/{customer_id}/entitlement-grants",
        &[("customer_id", "customer")],
    ),
    (
        "GET /customers/{customer_id}/entitlements",
        &[("customer_id", "customer")],
    ),
    ("GET /products/{product_id}", &[("product_id", "product")]),
    ("PATCH /products/{product_id}", &[("product_id", "product")]),
    (
        "GET /products/{product_id}/entitlements",
        &[("product_id", "product")],
    ),
    (
        "PUT /products/{product_id}/entitlements",
        &[("product_id", "product")],
    ),
    (
        "GET /discord/guilds/{guild_id}/roles",
        &[("guild_id", "guild")],
    ),
    ("GET /webhooks/{id}", &[("id", "endpoint")]),
    ("PATCH /webhooks/{id}", &[("id", "endpoint")]),
    ("GET /webhooks/{id}/secret", &[("id", "endpoint")]),
    ("GET /webhooks/{id}/headers", &[("id", "endpoint")]),
    ("PATCH /webhooks/{id}/headers", &[("id", "endpoint")]),
    ("POST /webhooks/{id}/secret/rotate", &[("id", "endpoint")]),
    ("GET /webhooks/{id}/messages", &[("id", "endpoint")]),
    (
        "POST /webhooks/{id}/messages/retry-failed",
        &[("id", "endpoint")],
    ),
    (
        "POST /webhooks/{id}/messages/{message_id}/retry",
        &[("id", "endpoint"), ("message_id", "message")],
    ),
];

/// A grant's `DELETE` revokes it, as on the platform: the grant stays readable, now
/// `Revoked`. Schemathesis' stateful phase takes a `DELETE` for a removal and expects
/// 404 after it (`use_after_free`), which is not what this `DELETE` means; the revoke
/// itself is covered in tests/api.rs.
const REVOKE_NOT_REMOVE: &[&str] = &[
    "DELETE /entitlements/{id}/grants/{grant_id}",
    "GET /entitlements/{id}/grants/{grant_id}",
];

/// The Schemathesis configuration of the run, from [`DEPENDS_ON_STATE`] (with its
/// reasons) and [`SEEDED_IDS`]; `ids` maps each kind of object to the seeded one's id.
fn config(ids: &[(&str, String)]) -> String {
    let mut toml = String::new();
    for (kind, id) in ids {
        toml += &format!("[dictionaries.{kind}]\nvalues = [{id:?}]\n\n");
    }
    let mut operations: Vec<&str> = DEPENDS_ON_STATE
        .iter()
        .map(|(op, ..)| *op)
        .chain(SEEDED_IDS.iter().map(|(op, ..)| *op))
        .chain(REVOKE_NOT_REMOVE.iter().copied())
        .collect();
    operations.sort();
    operations.dedup();
    for operation in operations {
        toml += &format!("[[operations]]\ninclude-name = {operation:?}\n");
        if REVOKE_NOT_REMOVE.contains(&operation) {
            toml += "# DELETE revokes a grant and keeps it readable\nchecks.use_after_free.enabled = false\n";
        }
        for (_, status, why) in DEPENDS_ON_STATE.iter().filter(|d| d.0 == operation) {
            let statuses: Vec<String> = ACCEPTED
                .iter()
                .chain([status])
                .map(|s| format!("{s:?}"))
                .collect();
            toml += &format!(
                "# {status}: {why}\nchecks.positive_data_acceptance.expected-statuses = [{}]\n",
                statuses.join(", ")
            );
        }
        let bound: Vec<String> = SEEDED_IDS
            .iter()
            .filter(|(op, _)| *op == operation)
            .flat_map(|(_, params)| params.iter())
            .map(|(param, kind)| {
                assert!(ids.iter().any(|(k, _)| k == kind), "no seeded {kind}");
                format!("\"path.{param}\" = {{ dictionary = {kind:?}, probability = 0.5 }}")
            })
            .collect();
        if !bound.is_empty() {
            toml += &format!("parameters = {{ {} }}\n", bound.join(", "));
        }
        toml += "\n";
    }
    toml
}

/// `name` from the environment as a number, else `default`.
fn number_from_env(name: &str, default: u64) -> String {
    match std::env::var(name) {
        Ok(v) => {
            v.parse::<u64>()
                .unwrap_or_else(|_| panic!("{name}={v:?} is not a number"));
            v
        }
        Err(_) => default.to_string(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_keeps_to_its_openapi_document_under_a_schema_fuzzer() {
    let cli = SCHEMATHESIS.program();
    let Seeded { world: w, key, ids } = seeded(Endpoint::Unreachable).await;
    // Every operation the configuration names is one of the document's: a renamed
    // route would otherwise drop its exception or its ids without a word.
    let doc: Value = w
        .http
        .get(format!("http://{}/openapi.json", w.app.addr))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    for named in DEPENDS_ON_STATE
        .iter()
        .map(|(op, ..)| *op)
        .chain(SEEDED_IDS.iter().map(|(op, _)| *op))
    {
        let (method, path) = named.split_once(' ').unwrap();
        assert!(
            doc["paths"][path][method.to_lowercase()].is_object(),
            "{named} is not in the document"
        );
    }
    let reports = Path::new(TMP).join("schemathesis-report");
    let _ = std::fs::remove_dir_all(&reports);
    std::fs::create_dir_all(&reports).unwrap();
    let config_file = reports.join("schemathesis.toml");
    std::fs::write(&config_file, config(&ids)).unwrap();
    let mut cmd = Command::new(&cli);
    cmd.arg("--config-file")
        .arg(&config_file)
        .arg("run")
        .arg(format!("http://{}/openapi.json", w.app.addr))
        .args(["--header", &format!("Authorization: Bearer {key}")])
        // Every check Schemathesis has, on every phase (examples, coverage, fuzzing,
        // stateful), in positive and negative mode: its defaults. What is narrowed is
        // in `config()` and below, each with its reason.
        //
        // The same requests on every run; a longer or another run locally with
        // GUILDGATE_SCHEMATHESIS_EXAMPLES and GUILDGATE_SCHEMATHESIS_SEED.
        .args([
            "--seed",
            &number_from_env("GUILDGATE_SCHEMATHESIS_SEED", 20260501),
        ])
        .args([
            "--max-examples",
            &number_from_env("GUILDGATE_SCHEMATHESIS_EXAMPLES", 10),
        ])
        .args(["--generation-database", "none"])
        // One request at a time: operations change what others read (an endpoint
        // deleted, a grant revoked), and the order must not depend on scheduling.
        .args(["--workers", "1"])
        .args(["--request-timeout", "20"])
        // U+0000 is refused in every string, key and parameter by design (docs/api.md;
        // tests/api.rs holds it), a rule the document states in words rather than in
        // every schema: generated strings leave it out.
        .args(["--generation-allow-x00", "false"])
        .args(["--no-color", "--report", "junit"])
        .arg("--report-dir")
        .arg(&reports)
        // Hypothesis and Schemathesis may write caches into the working directory.
        .current_dir(&reports)
        // A proxy of the environment (set for pip) must not stand between the two.
        .env("NO_PROXY", "127.0.0.1")
        .env("no_proxy", "127.0.0.1");
    // Its output goes to a file beside the report.
    let output = reports.join("output.txt");
    let (status, took, text) = python::run_with_deadline(&mut cmd, &output, RUN_DEADLINE).await;
    let status = status.unwrap_or_else(|| {
        panic!("Schemathesis did not finish within {RUN_DEADLINE:?}; killed:\n{text}")
    });
    assert!(
        status.success(),
        "Schemathesis found problems ({status}; its configuration, output and report are in {}):\n{text}",
        reports.display()
    );
    let cases = text
        .lines()
        .find(|l| l.contains(" generated, "))
        .unwrap_or_default()
        .trim();
    println!("Schemathesis: {cases}, in {took:.1?}");
    w.stop().await;
}

/// Every operation the document says needs an API key refuses a request without a
/// valid one with 401 in the error shape, before anything else is looked at; and the
/// operations it says need none do not ask for one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_protected_operation_answers_401_without_a_valid_key() {
    let Seeded { world: w, ids, .. } = seeded(Endpoint::Unreachable).await;
    let base = format!("http://{}", w.app.addr);
    let (s, doc) = {
        let r = w
            .http
            .get(format!("{base}/openapi.json"))
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json::<Value>().await.unwrap())
    };
    assert_eq!(s, 200);
    let id_of = |kind: &str| ids.iter().find(|(k, _)| *k == kind).unwrap().1.clone();
    let mut protected = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            // Real ids where the seeded objects have them: a 401 must not depend on
            // whether the object exists.
            let concrete = path
                .replace(
                    "{id}",
                    &id_of(if path.starts_with("/webhooks") {
                        "endpoint"
                    } else {
                        "entitlement"
                    }),
                )
                .replace("{grant_id}", &id_of("grant"))
                .replace("{message_id}", &id_of("message"))
                .replace("{customer_id}", &id_of("customer"))
                .replace("{product_id}", &id_of("product"))
                .replace("{guild_id}", &id_of("guild"))
                .replace("{locale}", "fr")
                .replace("{user_id}", "1234567890123456789");
            assert!(
                !concrete.contains('{'),
                "{path}: a parameter without a value"
            );
            let secured = op["security"]
                .as_array()
                .is_some_and(|s| s.iter().any(|r| r.get("api_key").is_some()));
            let method = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let name = format!("{method} {path}");
            let bad_keys = [
                None,
                Some("Bearer".to_string()),
                Some("Bearer nonsense".to_string()),
                Some(
                    "Bearer gg_aaaaaaaaaaaaaaaaaaaa_bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"
                        .to_string(),
                ),
                Some("Basic dXNlcjpwYXNz".to_string()),
            ];
            for auth in bad_keys {
                let mut req = w.http.request(method.clone(), format!("{base}{concrete}"));
                if let Some(a) = &auth {
                    req = req.header("authorization", a);
                }
                if op["requestBody"].is_object() {
                    req = req.json(&json!({}));
                }
                let r = req.send().await.expect("guildgate answers");
                let status = r.status().as_u16();
                let body = r.text().await.unwrap();
                if secured {
                    let v: Value = serde_json::from_str(&body)
                        .unwrap_or_else(|_| panic!("{name} ({auth:?}): {status} {body}"));
                    assert_eq!(
                        (status, v["code"].as_str()),
                        (401, Some("unauthorized")),
                        "{name} ({auth:?}): {body}"
                    );
                    assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()));
                } else {
                    assert_ne!(status, 401, "{name} is documented without a key: {body}");
                }
            }
            protected += usize::from(secured);
        }
    }
    assert!(protected >= 25, "only {protected} protected operations");
    // Nothing the refused requests asked for happened.
    let key = {
        let mut conn = w.app.pool.acquire().await.unwrap();
        let (_, key) = guildgate::web::api::auth::create_api_key(
            &mut conn,
            &BusinessId::parse(w.app.business()).unwrap(),
            None,
        )
        .await
        .unwrap();
        key.expose_secret().to_string()
    };
    let get = |path: String| {
        let req = w.http.get(format!("{base}{path}")).bearer_auth(&key);
        async move { req.send().await.unwrap().json::<Value>().await.unwrap() }
    };
    let entitlement = get(format!("/entitlements/{}", id_of("entitlement"))).await;
    assert_eq!(
        entitlement["id"],
        id_of("entitlement").as_str(),
        "{entitlement}"
    );
    let grant = get(format!(
        "/entitlements/{}/grants/{}",
        id_of("entitlement"),
        id_of("grant")
    ))
    .await;
    assert_eq!(grant["status"], "Pending", "{grant}");
    let endpoints = get("/webhooks".into()).await;
    assert_eq!(
        endpoints["data"].as_array().unwrap().len(),
        1,
        "{endpoints}"
    );
    w.stop().await;
}
