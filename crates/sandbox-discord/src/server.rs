//! HTTP front: routing, authentication, fault injection, rate limiting and
//! the `/api/v10` guild/user endpoints.

// Handlers bail out early with a ready `Response` as the error; boxing it
// would only add noise.
#![allow(clippy::result_large_err)]

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Request, State as AxState};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use rand::Rng;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::config::{Latency, RouteKind};
use crate::model::{Member, permissions};
use crate::oauth;
use crate::ratelimit::{self, BucketHeaders, Decision, Limited, Principal, RateLimitScope};
use crate::state::{Bot, RecordInfo, RequestRecord, Shared, State, Stats};
use crate::util::epoch_secs;

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new().fallback(handle).with_state(shared)
}

async fn handle(AxState(shared): AxState<Arc<Shared>>, req: Request) -> Response {
    let at = Instant::now();
    let time = SystemTime::now();
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, 1 << 20)
        .await
        .unwrap_or_default();
    let path = parts.uri.path().to_owned();
    let query = parts.uri.query().map(str::to_owned);
    // Discord takes the reason URL-encoded (it may hold any Unicode).
    let audit_log_reason = parts
        .headers
        .get("x-audit-log-reason")
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            percent_encoding::percent_decode_str(v)
                .decode_utf8_lossy()
                .into_owned()
        });
    let q = query.as_deref().unwrap_or("");
    let mut info = RecordInfo::default();

    let resp = if path == "/oauth2/authorize" {
        oauth::authorize_page(&shared, &parts.method, q, &parts.headers, &body)
    } else if let Some(rest) = path.strip_prefix("/api/v10/") {
        let resp = api(
            &shared,
            &parts.method,
            rest,
            q,
            &parts.headers,
            body,
            &mut info,
        )
        .await;
        if !info.delay.is_zero() {
            tokio::time::sleep(info.delay).await;
        }
        resp
    } else {
        error(StatusCode::NOT_FOUND, 0, "404: Not Found")
    };

    let status = resp.status().as_u16();
    tracing::debug!(method = %parts.method, %path, status, "sandbox-discord request");
    let mut guard = shared.lock();
    let st = &mut *guard;
    count(&mut st.stats, status, &info);
    if let Some(client_id) = info.client_id {
        count(st.app_stats.entry(client_id).or_default(), status, &info);
    }
    while st.log_limit > 0 && st.log.len() >= st.log_limit {
        st.log.pop_front();
    }
    st.log.push_back(RequestRecord {
        method: parts.method.to_string(),
        path,
        query,
        status,
        at,
        time,
        bucket: info.bucket,
        major: info.major,
        rate_limit_scope: info.scope,
        forced: info.forced,
        violation: info.violation,
        injected_error: info.injected_error,
        audit_log_reason,
        client_id: info.client_id,
    });
    resp
}

/// Counts an answered request (violations are counted when the limiter sees them).
fn count(s: &mut Stats, status: u16, info: &RecordInfo) {
    s.total_requests += 1;
    match status {
        401 => s.unauthorized += 1,
        403 => s.forbidden += 1,
        429 => {
            s.rate_limited += 1;
            if info.forced {
                s.rate_limited_forced += 1;
            } else {
                s.rate_limited_earned += 1;
            }
            if info.scope == Some(RateLimitScope::Global) {
                s.global_rate_limited += 1;
            }
        }
        _ => {}
    }
    if matches!(status, 401 | 403) || (status == 429 && info.scope != Some(RateLimitScope::Shared))
    {
        s.invalid_requests += 1;
    }
    if info.injected_error {
        s.injected_errors += 1;
    }
}

// ---------------------------------------------------------------------------
// Responses
// ---------------------------------------------------------------------------

