//! SQL of webhook messages and their attempts. A message is one grant event for one
//! endpoint; its id is the stable `webhook-id`. Delivery jobs are outbox rows of kind
//! `webhook`, written in the same statement that creates or re-arms a message, so a
//! message is never pending without a job on its way — or, while its endpoint hangs or
//! its circuit is open, without a time at which [`release_due`] gives it one (held).

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use sqlx::PgConnection;

use super::Page;

/// The `webhook-id` of (grant, event type, endpoint): `msg_` + the first 128 bits of
/// SHA-256 of `grant:type:endpoint`, in hex. The fan-out computes the same in SQL.
pub fn message_id(grant_id: &str, event_type: &str, endpoint_id: &str) -> String {
    let digest = Sha256::digest(format!("{grant_id}:{event_type}:{endpoint_id}"));
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("msg_{hex}")
}

/// A stored message.
#[derive(Clone, Debug, PartialEq, sqlx::FromRow)]
pub struct Message {
    pub id: String,
    pub endpoint_id: String,
    pub business_id: String,
    pub grant_id: String,
    pub event_type: String,
    pub body: String,
    pub status: String,
    pub attempts: i32,
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    pub delivered_at: Option<DateTime<Utc>>,
}

/// One recorded attempt.
#[derive(Clone, Debug, PartialEq, sqlx::FromRow)]
pub struct Attempt {
    pub id: i64,
    pub message_id: String,
    pub attempted_at: DateTime<Utc>,
    pub status_code: Option<i32>,
    pub latency_ms: i32,
    pub error: Option<String>,
    pub response: Option<String>,
}

/// What a delivery worker needs, read in one query. `Debug` leaves the secrets out.
#[derive(Clone, sqlx::FromRow)]
pub struct DeliveryTarget {
    pub id: String,
    pub status: String,
    pub body: String,
    pub endpoint_id: String,
    /// The endpoint's business.
    pub business_id: String,
    pub url: String,
    pub disabled: bool,
    pub secret: String,
    /// The secrets rotated away from that still sign (each for 24 h after its
    /// rotation), newest first.
    pub previous_secrets: Vec<String>,
    /// The endpoint's custom headers, sent with every attempt (may hold credentials).
    pub headers: sqlx::types::Json<super::endpoints::Strings>,
    /// The endpoint's deliveries per second at most; `None`: no limit.
    pub rate_limit: Option<i32>,
}

impl std::fmt::Debug for DeliveryTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeliveryTarget")
            .field("id", &self.id)
            .field("status", &self.status)
            .field("endpoint_id", &self.endpoint_id)
            .field("business_id", &self.business_id)
            .field("url", &self.url)
            .field("disabled", &self.disabled)
            .finish_non_exhaustive()
    }
}

/// One grant event to fan out with [`fan_out`].
#[derive(Clone, Copy, Debug)]
pub struct FanoutEvent<'a> {
    pub business_id: &'a str,
    pub grant_id: &'a str,
    pub event_type: &'a str,
    pub body: &'a str,
}

