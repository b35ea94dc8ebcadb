//! A RabbitMQ cluster of its own for a test: several `rabbitmq-server` nodes from
//! Debian's package on this machine, each with its own node name, AMQP and distribution
//! ports and data folder, sharing one Erlang cookie, joined with
//! `rabbitmqctl join_cluster`. The machine's broker (5672, `rabbit@localhost`) is never
//! touched: only the port mapper (epmd) is shared, and it only maps names to ports.
//!
//! A node is killed with SIGKILL and started again on its data folder, where it rejoins
//! the cluster by itself. Every node is killed and its folder removed on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::worker::free_port;

/// Where Debian's package puts the server and its command-line tool.
const SERVER: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";
const CTL: &str = "/usr/lib/rabbitmq/bin/rabbitmqctl";

/// A node's startup on two busy cores takes seconds; this is the most it may take.
const START_LIMIT: Duration = Duration::from_secs(120);

pub struct RabbitCluster {
    dir: PathBuf,
    nodes: Vec<Node>,
}

struct Node {
    name: String,
    amqp_port: u16,
    dist_port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl Node {
    /// The OS process id of the node's Erlang VM, from the pid file it writes.
    fn pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.dir.join("pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }
}

impl RabbitCluster {
    /// Starts `n` nodes and joins them into one cluster. Panics with what to install
    /// when the RabbitMQ server is missing: a cluster test is never skipped.
    pub async fn start(n: usize) -> Self {
        assert!(
            Path::new(SERVER).exists() && Path::new(CTL).exists(),
            "the RabbitMQ cluster tests need Debian's rabbitmq-server package \
             ({SERVER} and {CTL}): apt-get install rabbitmq-server (.ci/run installs it)"
        );
        let tag = super::tag().to_lowercase();
        let dir = std::env::temp_dir().join(format!("guildgate-rabbit-{tag}"));
        std::fs::create_dir_all(&dir).unwrap();
        let cookie = dir.join(".erlang.cookie");
        std::fs::write(&cookie, format!("guildgate-test-{tag}")).unwrap();
        set_mode(&cookie, 0o400);
        let nodes = (0..n)
            .map(|i| {
                let node_dir = dir.join(format!("n{i}"));
                std::fs::create_dir_all(&node_dir).unwrap();
                Node {
                    name: format!("gg{tag}n{i}@localhost"),
                    amqp_port: free_port(),
                    dist_port: free_port(),
                    dir: node_dir,
                    child: None,
                }
            })
            .collect();
        let mut cluster = Self { dir, nodes };
        for i in 0..n {
            cluster.spawn(i);
        }
        for i in 0..n {
            cluster.await_startup(i).await;
        }
        let first = cluster.nodes[0].name.clone();
        for i in 1..n {
            cluster.ctl(i, &["stop_app"]).await;
            cluster.ctl(i, &["join_cluster", &first]).await;
            cluster.ctl(i, &["start_app"]).await;
        }
        cluster.await_running(n).await;
        cluster
    }

    /// The AMQP URL of node `i`.
    pub fn url(&self, i: usize) -> String {
        format!(
            "amqp://guest:guest@127.0.0.1:{}/%2f",
            self.nodes[i].amqp_port
        )
    }

    /// Every node's AMQP URL, in order.
    pub fn urls(&self) -> Vec<String> {
        (0..self.nodes.len()).map(|i| self.url(i)).collect()
    }

    /// The node whose AMQP port is `port`.
    pub fn node_of_port(&self, port: u16) -> Option<usize> {
        self.nodes.iter().position(|n| n.amqp_port == port)
    }

    /// Kills node `i` with SIGKILL (no shutdown of any kind).
    pub fn kill(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        if let Some(pid) = node.pid() {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
        if let Some(mut child) = node.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_file(node.dir.join("pid"));
    }

    /// Starts node `i` again on its data folder and waits until the cluster runs all
    /// of its nodes again.
    pub async fn restart(&mut self, i: usize) {
        self.spawn(i);
        self.await_startup(i).await;
        self.await_running(self.nodes.len()).await;
    }

    /// The node leading quorum queue `queue`, as a running node `via` sees it.
    pub async fn leader_of(&self, via: usize, queue: &str) -> Option<usize> {
        let out = self
            .ctl(
                via,
                &["list_queues", "name", "leader", "--no-table-headers"],
            )
            .await;
        let leader = out.lines().find_map(|l| {
            let mut cells = l.split_whitespace();
            (cells.next() == Some(queue)).then(|| cells.next().map(str::to_owned))?
        })?;
        self.nodes.iter().position(|n| n.name == leader)
    }

    /// The nodes that a client whose connection is named `name` is connected to.
    pub async fn nodes_with_connection(&self, name: &str) -> Vec<usize> {
        let mut out = Vec::new();
        for (i, node) in self.nodes.iter().enumerate() {
            if node.child.is_none() {
                continue;
            }
            let listed = self
                .ctl(
                    i,
                    &[
                        "list_connections",
                        "port",
                        "client_properties",
                        "--no-table-headers",
                    ],
                )
                .await;
            for line in listed.lines().filter(|l| l.contains(name)) {
                let port = line.split_whitespace().next().and_then(|p| p.parse().ok());
                if let Some(k) = port.and_then(|p| self.node_of_port(p))
                    && !out.contains(&k)
                {
                    out.push(k);
                }
            }
        }
        out
    }

    fn spawn(&mut self, i: usize) {
        let home = self.dir.clone();
        let node = &mut self.nodes[i];
        let conf = node.dir.join("rabbitmq.conf");
        std::fs::write(
            &conf,
            format!(
                "listeners.tcp.1 = 127.0.0.1:{}\nloopback_users = none\n",
                node.amqp_port
            ),
        )
        .unwrap();
        std::fs::write(node.dir.join("enabled_plugins"), "[].\n").unwrap();
        std::fs::write(node.dir.join("env.conf"), "").unwrap();
        let log = std::fs::File::create(node.dir.join("console.log")).unwrap();
        let child = Command::new(SERVER)
            .env("HOME", &home)
            .env("RABBITMQ_CONF_ENV_FILE", node.dir.join("env.conf"))
            .env("RABBITMQ_CONFIG_FILE", &conf)
            .env("RABBITMQ_NODENAME", &node.name)
            .env("RABBITMQ_NODE_PORT", node.amqp_port.to_string())
            .env("RABBITMQ_DIST_PORT", node.dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", node.dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", node.dir.join("log"))
            .env("RABBITMQ_PID_FILE", node.dir.join("pid"))
            .env(
                "RABBITMQ_ENABLED_PLUGINS_FILE",
                node.dir.join("enabled_plugins"),
            )
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            // One scheduler each and no busy waiting: three nodes share two cores
            // with everything else a test runs.
            .env(
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS",
                "+S 1:1 +sbwt none +sbwtdcpu none +sbwtdio none",
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {SERVER}: {e}"));
        node.child = Some(child);
    }

    async fn await_startup(&self, i: usize) {
        let began = Instant::now();
        loop {
            if self
                .try_ctl(i, &["await_startup", "--timeout", "30"])
                .await
                .is_ok()
            {
                return;
            }
            assert!(
                began.elapsed() < START_LIMIT,
                "RabbitMQ node {} did not start within {START_LIMIT:?}; its console:\n{}",
                self.nodes[i].name,
                self.console_tail(i)
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Waits until the cluster reports `n` running nodes.
    async fn await_running(&self, n: usize) {
        let began = Instant::now();
        loop {
            if let Ok(status) = self
                .try_ctl(0, &["cluster_status", "--formatter", "json"])
                .await
            {
                let running = serde_json::from_str::<serde_json::Value>(&status)
                    .ok()
                    .and_then(|v| v["running_nodes"].as_array().map(Vec::len))
                    .unwrap_or(0);
                if running == n {
                    return;
                }
            }
            assert!(
                began.elapsed() < START_LIMIT,
                "the RabbitMQ cluster did not reach {n} running nodes within {START_LIMIT:?}"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Runs `rabbitmqctl` against node `i`; panics with its output when it fails.
    pub async fn ctl(&self, i: usize, args: &[&str]) -> String {
        self.try_ctl(i, args).await.unwrap_or_else(|e| {
            panic!("rabbitmqctl {args:?} on {} failed: {e}", self.nodes[i].name)
        })
    }

    async fn try_ctl(&self, i: usize, args: &[&str]) -> Result<String, String> {
        let home = self.dir.clone();
        let node = self.nodes[i].name.clone();
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        tokio::task::spawn_blocking(move || {
            let out = Command::new(CTL)
                .env("HOME", home)
                .env("ERL_EPMD_ADDRESS", "127.0.0.1")
                .arg("-n")
                .arg(&node)
                .arg("--quiet")
                .args(&args)
                .stdin(Stdio::null())
                .output()
                .map_err(|e| format!("cannot run {CTL}: {e}"))?;
            if out.status.success() {
                Ok(String::from_utf8_lossy(&out.stdout).into_owned())
            } else {
                Err(format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ))
            }
        })
        .await
        .unwrap()
    }

    fn console_tail(&self, i: usize) -> String {
        let log =
            std::fs::read_to_string(self.nodes[i].dir.join("console.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for RabbitCluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}