pub(crate) fn json_response(status: StatusCode, body: &Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// Discord's error body: `{"code": .., "message": ..}`.
pub(crate) fn error(status: StatusCode, code: u32, message: &str) -> Response {
    json_response(status, &json!({ "message": message, "code": code }))
}

fn form_error(field: &str, code: &str, message: &str) -> Response {
    json_response(
        StatusCode::BAD_REQUEST,
        &json!({
            "message": "Invalid Form Body",
            "code": 50035,
            "errors": { field: { "_errors": [ { "code": code, "message": message } ] } },
        }),
    )
}

fn unauthorized() -> Response {
    error(StatusCode::UNAUTHORIZED, 0, "401: Unauthorized")
}
fn unknown_guild() -> Response {
    error(StatusCode::NOT_FOUND, 10004, "Unknown Guild")
}
fn unknown_member() -> Response {
    error(StatusCode::NOT_FOUND, 10007, "Unknown Member")
}
fn unknown_role() -> Response {
    error(StatusCode::NOT_FOUND, 10011, "Unknown Role")
}
fn unknown_user() -> Response {
    error(StatusCode::NOT_FOUND, 10013, "Unknown User")
}
fn missing_access() -> Response {
    error(StatusCode::FORBIDDEN, 50001, "Missing Access")
}
fn missing_permissions() -> Response {
    error(StatusCode::FORBIDDEN, 50013, "Missing Permissions")
}
fn invalid_oauth_token() -> Response {
    error(StatusCode::FORBIDDEN, 50025, "Invalid OAuth2 access token")
}
fn max_guilds() -> Response {
    error(
        StatusCode::BAD_REQUEST,
        30001,
        "Maximum number of guilds reached (100)",
    )
}
fn banned() -> Response {
    error(
        StatusCode::FORBIDDEN,
        40007,
        "The user is banned from this guild.",
    )
}
fn no_content() -> Response {
    StatusCode::NO_CONTENT.into_response()
}

fn secs3(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64())
}

fn add_bucket_headers(headers: &mut HeaderMap, h: &BucketHeaders) {
    let reset = epoch_secs(SystemTime::now() + h.reset_after);
    let pairs = [
        ("x-ratelimit-limit", h.limit.to_string()),
        ("x-ratelimit-remaining", h.remaining.to_string()),
        ("x-ratelimit-reset", format!("{reset:.3}")),
        ("x-ratelimit-reset-after", secs3(h.reset_after)),
        ("x-ratelimit-bucket", h.bucket.clone()),
    ];
    for (name, value) in pairs {
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.insert(name, v);
        }
    }
}

fn too_many_requests(l: &Limited) -> Response {
    let secs = l.retry_after.as_secs_f64();
    let global = l.scope == RateLimitScope::Global;
    let message = if l.scope == RateLimitScope::Shared {
        "The resource is being rate limited."
    } else {
        "You are being rate limited."
    };
    let body = json!({
        "message": message,
        "retry_after": (secs * 1000.0).ceil() / 1000.0,
        "global": global,
        "code": 0,
    });
    let mut resp = json_response(StatusCode::TOO_MANY_REQUESTS, &body);
    let headers = resp.headers_mut();
    let retry_header = (secs.ceil() as u64).max(1).to_string();
    if let Ok(v) = HeaderValue::from_str(&retry_header) {
        headers.insert(header::RETRY_AFTER, v);
    }
    headers.insert(
        "x-ratelimit-scope",
        HeaderValue::from_static(l.scope.as_str()),
    );
    if global {
        headers.insert("x-ratelimit-global", HeaderValue::from_static("true"));
    }
    if let Some(h) = &l.headers {
        add_bucket_headers(headers, h);
    }
    resp
}

fn injected_error(status: u16) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let message = format!(
        "{}: {}",
        status.as_u16(),
        status.canonical_reason().unwrap_or("Error")
    );
    error(status, 0, &message)
}

// ---------------------------------------------------------------------------
// Routing
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
enum Endpoint {
    Token,
    TokenRevoke,
    Me,
    MyGuilds,
    Guild(u64),
    Roles(u64),
    Members(u64),
    GetMember(u64, u64),
    AddMember(u64, u64),
    RemoveMember(u64, u64),
    MemberRole {
        guild: u64,
        user: u64,
        role: u64,
        add: bool,
    },
}

impl Endpoint {
    fn kind(self) -> RouteKind {
        match self {
            Endpoint::Token => RouteKind::TokenExchange,
            Endpoint::TokenRevoke => RouteKind::TokenRevoke,
            Endpoint::Me => RouteKind::CurrentUser,
            Endpoint::MyGuilds => RouteKind::CurrentUserGuilds,
            Endpoint::Guild(_) => RouteKind::GetGuild,
            Endpoint::Roles(_) => RouteKind::GetGuildRoles,
            Endpoint::Members(_) => RouteKind::ListMembers,
            Endpoint::GetMember(..) => RouteKind::GetMember,
            Endpoint::AddMember(..) => RouteKind::AddMember,
            Endpoint::RemoveMember(..) => RouteKind::RemoveMember,
            Endpoint::MemberRole { .. } => RouteKind::MemberRole,
        }
    }

