//! The email worker: consumes `<prefix>.emails`, one job at a time per process (one
//! SMTP server serves them all; its pooled connections are reused).
//!
//! Per job: remember the address a join job carries, record the email (`emails`, one
//! row per id: a job delivered again finds it settled and sends nothing), decide whether
//! it is still wanted ([`decide`]), keep to `email.per_recipient_per_hour` and
//! `email.per_business_per_hour` (an email over either is parked in its row, without
//! counting an attempt, until [`super::upkeep`] queues it again), send it, and record the
//! result before acking. A crash between sending and recording sends it again on
//! redelivery, with the same `Message-ID`. A database outage holds the job.

use std::time::Duration;

use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use lettre::message::Mailbox;
use secrecy::{ExposeSecret, SecretString};
use sha2::Sha256;
use sqlx::PgPool;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

use super::compose::{self, Draft, Letter};
use super::transport::Mailer;
use super::{Job, Kind};
use crate::amqp::{Broker, Names};
use crate::domain::GrantStatus;
use crate::domain::retry;
use crate::grants::link::LinkBuilder;
use crate::grants::link::renew_link;
use crate::i18n::Lang;
use crate::metrics::Metrics;
use crate::queue::{self, Outcome};
use crate::store::email::{self as db, Context};
use crate::store::grants as grant_store;
use crate::store::history;

/// What to do with an email.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Send(Letter),
    /// Not wanted (any more); the reason is recorded.
    Skip(&'static str),
    /// Settled before (a job delivered again).
    Duplicate,
}

/// Whether an email goes out. `status` is its row's; `send_email` the entitlement's
/// switch. A join email or reminder is only for a grant still waiting for the customer's
/// account, and only when the merchant left emails on; a resend (asked for by hand) goes
/// to any live grant: the join email while it is pending, else the access email.
pub fn decide(
    kind: Kind,
    status: &str,
    grant: GrantStatus,
    send_email: Option<bool>,
    has_address: bool,
) -> Decision {
    if status != "queued" {
        return Decision::Duplicate;
    }
    if grant == GrantStatus::Revoked {
        return Decision::Skip("grant_revoked");
    }
    if !has_address {
        return Decision::Skip("no_address");
    }
    match kind {
        Kind::Resend if grant == GrantStatus::Pending => Decision::Send(Letter::Join),
        Kind::Resend => Decision::Send(Letter::Access),
        _ if send_email == Some(false) => Decision::Skip("turned_off"),
        _ if grant != GrantStatus::Pending => Decision::Skip("already_connected"),
        Kind::Join => Decision::Send(Letter::Join),
        Kind::Reminder => Decision::Send(Letter::Reminder),
    }
}

/// The email workers of one process.
#[derive(Clone)]
pub struct EmailWorker {
    pub pool: PgPool,
    pub broker: Broker,
    pub mailer: Mailer,
    pub from: Mailbox,
    pub links: LinkBuilder,
    pub retry_delays: Vec<Duration>,
    pub per_recipient_per_hour: u32,
    pub per_business_per_hour: u32,
    /// Keys the recipient hash kept in `emails` (the state signing key).
    pub recipient_secret: SecretString,
    pub metrics: Arc<Metrics>,
}

impl EmailWorker {
    /// A keyed hash of an address (case-folded), so `emails` can count what one
    /// recipient was sent without keeping the address.
    fn recipient_key(&self, address: &str) -> Vec<u8> {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(self.recipient_secret.expose_secret().as_bytes())
                .expect("HMAC takes any key length");
        mac.update(b"email-recipient:");
        mac.update(address.to_lowercase().as_bytes());
        mac.finalize().into_bytes().to_vec()
    }

    fn count(&self, kind: Kind, outcome: &str) {
        self.metrics
            .emails
            .get_or_create(&vec![
                ("kind", kind.as_str().to_string()),
                ("outcome", outcome.to_string()),
            ])
            .inc();
    }