/// Creates, for each event, one message per enabled endpoint of its business whose
/// filter accepts the type, with a delivery job for each new one, in one statement for
/// the whole batch (one commit instead of one per event). A message for an endpoint in
/// `held` (it hangs or its circuit is open) is created held until the time given, with
/// no job: it would only be held by the worker that took it. Messages that already exist (a
/// redelivered grant event) are left alone and get no new job. Returns how many messages
/// each event created, in order; an event repeated within the batch counts for its first
/// occurrence only.
pub async fn fan_out(
    conn: &mut PgConnection,
    events: &[FanoutEvent<'_>],
    held: &[(String, DateTime<Utc>)],
) -> Result<Vec<u64>, sqlx::Error> {
    let (held_endpoints, held_until): (Vec<&str>, Vec<DateTime<Utc>>) =
        held.iter().map(|(e, t)| (e.as_str(), *t)).unzip();
    // Repeats would create nothing and only make the counts ambiguous.
    let mut seen = std::collections::HashSet::new();
    let unique: Vec<(usize, &FanoutEvent<'_>)> = events
        .iter()
        .enumerate()
        .filter(|(_, e)| seen.insert((e.business_id, e.grant_id, e.event_type)))
        .collect();
    let (mut business, mut grant, mut kind, mut body) = (
        Vec::with_capacity(unique.len()),
        Vec::with_capacity(unique.len()),
        Vec::with_capacity(unique.len()),
        Vec::with_capacity(unique.len()),
    );
    for (_, e) in &unique {
        business.push(e.business_id);
        grant.push(e.grant_id);
        kind.push(e.event_type);
        body.push(e.body);
    }
    // Rows are inserted in message-id order, so two fan-outs of overlapping batches (a
    // redelivery) wait on each other's keys in the same order instead of deadlocking.
    let created: Vec<(i64, i64)> = sqlx::query_as(
        "WITH ev AS (
            SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[])
                WITH ORDINALITY AS ev(business_id, grant_id, event_type, body, n)
         ), held AS (
            SELECT * FROM UNNEST($5::text[], $6::timestamptz[]) AS h(endpoint_id, until)
         ), ins AS (
            INSERT INTO webhook_messages (id, endpoint_id, business_id, grant_id, event_type, body,
                                          next_attempt_at, held_until, hold_count)
            SELECT 'msg_' || substr(encode(sha256(convert_to(ev.grant_id || ':' || ev.event_type || ':' || e.id, 'UTF8')), 'hex'), 1, 32) AS id,
                   e.id, ev.business_id, ev.grant_id, ev.event_type, ev.body,
                   coalesce(h.until, now()), h.until, CASE WHEN h.until IS NULL THEN 0 ELSE 1 END
            FROM ev JOIN webhook_endpoints e ON e.business_id = ev.business_id
                 LEFT JOIN held h ON h.endpoint_id = e.id
            WHERE NOT e.disabled AND (e.filter_types IS NULL OR ev.event_type = ANY (e.filter_types))
            ORDER BY 1
            ON CONFLICT DO NOTHING
            RETURNING id, endpoint_id, business_id, grant_id, event_type, held_until
         ), jobs AS (
            INSERT INTO outbox (kind, message_id, payload)
            SELECT 'webhook', id,
                   convert_to(jsonb_build_object('webhook_message_id', id, 'endpoint_id', endpoint_id)::text, 'UTF8')
            FROM ins WHERE held_until IS NULL
         )
         SELECT ev.n, count(ins.id)
         FROM ev JOIN ins USING (business_id, grant_id, event_type)
         GROUP BY ev.n",
    )
    .bind(&business)
    .bind(&grant)
    .bind(&kind)
    .bind(&body)
    .bind(&held_endpoints)
    .bind(&held_until)
    .fetch_all(conn)
    .await?;
    let mut counts = vec![0u64; events.len()];
    for (n, count) in created {
        // `n` counts from 1 over `unique`.
        if let Some((i, _)) = usize::try_from(n - 1).ok().and_then(|k| unique.get(k)) {
            counts[*i] = count.max(0) as u64;
        }
    }
    Ok(counts)
}

/// The messages and their endpoints, for delivery attempts, in one query (the
/// delivery workers' group read, `webhooks::reader`). Ids not found are left out.
pub async fn targets(
    conn: &mut PgConnection,
    message_ids: &[String],
) -> Result<Vec<DeliveryTarget>, sqlx::Error> {
    sqlx::query_as(
        "SELECT m.id, m.status, m.body, e.id AS endpoint_id, e.business_id, e.url, e.disabled, e.secret,
                e.headers, e.rate_limit,
                ARRAY(SELECT o.secret FROM webhook_endpoint_old_secrets o
                      WHERE o.endpoint_id = e.id AND o.expires_at > now() AND o.secret <> e.secret
                      ORDER BY o.expires_at DESC, o.secret LIMIT $2) AS previous_secrets
         FROM webhook_messages m JOIN webhook_endpoints e ON e.id = m.endpoint_id
         WHERE m.id = ANY ($1)",
    )
    .bind(message_ids)
    // Also bounded here: rows an earlier release kept, or two rotations at once.
    .bind(i64::from(super::endpoints::MAX_OLD_SECRETS))
    .fetch_all(conn)
    .await
}

/// What an attempt did, to record.
#[derive(Clone, Debug, Default)]
pub struct AttemptRecord {
    pub at: DateTime<Utc>,
    pub status_code: Option<i32>,
    pub latency_ms: i32,
    pub error: Option<String>,
    pub response: Option<String>,
}

/// The message's state after an attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NewStatus {
    Delivered,
    Pending { next_attempt_at: DateTime<Utc> },
    Failed,
}

/// One attempt to record with [`record_attempts`].
#[derive(Clone, Debug)]
pub struct Recorded {
    pub message_id: String,
    pub attempt: AttemptRecord,
    pub status: NewStatus,
    pub disable: Option<String>,
    /// A message with no job in the broker (it was pulled from parking) that will be
    /// attempted again: held until its next attempt, when [`release_due`] gives it a
    /// job carrying this attempt's number, written with the attempt itself so the
    /// message is never pending without either.
    pub hold_retry: Option<(DateTime<Utc>, u32)>,
}

