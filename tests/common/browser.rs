//! A headless Chromium for the browser tests, driven through chromedriver's W3C
//! WebDriver HTTP API with `reqwest` (no WebDriver client crate: the few calls the
//! tests need are below).
//!
//! [`Browser::start`] spawns `chromedriver` on a free loopback port and opens a session
//! with Chromium in a new, empty profile directory; dropping the [`Browser`] ends the
//! session, kills chromedriver and removes the profile. Chromium must be installed
//! (Debian's `chromium` and `chromium-driver`; `.ci/run` installs them): without it the
//! tests fail, they do not skip.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine as _;
use serde_json::{Value, json};

/// The W3C key of an element reference.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// Chromium's flags: headless, and nothing that reaches the internet by itself.
const CHROMIUM_ARGS: [&str; 8] = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
];

fn find_binary(env: &str, candidates: &[&str]) -> Option<PathBuf> {
    if let Ok(p) = std::env::var(env) {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        for c in candidates {
            let p = dir.join(c);
            if p.is_file() {
                return Some(p);
            }
        }
    }
    None
}

pub struct Browser {
    driver: Child,
    base: String,
    session: String,
    http: reqwest::Client,
    profile: PathBuf,
}

/// An element found on the page.
#[derive(Debug, Clone)]
pub struct Element(String);

/// Starts chromedriver on a loopback port that was free a moment ago. Another process
/// may take the port before chromedriver binds it (and may even answer WebDriver there),
/// so only chromedriver's own word that it started counts, and one that found its port
/// taken is started again on another.
fn start_chromedriver(chromedriver: &Path) -> (Child, u16) {
    use std::io::{BufRead, BufReader};
    use std::sync::mpsc::RecvTimeoutError;
    for _ in 0..10 {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut driver = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", chromedriver.display()));
        // Its output is read to the end on a thread of its own, so it never blocks on a
        // full pipe.
        let out = BufReader::new(driver.stdout.take().unwrap());
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in out.lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut said = Vec::new();
        loop {
            match rx.recv_timeout(Duration::from_secs(20)) {
                Ok(line) if line.contains("started successfully") => return (driver, port),
                Ok(line) => said.push(line),
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => {
                    panic!("chromedriver did not start within 20 s: {said:?}")
                }
            }
        }
        let _ = driver.wait();
        if !said.iter().any(|l| l.contains("port not available")) {
            panic!("chromedriver exited: {said:?}");
        }
    }
    panic!("chromedriver found its port taken 10 times");
}