    /// Handles one job; `attempt` is how many attempts earlier rounds made.
    pub async fn handle(&self, job: &Job, attempt: u32) -> Result<Outcome, sqlx::Error> {
        let now = Utc::now();
        let kind = job.kind();
        let mut conn = self.pool.acquire().await?;
        let Some(grant) = grant_store::get(&mut conn, &job.grant_id).await? else {
            return Ok(Outcome::DeadLetter {
                code: "unknown_grant",
                reason: format!("no grant {}", job.grant_id),
            });
        };
        if let Some(to) = job.to.as_deref().and_then(|t| super::address(Some(t))) {
            db::save_contact(&mut conn, &grant.business_id, &grant.customer_id, &to).await?;
        }
        let row = db::claim(
            &mut conn,
            &job.email_id,
            &job.grant_id,
            job.kind().as_str(),
            &grant.business_id,
        )
        .await?;
        // A job queued again from its parked row carries no attempts: the row
        // remembers the ones made before it was parked.
        let attempt = attempt.max(u32::try_from(row.attempts).unwrap_or(0));
        if row.parked {
            // Delivered again after it was parked: the upkeep queues it when it is due.
            self.count(kind, "duplicate");
            return Ok(Outcome::Ack("parked already"));
        }
        let Some(ctx) = db::context(&mut conn, &grant.entitlement_id, &grant.customer_id).await?
        else {
            return self
                .skip(&mut conn, job, row.attempts, "no_entitlement", now)
                .await;
        };
        let to: Option<Mailbox> = ctx.email.as_deref().and_then(|e| e.parse().ok());
        let letter = match decide(
            kind,
            &row.status,
            grant.status,
            ctx.send_email,
            to.is_some(),
        ) {
            Decision::Duplicate => {
                self.count(kind, "duplicate");
                return Ok(Outcome::Ack("duplicate"));
            }
            Decision::Skip(why) => {
                return self.skip(&mut conn, job, row.attempts, why, now).await;
            }
            Decision::Send(letter) => letter,
        };
        let to = to.expect("decide sends only with an address");
        let key = self.recipient_key(to.email.as_ref());
        let full = match self
            .recipient_full(&mut conn, &grant.business_id, &key, now)
            .await?
        {
            Some(wait) => Some((wait, "the recipient's hourly limit is reached")),
            None => match self
                .business_full(&mut conn, &grant.business_id, now)
                .await?
            {
                Some(wait) => Some((wait, "the business's hourly limit is reached")),
                // Room in the hour, but older emails of the business wait for it: they
                // go first, and this one is due behind them.
                None => db::parked_ahead(
                    &mut conn,
                    &grant.business_id,
                    row.created_at,
                    &job.email_id,
                    now,
                )
                .await?
                .then_some((Duration::ZERO, "older emails of the business wait first")),
            },
        };
        if let Some((wait, reason)) = full {
            // Waits in PostgreSQL, not round the queue every business shares: the
            // upkeep queues it again once its business's hour has room.
            let until =
                now + chrono::Duration::from_std(wait).unwrap_or(chrono::Duration::hours(1));
            db::park(&mut conn, &job.email_id, until).await?;
            tracing::debug!(email = %job.email_id, %until, reason, "email parked");
            self.count(kind, "deferred");
            return Ok(Outcome::Ack("parked"));
        }
        let grant = renew_link(&mut conn, &self.links, &grant, now).await?;
        let message = self.compose(&grant, &ctx, letter, to, &job.email_id, now);
        let this_attempt = attempt + 1;
        let result = match message {
            Ok(m) => self.mailer.send(m).await,
            Err(e) => Err(super::transport::SendError {
                permanent: true,
                detail: format!("cannot build the message: {e}"),
            }),
        };
        let attempts = i32::try_from(this_attempt).unwrap_or(i32::MAX);
        match result {
            Ok(()) => {
                self.sent(&mut conn, job, &grant.id, letter, &key, attempts)
                    .await
            }
            Err(e) => self.not_sent(&mut conn, job, e, &key, this_attempt).await,
        }
    }