    /// The major parameter (top-level resource) of the route.
    fn major(self) -> Option<u64> {
        match self {
            Endpoint::Token | Endpoint::TokenRevoke | Endpoint::Me | Endpoint::MyGuilds => None,
            Endpoint::Guild(g)
            | Endpoint::Roles(g)
            | Endpoint::Members(g)
            | Endpoint::GetMember(g, _)
            | Endpoint::AddMember(g, _)
            | Endpoint::RemoveMember(g, _)
            | Endpoint::MemberRole { guild: g, .. } => Some(g),
        }
    }
}

fn snowflake(field: &str, raw: &str) -> Result<u64, Response> {
    raw.parse::<u64>().map_err(|_| {
        form_error(
            field,
            "NUMBER_TYPE_COERCE",
            &format!("Value \"{raw}\" is not snowflake."),
        )
    })
}

fn method_not_allowed() -> Response {
    error(StatusCode::METHOD_NOT_ALLOWED, 0, "405: Method Not Allowed")
}

fn parse_route(method: &Method, rest: &str) -> Result<Endpoint, Response> {
    let segs: Vec<&str> = rest.trim_end_matches('/').split('/').collect();
    let m = method.clone();
    let only = |allowed: Method, ep: Endpoint| {
        if m == allowed {
            Ok(ep)
        } else {
            Err(method_not_allowed())
        }
    };
    match segs.as_slice() {
        ["oauth2", "token"] => only(Method::POST, Endpoint::Token),
        ["oauth2", "token", "revoke"] => only(Method::POST, Endpoint::TokenRevoke),
        ["users", "@me"] => only(Method::GET, Endpoint::Me),
        ["users", "@me", "guilds"] => only(Method::GET, Endpoint::MyGuilds),
        ["guilds", g] => only(Method::GET, Endpoint::Guild(snowflake("guild_id", g)?)),
        ["guilds", g, "roles"] => only(Method::GET, Endpoint::Roles(snowflake("guild_id", g)?)),
        ["guilds", g, "members"] => only(Method::GET, Endpoint::Members(snowflake("guild_id", g)?)),
        ["guilds", g, "members", u] => {
            let (g, u) = (snowflake("guild_id", g)?, snowflake("user_id", u)?);
            match *method {
                Method::GET => Ok(Endpoint::GetMember(g, u)),
                Method::PUT => Ok(Endpoint::AddMember(g, u)),
                Method::DELETE => Ok(Endpoint::RemoveMember(g, u)),
                _ => Err(method_not_allowed()),
            }
        }
        ["guilds", g, "members", u, "roles", r] => {
            let guild = snowflake("guild_id", g)?;
            let user = snowflake("user_id", u)?;
            let role = snowflake("role_id", r)?;
            match *method {
                Method::PUT | Method::DELETE => Ok(Endpoint::MemberRole {
                    guild,
                    user,
                    role,
                    add: *method == Method::PUT,
                }),
                _ => Err(method_not_allowed()),
            }
        }
        _ => Err(error(StatusCode::NOT_FOUND, 0, "404: Not Found")),
    }
}

/// Who is calling.
enum Caller {
    /// An application's bot (`Authorization: Bot <token>`).
    Bot(Bot),
    User {
        id: u64,
    },
    Anonymous,
}

