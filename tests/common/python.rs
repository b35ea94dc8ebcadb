//! A pinned Python tool for a test: the program an environment variable names (`.ci/run`
//! sets it), else a virtualenv this module makes once under the cargo target directory
//! with `python3 -m venv` and `pip install -r`, reused while the pins are unchanged.
//! Without either a test fails, saying how to provide it: it never skips.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// Where tests keep what they make: virtualenvs, reports.
pub const TMP: &str = env!("CARGO_TARGET_TMPDIR");

/// A pinned Python tool.
pub struct Tool {
    /// The environment variable that may name the program to use.
    pub env_var: &'static str,
    /// The requirements file, as in the repository (for messages).
    pub requirements_path: &'static str,
    /// Its content: every package, pinned.
    pub requirements: &'static str,
    /// The package whose pinned version the program must report.
    pub package: &'static str,
    /// The program, in the virtualenv's `bin`.
    pub program: &'static str,
    /// Arguments that make the program print the package's version as its last word.
    pub version_args: &'static [&'static str],
}

/// Runs `cmd`, returning its stdout and stderr, or why it failed.
pub fn run(cmd: &mut Command) -> Result<String, String> {
    let shown = format!("{cmd:?}");
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {shown}: {e}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(format!("{shown} failed ({}):\n{text}", out.status))
    }
}

impl Tool {
    /// The pinned version of [`Tool::package`].
    pub fn pinned(&self) -> &'static str {
        let prefix = format!("{}==", self.package);
        self.requirements
            .lines()
            .find_map(|l| l.trim().strip_prefix(prefix.as_str()))
            .unwrap_or_else(|| panic!("{} pins {}", self.requirements_path, self.package))
    }

    /// The version `program` reports.
    fn version_of(&self, program: &Path) -> Result<String, String> {
        let out = run(Command::new(program).args(self.version_args))?;
        out.split_whitespace()
            .last()
            .map(str::to_string)
            .ok_or_else(|| format!("{} said no version", program.display()))
    }

    /// The program to use, with the pinned version of the package.
    pub fn program(&self) -> PathBuf {
        // Tests may ask at once; one of them installs.
        static INSTALL: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _one = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
        let want = self.pinned();
        let (package, var, pins) = (self.package, self.env_var, self.requirements_path);
        let help = format!(
            "Set {var} to a {} with {package} {want} (pip install -r {pins} into a \
             virtualenv; .ci/run does), or make python3 with venv and PyPI reachable so \
             that this test installs it (docs/testing.md).",
            self.program
        );
        if let Some(program) = std::env::var_os(var) {
            let program = PathBuf::from(program);
            match self.version_of(&program) {
                Ok(v) if v == want => return program,
                Ok(v) => panic!(
                    "{var}={} has {package} {v}, not the pinned {want}. {help}",
                    program.display()
                ),
                Err(e) => panic!("{var} is not usable: {e}. {help}"),
            }
        }
        let venv = Path::new(TMP).join(format!("{package}-{want}"));
        let program = venv.join("bin").join(self.program);
        // Written last: a virtualenv without it (an interrupted install) is made again.
        let installed = venv.join("guildgate-requirements.txt");
        if std::fs::read_to_string(&installed).is_ok_and(|r| r == self.requirements)
            && self.version_of(&program).is_ok_and(|v| v == want)
        {
            return program;
        }
        let _ = std::fs::remove_dir_all(&venv);
        let requirements = Path::new(TMP).join(format!("{package}-requirements.txt"));
        let made = std::fs::write(&requirements, self.requirements)
            .map_err(|e| format!("cannot write {}: {e}", requirements.display()))
            .and_then(|_| run(Command::new("python3").args(["-m", "venv"]).arg(&venv)))
            .and_then(|_| {
                run(Command::new(venv.join("bin").join("pip"))
                    .args(["install", "--quiet", "--disable-pip-version-check", "-r"])
                    .arg(&requirements))
            })
            .and_then(|_| self.version_of(&program))
            .and_then(|v| {
                if v == want {
                    Ok(())
                } else {
                    Err(format!("installed {package} {v}, not {want}"))
                }
            })
            .and_then(|_| {
                std::fs::write(&installed, self.requirements)
                    .map_err(|e| format!("cannot write {}: {e}", installed.display()))
            });
        if let Err(e) = made {
            panic!("{package} {want} is needed and could not be installed: {e}\n{help}");
        }
        program
    }
}

/// Runs `cmd` with its stdout and stderr in the file `output`, killing it if it is still
/// running after `deadline` (a request that never ends, say) rather than letting it
/// hold the suite. Returns its exit status (`None`: killed), how long it ran, and what
/// it wrote.
pub async fn run_with_deadline(
    cmd: &mut Command,
    output: &Path,
    deadline: std::time::Duration,
) -> (
    Option<std::process::ExitStatus>,
    std::time::Duration,
    String,
) {
    let file = std::fs::File::create(output).unwrap();
    cmd.stdout(file.try_clone().unwrap()).stderr(file);
    let started = std::time::Instant::now();
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("{:?} starts: {e}", cmd.get_program()));
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if started.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    let took = started.elapsed();
    (
        status,
        took,
        std::fs::read_to_string(output).unwrap_or_default(),
    )
}
