//! Sending a grant's email again, asked for by the merchant (`POST
//! /entitlements/{id}/grants/{grant_id}/resend`) or an operator (`guildgate grants
//! resend`).

use std::time::Duration;

use chrono::Utc;
use sqlx::PgConnection;

use super::Job;
use crate::domain::{Grant, GrantStatus};
use crate::store::email as db;
use crate::store::grants as grant_store;

/// Resends a merchant may ask for one grant in an hour: enough for a customer who lost
/// the email, not a way to flood the email queue every business shares.
pub const MERCHANT_RESENDS_PER_HOUR: i64 = 3;

/// Why a resend was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("this guildgate sends no email (no SMTP server is configured)")]
    EmailOff,
    #[error("the grant is revoked")]
    Revoked,
    #[error("no email address is known for the grant's customer")]
    NoAddress,
    #[error("the grant was resent {MERCHANT_RESENDS_PER_HOUR} times in the last hour")]
    TooMany { retry_after: Duration },
}

impl Refused {
    pub fn code(self) -> &'static str {
        match self {
            Refused::EmailOff => "email_disabled",
            Refused::Revoked => "grant_revoked",
            Refused::NoAddress => "no_email_address",
            Refused::TooMany { .. } => "rate_limited",
        }
    }
}

/// Who asks for a resend: a merchant is held to [`MERCHANT_RESENDS_PER_HOUR`], an
/// operator (`guildgate grants resend`) is not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AskedBy {
    Merchant,
    Operator,
}

/// Queues the next resend of a grant, in the caller's transaction: the join email while
/// it is pending, else the access email. Each call queues one more (the `n`th resend).
pub async fn queue(
    tx: &mut PgConnection,
    grant: &Grant,
    email_on: bool,
    asked_by: AskedBy,
) -> Result<Result<Job, Refused>, sqlx::Error> {
    if !email_on {
        return Ok(Err(Refused::EmailOff));
    }
    // Locked: two resends at once number themselves one after the other.
    let Some(grant) = grant_store::get_for_update(tx, &grant.id).await? else {
        return Ok(Err(Refused::Revoked));
    };
    if grant.status == GrantStatus::Revoked {
        return Ok(Err(Refused::Revoked));
    }
    if db::contact(tx, &grant.business_id, &grant.customer_id)
        .await?
        .is_none()
    {
        return Ok(Err(Refused::NoAddress));
    }
    let now = Utc::now();
    let (had, recent, oldest) =
        db::resends(tx, &grant.id, now - chrono::Duration::hours(1)).await?;
    if asked_by == AskedBy::Merchant && recent >= MERCHANT_RESENDS_PER_HOUR {
        return Ok(Err(Refused::TooMany {
            retry_after: super::until_an_hour_after(oldest, now),
        }));
    }
    let n = had + 1;
    let job = Job::resend(&grant.id, n);
    super::queue(tx, &job, &grant.business_id).await?;
    Ok(Ok(job))
}