fn authorization(headers: &HeaderMap) -> &str {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

/// The bot a request to `/api/v10/{rest}` is made by, for the counters and the
/// log: a known bot token on any route but the OAuth2 token endpoints (which
/// authenticate the application, not its bot).
fn attributed_bot(st: &State, rest: &str, headers: &HeaderMap) -> Option<Bot> {
    if rest.starts_with("oauth2/token") {
        return None;
    }
    let token = authorization(headers).strip_prefix("Bot ")?;
    st.app_by_token(token).map(|a| a.bot())
}

fn authenticate(st: &State, ep: Endpoint, headers: &HeaderMap) -> Result<Caller, Response> {
    if let Endpoint::Token | Endpoint::TokenRevoke = ep {
        return Ok(Caller::Anonymous);
    }
    let auth = authorization(headers);
    if let Some(token) = auth.strip_prefix("Bot ") {
        return match st.app_by_token(token) {
            Some(app) => Ok(Caller::Bot(app.bot())),
            None => Err(unauthorized()),
        };
    }
    if let Some(token) = auth.strip_prefix("Bearer ") {
        let needed = match ep {
            Endpoint::Me => "identify",
            Endpoint::MyGuilds => "guilds",
            // Guild routes are bot-only.
            _ => return Err(unauthorized()),
        };
        return match st.access_grant(token) {
            Some(g) if g.scopes.iter().any(|s| s == needed) => Ok(Caller::User { id: g.user_id }),
            _ => Err(unauthorized()),
        };
    }
    Err(unauthorized())
}

fn sample_latency(st: &mut State) -> Duration {
    match st.faults.latency {
        Latency::None => Duration::ZERO,
        Latency::Fixed(d) => d,
        Latency::Range(a, b) => {
            let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
            st.rng.random_range(lo..=hi)
        }
    }
}

async fn api(
    shared: &Shared,
    method: &Method,
    rest: &str,
    query: &str,
    headers: &HeaderMap,
    body: Bytes,
    info: &mut RecordInfo,
) -> Response {
    let cfg = &shared.cfg;
    let mut guard = shared.lock();
    let st = &mut *guard;
    info.client_id = attributed_bot(st, rest, headers).map(|b| b.client_id);

    let ep = match parse_route(method, rest) {
        Ok(ep) => ep,
        Err(resp) => return resp,
    };
    // Slow answers: the request is handled on arrival and its answer arrives late
    // (the caller sleeps `info.delay` before answering).
    info.delay = sample_latency(st);

    let rate = st.faults.error_rate.clamp(0.0, 1.0);
    if rate > 0.0 && !st.faults.error_statuses.is_empty() && st.rng.random_bool(rate) {
        let idx = st.rng.random_range(0..st.faults.error_statuses.len());
        info.injected_error = true;
        return injected_error(st.faults.error_statuses[idx]);
    }

    let caller = match authenticate(st, ep, headers) {
        Ok(c) => c,
        Err(resp) => return resp,
    };
    let principal = match &caller {
        Caller::Bot(bot) => Principal::Bot(bot.client_id),
        Caller::User { id, .. } => Principal::User(*id),
        Caller::Anonymous => Principal::Anonymous,
    };

    let kind = ep.kind();
    info.bucket = Some(kind.bucket_hash());
    info.major = ep.major();
    let verdict = st.limiter.check(
        Instant::now(),
        &st.rate_limits,
        &mut st.forced,
        ratelimit::Request {
            route: kind,
            major: ep.major(),
            principal: &principal,
            global: !matches!(caller, Caller::Anonymous),
            answered_at: Instant::now() + info.delay + ratelimit::ANSWER_TRANSIT,
        },
    );
    st.count_violations(
        info.client_id,
        verdict.bucket_violation,
        verdict.global_violation,
    );
    info.violation = verdict.bucket_violation || verdict.global_violation;
    let bucket_headers = match verdict.decision {
        Decision::Limited(l) => {
            info.scope = Some(l.scope);
            info.forced = l.forced;
            tracing::debug!(?l, "sandbox-discord rate limited");
            return too_many_requests(&l);
        }
        Decision::Allow(h) => h,
    };

    let mut resp = match (ep, &caller) {
        (Endpoint::Token, _) => oauth::token_exchange(cfg, st, headers, &body),
        (Endpoint::TokenRevoke, _) => oauth::token_revoke(st, headers, &body),
        (Endpoint::Me, _) => current_user(st, &caller),
        (Endpoint::MyGuilds, _) => current_user_guilds(st, &caller, query),
        // Guild routes are bot-only (`authenticate` refuses anything else).
        (_, Caller::User { .. } | Caller::Anonymous) => unauthorized(),
        (Endpoint::Guild(g), Caller::Bot(bot)) => get_guild(*bot, st, g),
        (Endpoint::Roles(g), Caller::Bot(bot)) => get_roles(*bot, st, g),
        (Endpoint::Members(g), Caller::Bot(bot)) => list_members(*bot, st, g, query),
        (Endpoint::GetMember(g, u), Caller::Bot(bot)) => get_member(*bot, st, g, u),
        (Endpoint::AddMember(g, u), Caller::Bot(bot)) => add_member(*bot, st, g, u, &body),
        (Endpoint::RemoveMember(g, u), Caller::Bot(bot)) => remove_member(*bot, st, g, u),
        (
            Endpoint::MemberRole {
                guild,
                user,
                role,
                add,
            },
            Caller::Bot(bot),
        ) => member_role(*bot, st, guild, user, role, add),
    };
    if let Some(h) = &bucket_headers {
        add_bucket_headers(resp.headers_mut(), h);
    }
    resp
}

// ---------------------------------------------------------------------------
// Handlers
// ---------------------------------------------------------------------------

/// The guild, if it exists (10004) and the calling bot is in it (50001).
fn bot_guild(bot: Bot, st: &State, guild_id: u64) -> Result<&crate::model::Guild, Response> {
    let guild = st.world.guilds.get(&guild_id).ok_or_else(unknown_guild)?;
    if !guild.members.contains_key(&bot.user_id) {
        return Err(missing_access());
    }
    Ok(guild)
}

macro_rules! tri {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err(resp) => return resp,
        }
    };
}

