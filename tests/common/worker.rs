//! `guildgate serve` as a child process, to be killed with SIGKILL and started again.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How to start a worker: a program and its arguments (e.g. the `guildgate` binary and
/// `serve`, or an example that runs the same code with `worker`).
#[derive(Clone, Debug)]
pub struct WorkerCommand {
    pub program: PathBuf,
    pub args: Vec<String>,
}

/// One running worker process.
pub struct Worker {
    pub name: String,
    child: Child,
    pub port: u16,
    pub log: PathBuf,
    /// What started it, to start it again on another port (see [`Worker::wait_ready`]).
    cmd: WorkerCommand,
    env: HashMap<String, String>,
    /// Where the lines of the current start begin in `log`.
    log_from: u64,
}

impl Worker {
    /// Starts `cmd` with exactly `env` (plus `PATH`), its own HTTP port, JSON logs into
    /// `<dir>/<name>.log` (appended to, so restarts keep earlier lines).
    pub fn spawn(
        name: &str,
        cmd: &WorkerCommand,
        env: &HashMap<String, String>,
        dir: &Path,
    ) -> Self {
        Self::spawn_on(free_port(), name, cmd, env, dir)
    }

    /// [`Worker::spawn`] on `port` first.
    pub fn spawn_on(
        port: u16,
        name: &str,
        cmd: &WorkerCommand,
        env: &HashMap<String, String>,
        dir: &Path,
    ) -> Self {
        let log = dir.join(format!("{name}.log"));
        let (child, log_from) = start(cmd, env, &log, port);
        Self {
            name: name.to_string(),
            child,
            port,
            log,
            cmd: cmd.clone(),
            env: env.clone(),
            log_from,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub async fn metrics(&self) -> String {
        match reqwest::get(self.url("/metrics")).await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        }
    }

    /// Waits until `/readyz` answers 200; panics with the log's tail after `limit`.
    ///
    /// The port was free when [`free_port`] picked it, but another process may take it
    /// before this one binds it (and may even answer `/readyz` there). So only an answer
    /// after this start logged that it serves on the port counts, and a start that could
    /// not bind its port is started again on another one.
    pub async fn wait_ready(&mut self, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            if self.serving()
                && matches!(reqwest::get(self.url("/readyz")).await, Ok(r) if r.status() == 200)
            {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                if self.this_start().contains("cannot bind") {
                    self.port = free_port();
                    (self.child, self.log_from) = start(&self.cmd, &self.env, &self.log, self.port);
                    continue;
                }
                panic!(
                    "worker {} exited ({status}) before it was ready:\n{}",
                    self.name,
                    self.log_tail(40)
                );
            }
            assert!(
                Instant::now() < deadline,
                "worker {} not ready after {limit:?}:\n{}",
                self.name,
                self.log_tail(40)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The log of the current start.
    fn this_start(&self) -> String {
        use std::io::{Read, Seek, SeekFrom};
        let mut lines = Vec::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f
                .seek(SeekFrom::Start(self.log_from))
                .and_then(|_| f.read_to_end(&mut lines));
        }
        String::from_utf8_lossy(&lines).into_owned()
    }

    /// Whether the current start logged that it serves on `port` (so it holds the port).
    fn serving(&self) -> bool {
        let addr = format!("\"127.0.0.1:{}\"", self.port);
        self.this_start()
            .lines()
            .any(|l| l.contains("guildgate serving") && l.contains(&addr))
    }

    /// SIGKILL: no graceful shutdown, unacked deliveries go back to their queues.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The last `n` lines of its log.
    pub fn log_tail(&self, n: usize) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts `cmd` on `port`, its stderr appended to `log`; returns the child and where
/// its lines begin in `log`.
fn start(
    cmd: &WorkerCommand,
    env: &HashMap<String, String>,
    log: &Path,
    port: u16,
) -> (Child, u64) {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let from = file.metadata().unwrap().len();
    let child = Command::new(&cmd.program)
        .args(&cmd.args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env)
        .env("GUILDGATE_HTTP__ADDR", format!("127.0.0.1:{port}"))
        .env(
            "GUILDGATE_HTTP__PUBLIC_URL",
            format!("http://127.0.0.1:{port}"),
        )
        .env("GUILDGATE_LOG__FORMAT", "json")
        // `GUILDGATE_TEST_WORKER_LOG` replaces the filter, e.g. to read a scenario's
        // syncer at debug level.
        .env(
            "RUST_LOG",
            std::env::var("GUILDGATE_TEST_WORKER_LOG")
                .unwrap_or_else(|_| "info,sqlx=warn,lapin=warn,amq_protocol=warn".into()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(file)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", cmd.program.display()));
    (child, from)
}

/// A port that was free a moment ago (see [`Worker::wait_ready`]), picked below the
/// kernel's range of ephemeral ports: a port from that range can be taken, between
/// this check and the server binding it, as the source port of any connection the
/// suite opens meanwhile (a RabbitMQ node once failed to start so).
pub fn free_port() -> u16 {
    use rand::Rng;
    let first_ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    if first_ephemeral > 11_000 {
        let mut rng = rand::rng();
        for _ in 0..1000 {
            let port = rng.random_range(10_000..first_ephemeral);
            if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return port;
            }
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The sum of the samples of `name` whose labels contain every one of `labels`.
pub fn sample(metrics: &str, name: &str, labels: &[&str]) -> f64 {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.strip_prefix(name))
        .filter(|rest| rest.starts_with('{') || rest.starts_with(' '))
        .filter(|rest| labels.iter().all(|l| rest.contains(l)))
        .map(|rest| rest.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum::<f64>()
        + 0.0 // an empty sum is -0.0
}
