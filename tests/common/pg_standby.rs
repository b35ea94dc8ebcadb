//! A PostgreSQL primary with a streaming standby of its own for a test, made with
//! `initdb` and `pg_basebackup` from the machine's PostgreSQL binaries on spare ports
//! and in a folder of the test's. The machine's server on 5432 is never touched: its
//! replication settings stay as they are.
//!
//! Replication is synchronous (`synchronous_standby_names = '*'`, `synchronous_commit =
//! on`): a commit returns once the standby has flushed it, so whatever guildgate
//! committed (and then acknowledged to the broker) survives the primary's death. The
//! standby streams through an in-process TCP proxy, so a test can cut the link first
//! (then commits wait, and nothing acknowledged can be missing on the standby). The
//! primary is killed with SIGKILL (every process of it at once, like a machine that
//! dies) and the standby promoted with `pg_promote()`.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sqlx::{Connection, PgConnection};

use super::proxy::Proxy;
use super::worker::free_port;

/// How long a server may take to accept connections, or the standby to catch up.
const READY_LIMIT: Duration = Duration::from_secs(60);

pub struct PgStandbyPair {
    dir: PathBuf,
    bin: PathBuf,
    pub primary_port: u16,
    pub standby_port: u16,
    primary: Option<Child>,
    standby: Option<Child>,
    /// The standby's replication connection to the primary goes through it.
    link: Option<Proxy>,
}

