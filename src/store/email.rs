//! SQL of delivery email: customers' addresses, businesses' settings, and the state of
//! every email (migration 0029).

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

/// A business's settings (defaults when it never saved any).
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct BusinessSettings {
    pub default_locale: String,
    pub support_email: Option<String>,
    pub reminder_days: Vec<i32>,
    pub updated_at: Option<DateTime<Utc>>,
}

impl Default for BusinessSettings {
    fn default() -> Self {
        Self {
            default_locale: "en".into(),
            support_email: None,
            reminder_days: Vec::new(),
            updated_at: None,
        }
    }
}

pub async fn settings(
    conn: &mut PgConnection,
    business_id: &str,
) -> Result<BusinessSettings, sqlx::Error> {
    Ok(sqlx::query_as(
        "SELECT default_locale, support_email, reminder_days, updated_at
         FROM business_settings WHERE business_id = $1",
    )
    .bind(business_id)
    .fetch_optional(conn)
    .await?
    .unwrap_or_default())
}

/// Locks the business's settings until the transaction ends (their row may not exist
/// yet), so concurrent changes apply one after the other.
pub async fn lock_settings(conn: &mut PgConnection, business_id: &str) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('business-settings:' || $1, 0))")
        .bind(business_id)
        .execute(conn)
        .await
        .map(|_| ())
}

pub async fn save_settings(
    conn: &mut PgConnection,
    business_id: &str,
    s: &BusinessSettings,
    now: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO business_settings (business_id, default_locale, support_email, reminder_days, updated_at)
         VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (business_id) DO UPDATE SET default_locale = EXCLUDED.default_locale,
             support_email = EXCLUDED.support_email, reminder_days = EXCLUDED.reminder_days,
             updated_at = EXCLUDED.updated_at",
    )
    .bind(business_id)
    .bind(&s.default_locale)
    .bind(&s.support_email)
    .bind(&s.reminder_days)
    .bind(now)
    .execute(conn)
    .await?;
    Ok(())
}

/// Remembers (or updates) a customer's address.
pub async fn save_contact(
    conn: &mut PgConnection,
    business_id: &str,
    customer_id: &str,
    email: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO customer_contacts (business_id, customer_id, email) VALUES ($1, $2, $3)
         ON CONFLICT (business_id, customer_id) DO UPDATE SET email = EXCLUDED.email, updated_at = now()
         WHERE customer_contacts.email <> EXCLUDED.email",
    )
    .bind(business_id)
    .bind(customer_id)
    .bind(email)
    .execute(conn)
    .await?;
    Ok(())
}

/// A customer's address, if guildgate holds one.
pub async fn contact(
    conn: &mut PgConnection,
    business_id: &str,
    customer_id: &str,
) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT email FROM customer_contacts WHERE business_id = $1 AND customer_id = $2",
    )
    .bind(business_id)
    .bind(customer_id)
    .fetch_optional(conn)
    .await
}

/// Deletes the addresses of customers without a live grant with the business, and
/// returns how many.
pub async fn prune_contacts(conn: &mut PgConnection) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query(
        "DELETE FROM customer_contacts c WHERE NOT EXISTS (
             SELECT 1 FROM grants g WHERE g.business_id = c.business_id
               AND g.customer_id = c.customer_id AND g.status <> 'Revoked')",
    )
    .execute(conn)
    .await?
    .rows_affected())
}

/// Deletes the rows of emails settled more than 90 days ago (they keep no address; the
/// hourly count and the once-per-kind rule look back much less far), and returns how
/// many.
pub async fn prune_settled(conn: &mut PgConnection) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query(
        "DELETE FROM emails WHERE status <> 'queued' AND updated_at < now() - interval '90 days'",
    )
    .execute(conn)
    .await?
    .rows_affected())
}

