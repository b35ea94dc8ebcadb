//! Rate-limit buckets, the global limit, forced 429s and fault injection.

mod common;

use std::time::{Duration, Instant};

use common::{Api, expect_error, header, relaxed};
use reqwest::{Method, Response};
use sandbox_discord::{
    ANSWER_TRANSIT, FaultConfig, ForcedRateLimit, GuildIds, GuildSpec, Latency, RateLimitConfig,
    RateLimitScope, RouteKind, Sandbox, SandboxConfig, UserSpec, permissions as p,
};
use serde_json::Value;

fn secs(resp: &Response, name: &str) -> f64 {
    header(resp, name)
        .unwrap_or_else(|| panic!("missing {name}"))
        .parse()
        .unwrap()
}

async fn guild_with_member(sb: &Sandbox) -> (GuildIds, u64) {
    let ids = sb.add_guild(
        GuildSpec::new("Limits")
            .with_bot_permissions(p::MANAGE_ROLES | p::CREATE_INSTANT_INVITE)
            .with_role("Patrons", 1),
    );
    let alice = sb.add_user(UserSpec::new("alice"));
    sb.add_member(ids.guild_id, alice, &[]);
    (ids, alice)
}

fn member_role_limited(limit: u32, window_ms: u64) -> SandboxConfig {
    relaxed().with_route_limit(
        RouteKind::MemberRole,
        limit,
        Duration::from_millis(window_ms),
    )
}

#[tokio::test]
async fn bucket_headers_then_429_counts_a_violation() {
    let sb = Sandbox::start(member_role_limited(3, 400)).await;
    let api = Api::new(&sb);
    let (ids, alice) = guild_with_member(&sb).await;
    let role = ids.role("Patrons");

    let mut bucket = None;
    for expected_remaining in [2, 1, 0] {
        let resp = api.put_role(ids.guild_id, alice, role).await;
        assert_eq!(resp.status(), 204);
        assert_eq!(header(&resp, "x-ratelimit-limit"), Some("3"));
        assert_eq!(
            header(&resp, "x-ratelimit-remaining"),
            Some(expected_remaining.to_string().as_str())
        );
        let after = secs(&resp, "x-ratelimit-reset-after");
        assert!(after > 0.0 && after <= 0.4, "reset-after {after}");
        let reset = secs(&resp, "x-ratelimit-reset");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!((reset - now - after).abs() < 0.2, "reset {reset} now {now}");
        let b = header(&resp, "x-ratelimit-bucket").unwrap().to_owned();
        assert_eq!(*bucket.get_or_insert(b.clone()), b, "same bucket");
    }
    assert_eq!(sb.stats().violations(), 0);

    // Once the answer saying "0 remaining" could have been read, a request is sent
    // into a bucket known to be exhausted.
    tokio::time::sleep(ANSWER_TRANSIT).await;
    let resp = api.put_role(ids.guild_id, alice, role).await;
    assert_eq!(resp.status(), 429);
    assert_eq!(header(&resp, "x-ratelimit-scope"), Some("user"));
    assert_eq!(header(&resp, "x-ratelimit-remaining"), Some("0"));
    assert!(header(&resp, "x-ratelimit-global").is_none());
    assert_eq!(header(&resp, "retry-after"), Some("1"));
    let wait = secs(&resp, "x-ratelimit-reset-after");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["message"], "You are being rate limited.");
    assert_eq!(body["global"], false);
    let retry = body["retry_after"].as_f64().unwrap();
    assert!(retry > 0.0 && retry <= 0.4, "retry_after {retry}");

    let s = sb.stats();
    assert_eq!(s.rate_limited_earned, 1);
    assert_eq!(s.rate_limited_forced, 0);
    assert_eq!(s.bucket_violations, 1);
    assert_eq!(s.invalid_requests, 1);
    let last = sb.requests().pop().unwrap();
    assert_eq!(last.status, 429);
    assert!(last.violation);
    assert_eq!(last.rate_limit_scope, Some(RateLimitScope::User));
    assert_eq!(last.bucket, bucket);
    assert_eq!(last.major, Some(ids.guild_id));

    // After the advertised reset, a new window starts: no violation.
    tokio::time::sleep(Duration::from_secs_f64(wait + 0.01)).await;
    let resp = api.put_role(ids.guild_id, alice, role).await;
    assert_eq!(resp.status(), 204);
    assert_eq!(header(&resp, "x-ratelimit-remaining"), Some("2"));
    assert_eq!(sb.stats().violations(), 1);
}