/// Records many attempts in one statement (the delivery workers' group commit): one
/// commit for a batch instead of one per delivery. Each record inserts an attempt and
/// sets its message's new state; `disable` also disables the endpoint (410 Gone) with
/// that reason. A failed duplicate attempt never turns a delivered message back.
pub async fn record_attempts(
    conn: &mut PgConnection,
    batch: &[Recorded],
) -> Result<(), sqlx::Error> {
    let mut ids = Vec::with_capacity(batch.len());
    let (mut at, mut code, mut latency, mut error, mut response) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut status, mut next, mut disable) = (Vec::new(), Vec::new(), Vec::new());
    let (mut hold, mut hold_attempt) = (Vec::new(), Vec::new());
    for r in batch {
        hold.push(r.hold_retry.map(|(until, _)| until));
        hold_attempt.push(
            r.hold_retry
                .map(|(_, a)| i32::try_from(a).unwrap_or(i32::MAX)),
        );
        let (s, n) = match r.status {
            NewStatus::Delivered => ("delivered", None),
            NewStatus::Pending { next_attempt_at } => ("pending", Some(next_attempt_at)),
            NewStatus::Failed => ("failed", None),
        };
        ids.push(r.message_id.clone());
        at.push(r.attempt.at);
        code.push(r.attempt.status_code);
        latency.push(r.attempt.latency_ms);
        error.push(r.attempt.error.clone());
        response.push(r.attempt.response.clone());
        status.push(s);
        next.push(n);
        disable.push(r.disable.clone());
    }
    sqlx::query(
        "WITH v AS (
            SELECT * FROM UNNEST($1::text[], $2::timestamptz[], $3::int[], $4::int[], $5::text[],
                                 $6::text[], $7::text[], $8::timestamptz[], $9::text[],
                                 $10::timestamptz[], $11::int[])
                AS v(message_id, at, status_code, latency_ms, error, response, status, next_at, disable,
                     hold, hold_attempt)
         ), a AS (
            -- Only for messages that still exist (an endpoint deleted meanwhile takes its
            -- messages along), so one vanished message cannot fail the batch.
            INSERT INTO webhook_attempts (message_id, attempted_at, status_code, latency_ms, error, response)
            SELECT v.message_id, v.at, v.status_code, v.latency_ms, v.error, v.response
            FROM v JOIN webhook_messages m ON m.id = v.message_id
         ), d AS (
            UPDATE webhook_endpoints e SET disabled = true, disabled_reason = v.disable, updated_at = now()
            FROM v JOIN webhook_messages m ON m.id = v.message_id
            WHERE v.disable IS NOT NULL AND e.id = m.endpoint_id
         ), unparked AS (
            -- An attempt supersedes a parking (a duplicate job ran meanwhile) and ends a
            -- message's time taken from parking.
            DELETE FROM webhook_parked k USING v WHERE k.message_id = v.message_id
         )
         UPDATE webhook_messages m SET
            status = CASE WHEN m.status = 'delivered' AND v.status <> 'delivered' THEN m.status ELSE v.status END,
            attempts = m.attempts + 1,
            next_attempt_at = v.next_at,
            last_error = v.error,
            delivered_at = CASE WHEN v.status = 'delivered' THEN v.at ELSE m.delivered_at END,
            -- An attempt supersedes a hold (a duplicate job ran meanwhile), unless it
            -- holds the message for its retry.
            held_until = CASE WHEN v.status = 'pending' THEN v.hold END,
            held_attempt = coalesce(v.hold_attempt, m.held_attempt),
            hold_count = 0,
            updated_at = now()
         FROM v WHERE m.id = v.message_id",
    )
    .bind(&ids)
    .bind(&at)
    .bind(&code)
    .bind(&latency)
    .bind(&error)
    .bind(&response)
    .bind(&status)
    .bind(&next)
    .bind(&disable)
    .bind(&hold)
    .bind(&hold_attempt)
    .execute(conn)
    .await?;
    Ok(())
}

/// A message to hold: its endpoint hangs or its circuit is open, so it waits in the
/// database until `until` instead of cycling through the broker.
#[derive(Clone, Debug)]
pub struct Held {
    pub message_id: String,
    pub until: DateTime<Utc>,
    /// The attempt count of the job's round, carried by the job it gets back.
    pub attempt: u32,
    /// How often it has been held since its last attempt, this time included.
    pub hold_count: u32,
}

/// Holds many pending messages in one statement (settled messages are left alone); a
/// hold supersedes a parking.
pub async fn hold_many(conn: &mut PgConnection, batch: &[Held]) -> Result<(), sqlx::Error> {
    let (mut ids, mut until, mut attempt, mut count) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for p in batch {
        ids.push(p.message_id.clone());
        until.push(p.until);
        attempt.push(i32::try_from(p.attempt).unwrap_or(i32::MAX));
        count.push(i32::try_from(p.hold_count).unwrap_or(i32::MAX));
    }
    sqlx::query(
        "WITH v AS (
            SELECT * FROM UNNEST($1::text[], $2::timestamptz[], $3::int[], $4::int[])
                AS v(id, until, attempt, hold_count)
         ), unparked AS (
            DELETE FROM webhook_parked k USING v WHERE k.message_id = v.id
         )
         UPDATE webhook_messages m SET
            held_until = v.until, held_attempt = v.attempt, hold_count = v.hold_count,
            next_attempt_at = v.until, updated_at = now()
         FROM v WHERE m.id = v.id AND m.status = 'pending'",
    )
    .bind(&ids)
    .bind(&until)
    .bind(&attempt)
    .bind(&count)
    .execute(conn)
    .await?;
    Ok(())
}