    /// Settles a job that sends nothing, saying `why`.
    async fn skip(
        &self,
        conn: &mut sqlx::PgConnection,
        job: &Job,
        attempts: i32,
        why: &str,
        now: DateTime<Utc>,
    ) -> Result<Outcome, sqlx::Error> {
        db::settle(
            conn,
            &job.email_id,
            "skipped",
            attempts,
            None,
            Some(why),
            now,
        )
        .await?;
        self.count(job.kind(), "skipped");
        Ok(Outcome::Ack("skipped"))
    }

    /// How long until the recipient (by `key`) may be sent another email of `business`,
    /// when it sent them `email.per_recipient_per_hour` in the last hour. Counted per
    /// business: one business's emails never hold back another's.
    async fn recipient_full(
        &self,
        conn: &mut sqlx::PgConnection,
        business: &str,
        key: &[u8],
        now: DateTime<Utc>,
    ) -> Result<Option<Duration>, sqlx::Error> {
        let (sent, oldest) = db::sent_in_last_hour(conn, business, key, now).await?;
        if sent < i64::from(self.per_recipient_per_hour) {
            return Ok(None);
        }
        Ok(Some(super::until_an_hour_after(oldest, now)))
    }

    /// How long until `business` may send another email, when it sent
    /// `email.per_business_per_hour` in the last hour (to anyone): one business cannot
    /// take the email worker and the mail server every business shares, whatever
    /// addresses it gives its comp grants.
    async fn business_full(
        &self,
        conn: &mut sqlx::PgConnection,
        business: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<Duration>, sqlx::Error> {
        let nth = db::nth_latest_sent(conn, business, self.per_business_per_hour, now).await?;
        Ok(nth.map(|at| super::until_an_hour_after(Some(at), now)))
    }

    /// The email went out: recorded as sent, with the grant's history.
    async fn sent(
        &self,
        conn: &mut sqlx::PgConnection,
        job: &Job,
        grant_id: &str,
        letter: Letter,
        key: &[u8],
        attempts: i32,
    ) -> Result<Outcome, sqlx::Error> {
        let kind = job.kind();
        // On the connection already held: no second one from the pool.
        let mut tx = sqlx::Connection::begin(&mut *conn).await?;
        db::settle(
            &mut tx,
            &job.email_id,
            "sent",
            attempts,
            Some(key),
            None,
            Utc::now(),
        )
        .await?;
        history::record(
            &mut tx,
            grant_id,
            Utc::now(),
            "email_sent",
            serde_json::json!({"email": kind.as_str(), "letter": letter.as_str()}),
        )
        .await?;
        tx.commit().await?;
        self.count(kind, "sent");
        Ok(Outcome::Ack("sent"))
    }

    /// The email did not go out: tried again later, or failed for good (refused, or no
    /// retry left).
    async fn not_sent(
        &self,
        conn: &mut sqlx::PgConnection,
        job: &Job,
        e: super::transport::SendError,
        key: &[u8],
        this_attempt: u32,
    ) -> Result<Outcome, sqlx::Error> {
        let kind = job.kind();
        let attempts = i32::try_from(this_attempt).unwrap_or(i32::MAX);
        let next = if e.permanent {
            None
        } else {
            retry::next(this_attempt - 1, Duration::ZERO, &self.retry_delays).map(|r| r.delay)
        };
        if let Some(delay) = next {
            db::attempt_failed(conn, &job.email_id, attempts, &e.detail).await?;
            self.count(kind, "retried");
            return Ok(Outcome::Retry {
                delay,
                attempt: this_attempt,
                reason: e.detail.clone(),
            });
        }
        db::settle(
            conn,
            &job.email_id,
            "failed",
            attempts,
            Some(key),
            Some(&e.detail),
            Utc::now(),
        )
        .await?;
        self.count(kind, "failed");
        Ok(Outcome::DeadLetter {
            // Refused for good (5xx), or no retry left.
            code: if e.permanent {
                "rejected"
            } else {
                "retries_exhausted"
            },
            reason: e.detail,
        })
    }

    fn compose(
        &self,
        grant: &crate::domain::Grant,
        ctx: &Context,
        letter: Letter,
        to: Mailbox,
        email_id: &str,
        now: DateTime<Utc>,
    ) -> Result<lettre::Message, lettre::error::Error> {
        let lang = ctx
            .default_locale
            .as_deref()
            .and_then(Lang::parse)
            .unwrap_or_default();
        let join_url = self.links.url(
            &grant.business_id,
            &grant.id,
            &grant.oauth_nonce,
            grant.oauth_expires_at,
        );
        let access_url = self.links.access_url(
            &grant.business_id,
            &grant.customer_id,
            now + self.links.access_ttl,
        );
        let product = ctx
            .translated_name
            .as_deref()
            .unwrap_or(&ctx.entitlement_name);
        let server = ctx.guild_name.as_deref().unwrap_or("Discord");
        let domain = self.from.email.domain().to_string();
        compose::message(&Draft {
            letter,
            lang,
            product,
            server,
            join_url: Some(join_url.as_str()),
            access_url: &access_url,
            from: self.from.clone(),
            to,
            reply_to: ctx.support_email.as_deref().and_then(|s| s.parse().ok()),
            message_id: format!("<{}@{domain}>", email_id.replace(':', ".")),
        })
    }

    /// Consumes `<prefix>.emails` until `shutdown`; the job in hand finishes and
    /// settles first.
    pub async fn run(self, shutdown: CancellationToken) {
        let broker = self.broker.clone();
        queue::run(&self, &broker, shutdown).await;
    }
}

impl queue::Handler for EmailWorker {
    fn queue(&self, names: &Names) -> String {
        names.emails()
    }
}

impl queue::Batched for EmailWorker {
    fn shape(&self) -> queue::Shape {
        queue::Shape {
            prefetch: 4,
            batch: 1,
            linger: Duration::ZERO,
        }
    }