impl Browser {
    /// Starts chromedriver and a headless Chromium session. Panics with what to install
    /// when Chromium or chromedriver is missing.
    pub async fn start() -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let chromium = find_binary("GUILDGATE_TEST_CHROMIUM", &["chromium", "chromium-browser"])
            .expect(
                "Chromium is not installed: the browser tests need it \
                 (apt-get install -y chromium chromium-driver; .ci/run does this), \
                 or set GUILDGATE_TEST_CHROMIUM",
            );
        let chromedriver = find_binary("GUILDGATE_TEST_CHROMEDRIVER", &["chromedriver"]).expect(
            "chromedriver is not installed: the browser tests need it \
             (apt-get install -y chromium chromium-driver; .ci/run does this), \
             or set GUILDGATE_TEST_CHROMEDRIVER",
        );
        let profile =
            std::env::temp_dir().join(format!("guildgate-chromium-{}", crate::common::tag()));
        std::fs::create_dir_all(&profile).unwrap();
        let (driver, port) = start_chromedriver(&chromedriver);
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap();
        let base = format!("http://127.0.0.1:{port}");
        let mut b = Self {
            driver,
            base,
            session: String::new(),
            http,
            profile,
        };
        b.wait_ready().await;
        let mut args: Vec<String> = CHROMIUM_ARGS.iter().map(|s| s.to_string()).collect();
        args.push(format!("--user-data-dir={}", b.profile.display()));
        let caps = json!({
            "capabilities": {
                "alwaysMatch": {
                    "browserName": "chrome",
                    "goog:chromeOptions": {
                        "binary": chromium.display().to_string(),
                        "args": args,
                    }
                }
            }
        });
        let v = b.call(reqwest::Method::POST, "/session", Some(caps)).await;
        b.session = v["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no WebDriver session: {v}"))
            .to_string();
        b
    }

    async fn wait_ready(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(r) = self.http.get(format!("{}/status", self.base)).send().await
                && let Ok(v) = r.json::<Value>().await
                && v["value"]["ready"] == json!(true)
            {
                return;
            }
            if tokio::time::Instant::now() > deadline {
                panic!("chromedriver did not become ready within 20 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// One WebDriver command; returns its `value`, panicking on a WebDriver error.
    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let url = format!("{}{path}", self.base);
        let mut req = self.http.request(method.clone(), &url);
        if let Some(b) = body {
            req = req.json(&b);
        } else if method == reqwest::Method::POST {
            req = req.json(&json!({}));
        }
        let r = req
            .send()
            .await
            .unwrap_or_else(|e| panic!("WebDriver {path}: {e}"));
        let status = r.status();
        let v: Value = r.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            panic!("WebDriver {method} {path}: {status} {v}");
        }
        v["value"].clone()
    }

    fn s(&self, path: &str) -> String {
        format!("/session/{}{path}", self.session)
    }

    /// Sets the window's size in CSS pixels (a phone's, for the screenshots).
    pub async fn set_window_size(&self, width: u32, height: u32) {
        self.call(
            reqwest::Method::POST,
            &self.s("/window/rect"),
            Some(json!({"width": width, "height": height})),
        )
        .await;
    }

    pub async fn goto(&self, url: &str) {
        self.call(
            reqwest::Method::POST,
            &self.s("/url"),
            Some(json!({ "url": url })),
        )
        .await;
    }

    pub async fn current_url(&self) -> String {
        self.call(reqwest::Method::GET, &self.s("/url"), None)
            .await
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    pub async fn title(&self) -> String {
        self.call(reqwest::Method::GET, &self.s("/title"), None)
            .await
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    pub async fn source(&self) -> String {
        self.call(reqwest::Method::GET, &self.s("/source"), None)
            .await
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// The first element matching a CSS selector (panics if none).
    pub async fn find(&self, css: &str) -> Element {
        let v = self
            .call(
                reqwest::Method::POST,
                &self.s("/element"),
                Some(json!({"using": "css selector", "value": css})),
            )
            .await;
        Element(
            v[ELEMENT]
                .as_str()
                .unwrap_or_else(|| panic!("no element {css}: {v}"))
                .to_string(),
        )
    }

    /// Every element matching a CSS selector.
    pub async fn find_all(&self, css: &str) -> Vec<Element> {
        let v = self
            .call(
                reqwest::Method::POST,
                &self.s("/elements"),
                Some(json!({"using": "css selector", "value": css})),
            )
            .await;
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|e| e[ELEMENT].as_str().map(|s| Element(s.to_string())))
                    .collect()
            })
            .unwrap_or_default()
    }

    pub async fn click(&self, e: &Element) {
        self.call(
            reqwest::Method::POST,
            &self.s(&format!("/element/{}/click", e.0)),
            None,
        )
        .await;
    }

    /// The rendered text of an element.
    pub async fn text(&self, e: &Element) -> String {
        self.call(
            reqwest::Method::GET,
            &self.s(&format!("/element/{}/text", e.0)),
            None,
        )
        .await
        .as_str()
        .unwrap_or_default()
        .to_string()
    }

    /// An attribute or, failing that, a property of an element (e.g. `href`).
    pub async fn attribute(&self, e: &Element, name: &str) -> Option<String> {
        self.call(
            reqwest::Method::GET,
            &self.s(&format!("/element/{}/attribute/{name}", e.0)),
            None,
        )
        .await
        .as_str()
        .map(str::to_string)
    }

    /// Runs a script in the page and returns its result.
    pub async fn execute(&self, script: &str) -> Value {
        self.call(
            reqwest::Method::POST,
            &self.s("/execute/sync"),
            Some(json!({"script": script, "args": []})),
        )
        .await
    }

    /// Waits until the page's URL contains `part` and it has loaded.
    pub async fn wait_url(&self, part: &str) -> String {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let url = self.current_url().await;
            if url.contains(part)
                && self.execute("return document.readyState").await == json!("complete")
            {
                return url;
            }
            if tokio::time::Instant::now() > deadline {
                panic!("the browser did not reach {part} (at {url})");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Saves a PNG of the viewport to `path`.
    pub async fn screenshot(&self, path: &Path) {
        let v = self
            .call(reqwest::Method::GET, &self.s("/screenshot"), None)
            .await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(v.as_str().expect("base64 screenshot"))
            .expect("valid base64");
        assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).unwrap();
        }
        std::fs::write(path, png).unwrap();
    }
}

/// `<target dir>/browser-screenshots`: found from the test binary's path
/// (`<target>/<profile>/deps/<binary>`), so it follows `CARGO_TARGET_DIR`. Never a tracked
/// file: `scripts/refresh-screenshots` copies them into `docs/`.
pub fn screenshot_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let target = exe
        .parent()
        .and_then(Path::parent)
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
    target.join("browser-screenshots")
}

impl Drop for Browser {
    fn drop(&mut self) {
        // End the session (closes Chromium) on a thread of its own: this may run inside
        // the test's runtime, which cannot be blocked on.
        if !self.session.is_empty() {
            let url = format!("{}/session/{}", self.base, self.session);
            let _ = std::thread::spawn(move || {
                let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                else {
                    return;
                };
                rt.block_on(async {
                    if let Ok(c) = reqwest::Client::builder()
                        .no_proxy()
                        .timeout(Duration::from_secs(10))
                        .build()
                    {
                        let _ = c.delete(url).send().await;
                    }
                });
            })
            .join();
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}
