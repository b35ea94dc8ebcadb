//! Fixed-window rate limiter modelled on Discord's per-route buckets and the
//! global limit, plus violation tracking.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use tokio::time::Instant;

use crate::config::{BucketLimit, ForcedRateLimit, ForcedScope, RateLimitConfig, RouteKind};

/// How long after an answer leaves the client is taken to know what it says: the way
/// back and the reading. A request arriving sooner was sent before the client could
/// have held it back, so it is not counted as a violation.
///
/// The sandbox, the client, PostgreSQL and RabbitMQ share the test machine's cores, and
/// on a loaded one both the answer leaving (its latency is a timer) and the client
/// reading it wait for a scheduling turn, while a request that had passed the client's
/// last look is still on its way: under a fully loaded machine a request into a forced
/// global 429 arrived 116 ms after the client had logged it and shut its gate. A client that ignores what
/// it was told keeps sending for the whole wait (a second or more), far beyond this.
pub const ANSWER_TRANSIT: Duration = Duration::from_millis(150);

/// Who a limit applies to (Discord limits per bot token / per user token).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Principal {
    /// The bot of the application with this client id.
    Bot(u64),
    User(u64),
    /// No authorization (OAuth2 token exchange): keyed by "IP", i.e. shared.
    Anonymous,
}

/// The `X-RateLimit-Scope` of a 429.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RateLimitScope {
    /// Per bot/user route limit (the client's fault).
    User,
    /// Global limit of the bot/user.
    Global,
    /// Per-resource limit (not counted against the client by Discord).
    Shared,
}

impl RateLimitScope {
    /// Header value.
    pub fn as_str(self) -> &'static str {
        match self {
            RateLimitScope::User => "user",
            RateLimitScope::Global => "global",
            RateLimitScope::Shared => "shared",
        }
    }
}

#[derive(Default, Debug)]
struct Window {
    reset_at: Option<Instant>,
    used: u32,
    /// Until when the client has been told the bucket is exhausted
    /// (`Remaining: 0` or a 429's retry-after).
    exhausted_until: Option<Instant>,
    /// When the current exhaustion was first told.
    exhausted_since: Option<Instant>,
    /// A (shared or forced) block that rejects everything until then.
    blocked_until: Option<Instant>,
}

impl Window {
    fn roll(&mut self, now: Instant, window: Duration) {
        if self.reset_at.is_none_or(|r| now >= r) {
            self.reset_at = Some(now + window);
            self.used = 0;
        }
    }

    fn active_block(&self, now: Instant) -> Option<Duration> {
        self.blocked_until.filter(|b| now < *b).map(|b| b - now)
    }

    /// Whether the client had been told (had received the answer saying) the bucket
    /// was exhausted before `now`, and that has not ended.
    fn told_exhausted(&self, now: Instant) -> bool {
        self.exhausted_since.is_some_and(|since| since <= now)
            && self.exhausted_until.is_some_and(|until| now < until)
    }

    /// Exhausted until `until`, as the client learns from the answer it gets at `told`.
    fn extend_exhausted(&mut self, told: Instant, until: Instant) {
        if self.exhausted_until.is_none_or(|t| t <= told) {
            self.exhausted_since = Some(told);
        }
        self.exhausted_until = Some(self.exhausted_until.map_or(until, |t| t.max(until)));
    }
}

/// Headers describing a bucket.
#[derive(Clone, Debug)]
pub(crate) struct BucketHeaders {
    pub limit: u32,
    pub remaining: u32,
    pub reset_after: Duration,
    pub bucket: String,
}

#[derive(Clone, Debug)]
pub(crate) struct Limited {
    pub scope: RateLimitScope,
    pub retry_after: Duration,
    pub headers: Option<BucketHeaders>,
    pub forced: bool,
}

#[derive(Debug)]
pub(crate) enum Decision {
    Allow(Option<BucketHeaders>),
    Limited(Limited),
}

#[derive(Debug)]
pub(crate) struct Verdict {
    pub decision: Decision,
    pub bucket_violation: bool,
    pub global_violation: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct BucketKey {
    route: RouteKind,
    major: Option<u64>,
    principal: Principal,
}

#[derive(Default, Debug)]
pub(crate) struct Limiter {
    buckets: HashMap<BucketKey, Window>,
    globals: HashMap<Principal, Window>,
}

pub(crate) struct Request<'a> {
    pub route: RouteKind,
    pub major: Option<u64>,
    pub principal: &'a Principal,
    /// Whether the global limit applies (bot and user tokens, not the token
    /// exchange).
    pub global: bool,
    /// When the answer reaches the client (now plus injected latency): what it says
    /// is known to the client from then on, and a request already on its way before
    /// is not a violation.
    pub answered_at: Instant,
}

fn take_forced(
    queue: &mut VecDeque<ForcedRateLimit>,
    matches: impl Fn(&ForcedScope) -> bool,
) -> Option<ForcedRateLimit> {
    let idx = queue
        .iter()
        .position(|f| f.count > 0 && matches(&f.scope))?;
    let entry = queue[idx];
    if entry.count <= 1 {
        queue.remove(idx);
    } else {
        queue[idx].count -= 1;
    }
    Some(entry)
}

fn headers_of(w: &Window, now: Instant, limit: BucketLimit, bucket: &str) -> BucketHeaders {
    let (remaining, reset_after) = match w.reset_at {
        Some(r) if now < r => (limit.limit.saturating_sub(w.used), r - now),
        _ => (limit.limit, limit.window),
    };
    BucketHeaders {
        limit: limit.limit,
        remaining,
        reset_after,
        bucket: bucket.to_owned(),
    }
}