#[tokio::test]
async fn buckets_are_per_route_shape_and_major_parameter() {
    let sb = Sandbox::start(member_role_limited(2, 2_000)).await;
    let api = Api::new(&sb);
    let (a, alice) = guild_with_member(&sb).await;
    let (b, bob) = guild_with_member(&sb).await;

    // PUT and DELETE share one bucket per guild.
    let r1 = api.put_role(a.guild_id, alice, a.role("Patrons")).await;
    let r2 = api.delete_role(a.guild_id, alice, a.role("Patrons")).await;
    assert_eq!(header(&r1, "x-ratelimit-remaining"), Some("1"));
    assert_eq!(header(&r2, "x-ratelimit-remaining"), Some("0"));
    let hash = header(&r1, "x-ratelimit-bucket").unwrap().to_owned();
    assert_eq!(header(&r2, "x-ratelimit-bucket"), Some(hash.as_str()));

    // Another guild: same bucket hash, separate state.
    let r3 = api.put_role(b.guild_id, bob, b.role("Patrons")).await;
    assert_eq!(r3.status(), 204);
    assert_eq!(header(&r3, "x-ratelimit-remaining"), Some("1"));
    assert_eq!(header(&r3, "x-ratelimit-bucket"), Some(hash.as_str()));

    // Another route shape: a different bucket.
    let r4 = api
        .bot(
            Method::GET,
            &format!("/guilds/{}/members/{alice}", a.guild_id),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r4.status(), 200);
    assert_ne!(header(&r4, "x-ratelimit-bucket"), Some(hash.as_str()));
    assert_eq!(
        header(&r4, "x-ratelimit-bucket").map(str::to_owned),
        Some(RouteKind::GetMember.bucket_hash())
    );
    assert_eq!(
        api.put_role(a.guild_id, alice, a.role("Patrons"))
            .await
            .status(),
        429
    );
}

#[tokio::test]
async fn a_client_honouring_headers_never_violates() {
    let sb = Sandbox::start(member_role_limited(2, 100)).await;
    let api = Api::new(&sb);
    let (ids, alice) = guild_with_member(&sb).await;
    for _ in 0..6 {
        let resp = api.put_role(ids.guild_id, alice, ids.role("Patrons")).await;
        assert_eq!(resp.status(), 204);
        if header(&resp, "x-ratelimit-remaining") == Some("0") {
            let wait = secs(&resp, "x-ratelimit-reset-after");
            tokio::time::sleep(Duration::from_secs_f64(wait + 0.005)).await;
        }
    }
    let s = sb.stats();
    assert_eq!(
        (s.rate_limited, s.violations(), s.invalid_requests),
        (0, 0, 0)
    );
}

