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
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        // Fields after the command name (which ends with ')'): utime and stime are the
        // 14th and 15th of the line, the 12th and 13th after it.
        let after = stat.rsplit_once(')')?.1;
        let f: Vec<&str> = after.split_whitespace().collect();
        let process_s = (f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?) / 100.0;
        Some(Cpu {
            machine_s: machine_busy_s()?,
            process_s,
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