impl Limiter {
    pub(crate) fn check(
        &mut self,
        now: Instant,
        cfg: &RateLimitConfig,
        forced: &mut VecDeque<ForcedRateLimit>,
        req: Request<'_>,
    ) -> Verdict {
        let bucket = req.route.bucket_hash();
        let limit = cfg.bucket_for(req.route);
        let key = BucketKey {
            route: req.route,
            major: req.major,
            principal: req.principal.clone(),
        };

        let global_violation = req.global
            && self
                .globals
                .get(req.principal)
                .is_some_and(|g| g.told_exhausted(now));
        let bucket_violation = self
            .buckets
            .get(&key)
            .is_some_and(|w| w.told_exhausted(now));
        let verdict = |decision| Verdict {
            decision,
            bucket_violation,
            global_violation,
        };

        // Global limit (forced first, then earned).
        if req.global {
            let g = self.globals.entry(req.principal.clone()).or_default();
            // A forced global 429 hits the next bot-token request, of whichever
            // application, and blocks that application's global limit.
            if matches!(req.principal, Principal::Bot(_))
                && let Some(f) = take_forced(forced, |s| *s == ForcedScope::Global)
            {
                g.blocked_until = Some(now + f.retry_after);
                g.extend_exhausted(req.answered_at, now + f.retry_after);
                return verdict(Decision::Limited(Limited {
                    scope: RateLimitScope::Global,
                    retry_after: f.retry_after,
                    headers: None,
                    forced: true,
                }));
            }
            if cfg.enabled {
                // Blocks come only from forced 429s: what they reject before the client
                // could know of them is part of the injected fault; after, it is earned.
                if let Some(wait) = g.active_block(now) {
                    return verdict(Decision::Limited(Limited {
                        scope: RateLimitScope::Global,
                        retry_after: wait,
                        headers: None,
                        forced: !global_violation,
                    }));
                }
                g.roll(now, cfg.global.window);
                if g.used >= cfg.global.limit {
                    let reset = g.reset_at.unwrap_or(now);
                    g.extend_exhausted(req.answered_at, reset);
                    return verdict(Decision::Limited(Limited {
                        scope: RateLimitScope::Global,
                        retry_after: reset - now,
                        headers: None,
                        forced: false,
                    }));
                }
                g.used += 1;
            }
        }

        let w = self.buckets.entry(key).or_default();
        if let Some(f) = take_forced(forced, |s| match s {
            ForcedScope::Shared(None) => true,
            ForcedScope::Shared(Some(r)) => *r == req.route,
            ForcedScope::Global => false,
        }) {
            w.blocked_until = Some(now + f.retry_after);
            w.extend_exhausted(req.answered_at, now + f.retry_after);
            return verdict(Decision::Limited(Limited {
                scope: RateLimitScope::Shared,
                retry_after: f.retry_after,
                headers: Some(headers_of(w, now, limit, &bucket)),
                forced: true,
            }));
        }
        if !cfg.enabled {
            return verdict(Decision::Allow(None));
        }
        if let Some(wait) = w.active_block(now) {
            return verdict(Decision::Limited(Limited {
                scope: RateLimitScope::Shared,
                retry_after: wait,
                headers: Some(headers_of(w, now, limit, &bucket)),
                forced: !bucket_violation,
            }));
        }
        w.roll(now, limit.window);
        let reset = w.reset_at.unwrap_or(now);
        if w.used >= limit.limit {
            w.extend_exhausted(req.answered_at, reset);
            return verdict(Decision::Limited(Limited {
                scope: RateLimitScope::User,
                retry_after: reset - now,
                headers: Some(headers_of(w, now, limit, &bucket)),
                forced: false,
            }));
        }
        w.used += 1;
        if w.used >= limit.limit {
            w.extend_exhausted(req.answered_at, reset);
        }
        verdict(Decision::Allow(Some(headers_of(w, now, limit, &bucket))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(p: &Principal) -> Request<'_> {
        Request {
            route: RouteKind::MemberRole,
            major: Some(1),
            principal: p,
            global: true,
            answered_at: Instant::now(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn fixed_window_and_violations() {
        let cfg = RateLimitConfig::default().with_route(
            RouteKind::MemberRole,
            2,
            Duration::from_millis(100),
        );
        let mut l = Limiter::default();
        let mut q = VecDeque::new();
        let p = Principal::Bot(1);
        let a = l.check(Instant::now(), &cfg, &mut q, req(&p));
        assert!(matches!(a.decision, Decision::Allow(Some(ref h)) if h.remaining == 1));
        let b = l.check(Instant::now(), &cfg, &mut q, req(&p));
        assert!(matches!(b.decision, Decision::Allow(Some(ref h)) if h.remaining == 0));
        assert!(!b.bucket_violation);
        let c = l.check(Instant::now(), &cfg, &mut q, req(&p));
        assert!(c.bucket_violation);
        assert!(matches!(c.decision, Decision::Limited(ref x) if x.scope == RateLimitScope::User));
        tokio::time::advance(Duration::from_millis(100)).await;
        let d = l.check(Instant::now(), &cfg, &mut q, req(&p));
        assert!(!d.bucket_violation);
        assert!(matches!(d.decision, Decision::Allow(Some(ref h)) if h.remaining == 1));
    }
}