/// Gives held messages whose time has come a delivery job again (an outbox row, in the
/// same statement), at most `per_endpoint` of each endpoint and `limit` in all, the
/// longest-held first. So too messages taken from parking whose attempt was never
/// recorded once their time taken runs out, and parked messages nobody pulls any more
/// (the lease of their puller ran out). Safe to run in several processes at once: a
/// message is released by whichever gets its row first, and the other skips it.
/// Returns how many were released.
pub async fn release_due(
    conn: &mut PgConnection,
    per_endpoint: i64,
    limit: i64,
) -> Result<u64, sqlx::Error> {
    let n: i64 = sqlx::query_scalar(
        "WITH due AS (
            SELECT id, endpoint_id, held_until AS at, false AS parked
            FROM webhook_messages WHERE held_until <= now()
            UNION ALL
            SELECT message_id, endpoint_id, taken_until, true
            FROM webhook_parked WHERE taken_until <= now()
            UNION ALL
            SELECT k.message_id, p.endpoint_id, k.parked_at, true FROM webhook_parking p
            CROSS JOIN LATERAL (
                SELECT message_id, parked_at FROM webhook_parked
                WHERE endpoint_id = p.endpoint_id AND taken_until IS NULL
                ORDER BY parked_at, message_id LIMIT $1
            ) k
            WHERE p.lease_until <= now()
         ), first AS (
            -- At most `per_endpoint` of each endpoint, whichever way they are due.
            SELECT id, at, parked FROM (
                SELECT *, row_number() OVER (PARTITION BY endpoint_id ORDER BY at, id) AS n FROM due
            ) d
            WHERE n <= $1 ORDER BY at, id LIMIT $2
         ), locked_held AS (
            SELECT m.id, first.at FROM webhook_messages m JOIN first USING (id)
            WHERE NOT first.parked AND m.held_until <= now()
            FOR UPDATE OF m SKIP LOCKED
         ), locked_parked AS (
            -- Re-checked on the row as it is once locked: one pulled meanwhile is skipped.
            SELECT k.message_id AS id, first.at FROM webhook_parked k JOIN first ON first.id = k.message_id
            WHERE first.parked AND (k.taken_until IS NULL OR k.taken_until <= now())
            FOR UPDATE OF k SKIP LOCKED
         ), held AS (
            UPDATE webhook_messages m SET held_until = NULL, updated_at = now()
            FROM locked_held l WHERE m.id = l.id
            RETURNING m.id, m.endpoint_id, m.status, m.held_attempt AS attempt, m.hold_count
         ), unparked AS (
            DELETE FROM webhook_parked k USING locked_parked l WHERE k.message_id = l.id
            RETURNING k.message_id AS id, k.attempt, k.hold_count
         ), released AS (
            SELECT id, endpoint_id, status = 'pending' AS live, attempt, hold_count, l.at
            FROM held JOIN locked_held l USING (id)
            UNION ALL
            -- A parked row of a message recorded or held meanwhile (by a duplicate job)
            -- is dropped without a job.
            SELECT id, m.endpoint_id, m.status = 'pending' AND m.held_until IS NULL,
                   u.attempt, u.hold_count, l.at
            FROM unparked u JOIN locked_parked l USING (id) JOIN webhook_messages m USING (id)
         ), jobs AS (
            INSERT INTO outbox (kind, message_id, payload)
            SELECT 'webhook', id, convert_to(jsonb_build_object('webhook_message_id', id,
                'endpoint_id', endpoint_id, 'attempt', attempt, 'holds', hold_count)::text, 'UTF8')
            FROM released WHERE live
            ORDER BY at, id
         )
         SELECT count(*) FROM released",
    )
    .bind(per_endpoint)
    .bind(limit)
    .fetch_one(conn)
    .await?;
    Ok(n.max(0) as u64)
}

/// Forgets the parking leases that ran out over endpoints with nothing parked any more.
pub async fn drop_idle_leases(conn: &mut PgConnection) -> Result<u64, sqlx::Error> {
    let r = sqlx::query(
        "DELETE FROM webhook_parking WHERE endpoint_id IN (
            SELECT endpoint_id FROM webhook_parking p WHERE lease_until <= now()
              AND NOT EXISTS (SELECT 1 FROM webhook_parked k
                              WHERE k.endpoint_id = p.endpoint_id AND k.taken_until IS NULL)
            ORDER BY endpoint_id FOR UPDATE SKIP LOCKED)",
    )
    .execute(conn)
    .await?;
    Ok(r.rows_affected())
}