/// An email's row.
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct EmailRow {
    pub status: String,
    pub attempts: i32,
    /// Waiting in PostgreSQL for its hour to have room ([`park`]): the email upkeep
    /// queues it again, so a job that finds it parked is one delivered again.
    pub parked: bool,
    pub created_at: DateTime<Utc>,
}

/// Records a new `queued` email of `kind` for a grant; `false` when the email already
/// exists.
pub async fn insert(
    conn: &mut PgConnection,
    email_id: &str,
    grant_id: &str,
    kind: &str,
    business_id: &str,
) -> Result<bool, sqlx::Error> {
    Ok(sqlx::query(
        "INSERT INTO emails (id, business_id, grant_id, kind) VALUES ($1, $2, $3, $4)
         ON CONFLICT (id) DO NOTHING",
    )
    .bind(email_id)
    .bind(business_id)
    .bind(grant_id)
    .bind(kind)
    .execute(conn)
    .await?
    .rows_affected()
        == 1)
}

/// The email's row, made `queued` if it is new.
pub async fn claim(
    conn: &mut PgConnection,
    email_id: &str,
    grant_id: &str,
    kind: &str,
    business_id: &str,
) -> Result<EmailRow, sqlx::Error> {
    insert(&mut *conn, email_id, grant_id, kind, business_id).await?;
    sqlx::query_as(
        "SELECT status, attempts, parked_until IS NOT NULL AS parked, created_at
         FROM emails WHERE id = $1",
    )
    .bind(email_id)
    .fetch_one(conn)
    .await
}

/// A grant's resends: how many it had, how many of them were queued since `since`, and
/// when the oldest of those was.
pub async fn resends(
    conn: &mut PgConnection,
    grant_id: &str,
    since: DateTime<Utc>,
) -> Result<(i64, i64, Option<DateTime<Utc>>), sqlx::Error> {
    sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE created_at > $2),
                min(created_at) FILTER (WHERE created_at > $2)
         FROM emails WHERE grant_id = $1 AND kind = 'resend'",
    )
    .bind(grant_id)
    .bind(since)
    .fetch_one(conn)
    .await
}

/// What an email is about, read when it is sent.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct Context {
    pub entitlement_name: String,
    /// The name in the business's language, where the merchant translated it.
    pub translated_name: Option<String>,
    pub guild_id: String,
    pub guild_name: Option<String>,
    pub send_email: Option<bool>,
    pub default_locale: Option<String>,
    pub support_email: Option<String>,
    pub email: Option<String>,
}

/// The context of an email about a grant of `entitlement_id` for `customer_id`.
pub async fn context(
    conn: &mut PgConnection,
    entitlement_id: &str,
    customer_id: &str,
) -> Result<Option<Context>, sqlx::Error> {
    sqlx::query_as(
        "SELECT e.name AS entitlement_name, t.name AS translated_name, e.guild_id,
                dg.name AS guild_name, e.send_email, s.default_locale, s.support_email, c.email
         FROM entitlements e
         LEFT JOIN discord_guilds dg ON dg.business_id = e.business_id AND dg.guild_id = e.guild_id
         LEFT JOIN business_settings s ON s.business_id = e.business_id
         LEFT JOIN customer_contacts c ON c.business_id = e.business_id AND c.customer_id = $2
         LEFT JOIN LATERAL (
             SELECT name FROM entitlement_translations
             WHERE entitlement_id = e.id
               AND locale = split_part(lower(COALESCE(s.default_locale, 'en')), '-', 1)
         ) t ON true
         WHERE e.id = $1",
    )
    .bind(entitlement_id)
    .bind(customer_id)
    .fetch_optional(conn)
    .await
}

