//! Delivery email: guildgate writes to a customer whose grant needs their Discord
//! account (a "Join the Discord" button and a link to their access page), reminds them
//! on the business's reminder days while the grant stays pending, and sends again when
//! the merchant or an operator asks.
//!
//! Every email starts as an outbox row of the transaction that makes it due (a grant
//! made by ingest, the API, a backfill; a reminder; a resend), relayed to
//! `<prefix>.emails`. [`worker::EmailWorker`] consumes it: it records the email in
//! `emails` (one row per grant and kind, so a redelivered job sends nothing twice),
//! checks it is still wanted, sends it over SMTP ([`transport`]), and retries what the
//! server did not take on the retry tiers of `email.retry_delays`, parking in
//! `<prefix>.emails.dead` what it refused for good or what ran out of retries.

pub mod compose;
pub mod resend;
pub mod texts;
pub mod transport;
pub mod upkeep;
pub mod worker;

use serde::{Deserialize, Serialize};

/// Which email of a grant a job is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The first, when the grant is made.
    Join,
    /// A reminder, some days later.
    Reminder,
    /// Sent again on request.
    Resend,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Join => "join",
            Kind::Reminder => "reminder",
            Kind::Resend => "resend",
        }
    }
}

/// One email job: the email's id (`<grant>:join`, `<grant>:reminder:<days>`,
/// `<grant>:resend:<n>`), its grant, and for a join email the address the payment event
/// named (remembered when the job is handled).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    pub email_id: String,
    pub grant_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
}

impl Job {
    pub fn join(grant_id: &str, to: Option<&str>) -> Self {
        Self {
            email_id: format!("{grant_id}:join"),
            grant_id: grant_id.to_string(),
            to: to.map(str::to_string),
        }
    }

    pub fn reminder(grant_id: &str, days: i32) -> Self {
        Self {
            email_id: format!("{grant_id}:reminder:{days}"),
            grant_id: grant_id.to_string(),
            to: None,
        }
    }

    /// The `n`th resend (from 1).
    pub fn resend(grant_id: &str, n: i64) -> Self {
        Self {
            email_id: format!("{grant_id}:resend:{n}"),
            grant_id: grant_id.to_string(),
            to: None,
        }
    }

    /// The kind its id names.
    pub fn kind(&self) -> Kind {
        let rest = self
            .email_id
            .strip_prefix(self.grant_id.as_str())
            .and_then(|r| r.strip_prefix(':'))
            .unwrap_or("");
        if rest.starts_with("reminder:") {
            Kind::Reminder
        } else if rest.starts_with("resend:") {
            Kind::Resend
        } else {
            Kind::Join
        }
    }

    pub fn payload(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a job serializes")
    }

    /// A job from a message body: its id must be one of its grant's email ids.
    pub fn parse(body: &[u8]) -> Option<Self> {
        let job: Self = serde_json::from_slice(body).ok()?;
        let rest = job
            .email_id
            .strip_prefix(job.grant_id.as_str())?
            .strip_prefix(':')?;
        let number =
            |s: &str| !s.is_empty() && s.len() <= 6 && s.bytes().all(|b| b.is_ascii_digit());
        let valid = rest == "join"
            || rest.strip_prefix("reminder:").is_some_and(number)
            || rest.strip_prefix("resend:").is_some_and(number);
        (valid && job.grant_id.len() <= 64 && job.to.as_ref().is_none_or(|t| t.len() <= 320))
            .then_some(job)
    }
}

/// Writes a new `queued` email and its job (an outbox row, relayed to `<prefix>.emails`)
/// in the caller's transaction; `false`, and nothing written, when the email already
/// exists.
pub async fn queue(
    conn: &mut sqlx::PgConnection,
    job: &Job,
    business_id: &str,
) -> Result<bool, sqlx::Error> {
    let new = crate::store::email::insert(
        &mut *conn,
        &job.email_id,
        &job.grant_id,
        job.kind().as_str(),
        business_id,
    )
    .await?;
    if new {
        crate::outbox::produce::queue_email(conn, &job.email_id, &job.payload()).await?;
    }
    Ok(new)
}

/// Under an hourly limit that is full, how long until its oldest counted email is an
/// hour old, as of `now`; an hour when that is not known.
fn until_an_hour_after(
    oldest: Option<chrono::DateTime<chrono::Utc>>,
    now: chrono::DateTime<chrono::Utc>,
) -> std::time::Duration {
    oldest
        .map(|t| {
            (t + chrono::Duration::hours(1) - now)
                .to_std()
                .unwrap_or_default()
        })
        .unwrap_or(std::time::Duration::from_secs(3600))
}

/// A customer address from a payment event, if it is one an email can go to.
pub fn address(raw: Option<&str>) -> Option<String> {
    let raw = raw?.trim();
    (raw.len() <= 254 && raw.parse::<lettre::Address>().is_ok()).then(|| raw.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_round_trip_and_name_their_kind() {
        for (job, kind) in [
            (Job::join("grant_1", Some("a@b.test")), Kind::Join),
            (Job::reminder("grant_1", 3), Kind::Reminder),
            (Job::resend("grant_1", 2), Kind::Resend),
        ] {
            assert_eq!(job.kind(), kind);
            assert_eq!(Job::parse(&job.payload()), Some(job));
        }
        for bad in [
            r#"{"email_id":"grant_2:join","grant_id":"grant_1"}"#,
            r#"{"email_id":"grant_1:other","grant_id":"grant_1"}"#,
            r#"{"email_id":"grant_1:resend:x","grant_id":"grant_1"}"#,
            r#"{"grant_id":"grant_1"}"#,
            "not json",
        ] {
            assert_eq!(Job::parse(bad.as_bytes()), None, "{bad}");
        }
    }

    #[test]
    fn only_real_addresses_are_kept() {
        assert_eq!(address(Some(" a@b.test ")).as_deref(), Some("a@b.test"));
        assert_eq!(address(Some("no at sign")), None);
        assert_eq!(address(Some("")), None);
        assert_eq!(address(None), None);
        let long = format!("{}@b.test", "a".repeat(250));
        assert_eq!(address(Some(&long)), None);
    }
}