/// A message to park: its endpoint is at its in-flight cap, so it waits in the
/// database, in order, until this process pulls it ([`pull_parked`]).
#[derive(Clone, Debug)]
pub struct Parked {
    pub message_id: String,
    /// When it was parked: the endpoint's parked messages are pulled in this order.
    pub at: DateTime<Utc>,
    /// Until when the process that parks it promises to pull (renewed by each pull).
    pub lease_until: DateTime<Utc>,
    /// The attempt count of the job's round, and its holds since the last attempt.
    pub attempt: u32,
    pub hold_count: u32,
}

/// Parks many pending messages in one statement (settled ones, and ones taken from
/// parking and being sent, are left alone; a parking supersedes a hold) and takes or
/// extends the lease of their endpoints. The messages' own rows are not written unless
/// they were held.
pub async fn park_many(conn: &mut PgConnection, batch: &[Parked]) -> Result<(), sqlx::Error> {
    // Two jobs of one message (a redelivery) may park in one batch: its earlier parking
    // counts, since one row cannot be written twice by one statement.
    let mut batch: Vec<&Parked> = batch.iter().collect();
    batch.sort_by(|a, b| (&a.message_id, a.at).cmp(&(&b.message_id, b.at)));
    batch.dedup_by(|later, first| later.message_id == first.message_id);
    let (mut ids, mut at, mut lease, mut attempt, mut count) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for p in batch {
        ids.push(p.message_id.clone());
        at.push(p.at);
        lease.push(p.lease_until);
        attempt.push(i32::try_from(p.attempt).unwrap_or(i32::MAX));
        count.push(i32::try_from(p.hold_count).unwrap_or(i32::MAX));
    }
    sqlx::query(
        "WITH v AS (
            SELECT v.*, m.endpoint_id, m.held_until FROM UNNEST($1::text[], $2::timestamptz[],
                    $3::timestamptz[], $4::int[], $5::int[])
                AS v(id, at, lease_until, attempt, hold_count)
            JOIN webhook_messages m ON m.id = v.id
            WHERE m.status = 'pending'
            ORDER BY m.id
            -- Waits for a record, hold or deletion of the message under way and reads the
            -- row it left (a lock, not a new version of the row).
            FOR SHARE OF m
         ), p AS (
            -- Rows in message-id order, so two parks of overlapping batches wait on each
            -- other's keys in the same order instead of deadlocking.
            INSERT INTO webhook_parked (message_id, endpoint_id, parked_at, attempt, hold_count)
            SELECT id, endpoint_id, at, attempt, hold_count FROM v ORDER BY id
            ON CONFLICT (message_id) DO UPDATE SET
                parked_at = EXCLUDED.parked_at, attempt = EXCLUDED.attempt,
                hold_count = EXCLUDED.hold_count
            -- Not one taken from parking and being sent (a duplicate job).
            WHERE webhook_parked.taken_until IS NULL
            RETURNING message_id
         ), unheld AS (
            UPDATE webhook_messages m SET held_until = NULL, updated_at = now()
            FROM v JOIN p ON p.message_id = v.id
            WHERE m.id = v.id AND v.held_until IS NOT NULL
         )
         INSERT INTO webhook_parking (endpoint_id, lease_until)
         SELECT endpoint_id, max(lease_until) FROM v JOIN p ON p.message_id = v.id
         GROUP BY endpoint_id
         ORDER BY endpoint_id
         ON CONFLICT (endpoint_id) DO UPDATE
            SET lease_until = greatest(webhook_parking.lease_until, EXCLUDED.lease_until)",
    )
    .bind(&ids)
    .bind(&at)
    .bind(&lease)
    .bind(&attempt)
    .bind(&count)
    .execute(conn)
    .await?;
    Ok(())
}

/// A message taken out of parking to be attempted.
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct Pulled {
    pub id: String,
    pub held_attempt: i32,
    pub hold_count: i32,
}