/// Emails a business sent to a recipient in the hour before `now`, and when the oldest
/// of them was.
pub async fn sent_in_last_hour(
    conn: &mut PgConnection,
    business_id: &str,
    recipient_key: &[u8],
    now: DateTime<Utc>,
) -> Result<(i64, Option<DateTime<Utc>>), sqlx::Error> {
    sqlx::query_as(
        "SELECT count(*), min(sent_at) FROM emails
         WHERE recipient_key = $1 AND sent_at > $2 - interval '1 hour' AND business_id = $3",
    )
    .bind(recipient_key)
    .bind(now)
    .bind(business_id)
    .fetch_one(conn)
    .await
}

/// When `business`'s `n`-th latest email of the last hour before `now` was sent: `None`
/// while it sent fewer than `n` in that hour. Reads at most `n` entries of
/// `emails_business_sent`.
pub async fn nth_latest_sent(
    conn: &mut PgConnection,
    business_id: &str,
    n: u32,
    now: DateTime<Utc>,
) -> Result<Option<DateTime<Utc>>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT sent_at FROM emails
         WHERE business_id = $1 AND sent_at > $2 - interval '1 hour'
         ORDER BY sent_at DESC OFFSET $3 - 1 LIMIT 1",
    )
    .bind(business_id)
    .bind(now)
    .bind(i64::from(n.max(1)))
    .fetch_optional(conn)
    .await
}

/// Parks a queued email until `until`: it waits in PostgreSQL, not in the queue, and
/// [`release_parked`] queues it again once its hour has room.
pub async fn park(
    conn: &mut PgConnection,
    id: &str,
    until: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE emails SET parked_until = $2, updated_at = now() WHERE id = $1 AND status = 'queued'",
    )
    .bind(id)
    .bind(until)
    .execute(conn)
    .await?;
    Ok(())
}

/// A parked email released to be queued again.
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct Released {
    pub id: String,
    pub grant_id: String,
}

/// Unparks, oldest first, the parked emails due by `now` that their business's hour
/// has room for, at most `per_business` of each business and `limit` in all, and
/// returns them for the caller to queue in the same transaction. The room is
/// `per_hour` less what the business sent in the hour before `now` and less its emails
/// on their way (queued, not parked, touched within the hour: one stuck longer stops
/// counting). One transaction at a time releases (the others release nothing): two
/// processes at once would each count the same room.
pub async fn release_parked(
    conn: &mut PgConnection,
    per_hour: u32,
    now: DateTime<Utc>,
    per_business: i64,
    limit: i64,
) -> Result<Vec<Released>, sqlx::Error> {
    let ours: bool = sqlx::query_scalar(
        "SELECT pg_try_advisory_xact_lock(hashtextextended('email-release', 0))",
    )
    .fetch_one(&mut *conn)
    .await?;
    if !ours {
        return Ok(Vec::new());
    }
    // The businesses with parked emails, one index probe each (however deep their
    // backlogs), then each one's room and its oldest due emails.
    sqlx::query_as(
        "WITH RECURSIVE waiting (business_id) AS (
             (SELECT business_id FROM emails
              WHERE status = 'queued' AND parked_until IS NOT NULL
              ORDER BY business_id LIMIT 1)
             UNION ALL
             SELECT (SELECT e.business_id FROM emails e
                     WHERE e.status = 'queued' AND e.parked_until IS NOT NULL
                       AND e.business_id > w.business_id
                     ORDER BY e.business_id LIMIT 1)
             FROM waiting w WHERE w.business_id IS NOT NULL
         ), room AS (
             SELECT w.business_id,
                    least($4, $1 - (SELECT count(*) FROM emails s
                                    WHERE s.business_id = w.business_id
                                      AND s.sent_at > $2 - interval '1 hour')
                              - (SELECT count(*) FROM emails q
                                 WHERE q.business_id = w.business_id AND q.status = 'queued'
                                   AND q.parked_until IS NULL
                                   AND q.updated_at > $2 - interval '1 hour')) AS room
             FROM waiting w WHERE w.business_id IS NOT NULL
         ), picked AS (
             SELECT p.id FROM room r CROSS JOIN LATERAL (
                 SELECT e.id FROM emails e
                 WHERE e.business_id = r.business_id AND e.status = 'queued'
                   AND e.parked_until IS NOT NULL AND e.parked_until <= $2
                 ORDER BY e.created_at, e.id
                 LIMIT greatest(r.room, 0)
                 FOR UPDATE SKIP LOCKED
             ) p
             LIMIT $3
         )
         UPDATE emails SET parked_until = NULL, updated_at = $2
         FROM picked WHERE emails.id = picked.id
         RETURNING emails.id, emails.grant_id",
    )
    .bind(i64::from(per_hour))
    .bind(now)
    .bind(limit)
    .bind(per_business)
    .fetch_all(conn)
    .await
}