#[tokio::test]
async fn global_limit_applies_across_routes_per_token() {
    let cfg = relaxed().with_global_limit(4, Duration::from_millis(1_500));
    let sb = Sandbox::start(cfg).await;
    let api = Api::new(&sb);
    let (ids, alice) = guild_with_member(&sb).await;
    let g = ids.guild_id;
    let paths = [
        format!("/guilds/{g}"),
        format!("/guilds/{g}/roles"),
        format!("/guilds/{g}/members/{alice}"),
        "/users/@me".to_owned(),
    ];
    for path in &paths {
        assert_eq!(
            api.bot(Method::GET, path).send().await.unwrap().status(),
            200
        );
    }
    let resp = api
        .bot(Method::GET, "/users/@me/guilds")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 429);
    assert_eq!(header(&resp, "x-ratelimit-global"), Some("true"));
    assert_eq!(header(&resp, "x-ratelimit-scope"), Some("global"));
    assert!(header(&resp, "retry-after").is_some());
    assert!(header(&resp, "x-ratelimit-bucket").is_none());
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["global"], true);
    assert!(body["retry_after"].as_f64().unwrap() > 0.0);
    assert_eq!(
        sb.stats().global_violations,
        0,
        "the first global 429 is earned, not a violation"
    );

    // Ignoring the global 429 is a violation.
    tokio::time::sleep(ANSWER_TRANSIT).await;
    let resp = api.bot(Method::GET, &paths[0]).send().await.unwrap();
    assert_eq!(resp.status(), 429);
    let s = sb.stats();
    assert_eq!(s.global_rate_limited, 2);
    assert_eq!(s.global_violations, 1);
    assert_eq!(s.bucket_violations, 0);

    // A user's bearer token has its own global limit; the token endpoint none.
    let tok = sb.issue_token(alice, &["identify"]).access_token;
    assert_eq!(
        api.bearer(Method::GET, "/users/@me", &tok)
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    for _ in 0..5 {
        let resp = api
            .http
            .post(format!("{}/oauth2/token", sb.api_base()))
            .form(&[("grant_type", "refresh_token"), ("refresh_token", "x")])
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 401, "invalid_client, not a global 429");
    }
}

#[tokio::test]
async fn forced_shared_429_is_not_a_violation_when_honoured() {
    let sb = Sandbox::start(relaxed()).await;
    let api = Api::new(&sb);
    let (ids, alice) = guild_with_member(&sb).await;
    let role = ids.role("Patrons");
    sb.force_rate_limit(
        ForcedRateLimit::shared(1)
            .on_route(RouteKind::MemberRole)
            .retry_after(Duration::from_millis(120)),
    );
    // Other routes are unaffected.
    let other = api
        .bot(Method::GET, &format!("/guilds/{}", ids.guild_id))
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 200);
    assert_eq!(sb.pending_forced_rate_limits(), 1);

    let resp = api.put_role(ids.guild_id, alice, role).await;
    assert_eq!(resp.status(), 429);
    assert_eq!(header(&resp, "x-ratelimit-scope"), Some("shared"));
    assert!(header(&resp, "x-ratelimit-bucket").is_some());
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["message"], "The resource is being rate limited.");
    assert_eq!(body["global"], false);
    let retry = body["retry_after"].as_f64().unwrap();
    assert!((retry - 0.12).abs() < 0.001, "{retry}");
    assert!(
        sb.member(ids.guild_id, alice).unwrap().roles.is_empty(),
        "not applied"
    );

    tokio::time::sleep(Duration::from_millis(130)).await;
    assert_eq!(api.put_role(ids.guild_id, alice, role).await.status(), 204);
    let s = sb.stats();
    assert_eq!(s.rate_limited_forced, 1);
    assert_eq!(s.rate_limited_earned, 0);
    assert_eq!(s.violations(), 0);
    assert_eq!(s.invalid_requests, 0, "shared 429s do not count as invalid");
    assert_eq!(sb.pending_forced_rate_limits(), 0);
}

#[tokio::test]
async fn retrying_before_a_forced_retry_after_is_a_violation() {
    let sb = Sandbox::start(relaxed()).await;
    let api = Api::new(&sb);
    let (ids, alice) = guild_with_member(&sb).await;
    sb.force_rate_limit(ForcedRateLimit::shared(1).retry_after(Duration::from_secs(5)));
    let role = ids.role("Patrons");
    let sent = tokio::time::Instant::now();
    assert_eq!(api.put_role(ids.guild_id, alice, role).await.status(), 429);
    // Sent before the answer could have been read: refused, not held against the client.
    let on_its_way = api.put_role(ids.guild_id, alice, role).await;
    if sent.elapsed() < ANSWER_TRANSIT {
        assert_eq!(on_its_way.status(), 429);
        assert_eq!(sb.stats().bucket_violations, 0);
    }
    tokio::time::sleep(ANSWER_TRANSIT).await;
    let resp = api.put_role(ids.guild_id, alice, role).await;
    assert_eq!(resp.status(), 429, "the resource stays blocked");
    assert_eq!(header(&resp, "x-ratelimit-scope"), Some("shared"));
    let s = sb.stats();
    // What arrives before the client could know is part of the injected fault.
    assert_eq!(s.rate_limited_forced + s.rate_limited_earned, 3);
    assert_eq!(s.rate_limited_earned, s.bucket_violations, "{s:?}");
    assert!(s.bucket_violations >= 1, "{s:?}");
}

