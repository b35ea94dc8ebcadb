//! What the benchmarks measure besides time: the CPU the whole machine and this process
//! spent, a process's memory, and medians over rounds. Included by the bench examples
//! with `#[path]`.
#![allow(dead_code)]

/// CPU seconds spent so far: the whole machine busy (every process: guildgate, the
/// broker, PostgreSQL, the publisher) and this process alone; `None` where `/proc` is
/// not readable.
#[derive(Clone, Copy, Debug)]
pub struct Cpu {
    pub machine_s: f64,
    pub process_s: f64,
}

impl Cpu {
    pub fn now() -> Option<Cpu> {
        Some(Cpu {
            machine_s: machine_busy_s()?,
            process_s: proc_stat("self")?.1,
        })
    }

    /// Milliseconds per 1,000 units of work since `before`: (machine, this process).
    pub fn ms_per_k_since(before: Option<Cpu>, units: u64) -> Option<(f64, f64)> {
        let (b, a) = (before?, Cpu::now()?);
        let per_k = |s: f64| s * 1000.0 / (units as f64 / 1000.0);
        Some((
            per_k(a.machine_s - b.machine_s),
            per_k(a.process_s - b.process_s),
        ))
    }
}

/// (name, utime + stime, cutime + cstime) of a process, in seconds, from
/// `/proc/<pid>/stat`: its own CPU and that of its children that ended.
pub fn proc_stat(pid: &str) -> Option<(String, f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses; utime, stime, cutime and cstime are the 14th
    // to 17th fields of the line, the 12th to 15th after the name.
    let (head, after) = stat.rsplit_once(')')?;
    let name = head.split_once('(')?.1.to_string();
    let f: Vec<f64> = after
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0.0))
        .collect();
    Some((
        name,
        (f.get(11)? + f.get(12)?) / 100.0,
        (f.get(13)? + f.get(14)?) / 100.0,
    ))
}

/// The ids of the machine's processes, as `/proc` lists them.
pub fn pids() -> impl Iterator<Item = String> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
}

/// CPU seconds spent so far by the machine's PostgreSQL processes (every backend and
/// background process, and the backends that ended) and by its RabbitMQ node
/// (`beam.smp`), and by this process: where a phase's CPU goes.
#[derive(Clone, Copy, Debug)]
pub struct Split {
    pub postgres_s: f64,
    pub rabbitmq_s: f64,
    pub process_s: f64,
}

impl Split {
    pub fn now() -> Option<Split> {
        let (mut postgres_s, mut rabbitmq_s) = (0.0, 0.0);
        for pid in pids() {
            match proc_stat(&pid) {
                // The postmaster's children's time holds backends that ended.
                Some((name, own, children)) if name == "postgres" => postgres_s += own + children,
                Some((name, own, _)) if name == "beam.smp" => rabbitmq_s += own,
                _ => {}
            }
        }
        Some(Split {
            postgres_s,
            rabbitmq_s,
            process_s: proc_stat("self")?.1,
        })
    }

    /// Milliseconds per 1,000 units of work since `before`: PostgreSQL, RabbitMQ, this
    /// process.
    pub fn ms_per_k_since(before: Option<Split>, units: u64) -> Option<[f64; 3]> {
        let (b, a) = (before?, Split::now()?);
        let per_k = |s: f64| s * 1000.0 / (units as f64 / 1000.0);
        Some([
            per_k(a.postgres_s - b.postgres_s),
            per_k(a.rabbitmq_s - b.rabbitmq_s),
            per_k(a.process_s - b.process_s),
        ])
    }
}

/// CPU time the whole machine has spent busy so far, in seconds, from `/proc/stat`.
fn machine_busy_s() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let cpu: Vec<f64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap_or(0.0))
        .collect();
    // user nice system idle iowait irq softirq steal …: busy is all but idle, iowait, steal.
    let busy: f64 = cpu.iter().take(7).sum::<f64>() - cpu.get(3)? - cpu.get(4)?;
    Some(busy / 100.0)
}

/// The median (the mean of the middle two for an even count); 0 for none.
pub fn median(xs: &mut [f64]) -> f64 {
    if xs.is_empty() {
        return 0.0;
    }
    xs.sort_by(f64::total_cmp);
    let mid = xs.len() / 2;
    if xs.len() % 2 == 1 {
        xs[mid]
    } else {
        (xs[mid - 1] + xs[mid]) / 2.0
    }
}

/// Resident memory of a process in KiB: (`VmRSS`, `VmHWM`).
pub fn memory_kib(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// An unlabelled counter's or a histogram count's value in Prometheus' text format.
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// PostgreSQL's write-ahead log counters (`pg_stat_wal`, the whole server's, so
/// background work counts), or their difference per unit of work. A backend adds to
/// them when it goes idle, at most once a second: a reading misses up to the last
/// second of each connection still open.
#[derive(Clone, Copy, Debug, Default)]
pub struct Wal {
    pub records: f64,
    pub fpi: f64,
    pub bytes: f64,
}

impl Wal {
    pub async fn read<'c, E: sqlx::PgExecutor<'c>>(db: E) -> Self {
        let (records, fpi, bytes): (f64, f64, f64) = sqlx::query_as(
            "SELECT wal_records::float8, wal_fpi::float8, wal_bytes::float8 FROM pg_stat_wal",
        )
        .fetch_one(db)
        .await
        .unwrap();
        Self {
            records,
            fpi,
            bytes,
        }
    }

    /// The counters after a second of quiet: a backend reports its WAL when it goes
    /// idle, at most once a second (and, within a second of its last report, only ten
    /// seconds later), so what was written before the call is counted by then.
    pub async fn read_after_quiet<'c, E: sqlx::PgExecutor<'c>>(db: E) -> Self {
        tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
        Self::read(db).await
    }

    /// What was written since `before`, per unit.
    pub fn per_unit_since(self, before: Self, units: usize) -> Self {
        let n = units.max(1) as f64;
        Self {
            records: (self.records - before.records) / n,
            fpi: (self.fpi - before.fpi) / n,
            bytes: (self.bytes - before.bytes) / n,
        }
    }
}