    async fn handle(
        &self,
        jobs: &[queue::Job],
        _shutdown: &CancellationToken,
    ) -> Result<Vec<Outcome>, sqlx::Error> {
        let mut outcomes = Vec::with_capacity(jobs.len());
        for j in jobs {
            outcomes.push(match Job::parse(&j.body) {
                // The header's count, bounded: `handle` counts one more.
                Some(job) => self.handle(&job, j.attempt.min(1000)).await?,
                None => Outcome::DeadLetter {
                    code: "bad_job",
                    reason: "not an email job".into(),
                },
            });
        }
        Ok(outcomes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use GrantStatus::*;

    #[test]
    fn an_email_goes_out_only_while_it_is_wanted() {
        let d = decide;
        assert_eq!(
            d(Kind::Join, "queued", Pending, None, true),
            Decision::Send(Letter::Join)
        );
        assert_eq!(
            d(Kind::Reminder, "queued", Pending, Some(true), true),
            Decision::Send(Letter::Reminder)
        );
        // Settled before: a redelivered job.
        for status in ["sent", "skipped", "failed"] {
            assert_eq!(
                d(Kind::Join, status, Pending, None, true),
                Decision::Duplicate
            );
        }
        // The customer connected meanwhile, or the grant ended.
        assert_eq!(
            d(Kind::Reminder, "queued", Delivered, None, true),
            Decision::Skip("already_connected")
        );
        assert_eq!(
            d(Kind::Join, "queued", Revoked, None, true),
            Decision::Skip("grant_revoked")
        );
        // The merchant sends their own.
        assert_eq!(
            d(Kind::Join, "queued", Pending, Some(false), true),
            Decision::Skip("turned_off")
        );
        assert_eq!(
            d(Kind::Join, "queued", Pending, None, false),
            Decision::Skip("no_address")
        );
        // A resend is asked for by hand: it goes out even with emails turned off.
        assert_eq!(
            d(Kind::Resend, "queued", Pending, Some(false), true),
            Decision::Send(Letter::Join)
        );
        assert_eq!(
            d(Kind::Resend, "queued", Delivered, None, true),
            Decision::Send(Letter::Access)
        );
        assert_eq!(
            d(Kind::Resend, "queued", Failed, None, true),
            Decision::Send(Letter::Access)
        );
        assert_eq!(
            d(Kind::Resend, "queued", Revoked, None, true),
            Decision::Skip("grant_revoked")
        );
    }
}
