//! A headless Chromium for the browser tests, driven through chromedriver with the
//! `fantoccini` WebDriver client; [`Browser`] keeps the few steps the tests take in one
//! place (find, click, keys, scripts, axe-core, screenshots).
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

use fantoccini::actions::{InputSource, KeyAction, KeyActions};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};

/// WebDriver's key values.
pub const TAB: &str = "\u{E004}";
pub const ENTER: &str = "\u{E007}";

/// The axe-core version the accessibility checks use (`tests/axe/version`).
const AXE_VERSION: &str = include_str!("../axe/version");

/// axe-core's `axe.min.js`: the file `GUILDGATE_AXE_JS` names (`.ci/run` sets it), else
/// the pinned version fetched once from npm (`npm pack`) under the target directory.
pub fn axe_source() -> String {
    static SOURCE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    SOURCE
        .get_or_init(|| {
            let path = match std::env::var("GUILDGATE_AXE_JS") {
                Ok(p) => PathBuf::from(p),
                Err(_) => fetch_axe(),
            };
            std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("cannot read axe-core at {}: {e}", path.display()))
        })
        .clone()
}

fn fetch_axe() -> PathBuf {
    let version = AXE_VERSION.trim();
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("axe-core-{version}"));
    let js = dir.join("package/axe.min.js");
    if js.is_file() {
        return js;
    }
    std::fs::create_dir_all(&dir).unwrap();
    let run = |cmd: &mut Command| {
        let out = cmd
            .current_dir(&dir)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {cmd:?} (npm and tar are needed to fetch axe-core, or set GUILDGATE_AXE_JS): {e}"));
        assert!(
            out.status.success(),
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(Command::new("npm").args(["pack", "--silent", &format!("axe-core@{version}")]));
    run(Command::new("tar").args([
        "-xzf",
        &format!("axe-core-{version}.tgz"),
        "package/axe.min.js",
    ]));
    js
}

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
    client: Client,
    session: String,
    profile: PathBuf,
}

/// An element found on the page.
#[derive(Debug, Clone)]
pub struct Element(fantoccini::elements::Element);

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
        Self::start_in("en-US").await
    }

    /// The same, with a browser whose languages (`Accept-Language`) are `lang`.
    pub async fn start_in(lang: &str) -> Self {
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
        let base = format!("http://127.0.0.1:{port}");
        let mut args: Vec<String> = CHROMIUM_ARGS.iter().map(|s| s.to_string()).collect();
        args.push(format!("--user-data-dir={}", profile.display()));
        args.push(format!("--lang={lang}"));
        args.push(format!("--accept-lang={lang}"));
        let caps = json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium.display().to_string(),
                "args": args,
            }
        });
        let Value::Object(caps) = caps else {
            unreachable!("an object")
        };
        // chromedriver is on loopback, over plain HTTP.
        let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&base)
            .await
            .unwrap_or_else(|e| panic!("no WebDriver session: {e}"));
        let session = client
            .session_id()
            .await
            .ok()
            .flatten()
            .expect("a session id");
        Self {
            driver,
            base,
            client,
            session,
            profile,
        }
    }

    /// Sets the window's size in CSS pixels (a phone's, for the screenshots).
    pub async fn set_window_size(&self, width: u32, height: u32) {
        self.client
            .set_window_size(width, height)
            .await
            .expect("window resized");
    }

    pub async fn goto(&self, url: &str) {
        self.client
            .goto(url)
            .await
            .unwrap_or_else(|e| panic!("cannot open {url}: {e}"));
    }

    pub async fn current_url(&self) -> String {
        self.client
            .current_url()
            .await
            .map(|u| u.to_string())
            .unwrap_or_default()
    }

    pub async fn title(&self) -> String {
        self.client.title().await.unwrap_or_default()
    }

    pub async fn source(&self) -> String {
        self.client.source().await.unwrap_or_default()
    }

    /// The first element matching a CSS selector (panics if none).
    pub async fn find(&self, css: &str) -> Element {
        Element(
            self.client
                .find(Locator::Css(css))
                .await
                .unwrap_or_else(|e| panic!("no element {css}: {e}")),
        )
    }

    /// Every element matching a CSS selector.
    pub async fn find_all(&self, css: &str) -> Vec<Element> {
        self.client
            .find_all(Locator::Css(css))
            .await
            .unwrap_or_default()
            .into_iter()
            .map(Element)
            .collect()
    }

    pub async fn click(&self, e: &Element) {
        e.0.click().await.expect("clicked");
    }

    /// The rendered text of an element.
    pub async fn text(&self, e: &Element) -> String {
        e.0.text().await.unwrap_or_default()
    }

    /// An attribute or, failing that, a property of an element (e.g. `href`).
    pub async fn attribute(&self, e: &Element, name: &str) -> Option<String> {
        e.0.attr(name).await.ok().flatten()
    }

    /// Runs a script in the page and returns its result.
    pub async fn execute(&self, script: &str) -> Value {
        self.client
            .execute(script, Vec::new())
            .await
            .unwrap_or_else(|e| panic!("script failed: {e}"))
    }

    /// Presses keys on the keyboard, one after the other (WebDriver key values:
    /// [`TAB`], [`ENTER`], or characters).
    pub async fn press(&self, keys: &[&str]) {
        let mut actions = KeyActions::new("keyboard".into());
        for value in keys.iter().flat_map(|k| k.chars()) {
            actions = actions
                .then(KeyAction::Down { value })
                .then(KeyAction::Up { value });
        }
        self.client
            .perform_actions(actions)
            .await
            .expect("keys pressed");
    }

    /// The visible text of the focused element.
    pub async fn focused_text(&self) -> String {
        self.execute(
            "const e = document.activeElement; return e ? (e.innerText || e.value || '') : ''",
        )
        .await
        .as_str()
        .unwrap_or_default()
        .trim()
        .to_string()
    }

    /// Presses Tab until the focused element's text is `label` (at most 30 times); panics
    /// if the keyboard cannot reach it.
    pub async fn tab_to(&self, label: &str) {
        for _ in 0..30 {
            self.press(&[TAB]).await;
            if self.focused_text().await == label {
                return;
            }
        }
        panic!("{label:?} cannot be reached with the keyboard");
    }

    /// Whether the page is wider than the window (sideways scrolling).
    pub async fn scrolls_sideways(&self) -> bool {
        self.execute(
            "return document.documentElement.scrollWidth > document.documentElement.clientWidth",
        )
        .await
            == json!(true)
    }

    /// Runs axe-core in the page; returns its violations of `serious` or `critical`
    /// impact as `(rule, impact, help, nodes)`.
    pub async fn serious_accessibility_violations(&self) -> Vec<(String, String, String, u64)> {
        let script = format!(
            "{}\nreturn axe.run(document).then(r => r.violations\
             .filter(v => v.impact === 'serious' || v.impact === 'critical')\
             .map(v => [v.id, v.impact, v.help, v.nodes.length]));",
            axe_source()
        );
        let v = self.execute(&script).await;
        v.as_array()
            .unwrap_or_else(|| panic!("axe did not run: {v}"))
            .iter()
            .map(|x| {
                (
                    x[0].as_str().unwrap_or_default().to_string(),
                    x[1].as_str().unwrap_or_default().to_string(),
                    x[2].as_str().unwrap_or_default().to_string(),
                    x[3].as_u64().unwrap_or_default(),
                )
            })
            .collect()
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
        let png = self.client.screenshot().await.expect("a screenshot");
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
