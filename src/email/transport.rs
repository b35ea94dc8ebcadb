//! The SMTP connection: lettre's async transport from `email.smtp_url`, with the TLS
//! mode the URL names and, with `email.ca_file`, that CA trusted besides the system's.

use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use secrecy::ExposeSecret;

use crate::config::EmailSettings;

/// Why an email was not sent.
#[derive(Debug, thiserror::Error)]
#[error("{detail}")]
pub struct SendError {
    /// The server refused it for good (a 5xx answer: an unknown recipient, a refused
    /// sender): retrying cannot help.
    pub permanent: bool,
    /// What happened, without the URL or credentials.
    pub detail: String,
}

/// The SMTP client of one process (pooled connections).
#[derive(Clone)]
pub struct Mailer {
    transport: AsyncSmtpTransport<Tokio1Executor>,
}

impl std::fmt::Debug for Mailer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The transport's own Debug would print the credentials' user name.
        f.write_str("Mailer")
    }
}

/// How the URL asks for TLS.
fn tls_mode(url: &url::Url) -> Result<&'static str, String> {
    let asked = url
        .query_pairs()
        .find(|(k, _)| k == "tls")
        .map(|(_, v)| v.into_owned());
    match (url.scheme(), asked.as_deref()) {
        ("smtps", None) => Ok("wrapper"),
        ("smtp", None) => Ok("none"),
        ("smtp", Some("required")) => Ok("required"),
        ("smtp", Some("opportunistic")) => Ok("opportunistic"),
        ("smtp" | "smtps", Some(other)) => Err(format!(
            "smtp_url: tls={other:?} is not known (required or opportunistic, with smtp://)"
        )),
        (other, _) => Err(format!(
            "smtp_url: the scheme must be smtp or smtps, not {other:?}"
        )),
    }
}

/// Checks the settings without connecting (at start-up). Errors never quote the URL.
pub fn check(s: &EmailSettings) -> Result<(), String> {
    builder(s).map(|_| ())
}

/// The transport the settings describe, not yet built (building starts its connection
/// pool, which needs a running Tokio runtime).
fn builder(
    s: &EmailSettings,
) -> Result<lettre::transport::smtp::AsyncSmtpTransportBuilder, String> {
    let raw = s.smtp_url.expose_secret().trim();
    let url = url::Url::parse(raw).map_err(|e| format!("smtp_url does not parse: {e}"))?;
    let host = url
        .host_str()
        .ok_or("smtp_url has no host")?
        .trim_matches(['[', ']'])
        .to_string();
    let mode = tls_mode(&url)?;
    s.from
        .parse::<lettre::message::Mailbox>()
        .map_err(|e| format!("from {:?} is not an address: {e}", s.from))?;
    let mut builder = AsyncSmtpTransport::<Tokio1Executor>::from_url(raw)
        .map_err(|e| format!("smtp_url: {e}"))?
        .timeout(Some(s.timeout));
    if mode != "none" {
        let mut params = TlsParameters::builder(host);
        if !s.ca_file.trim().is_empty() {
            let pem = std::fs::read(s.ca_file.trim())
                .map_err(|e| format!("ca_file {:?}: {e}", s.ca_file))?;
            let cert =
                Certificate::from_pem(&pem).map_err(|e| format!("ca_file {:?}: {e}", s.ca_file))?;
            params = params.add_root_certificate(cert);
        }
        let params = params
            .build_rustls()
            .map_err(|e| format!("TLS settings: {e}"))?;
        builder = builder.tls(match mode {
            "wrapper" => Tls::Wrapper(params),
            "required" => Tls::Required(params),
            _ => Tls::Opportunistic(params),
        });
    }
    Ok(builder)
}

impl Mailer {
    /// The mailer of the settings; call within a Tokio runtime.
    pub fn from_settings(s: &EmailSettings) -> Result<Self, String> {
        Ok(Self {
            transport: builder(s)?.build(),
        })
    }

    /// Sends one message.
    pub async fn send(&self, message: Message) -> Result<(), SendError> {
        match self.transport.send(message).await {
            Ok(_) => Ok(()),
            Err(e) => Err(SendError {
                permanent: e.is_permanent(),
                detail: describe(&e),
            }),
        }
    }
}

/// An SMTP error as one line: the server's answer, or what failed on the way.
fn describe(e: &lettre::transport::smtp::Error) -> String {
    let mut out = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out.chars().take(500).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::SecretString;
    use std::time::Duration;

    fn settings(url: &str) -> EmailSettings {
        EmailSettings {
            smtp_url: SecretString::from(url.to_string()),
            from: "Acme <access@acme.test>".into(),
            ca_file: String::new(),
            retry_delays: vec![Duration::from_secs(1)],
            per_recipient_per_hour: 5,
            per_business_per_hour: 1000,
            timeout: Duration::from_secs(5),
            access_link_ttl: Duration::from_secs(60),
        }
    }

    #[test]
    fn urls_choose_the_tls_mode_and_errors_never_show_the_password() {
        for ok in [
            "smtp://127.0.0.1:2525",
            "smtp://u:p@mail.test:587?tls=required",
            "smtp://mail.test?tls=opportunistic",
            "smtps://u:p@mail.test:465",
        ] {
            check(&settings(ok)).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for (bad, says) in [
            ("http://u:hunter2@mail.test", "scheme"),
            ("smtp://u:hunter2@mail.test?tls=maybe", "tls="),
            ("smtps://u:hunter2@", "host"),
        ] {
            let e = check(&settings(bad)).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
            assert!(!e.contains("hunter2"), "{e}");
        }
        let mut s = settings("smtp://mail.test?tls=required");
        s.ca_file = "/nonexistent/ca.pem".into();
        assert!(check(&s).unwrap_err().contains("ca_file"));
        let mut s = settings("smtp://mail.test");
        s.from = "not an address".into();
        assert!(check(&s).unwrap_err().contains("from"));
    }
}