fn current_user(st: &State, caller: &Caller) -> Response {
    let id = match caller {
        Caller::Bot(bot) => bot.user_id,
        Caller::User { id, .. } => *id,
        Caller::Anonymous => return unauthorized(),
    };
    match st.world.users.get(&id) {
        Some(u) => {
            let mut v = u.json();
            v["locale"] = json!("en-US");
            v["mfa_enabled"] = json!(false);
            json_response(StatusCode::OK, &v)
        }
        None => unauthorized(),
    }
}

#[derive(Deserialize, Default)]
struct PageQuery {
    limit: Option<String>,
    after: Option<String>,
}

fn parse_limit(raw: Option<&str>, default: u32, max: u32) -> Result<u32, Response> {
    let Some(raw) = raw else {
        return Ok(default);
    };
    let n: i64 = raw.parse().map_err(|_| {
        form_error(
            "limit",
            "NUMBER_TYPE_COERCE",
            &format!("Value \"{raw}\" is not int."),
        )
    })?;
    if n < 1 {
        return Err(form_error(
            "limit",
            "NUMBER_TYPE_MIN",
            "int value should be greater than or equal to 1.",
        ));
    }
    if n > i64::from(max) {
        return Err(form_error(
            "limit",
            "NUMBER_TYPE_MAX",
            &format!("int value should be less than or equal to {max}."),
        ));
    }
    Ok(n as u32)
}

fn page(query: &str, default: u32, max: u32) -> Result<(u32, u64), Response> {
    let q: PageQuery = serde_urlencoded::from_str(query).unwrap_or_default();
    let limit = parse_limit(q.limit.as_deref(), default, max)?;
    let after = match q.after.as_deref() {
        Some(a) => snowflake("after", a)?,
        None => 0,
    };
    Ok((limit, after))
}

fn current_user_guilds(st: &State, caller: &Caller, query: &str) -> Response {
    let user_id = match caller {
        Caller::Bot(bot) => bot.user_id,
        Caller::User { id, .. } => *id,
        Caller::Anonymous => return unauthorized(),
    };
    let (limit, after) = tri!(page(query, 200, 200));
    let guilds: Vec<Value> = st
        .world
        .guilds
        .values()
        .filter(|g| g.id > after && g.members.contains_key(&user_id))
        .take(limit as usize)
        .map(|g| {
            json!({
                "id": g.id.to_string(),
                "name": g.name,
                "icon": null,
                "banner": null,
                "owner": g.owner_id == user_id,
                "permissions": g.permissions_of(user_id).to_string(),
                "features": [],
            })
        })
        .collect();
    json_response(StatusCode::OK, &Value::Array(guilds))
}

fn get_guild(bot: Bot, st: &State, guild_id: u64) -> Response {
    let guild = tri!(bot_guild(bot, st, guild_id));
    json_response(StatusCode::OK, &guild.json())
}

fn get_roles(bot: Bot, st: &State, guild_id: u64) -> Response {
    let guild = tri!(bot_guild(bot, st, guild_id));
    let roles: Vec<Value> = guild.sorted_roles().iter().map(|r| r.json()).collect();
    json_response(StatusCode::OK, &Value::Array(roles))
}

fn get_member(bot: Bot, st: &State, guild_id: u64, user_id: u64) -> Response {
    let guild = tri!(bot_guild(bot, st, guild_id));
    match guild.members.get(&user_id) {
        Some(m) => json_response(
            StatusCode::OK,
            &guild.member_json(m, st.world.users.get(&user_id)),
        ),
        None => unknown_member(),
    }
}

fn list_members(bot: Bot, st: &State, guild_id: u64, query: &str) -> Response {
    let guild = tri!(bot_guild(bot, st, guild_id));
    if !st.members_intent {
        return missing_access();
    }
    let (limit, after) = tri!(page(query, 1, 1000));
    let members: Vec<Value> = guild
        .members
        .range(after.saturating_add(1)..)
        .take(limit as usize)
        .map(|(id, m)| guild.member_json(m, st.world.users.get(id)))
        .collect();
    json_response(StatusCode::OK, &Value::Array(members))
}