/// Whether `business` has a parked email older than the one `id` created at `created_at`
/// that is due by `now`: that one goes first, so this one waits behind it.
pub async fn parked_ahead(
    conn: &mut PgConnection,
    business_id: &str,
    created_at: DateTime<Utc>,
    id: &str,
    now: DateTime<Utc>,
) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT EXISTS (
             SELECT 1 FROM emails
             WHERE business_id = $1 AND status = 'queued' AND parked_until IS NOT NULL
               AND (created_at, id) < ($2, $3) AND parked_until <= $4)",
    )
    .bind(business_id)
    .bind(created_at)
    .bind(id)
    .bind(now)
    .fetch_one(conn)
    .await
}

/// Settles an email: `sent`, `skipped` or `failed`, with the attempts it took and why.
pub async fn settle(
    conn: &mut PgConnection,
    id: &str,
    status: &str,
    attempts: i32,
    recipient_key: Option<&[u8]>,
    detail: Option<&str>,
    now: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE emails SET status = $2, attempts = $3, recipient_key = COALESCE($4, recipient_key),
             detail = $5, sent_at = CASE WHEN $2 = 'sent' THEN $6 END, updated_at = $6,
             parked_until = NULL
         WHERE id = $1",
    )
    .bind(id)
    .bind(status)
    .bind(attempts)
    .bind(recipient_key)
    .bind(detail)
    .bind(now)
    .execute(conn)
    .await?;
    Ok(())
}

/// Records a failed attempt of an email that will be retried.
pub async fn attempt_failed(
    conn: &mut PgConnection,
    id: &str,
    attempts: i32,
    detail: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE emails SET attempts = $2, detail = $3, updated_at = now() WHERE id = $1")
        .bind(id)
        .bind(attempts)
        .bind(detail)
        .execute(conn)
        .await?;
    Ok(())
}

/// A reminder that is due.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct DueReminder {
    pub grant_id: String,
    pub business_id: String,
    pub days: i32,
}

/// Pending grants that reached one of their business's reminder days (within a week
/// of it: a reminder that could not be sent then is not sent weeks late), whose
/// customer was sent the join email, and that have not had that reminder.
pub async fn due_reminders(
    conn: &mut PgConnection,
    now: DateTime<Utc>,
    limit: i64,
) -> Result<Vec<DueReminder>, sqlx::Error> {
    sqlx::query_as(
        "SELECT g.id AS grant_id, g.business_id, d.days
         FROM business_settings s
         CROSS JOIN LATERAL unnest(s.reminder_days) AS d(days)
         JOIN grants g ON g.business_id = s.business_id AND g.status = 'Pending'
              AND g.created_at <= $1 - make_interval(days => d.days)
              AND g.created_at > $1 - make_interval(days => d.days + 7)
         WHERE EXISTS (SELECT 1 FROM emails e WHERE e.id = g.id || ':join' AND e.status = 'sent')
           AND NOT EXISTS (SELECT 1 FROM emails e WHERE e.id = g.id || ':reminder:' || d.days)
         ORDER BY g.created_at
         LIMIT $2",
    )
    .bind(now)
    .bind(limit)
    .fetch_all(conn)
    .await
}