#[tokio::test]
async fn forced_global_429s() {
    let sb = Sandbox::start(relaxed()).await;
    let api = Api::new(&sb);
    let (ids, _) = guild_with_member(&sb).await;
    sb.force_rate_limit(ForcedRateLimit::global(2).retry_after(Duration::from_millis(60)));
    let path = format!("/guilds/{}", ids.guild_id);
    for _ in 0..2 {
        let resp = api.bot(Method::GET, &path).send().await.unwrap();
        assert_eq!(resp.status(), 429);
        assert_eq!(header(&resp, "x-ratelimit-global"), Some("true"));
        assert_eq!(header(&resp, "x-ratelimit-scope"), Some("global"));
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["global"], true);
        tokio::time::sleep(Duration::from_millis(70)).await;
    }
    assert_eq!(
        api.bot(Method::GET, &path).send().await.unwrap().status(),
        200
    );
    let s = sb.stats();
    assert_eq!(s.rate_limited_forced, 2);
    assert_eq!(s.global_rate_limited, 2);
    assert_eq!(s.rate_limited_earned, 0);
    assert_eq!(s.violations(), 0);
}

#[tokio::test]
async fn injected_server_errors_have_no_side_effects() {
    let sb = Sandbox::start(relaxed().with_faults(FaultConfig::none().with_error_rate(1.0))).await;
    let api = Api::new(&sb);
    let (ids, alice) = guild_with_member(&sb).await;
    for _ in 0..20 {
        let resp = api.put_role(ids.guild_id, alice, ids.role("Patrons")).await;
        let status = resp.status().as_u16();
        assert!([500, 502, 503].contains(&status), "{status}");
        assert!(header(&resp, "x-ratelimit-bucket").is_none());
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["code"], 0);
        assert!(
            body["message"]
                .as_str()
                .unwrap()
                .starts_with(&status.to_string())
        );
    }
    assert!(sb.member(ids.guild_id, alice).unwrap().roles.is_empty());
    assert_eq!(sb.stats().injected_errors, 20);

    sb.set_error_rate(0.0);
    assert_eq!(
        api.put_role(ids.guild_id, alice, ids.role("Patrons"))
            .await
            .status(),
        204
    );
}

#[tokio::test]
async fn error_rate_is_a_share_of_requests() {
    let sb = Sandbox::start(relaxed().with_seed(7)).await;
    let api = Api::new(&sb);
    sb.set_error_rate(0.3);
    let mut errors = 0;
    for _ in 0..200 {
        if api
            .bot(Method::GET, "/users/@me")
            .send()
            .await
            .unwrap()
            .status()
            .is_server_error()
        {
            errors += 1;
        }
    }
    assert!((35..=85).contains(&errors), "{errors} of 200");
    assert_eq!(sb.stats().injected_errors, errors);
    assert_eq!(sb.faults().error_rate, 0.3);
}