#[derive(Deserialize)]
struct AddMemberBody {
    access_token: Option<String>,
    #[serde(default)]
    roles: Option<Vec<String>>,
    #[serde(default)]
    nick: Option<String>,
}

fn add_member(bot: Bot, st: &mut State, guild_id: u64, user_id: u64, body: &[u8]) -> Response {
    let guild = tri!(bot_guild(bot, st, guild_id));
    let parsed: AddMemberBody = match serde_json::from_slice(body) {
        Ok(b) => b,
        Err(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                50109,
                "The request body contains invalid JSON.",
            );
        }
    };
    let Some(token) = parsed.access_token else {
        return form_error(
            "access_token",
            "BASE_TYPE_REQUIRED",
            "This field is required",
        );
    };
    let Some(user) = st.world.users.get(&user_id) else {
        return unknown_user();
    };
    // The token must be live, the user's, carry `guilds.join` and have been issued
    // to the calling bot's application.
    match st.access_grant(&token) {
        Some(g)
            if g.user_id == user_id
                && g.client_id == bot.client_id
                && g.scopes.iter().any(|s| s == "guilds.join") => {}
        _ => return invalid_oauth_token(),
    }
    let perms = guild.permissions_of(bot.user_id);
    if perms & permissions::CREATE_INSTANT_INVITE == 0 {
        return missing_permissions();
    }
    if guild.members.contains_key(&user_id) {
        // Already a member: Discord ignores the other fields.
        return no_content();
    }
    if guild.bans.contains(&user_id) {
        return banned();
    }
    let mut roles = std::collections::BTreeSet::new();
    for raw in parsed.roles.unwrap_or_default() {
        let id = tri!(snowflake("roles", &raw));
        if id == guild_id {
            continue; // @everyone is implicit
        }
        let Some(role) = guild.roles.get(&id) else {
            return unknown_role();
        };
        if perms & permissions::MANAGE_ROLES == 0
            || role.managed
            || !guild.outranks_role(bot.user_id, role)
        {
            return missing_permissions();
        }
        roles.insert(id);
    }
    if parsed.nick.is_some() && perms & permissions::MANAGE_NICKNAMES == 0 {
        return missing_permissions();
    }
    if user.at_guild_limit {
        return max_guilds();
    }
    let member = Member {
        user_id,
        roles,
        nick: parsed.nick,
        joined_at: SystemTime::now(),
    };
    let json = guild.member_json(&member, Some(user));
    if let Some(g) = st.world.guilds.get_mut(&guild_id) {
        g.members.insert(user_id, member);
    }
    json_response(StatusCode::CREATED, &json)
}

fn remove_member(bot: Bot, st: &mut State, guild_id: u64, user_id: u64) -> Response {
    let guild = tri!(bot_guild(bot, st, guild_id));
    if guild.permissions_of(bot.user_id) & permissions::KICK_MEMBERS == 0 {
        return missing_permissions();
    }
    if !guild.members.contains_key(&user_id) {
        return unknown_member();
    }
    if !guild.outranks_member(bot.user_id, user_id) {
        return missing_permissions();
    }
    if let Some(g) = st.world.guilds.get_mut(&guild_id) {
        g.members.remove(&user_id);
    }
    no_content()
}

fn member_role(
    bot: Bot,
    st: &mut State,
    guild_id: u64,
    user_id: u64,
    role_id: u64,
    add: bool,
) -> Response {
    let guild = tri!(bot_guild(bot, st, guild_id));
    if guild.permissions_of(bot.user_id) & permissions::MANAGE_ROLES == 0 {
        return missing_permissions();
    }
    if !guild.members.contains_key(&user_id) {
        return unknown_member();
    }
    let Some(role) = guild.roles.get(&role_id) else {
        return unknown_role();
    };
    if role.managed || role.id == guild_id || !guild.outranks_role(bot.user_id, role) {
        return missing_permissions();
    }
    if let Some(m) = st
        .world
        .guilds
        .get_mut(&guild_id)
        .and_then(|g| g.members.get_mut(&user_id))
    {
        if add {
            m.roles.insert(role_id);
        } else {
            m.roles.remove(&role_id);
        }
    }
    no_content()
}