impl PgStandbyPair {
    /// Creates and starts the primary, clones it into a standby that streams from it,
    /// and makes replication synchronous. Panics with what to install when the
    /// PostgreSQL server binaries are missing: the test is never skipped.
    pub async fn start() -> Self {
        let bin = server_bin();
        let dir = std::env::temp_dir().join(format!("guildgate-pg-{}", super::tag()));
        std::fs::create_dir_all(&dir).unwrap();
        as_postgres_owner(&dir);
        let mut pair = Self {
            bin,
            primary_port: free_port(),
            standby_port: free_port(),
            primary: None,
            standby: None,
            link: None,
            dir,
        };
        let primary = pair.dir.join("primary");
        pair.run(
            "initdb",
            &[
                "-D".as_ref(),
                primary.as_os_str(),
                "-A".as_ref(),
                "trust".as_ref(),
                "-U".as_ref(),
                "postgres".as_ref(),
                "--no-sync".as_ref(),
                "--no-instructions".as_ref(),
            ],
        );
        pair.primary = Some(pair.spawn(&primary, pair.primary_port, "primary"));
        await_ready(&pair.url_of(pair.primary_port, "postgres")).await;

        let standby = pair.dir.join("standby");
        let link = Proxy::start(([127, 0, 0, 1], pair.primary_port).into()).await;
        // Cloned through the link, so the standby's primary_conninfo names it.
        let port = link.addr.port().to_string();
        pair.link = Some(link);
        pair.run(
            "pg_basebackup",
            &[
                "-h".as_ref(),
                "127.0.0.1".as_ref(),
                "-p".as_ref(),
                port.as_ref(),
                "-U".as_ref(),
                "postgres".as_ref(),
                "-D".as_ref(),
                standby.as_os_str(),
                // standby.signal and primary_conninfo: a standby that streams.
                "-R".as_ref(),
                "-X".as_ref(),
                "stream".as_ref(),
                "-c".as_ref(),
                "fast".as_ref(),
            ],
        );
        pair.standby = Some(pair.spawn(&standby, pair.standby_port, "standby"));
        await_ready(&pair.url_of(pair.standby_port, "postgres")).await;

        // Synchronous from now on; set on the primary only, after the clone, so the
        // standby (which has no standby of its own) never waits once promoted.
        let mut admin = PgConnection::connect(&pair.url_of(pair.primary_port, "postgres"))
            .await
            .unwrap();
        for sql in [
            "ALTER SYSTEM SET synchronous_standby_names = '*'",
            "ALTER SYSTEM SET synchronous_commit = 'on'",
            "SELECT pg_reload_conf()",
        ] {
            sqlx::query(sql).execute(&mut admin).await.unwrap();
        }
        let began = Instant::now();
        loop {
            let state: Option<String> =
                sqlx::query_scalar("SELECT sync_state FROM pg_stat_replication LIMIT 1")
                    .fetch_optional(&mut admin)
                    .await
                    .unwrap();
            if state.as_deref() == Some("sync") {
                break;
            }
            assert!(
                began.elapsed() < READY_LIMIT,
                "the standby did not become synchronous ({state:?}); its log:\n{}",
                pair.log_tail("standby")
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        pair
    }

    /// A connection URL of database `db` on the server listening on `port`.
    pub fn url_of(&self, port: u16, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{port}/{db}")
    }

    /// The server URL (no database) of the primary.
    pub fn primary_base(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}", self.primary_port)
    }

    /// Cuts the standby's replication connection and keeps it cut: from now on the
    /// primary's commits wait for a standby that does not answer.
    pub fn cut_replication(&self) {
        self.link.as_ref().expect("started").cut();
    }

    /// Kills every process of the primary at once with SIGKILL.
    pub fn kill_primary(&mut self) {
        if let Some(child) = self.primary.take() {
            kill_group(child);
        }
    }

    /// Promotes the standby and waits until it accepts writes.
    pub async fn promote_standby(&self) {
        let mut conn = PgConnection::connect(&self.url_of(self.standby_port, "postgres"))
            .await
            .unwrap();
        let promoted: bool = sqlx::query_scalar("SELECT pg_promote(true, 60)")
            .fetch_one(&mut conn)
            .await
            .unwrap();
        assert!(promoted, "the standby was not promoted within 60 s");
    }

    fn spawn(&self, data: &Path, port: u16, name: &str) -> Child {
        let log = std::fs::File::create(self.dir.join(format!("{name}.log"))).unwrap();
        let mut cmd = self.command("postgres");
        cmd.arg("-D")
            .arg(data)
            .arg("-p")
            .arg(port.to_string())
            .arg("-c")
            .arg("listen_addresses=127.0.0.1")
            .arg("-c")
            .arg(format!("unix_socket_directories={}", self.dir.display()))
            .args(["-c", "shared_buffers=32MB", "-c", "max_connections=60"])
            .args(["-c", "wal_level=replica", "-c", "max_wal_senders=4"])
            // Its own process group: killing the group kills every backend at once.
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        cmd.spawn()
            .unwrap_or_else(|e| panic!("cannot start postgres: {e}"))
    }

    /// Runs one of the server's tools to its end; panics with its output if it fails.
    fn run(&self, tool: &str, args: &[&std::ffi::OsStr]) {
        let out = self
            .command(tool)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {tool}: {e}"));
        assert!(
            out.status.success(),
            "{tool} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `tool` from the server's binaries, as the `postgres` user when this runs as
    /// root (the server refuses to run as root).
    fn command(&self, tool: &str) -> Command {
        let path = self.bin.join(tool);
        if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        }
    }

    fn log_tail(&self, name: &str) -> String {
        let log = std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for PgStandbyPair {
    fn drop(&mut self) {
        for child in [self.primary.take(), self.standby.take()]
            .into_iter()
            .flatten()
        {
            kill_group(child);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The folder of the newest installed PostgreSQL server's binaries.
fn server_bin() -> PathBuf {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, bin)| bin).unwrap_or_else(|| {
        panic!(
            "the PostgreSQL standby test needs the server binaries (initdb, postgres, \
             pg_basebackup) under /usr/lib/postgresql/<version>/bin: apt-get install \
             postgresql (.ci/run installs it)"
        )
    })
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// Gives `dir` to the `postgres` user when this runs as root, so the servers (which
/// run as that user) can write their data folders in it.
fn as_postgres_owner(dir: &Path) {
    if !is_root() {
        return;
    }
    let status = Command::new("chown")
        .arg("postgres:postgres")
        .arg(dir)
        .status()
        .unwrap();
    assert!(status.success(), "chown postgres {}", dir.display());
}

fn kill_group(mut child: Child) {
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{}", child.id())])
        .status();
    let _ = child.kill();
    let _ = child.wait();
}

async fn await_ready(url: &str) {
    let began = Instant::now();
    loop {
        if let Ok(mut c) = PgConnection::connect(url).await
            && sqlx::query("SELECT 1").execute(&mut c).await.is_ok()
        {
            return;
        }
        assert!(
            began.elapsed() < READY_LIMIT,
            "PostgreSQL at {url} did not accept connections within {READY_LIMIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