/// Takes the oldest `limit` parked messages of an endpoint parked before `before`, in
/// the order they were parked, each until `claim_until` (should the process stop before
/// recording its attempt, [`release_due`] gives it a job then; its parked row stays
/// until then), and renews the endpoint's lease until `lease_until`. Messages another
/// process is taking right now are skipped; parked rows of messages recorded or held
/// meanwhile (by a duplicate job) are dropped.
///
/// `before` leaves out parks stamped at or after it: the puller's own process may still
/// be writing parks stamped earlier than those, which must go first.
pub async fn pull_parked(
    conn: &mut PgConnection,
    endpoint_id: &str,
    limit: i64,
    before: DateTime<Utc>,
    claim_until: DateTime<Utc>,
    lease_until: DateTime<Utc>,
) -> Result<Vec<Pulled>, sqlx::Error> {
    sqlx::query_as(
        "WITH picked AS (
            SELECT k.message_id, k.parked_at, m.status = 'pending' AND m.held_until IS NULL AS live
            FROM webhook_parked k JOIN webhook_messages m ON m.id = k.message_id
            WHERE k.endpoint_id = $1 AND k.taken_until IS NULL AND k.parked_at < $5
            ORDER BY k.parked_at, k.message_id LIMIT $2
            FOR UPDATE OF k SKIP LOCKED
         ), lease AS (
            UPDATE webhook_parking SET lease_until = greatest(lease_until, $4)
            WHERE endpoint_id = $1
         ), stale AS (
            -- Recorded or held by a job of the message that ran meanwhile.
            DELETE FROM webhook_parked k USING picked
            WHERE k.message_id = picked.message_id AND NOT picked.live
         ), u AS (
            UPDATE webhook_parked k SET taken_until = $3
            FROM picked WHERE k.message_id = picked.message_id AND picked.live
            RETURNING k.message_id, k.attempt, k.hold_count
         )
         SELECT u.message_id AS id, u.attempt AS held_attempt, u.hold_count
         FROM u JOIN picked USING (message_id)
         ORDER BY picked.parked_at, u.message_id",
    )
    .bind(endpoint_id)
    .bind(limit)
    .bind(claim_until)
    .bind(lease_until)
    .bind(before)
    .fetch_all(conn)
    .await
}

/// Whether an endpoint has messages parked at or after `from` and not taken: left
/// out of a pull bounded there ([`pull_parked`]).
pub async fn parked_from(
    conn: &mut PgConnection,
    endpoint_id: &str,
    from: DateTime<Utc>,
) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM webhook_parked
            WHERE endpoint_id = $1 AND taken_until IS NULL AND parked_at >= $2)",
    )
    .bind(endpoint_id)
    .bind(from)
    .fetch_one(conn)
    .await
}

/// Puts messages taken by [`pull_parked`] and not attempted back in parking: they keep
/// their place, so the endpoint's next pull takes them first, in their order.
/// Only those still held until `claim`, the pull's (not released and taken again
/// meanwhile). Returns how many.
pub async fn put_back(
    conn: &mut PgConnection,
    ids: &[String],
    claim: DateTime<Utc>,
) -> Result<u64, sqlx::Error> {
    let r = sqlx::query(
        "UPDATE webhook_parked SET taken_until = NULL
         WHERE message_id = ANY ($1) AND taken_until = $2",
    )
    .bind(ids)
    .bind(claim)
    .execute(conn)
    .await?;
    Ok(r.rows_affected())
}

/// Holds the parked messages of an endpoint that hangs or whose circuit is open until
/// `until`, and those of `pulled` too (taken, not attempted), as
/// [`hold_many`] would hold their jobs. Returns how many.
pub async fn hold_parked(
    conn: &mut PgConnection,
    endpoint_id: &str,
    until: DateTime<Utc>,
    pulled: &[String],
) -> Result<u64, sqlx::Error> {
    let r = sqlx::query(
        "WITH unparked AS (
            DELETE FROM webhook_parked
            WHERE endpoint_id = $1 AND (taken_until IS NULL OR message_id = ANY ($3))
            RETURNING message_id, attempt, hold_count
         )
         UPDATE webhook_messages m SET held_until = $2, next_attempt_at = $2,
            held_attempt = u.attempt, hold_count = u.hold_count + 1, updated_at = now()
         FROM unparked u WHERE m.id = u.message_id AND m.status = 'pending'",
    )
    .bind(endpoint_id)
    .bind(until)
    .bind(pulled)
    .execute(conn)
    .await?;
    Ok(r.rows_affected())
}

/// Hands an endpoint's parked messages back (the process pulling them is stopping):
/// ends its lease, so the hold releaser of whichever process runs it next gives them
/// jobs, and makes those it pulled but did not attempt (`pulled`) due now. They are due
/// from when they were parked, which the hold releaser orders them by, as it does the
/// parked ones: they go first, in the order they were parked. Returns how many.
pub async fn unclaim(
    conn: &mut PgConnection,
    endpoint_id: &str,
    pulled: &[String],
) -> Result<u64, sqlx::Error> {
    let n: i64 = sqlx::query_scalar(
        "WITH lease AS (
            UPDATE webhook_parking SET lease_until = now() WHERE endpoint_id = $1
         ), u AS (
            UPDATE webhook_parked SET taken_until = least(parked_at, now())
            WHERE message_id = ANY ($2) AND taken_until IS NOT NULL
            RETURNING message_id
         )
         SELECT count(*) FROM u",
    )
    .bind(endpoint_id)
    .bind(pulled)
    .fetch_one(conn)
    .await?;
    Ok(n.max(0) as u64)
}