#[tokio::test]
async fn latency_injection() {
    let sb = Sandbox::start(relaxed()).await;
    let api = Api::new(&sb);
    assert_eq!(
        api.bot(Method::GET, "/users/@me")
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    sb.set_latency(Latency::Fixed(Duration::from_millis(80)));
    let t = Instant::now();
    assert_eq!(
        api.bot(Method::GET, "/users/@me")
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert!(t.elapsed() >= Duration::from_millis(80));

    sb.set_latency(Latency::Range(
        Duration::from_millis(30),
        Duration::from_millis(40),
    ));
    let t = Instant::now();
    api.bot(Method::GET, "/users/@me").send().await.unwrap();
    assert!(t.elapsed() >= Duration::from_millis(30));
}

#[tokio::test]
async fn default_limits_are_five_per_second_and_fifty_global() {
    let sb = Sandbox::start(SandboxConfig::default()).await;
    let api = Api::new(&sb);
    let (ids, alice) = guild_with_member(&sb).await;
    let resp = api.put_role(ids.guild_id, alice, ids.role("Patrons")).await;
    assert_eq!(header(&resp, "x-ratelimit-limit"), Some("5"));
    let cfg = RateLimitConfig::default();
    assert_eq!(cfg.global.limit, 50);
    assert_eq!(cfg.global.window, Duration::from_secs(1));
}

#[tokio::test]
async fn disabled_rate_limits_send_no_headers() {
    let sb = Sandbox::start(SandboxConfig::default().with_rate_limits(RateLimitConfig::disabled()))
        .await;
    let api = Api::new(&sb);
    let (ids, alice) = guild_with_member(&sb).await;
    for _ in 0..10 {
        let resp = api.put_role(ids.guild_id, alice, ids.role("Patrons")).await;
        assert_eq!(resp.status(), 204);
        assert!(header(&resp, "x-ratelimit-limit").is_none());
    }
}

#[tokio::test]
async fn request_log_and_error_counters() {
    let sb = Sandbox::start(relaxed()).await;
    let api = Api::new(&sb);
    let (ids, alice) = guild_with_member(&sb).await;
    api.put_role(ids.guild_id, alice, ids.role("Patrons")).await;
    expect_error(api.put_role(ids.guild_id, alice, 1).await, 404, 10011).await;
    let other = sb.add_guild(GuildSpec::new("x").without_bot());
    expect_error(
        api.bot(Method::GET, &format!("/guilds/{}", other.guild_id))
            .send()
            .await
            .unwrap(),
        403,
        50001,
    )
    .await;
    let log = sb.requests();
    assert_eq!(log.len(), 3);
    assert_eq!(log[0].method, "PUT");
    assert_eq!(
        log[0].path,
        format!(
            "/api/v10/guilds/{}/members/{alice}/roles/{}",
            ids.guild_id,
            ids.role("Patrons")
        )
    );
    assert_eq!(log[0].status, 204);
    assert_eq!(log[0].bucket, Some(RouteKind::MemberRole.bucket_hash()));
    assert_eq!(log[1].status, 404);
    assert_eq!(log[2].status, 403);
    assert!(log[0].at <= log[2].at);
    let s = sb.stats();
    assert_eq!(
        (s.total_requests, s.forbidden, s.invalid_requests),
        (3, 1, 1)
    );
    sb.reset_stats();
    assert_eq!(sb.stats().total_requests, 0);
    assert!(sb.requests().is_empty());
}

/// A request sent after a global 429 was decided but before its (slow) answer reached
/// the client was sent before the client could know: not a violation. One sent after
/// the answer arrived is.
#[tokio::test]
async fn requests_in_flight_when_a_limit_is_told_are_not_violations() {
    let sb = Sandbox::start(relaxed()).await;
    let api = Api::new(&sb);
    let (ids, _) = guild_with_member(&sb).await;
    let path = format!("/guilds/{}", ids.guild_id);
    sb.set_latency(Latency::Fixed(Duration::from_millis(300)));
    sb.force_rate_limit(ForcedRateLimit::global(1).retry_after(Duration::from_secs(5)));
    let first = api.bot(Method::GET, &path).send();
    let second = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        api.bot(Method::GET, &path).send().await
    };
    let (a, b) = tokio::join!(first, second);
    assert_eq!(a.unwrap().status(), 429, "the forced global 429");
    assert_eq!(
        b.unwrap().status(),
        429,
        "blocked, though sent before the 429"
    );
    assert_eq!(sb.stats().global_violations, 0);

    tokio::time::sleep(ANSWER_TRANSIT).await;
    let c = api.bot(Method::GET, &path).send().await.unwrap();
    assert_eq!(c.status(), 429);
    assert_eq!(
        sb.stats().global_violations,
        1,
        "sent after the 429 was answered"
    );
}
