//! The platform's official Python SDK (`dodopayments`, pinned with everything it imports
//! in `tests/sdk/requirements.txt`) against a real guildgate: `tests/sdk/suite.py` calls
//! every Discord-relevant method the SDK has, as a merchant does, and validates each raw
//! answer strictly against the model the SDK parses it into (the models themselves take
//! a missing field as None). It also verifies a webhook guildgate delivered with the
//! SDK's `webhooks.unwrap`, and that guildgate's `/openapi.json` agrees with the SDK's
//! models (required fields, nullability, JSON types) for every object they share.
//!
//! The interpreter is `GUILDGATE_DODOPAYMENTS_PYTHON` if set (`.ci/run` prepares it),
//! else a virtualenv this test makes once under the cargo target directory (`python3 -m
//! venv`, `pip install` from PyPI). Without either the test fails, saying so: it never
//! skips.

use crate::python;
use crate::seed;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use python::Tool;
use seed::{Endpoint, Seeded, seeded};
use serde_json::{Value, json};

/// The SDK and every Python package it imports, pinned.
const SDK: Tool = Tool {
    env_var: "GUILDGATE_DODOPAYMENTS_PYTHON",
    requirements_path: "tests/sdk/requirements.txt",
    requirements: include_str!("sdk/requirements.txt"),
    package: "dodopayments",
    program: "python",
    version_args: &[
        "-c",
        "import importlib.metadata as m; print(m.version('dodopayments'))",
    ],
};
/// Far beyond a run's few seconds, even on a busy machine.
const RUN_DEADLINE: Duration = Duration::from_secs(300);

/// What a merchant's receiver got: each request's body and headers.
type Deliveries = Arc<Mutex<Vec<(String, BTreeMap<String, String>)>>>;

async fn receive(State(got): State<Deliveries>, headers: HeaderMap, body: Bytes) -> &'static str {
    let headers = headers
        .iter()
        .filter_map(|(k, v)| Some((k.to_string(), v.to_str().ok()?.to_string())))
        .collect();
    got.lock()
        .unwrap()
        .push((String::from_utf8_lossy(&body).into_owned(), headers));
    "ok"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_platforms_python_sdk_works_against_guildgate() {
    let python = SDK.program();
    // A receiver the seeded endpoint delivers the grant's message to, verbatim, so that
    // the SDK verifies what guildgate really sends.
    let got = Deliveries::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let receiver = format!("http://{}/hook", listener.local_addr().unwrap());
    let app = Router::new()
        .route("/hook", axum::routing::post(receive))
        .with_state(got.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });

    let Seeded { world: w, key, ids } = seeded(Endpoint::At(receiver.clone())).await;
    let (body, headers) = got.lock().unwrap()[0].clone();
    let seeded_ids: serde_json::Map<String, Value> = ids
        .iter()
        .map(|(k, v)| (k.to_string(), Value::from(v.clone())))
        .collect();

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sdk/suite.py");
    let output = Path::new(python::TMP).join("sdk-suite-output.txt");
    let mut cmd = Command::new(&python);
    cmd.arg(&script)
        .env("GUILDGATE_BASE_URL", format!("http://{}", w.app.addr))
        .env("GUILDGATE_API_KEY", &key)
        .env("GUILDGATE_SEEDED", Value::Object(seeded_ids).to_string())
        .env(
            "GUILDGATE_DELIVERED",
            json!({"body": body, "headers": headers}).to_string(),
        )
        .env("GUILDGATE_RECEIVER", &receiver)
        // A proxy of the environment (set for pip) must not stand between the two.
        .env("NO_PROXY", "127.0.0.1")
        .env("no_proxy", "127.0.0.1")
        .env("PYTHONDONTWRITEBYTECODE", "1");
    let (status, took, text) = python::run_with_deadline(&mut cmd, &output, RUN_DEADLINE).await;
    let status = status.unwrap_or_else(|| {
        panic!("tests/sdk/suite.py did not finish within {RUN_DEADLINE:?}; killed:\n{text}")
    });
    assert!(status.success(), "the SDK suite failed ({status}):\n{text}");
    println!("{text}SDK suite: {took:.1?}");
    w.stop().await;
}