/// Deletes up to `limit` delivered or failed messages created before `cutoff`, with
/// their attempts, passing over rows another pruner holds; a pending message is never
/// deleted. Returns how many it deleted.
pub async fn prune_settled(
    conn: &mut PgConnection,
    cutoff: DateTime<Utc>,
    limit: i64,
) -> Result<u64, sqlx::Error> {
    let done = sqlx::query(
        "DELETE FROM webhook_messages WHERE id IN (
             SELECT id FROM webhook_messages WHERE created_at < $1 AND status <> 'pending'
             LIMIT $2 FOR UPDATE SKIP LOCKED)",
    )
    .bind(cutoff)
    .bind(limit)
    .execute(conn)
    .await?;
    Ok(done.rows_affected())
}

/// Makes pulled messages whose attempt went wrong before it was recorded (the database
/// failed under it) due now, instead of when their claim runs out: the hold releaser
/// gives them jobs within a second. A message whose attempt was recorded after all
/// (delivered, or held for its retry: no longer parked) is left as it is.
pub async fn due_now(conn: &mut PgConnection, pulled: &[String]) -> Result<u64, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE webhook_parked SET taken_until = now()
         WHERE message_id = ANY ($1) AND taken_until > now()",
    )
    .bind(pulled)
    .execute(conn)
    .await?;
    Ok(done.rows_affected())
}

/// Parks every held message of an endpoint (it answered again after hanging, failing
/// or being taken for hanging), oldest first, behind nothing: its puller sends them at
/// its pace instead of the whole backlog going back through the broker at once. Takes
/// or extends the endpoint's lease until `lease_until`. Messages taken to be sent are
/// left alone. Returns how many.
pub async fn park_held(
    conn: &mut PgConnection,
    endpoint_id: &str,
    lease_until: DateTime<Utc>,
) -> Result<u64, sqlx::Error> {
    let n: i64 = sqlx::query_scalar(
        "WITH p AS (
            UPDATE webhook_messages SET held_until = NULL, updated_at = now()
            WHERE endpoint_id = $1 AND held_until > now() AND status = 'pending'
              -- Held for hanging or a circuit (holds counted), not retries on their schedule.
              AND hold_count > 0
            RETURNING id, endpoint_id, created_at, held_attempt, hold_count
         ), parked AS (
            INSERT INTO webhook_parked (message_id, endpoint_id, parked_at, attempt, hold_count)
            SELECT id, endpoint_id, created_at, held_attempt, hold_count FROM p ORDER BY id
            ON CONFLICT (message_id) DO NOTHING
         ), lease AS (
            INSERT INTO webhook_parking (endpoint_id, lease_until)
            SELECT $1, $2 WHERE EXISTS (SELECT 1 FROM p)
            ON CONFLICT (endpoint_id) DO UPDATE
               SET lease_until = greatest(webhook_parking.lease_until, EXCLUDED.lease_until)
         )
         SELECT count(*) FROM p",
    )
    .bind(endpoint_id)
    .bind(lease_until)
    .fetch_one(conn)
    .await?;
    Ok(n.max(0) as u64)
}

/// Fails a pending message without an attempt (its endpoint is disabled).
pub async fn fail_unattempted(
    conn: &mut PgConnection,
    message_id: &str,
    reason: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "WITH unparked AS (
            DELETE FROM webhook_parked WHERE message_id = $1
         )
         UPDATE webhook_messages SET status = 'failed', last_error = $2, next_attempt_at = NULL,
            held_until = NULL, updated_at = now()
         WHERE id = $1 AND status = 'pending'",
    )
    .bind(message_id)
    .bind(reason)
    .execute(conn)
    .await?;
    Ok(())
}

/// Re-arms one message of a business (pending again, with a new job) if it is settled:
/// `failed` or `delivered`. A pending message (waiting for a retry, held, or being
/// attempted right now) already has a job on its way, and a second would send it twice
/// at once. Returns the id if it was re-armed.
pub async fn rearm_settled(
    conn: &mut PgConnection,
    business_id: &str,
    message_id: &str,
) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar(
        "WITH r AS (
            UPDATE webhook_messages SET status = 'pending', next_attempt_at = now(),
                held_until = NULL, hold_count = 0, updated_at = now()
            WHERE business_id = $1 AND id = $2 AND status IN ('failed', 'delivered')
            RETURNING id, endpoint_id
         ), unparked AS (
            DELETE FROM webhook_parked WHERE message_id IN (SELECT id FROM r)
         )
         INSERT INTO outbox (kind, message_id, payload)
         SELECT 'webhook', id,
                convert_to(jsonb_build_object('webhook_message_id', id, 'endpoint_id', endpoint_id)::text, 'UTF8')
         FROM r
         RETURNING message_id",
    )
    .bind(business_id)
    .bind(message_id)
    .fetch_optional(conn)
    .await
}

