//! A real SMTP server on loopback for the email tests: `tests/smtp/sink.py` (aiosmtpd,
//! Debian's `python3-aiosmtpd`; `.ci/run` installs it) with STARTTLS required, a
//! certificate of a private CA made here with `openssl`, and AUTH required. What it
//! receives is read back with a MIME parser (`mail-parser`), as a mail client would.
//! Without Python's aiosmtpd or `openssl` the tests fail, saying so: they never skip.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use mail_parser::{Message, MessageParser, MimeHeaders};
use serde_json::Value;

pub const USER: &str = "gg-mailer";
pub const PASSWORD: &str = "s3cret-pass";

/// The Python with aiosmtpd: `GUILDGATE_SMTP_PYTHON`, else Debian's `/usr/bin/python3`.
fn python() -> String {
    std::env::var("GUILDGATE_SMTP_PYTHON").unwrap_or_else(|_| "/usr/bin/python3".into())
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl runs (apt-get install -y openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A private CA and a certificate for 127.0.0.1 it signed: (CA PEM, cert, key).
fn certificates(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=guildgate test CA",
    ]);
    openssl(dir, &ca);
    let mut csr = vec!["req"];
    csr.extend(ec);
    csr.extend([
        "-keyout",
        "key.pem",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    openssl(dir, &csr);
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "cert.pem",
            "-days",
            "2",
            "-extfile",
            "server.ext",
        ],
    );
    (
        dir.join("ca.pem"),
        dir.join("cert.pem"),
        dir.join("key.pem"),
    )
}

/// The running server; killed and its folder removed on drop.
pub struct SmtpServer {
    child: Child,
    pub port: u16,
    dir: PathBuf,
    pub ca: PathBuf,
}

/// One message the server accepted.
pub struct Received {
    pub raw: Vec<u8>,
    pub envelope: Value,
}

impl Received {
    pub fn parsed(&self) -> Message<'_> {
        MessageParser::default()
            .parse(&self.raw)
            .expect("a MIME message")
    }

    /// The recipients of the SMTP envelope.
    pub fn rcpt(&self) -> Vec<String> {
        self.envelope["rcpt_tos"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect()
    }

    pub fn subject(&self) -> String {
        self.parsed().subject().unwrap_or_default().to_string()
    }

    pub fn text(&self) -> String {
        self.parsed()
            .body_text(0)
            .expect("a text part")
            .into_owned()
    }

    pub fn html(&self) -> String {
        self.parsed()
            .body_html(0)
            .expect("an HTML part")
            .into_owned()
    }

    /// The first address of a header (`From`, `To`, `Reply-To`).
    pub fn address(&self, header: &str) -> Option<String> {
        let m = self.parsed();
        let a = match header {
            "From" => m.from(),
            "To" => m.to(),
            "Reply-To" => m.reply_to(),
            other => panic!("no accessor for {other}"),
        }?;
        a.first()?.address().map(str::to_string)
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.parsed().header_raw(name).map(|v| v.trim().to_string())
    }

    /// The content types of the leaf parts, in order.
    pub fn part_types(&self) -> Vec<String> {
        let m = self.parsed();
        m.parts
            .iter()
            .filter(|p| !matches!(p.body, mail_parser::PartType::Multipart(_)))
            .filter_map(|p| p.content_type())
            .map(|c| format!("{}/{}", c.ctype(), c.subtype().unwrap_or("")))
            .collect()
    }
}

impl SmtpServer {
    pub async fn start() -> Self {
        let dir = std::env::temp_dir().join(format!("gg-smtp-{}", crate::common::tag()));
        let mail = dir.join("mail");
        std::fs::create_dir_all(&mail).unwrap();
        let (ca, cert, key) = certificates(&dir);
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/smtp/sink.py");
        let mut child = Command::new(python())
            .arg(script)
            .arg(port.to_string())
            .arg(&mail)
            .arg(&cert)
            .arg(&key)
            .args([USER, PASSWORD])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {} {script}: {e}", python()));
        let stdout = child.stdout.take().unwrap();
        let ready = tokio::task::spawn_blocking(move || {
            use std::io::BufRead;
            let mut line = String::new();
            std::io::BufReader::new(stdout).read_line(&mut line).ok();
            line
        });
        let line = tokio::time::timeout(Duration::from_secs(30), ready)
            .await
            .expect("the SMTP server starts within 30 s")
            .unwrap();
        assert_eq!(
            line.trim(),
            "ready",
            "the SMTP server did not start (is python3-aiosmtpd installed for {}?)",
            python()
        );
        Self {
            child,
            port,
            dir,
            ca,
        }
    }

    /// `smtp://USER:PASSWORD@127.0.0.1:PORT?tls=required`.
    pub fn url(&self) -> String {
        format!(
            "smtp://{USER}:{PASSWORD}@127.0.0.1:{}?tls=required",
            self.port
        )
    }

    /// Every message received so far, in order.
    pub fn received(&self) -> Vec<Received> {
        let mail = self.dir.join("mail");
        let mut out = Vec::new();
        for n in 1.. {
            let eml = mail.join(format!("{n}.eml"));
            let Ok(raw) = std::fs::read(&eml) else { break };
            let envelope =
                serde_json::from_slice(&std::fs::read(mail.join(format!("{n}.json"))).unwrap())
                    .unwrap();
            out.push(Received { raw, envelope });
        }
        out
    }

    /// The messages to `to`, once there are `n` of them.
    pub async fn wait_for(&self, to: &str, n: usize) -> Vec<Received> {
        crate::common::wait_for(&format!("{n} email(s) to {to}"), || async {
            let got: Vec<Received> = self
                .received()
                .into_iter()
                .filter(|r| r.rcpt().iter().any(|a| a == to))
                .collect();
            (got.len() >= n).then_some(got)
        })
        .await
    }
}

impl Drop for SmtpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
