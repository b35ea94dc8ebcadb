//! The pure core of delivery: what an attempt's result means (delivered, retry when,
//! give up), with no I/O and no clock of its own. Table-tested below.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use crate::domain::retry;

/// What one attempt came to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AttemptResult {
    /// A 2xx answer.
    Delivered,
    /// 410 Gone: the merchant removed the endpoint; it is disabled and the message fails
    /// without retry.
    Gone,
    /// Anything else: another status, a timeout, a refused connection, an open circuit.
    /// `retry_after` is the endpoint's own `Retry-After`, if it sent one.
    Failed { retry_after: Option<Duration> },
}

/// What happens to the message next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Next {
    Delivered,
    /// Try again after this delay (one of the configured tiers).
    RetryIn(Duration),
    /// No more attempts: the message is `failed` and parked in the dead queue.
    GiveUp(GiveUpReason),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GiveUpReason {
    Gone,
    Exhausted,
}

impl GiveUpReason {
    pub fn code(self) -> &'static str {
        match self {
            GiveUpReason::Gone => "endpoint_gone",
            GiveUpReason::Exhausted => "retries_exhausted",
        }
    }
}

/// Decides after attempt number `attempt` (1 for the first) of this delivery round.
/// `delays[i]` is the wait before attempt `i + 2`; after `delays.len() + 1` attempts the
/// message gives up. A `Retry-After` is rounded up to a tier by [`retry::next`], never
/// shortening the schedule; only a failure counts as an attempt.
pub fn next(attempt: u32, result: &AttemptResult, delays: &[Duration]) -> Next {
    match result {
        AttemptResult::Delivered => Next::Delivered,
        AttemptResult::Gone => Next::GiveUp(GiveUpReason::Gone),
        AttemptResult::Failed { retry_after } => {
            match retry::next(
                attempt.saturating_sub(1),
                retry_after.unwrap_or_default(),
                delays,
            ) {
                Some(r) => Next::RetryIn(r.delay),
                None => Next::GiveUp(GiveUpReason::Exhausted),
            }
        }
    }
}

/// The longest a message is held at a time.
pub const MAX_HOLD: Duration = Duration::from_secs(300);

/// How long a message of a hanging endpoint (or one whose circuit is open) is held,
/// given how often it was held since its last attempt: the request timeout first (by
/// then the requests in flight have ended, one way or the other), doubling each time
/// up to [`MAX_HOLD`], so a long-dead endpoint's backlog costs less and less. A success
/// of the endpoint ends every hold of its messages at once.
pub fn hold_for(holds_before: u32, timeout: Duration) -> Duration {
    let factor = 1u32 << holds_before.min(16);
    timeout
        .saturating_mul(factor)
        .clamp(Duration::from_secs(1), MAX_HOLD)
}

/// Until when a message is held: `hold` from `now`, and at least until its endpoint's
/// open circuit closes.
pub fn hold_until(now: Instant, hold: Duration, open_until: Option<Instant>) -> Instant {
    open_until.map_or(now + hold, |until| until.max(now + hold))
}

/// Reads a `Retry-After` value: delay-seconds or an HTTP date.
pub fn parse_retry_after(value: &str, now: DateTime<Utc>) -> Option<Duration> {
    let v = value.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = DateTime::parse_from_rfc2822(v).ok()?.with_timezone(&Utc);
    Some((at - now).to_std().unwrap_or_default())
}

/// What a status code means (redirects are not followed, so 3xx is a failure).
pub fn classify(status: u16, retry_after: Option<Duration>) -> AttemptResult {
    match status {
        200..=299 => AttemptResult::Delivered,
        410 => AttemptResult::Gone,
        _ => AttemptResult::Failed { retry_after },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    fn default_delays() -> Vec<Duration> {
        [0, 5, 300, 1800, 7200, 18000, 36000, 36000]
            .into_iter()
            .map(s)
            .collect()
    }

    #[test]
    fn follows_the_schedule_then_gives_up() {
        let d = default_delays();
        let fail = AttemptResult::Failed { retry_after: None };
        let cases = [
            (1, Next::RetryIn(s(0))),
            (2, Next::RetryIn(s(5))),
            (3, Next::RetryIn(s(300))),
            (8, Next::RetryIn(s(36000))),
            (9, Next::GiveUp(GiveUpReason::Exhausted)),
            (20, Next::GiveUp(GiveUpReason::Exhausted)),
        ];
        for (attempt, want) in cases {
            assert_eq!(next(attempt, &fail, &d), want, "attempt {attempt}");
        }
    }

    #[test]
    fn success_and_gone_end_the_message() {
        let d = default_delays();
        assert_eq!(next(1, &AttemptResult::Delivered, &d), Next::Delivered);
        assert_eq!(
            next(1, &AttemptResult::Gone, &d),
            Next::GiveUp(GiveUpReason::Gone)
        );
    }

    #[test]
    fn retry_after_rounds_up_to_a_tier() {
        let d = default_delays();
        let ra = |n| AttemptResult::Failed {
            retry_after: Some(s(n)),
        };
        assert_eq!(next(1, &ra(3), &d), Next::RetryIn(s(5)));
        assert_eq!(next(1, &ra(60), &d), Next::RetryIn(s(300)));
        assert_eq!(next(1, &ra(999_999), &d), Next::RetryIn(s(36000)));
        // Never shorter than the schedule.
        assert_eq!(next(3, &ra(1), &d), Next::RetryIn(s(300)));
    }

    #[test]
    fn classifies_statuses() {
        assert_eq!(classify(200, None), AttemptResult::Delivered);
        assert_eq!(classify(204, None), AttemptResult::Delivered);
        assert_eq!(classify(410, None), AttemptResult::Gone);
        for code in [301, 307, 400, 404, 429, 500, 503] {
            assert!(matches!(classify(code, None), AttemptResult::Failed { .. }));
        }
    }

    #[test]
    fn parses_retry_after() {
        let now = DateTime::parse_from_rfc3339("2026-05-01T10:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(parse_retry_after("120", now), Some(s(120)));
        assert_eq!(
            parse_retry_after("Fri, 01 May 2026 10:01:00 GMT", now),
            Some(s(60))
        );
        assert_eq!(
            parse_retry_after("Fri, 01 May 2026 09:00:00 GMT", now),
            Some(s(0))
        );
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn hold_doubles_up_to_a_cap() {
        let timeout = s(15);
        let cases = [(0, 15), (1, 30), (2, 60), (4, 240), (5, 300), (40, 300)];
        for (holds, want) in cases {
            assert_eq!(hold_for(holds, timeout), s(want), "held {holds} times");
        }
        // A tiny timeout still holds for a second.
        assert_eq!(hold_for(0, Duration::from_millis(100)), s(1));
    }
}