/// Re-arms at most `limit` failed messages of an endpoint, in message-id order after
/// `after` (a page's cursor). Returns the ids re-armed, in that order.
pub async fn rearm_failed(
    conn: &mut PgConnection,
    business_id: &str,
    endpoint_id: &str,
    after: Option<&str>,
    limit: i64,
) -> Result<Vec<String>, sqlx::Error> {
    let mut ids: Vec<String> = sqlx::query_scalar(
        "WITH page AS (
            SELECT id FROM webhook_messages
            WHERE business_id = $1 AND endpoint_id = $2 AND status = 'failed'
              AND ($3::text IS NULL OR id > $3)
            ORDER BY id LIMIT $4
            FOR UPDATE
         ), r AS (
            UPDATE webhook_messages m SET status = 'pending', next_attempt_at = now(),
                held_until = NULL, hold_count = 0, updated_at = now()
            FROM page WHERE m.id = page.id
            RETURNING m.id, m.endpoint_id
         ), unparked AS (
            DELETE FROM webhook_parked WHERE message_id IN (SELECT id FROM r)
         )
         INSERT INTO outbox (kind, message_id, payload)
         SELECT 'webhook', id,
                convert_to(jsonb_build_object('webhook_message_id', id, 'endpoint_id', endpoint_id)::text, 'UTF8')
         FROM r ORDER BY id
         RETURNING message_id",
    )
    .bind(business_id)
    .bind(endpoint_id)
    .bind(after)
    .bind(limit)
    .fetch_all(conn)
    .await?;
    ids.sort();
    Ok(ids)
}

/// One message.
pub async fn get(conn: &mut PgConnection, id: &str) -> Result<Option<Message>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, endpoint_id, business_id, grant_id, event_type, body, status, attempts,
                next_attempt_at, last_error, delivered_at
         FROM webhook_messages WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(conn)
    .await
}

/// The messages of an endpoint, oldest first.
pub async fn of_endpoint(
    conn: &mut PgConnection,
    endpoint_id: &str,
) -> Result<Vec<Message>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, endpoint_id, business_id, grant_id, event_type, body, status, attempts,
                next_attempt_at, last_error, delivered_at
         FROM webhook_messages WHERE endpoint_id = $1 ORDER BY created_at, id",
    )
    .bind(endpoint_id)
    .fetch_all(conn)
    .await
}

/// The attempts of a message, in order.
pub async fn attempts(
    conn: &mut PgConnection,
    message_id: &str,
) -> Result<Vec<Attempt>, sqlx::Error> {
    sqlx::query_as("SELECT * FROM webhook_attempts WHERE message_id = $1 ORDER BY id")
        .bind(message_id)
        .fetch_all(conn)
        .await
}

/// The attempts of each of `message_ids`, in one query: by message, each message's in
/// order.
pub async fn attempts_of_many(
    conn: &mut PgConnection,
    message_ids: &[String],
) -> Result<std::collections::HashMap<String, Vec<Attempt>>, sqlx::Error> {
    let rows: Vec<Attempt> = sqlx::query_as(
        "SELECT * FROM webhook_attempts WHERE message_id = ANY ($1) ORDER BY message_id, id",
    )
    .bind(message_ids)
    .fetch_all(conn)
    .await?;
    let mut by_message: std::collections::HashMap<String, Vec<Attempt>> =
        std::collections::HashMap::with_capacity(message_ids.len());
    for a in rows {
        by_message.entry(a.message_id.clone()).or_default().push(a);
    }
    Ok(by_message)
}

/// A page of an endpoint's messages, newest first, optionally by status.
pub async fn page_of_endpoint(
    conn: &mut PgConnection,
    endpoint_id: &str,
    status: Option<&str>,
    page: Page,
) -> Result<Vec<Message>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, endpoint_id, business_id, grant_id, event_type, body, status, attempts,
                next_attempt_at, last_error, delivered_at
         FROM webhook_messages WHERE endpoint_id = $1 AND ($2::text IS NULL OR status = $2)
         ORDER BY created_at DESC, id DESC LIMIT $3 OFFSET $4",
    )
    .bind(endpoint_id)
    .bind(status)
    .bind(page.limit)
    .bind(page.offset)
    .fetch_all(conn)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_ids_are_stable_and_distinct() {
        let a = message_id("grant_1", "entitlement_grant.created", "ep_1");
        assert_eq!(
            a,
            message_id("grant_1", "entitlement_grant.created", "ep_1")
        );
        assert_ne!(
            a,
            message_id("grant_1", "entitlement_grant.revoked", "ep_1")
        );
        assert_ne!(
            a,
            message_id("grant_1", "entitlement_grant.created", "ep_2")
        );
        assert!(a.starts_with("msg_") && a.len() == 36);
    }
}
