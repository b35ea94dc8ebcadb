//! Several applications side by side: each with its own bot, credentials, OAuth2
//! grants, guild memberships, global limit and counters.

mod common;

use std::time::Duration;

use common::{Api, client, expect_error, header, param, relaxed};
use reqwest::Method;
use sandbox_discord::{
    ANSWER_TRANSIT, Consent, ConsentError, ForcedRateLimit, GuildIds, GuildSpec, Sandbox, UserSpec,
    permissions as p,
};
use serde_json::{Value, json};

const REDIRECT: &str = "http://127.0.0.1:9/callback";

async fn get_guild(api: &Api, guild: u64) -> reqwest::Response {
    api.bot(Method::GET, &format!("/guilds/{guild}"))
        .send()
        .await
        .unwrap()
}

async fn token_request(sb: &Sandbox, form: &[(&str, &str)]) -> reqwest::Response {
    client()
        .post(format!("{}/oauth2/token", sb.api_base()))
        .form(form)
        .send()
        .await
        .unwrap()
}

fn authorize_url(sb: &Sandbox, client_id: u64, scope: &str) -> String {
    format!(
        "{}?client_id={client_id}&response_type=code&scope={scope}&redirect_uri={REDIRECT}&state=s",
        sb.authorize_url(),
    )
}

fn guild_with_both_bots(sb: &Sandbox, other: u64, perms: u64) -> GuildIds {
    let ids = sb.add_guild(
        GuildSpec::new("Shared Server")
            .with_bot_permissions(perms)
            .with_role("Patrons", 1),
    );
    sb.install_app_bot(ids.guild_id, other, perms);
    ids
}

#[tokio::test]
async fn added_applications_get_distinct_credentials_and_bot_users() {
    let sb = Sandbox::start(relaxed()).await;
    let b = sb.add_application("Merchant Bot");
    let c = sb.add_application("Another Bot");
    let ids = [sb.client_id(), b.client_id, c.client_id];
    assert!(ids[0] != ids[1] && ids[1] != ids[2] && ids[0] != ids[2]);
    let tokens = [sb.bot_token(), &b.bot_token, &c.bot_token];
    assert!(tokens[0] != tokens[1] && tokens[1] != tokens[2] && tokens[0] != tokens[2]);
    let secrets = [sb.client_secret(), &b.client_secret, &c.client_secret];
    assert!(secrets[0] != secrets[1] && secrets[1] != secrets[2] && secrets[0] != secrets[2]);
    assert_eq!(b.bot_username, "Merchant Bot");

    // Each bot token identifies its own bot user.
    for (token, id, name) in [
        (b.bot_token.as_str(), b.client_id, "Merchant Bot"),
        (
            sb.bot_token(),
            sb.bot_user_id(),
            sb.config().bot_username.as_str(),
        ),
    ] {
        let me: Value = Api::with_bot_token(&sb, token)
            .bot(Method::GET, "/users/@me")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(me["id"], id.to_string());
        assert_eq!(me["username"], name);
        assert_eq!(me["bot"], true);
    }

    // A bot token no application has is still refused.
    let resp = Api::with_bot_token(&sb, "not-a-token")
        .bot(Method::GET, "/users/@me")
        .send()
        .await
        .unwrap();
    let body = expect_error(resp, 401, 0).await;
    assert_eq!(body["message"], "401: Unauthorized");
}

#[tokio::test]
async fn each_bot_has_its_own_global_limit_and_counters() {
    // 5 requests per window; a long window keeps the test independent of timing.
    let sb = Sandbox::start(relaxed().with_global_limit(5, Duration::from_secs(30))).await;
    let b = sb.add_application("Merchant Bot");
    let ids = guild_with_both_bots(&sb, b.client_id, 0);
    let api_a = Api::new(&sb);
    let api_b = Api::with_bot_token(&sb, &b.bot_token);

    for _ in 0..5 {
        assert_eq!(get_guild(&api_a, ids.guild_id).await.status(), 200);
    }
    let resp = get_guild(&api_a, ids.guild_id).await;
    assert_eq!(resp.status(), 429);
    assert_eq!(header(&resp, "x-ratelimit-global"), Some("true"));
    assert_eq!(header(&resp, "x-ratelimit-scope"), Some("global"));
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["global"], true);

    // The other bot's window is untouched, and so is its route bucket.
    for i in 1..=5 {
        let resp = get_guild(&api_b, ids.guild_id).await;
        assert_eq!(resp.status(), 200);
        let remaining = (10_000 - i).to_string();
        assert_eq!(
            header(&resp, "x-ratelimit-remaining"),
            Some(remaining.as_str())
        );
    }
    assert_eq!(get_guild(&api_b, ids.guild_id).await.status(), 429);
    // Sent into the exhausted global window once A could know it: a violation of A only.
    tokio::time::sleep(ANSWER_TRANSIT).await;
    assert_eq!(get_guild(&api_a, ids.guild_id).await.status(), 429);

    let a = sb.app_stats(sb.client_id());
    assert_eq!(a.total_requests, 7);
    assert_eq!(a.rate_limited, 2);
    assert_eq!(a.rate_limited_earned, 2);
    assert_eq!(a.global_rate_limited, 2);
    assert_eq!(a.invalid_requests, 2);
    assert_eq!(a.global_violations, 1);
    let bs = sb.app_stats(b.client_id);
    assert_eq!(bs.total_requests, 6);
    assert_eq!(bs.rate_limited, 1);
    assert_eq!(bs.global_rate_limited, 1);
    assert_eq!(bs.violations(), 0);
    let all = sb.stats();
    assert_eq!(all.total_requests, 13);
    assert_eq!(all.global_rate_limited, 3);
    assert_eq!(all.global_violations, 1);
    assert_eq!(sb.app_stats(12345), Default::default());

    // The log says which application's bot made each request.
    let log = sb.requests();
    assert_eq!(log.len(), 13);
    let by_b = log
        .iter()
        .filter(|r| r.client_id == Some(b.client_id))
        .count();
    assert_eq!(by_b, 6);
    assert_eq!(log[0].client_id, Some(sb.client_id()));

    sb.reset_stats();
    assert_eq!(sb.app_stats(b.client_id), Default::default());
}

#[tokio::test]
async fn forced_global_429_hits_the_next_bot_request_of_any_application() {
    let sb = Sandbox::start(relaxed()).await;
    let b = sb.add_application("Merchant Bot");
    let ids = guild_with_both_bots(&sb, b.client_id, 0);
    let api_a = Api::new(&sb);
    let api_b = Api::with_bot_token(&sb, &b.bot_token);
    sb.force_rate_limit(ForcedRateLimit::global(1).retry_after(Duration::from_secs(5)));

    let resp = get_guild(&api_b, ids.guild_id).await;
    assert_eq!(resp.status(), 429);
    assert_eq!(header(&resp, "x-ratelimit-global"), Some("true"));
    // It blocks that application's bot only.
    assert_eq!(get_guild(&api_a, ids.guild_id).await.status(), 200);
    assert_eq!(sb.app_stats(b.client_id).rate_limited_forced, 1);
    assert_eq!(sb.app_stats(sb.client_id()).rate_limited, 0);
}

#[tokio::test]
async fn guild_routes_check_the_calling_bot() {
    let sb = Sandbox::start(relaxed()).await;
    let b = sb.add_application("Merchant Bot");
    let alice = sb.add_user(UserSpec::new("alice"));
    let ids = sb.add_guild(
        GuildSpec::new("Acme")
            .with_bot_permissions(p::MANAGE_ROLES)
            .with_role("Patrons", 1)
            .with_role("Staff", 5),
    );
    let g = ids.guild_id;
    sb.add_member(g, alice, &[]);
    let api_a = Api::new(&sb);
    let api_b = Api::with_bot_token(&sb, &b.bot_token);

    // Not installed: Missing Access for B, while A works.
    expect_error(get_guild(&api_b, g).await, 403, 50001).await;
    assert_eq!(get_guild(&api_a, g).await.status(), 200);
    assert_eq!(sb.app_bot_permissions(g, b.client_id), None);

    let role_b = sb.install_app_bot(g, b.client_id, p::CREATE_INSTANT_INVITE);
    assert_eq!(get_guild(&api_b, g).await.status(), 200);
    assert_eq!(
        sb.app_bot_permissions(g, b.client_id),
        Some(p::CREATE_INSTANT_INVITE)
    );
    assert_eq!(sb.bot_permissions(g), Some(p::MANAGE_ROLES));

    // B's managed role is named after it, tagged with its id and on top.
    let roles: Vec<Value> = api_b
        .bot(Method::GET, &format!("/guilds/{g}/roles"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let top = roles.last().unwrap();
    assert_eq!(top["id"], role_b.to_string());
    assert_eq!(top["name"], "Merchant Bot");
    assert_eq!(top["managed"], true);
    assert_eq!(top["tags"]["bot_id"], b.client_id.to_string());
    let role_a = ids.bot_role_id.unwrap();
    let role_a_id = role_a.to_string();
    assert!(roles.iter().any(|r| r["id"].as_str() == Some(&role_a_id)));
    let member: Value = api_a
        .bot(Method::GET, &format!("/guilds/{g}/members/{}", b.client_id))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(member["roles"], json!([role_b.to_string()]));

    // Permissions are the calling bot's: B lacks Manage Roles, A has it.
    let patrons = ids.role("Patrons");
    expect_error(api_b.put_role(g, alice, patrons).await, 403, 50013).await;
    assert_eq!(api_a.put_role(g, alice, patrons).await.status(), 204);
    // Hierarchy too: with A's role moved below Staff (5) and B's on top, only B
    // may hand out Staff.
    sb.install_app_bot(g, b.client_id, p::MANAGE_ROLES);
    sb.set_role_position(g, role_a, 3);
    let staff = ids.role("Staff");
    expect_error(api_a.put_role(g, alice, staff).await, 403, 50013).await;
    assert_eq!(api_b.put_role(g, alice, staff).await.status(), 204);

    // Both bots appear in their own `/users/@me/guilds`.
    let guilds: Value = api_b
        .bot(Method::GET, "/users/@me/guilds")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(guilds[0]["id"], g.to_string());
    assert_eq!(guilds[0]["permissions"], p::MANAGE_ROLES.to_string());

    // Removing B leaves A in place.
    sb.remove_app_bot(g, b.client_id);
    expect_error(get_guild(&api_b, g).await, 403, 50001).await;
    assert_eq!(get_guild(&api_a, g).await.status(), 200);
    assert!(sb.roles(g).iter().all(|r| r.id != role_b));
    assert!(sb.member(g, b.client_id).is_none());
}

#[tokio::test]
async fn add_member_needs_a_token_of_the_calling_bots_application() {
    let sb = Sandbox::start(relaxed()).await;
    let b = sb.add_application("Merchant Bot");
    let ids = guild_with_both_bots(&sb, b.client_id, p::CREATE_INSTANT_INVITE);
    let g = ids.guild_id;
    let alice = sb.add_user(UserSpec::new("alice"));
    let token_a = sb.issue_token(alice, &["identify", "guilds.join"]);
    let token_b = sb.issue_token_for(b.client_id, alice, &["identify", "guilds.join"]);
    let api_a = Api::new(&sb);
    let api_b = Api::with_bot_token(&sb, &b.bot_token);

    let resp = api_b
        .add_member(g, alice, json!({ "access_token": token_a.access_token }))
        .await;
    let body = expect_error(resp, 403, 50025).await;
    assert_eq!(body["message"], "Invalid OAuth2 access token");
    let resp = api_a
        .add_member(g, alice, json!({ "access_token": token_b.access_token }))
        .await;
    expect_error(resp, 403, 50025).await;
    assert!(sb.member(g, alice).is_none());

    // The token check comes before the permission check, as for other bad tokens.
    sb.install_app_bot(g, b.client_id, 0);
    let resp = api_b
        .add_member(g, alice, json!({ "access_token": token_a.access_token }))
        .await;
    expect_error(resp, 403, 50025).await;
    let resp = api_b
        .add_member(g, alice, json!({ "access_token": token_b.access_token }))
        .await;
    expect_error(resp, 403, 50013).await;

    sb.install_app_bot(g, b.client_id, p::CREATE_INSTANT_INVITE);
    let resp = api_b
        .add_member(g, alice, json!({ "access_token": token_b.access_token }))
        .await;
    assert_eq!(resp.status(), 201);
    assert!(sb.member(g, alice).is_some());

    // A bearer token of any application reads the user.
    let me: Value = api_b
        .bearer(Method::GET, "/users/@me", &token_b.access_token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(me["id"], alice.to_string());
}

#[tokio::test]
async fn codes_and_refresh_tokens_belong_to_their_application() {
    let sb = Sandbox::start(relaxed()).await;
    let b = sb.add_application("Merchant Bot");
    let alice = sb.add_user(UserSpec::new("alice"));
    let id_a = sb.client_id().to_string();
    let id_b = b.client_id.to_string();

    // A code issued for B on the consent page (whose heading names B).
    let url = authorize_url(&sb, b.client_id, "identify+guilds.join");
    let html = client()
        .get(format!("{url}&login={alice}"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        html.contains("Merchant Bot wants to access your account"),
        "{html}"
    );
    let loc = sb.consent(&url, alice, Consent::Authorize).await.unwrap();
    let code = param(&loc, "code").expect("code");

    // Presented with A's (valid) credentials: invalid_grant.
    let resp = token_request(
        &sb,
        &[
            ("grant_type", "authorization_code"),
            ("code", &code),
            ("redirect_uri", REDIRECT),
            ("client_id", &id_a),
            ("client_secret", sb.client_secret()),
        ],
    )
    .await;
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "invalid_grant");

    // Bad credentials: invalid_client.
    let resp = token_request(
        &sb,
        &[
            ("grant_type", "authorization_code"),
            ("code", &code),
            ("redirect_uri", REDIRECT),
            ("client_id", &id_b),
            ("client_secret", sb.client_secret()),
        ],
    )
    .await;
    assert_eq!(resp.status(), 401);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "invalid_client");

    // B's own credentials (HTTP Basic) still redeem it.
    let resp = client()
        .post(format!("{}/oauth2/token", sb.api_base()))
        .basic_auth(b.client_id, Some(&b.client_secret))
        .form(&[
            ("grant_type", "authorization_code"),
            ("code", code.as_str()),
            ("redirect_uri", REDIRECT),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let tok: Value = resp.json().await.unwrap();
    let access = tok["access_token"].as_str().unwrap().to_owned();
    let refresh = tok["refresh_token"].as_str().unwrap().to_owned();

    // The refresh token is B's too.
    let resp = token_request(
        &sb,
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", &refresh),
            ("client_id", &id_a),
            ("client_secret", sb.client_secret()),
        ],
    )
    .await;
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "invalid_grant");

    // A cannot revoke B's tokens (200, nothing revoked); B can.
    let revoke = |id: String, secret: String| {
        let sb_api = sb.api_base();
        let access = access.clone();
        async move {
            client()
                .post(format!("{sb_api}/oauth2/token/revoke"))
                .form(&[
                    ("token", access.as_str()),
                    ("client_id", &id),
                    ("client_secret", &secret),
                ])
                .send()
                .await
                .unwrap()
                .status()
        }
    };
    let me = |token: String| {
        let api = Api::new(&sb);
        async move {
            api.bearer(Method::GET, "/users/@me", &token)
                .send()
                .await
                .unwrap()
                .status()
        }
    };
    assert_eq!(
        revoke(id_a.clone(), sb.client_secret().to_owned()).await,
        200
    );
    assert_eq!(me(access.clone()).await, 200);

    let resp = token_request(
        &sb,
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", &refresh),
            ("client_id", &id_b),
            ("client_secret", &b.client_secret),
        ],
    )
    .await;
    assert_eq!(resp.status(), 200);

    assert_eq!(revoke(id_b.clone(), b.client_secret.clone()).await, 200);
    assert_eq!(me(access.clone()).await, 401);

    // An application id nobody registered still gets the error page.
    let err = sb
        .consent(
            &authorize_url(&sb, 42, "identify"),
            alice,
            Consent::Authorize,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, ConsentError::Page { status: 400, .. }),
        "{err}"
    );
}

#[tokio::test]
async fn consent_page_bot_install_installs_that_applications_bot() {
    let sb = Sandbox::start(relaxed()).await;
    let b = sb.add_application("Merchant Bot");
    let owner = sb.add_user(UserSpec::new("owner"));
    let ids = sb.add_guild(
        GuildSpec::new("Fresh Server")
            .with_owner(owner)
            .with_bot_permissions(p::MANAGE_ROLES)
            .with_role("Patrons", 1),
    );
    let g = ids.guild_id;
    let perms = p::CREATE_INSTANT_INVITE | p::MANAGE_ROLES | p::KICK_MEMBERS;
    let url = format!(
        "{}&permissions={perms}",
        authorize_url(&sb, b.client_id, "bot+applications.commands")
    );
    let loc = sb
        .consent(&url, owner, Consent::InstallBot { guild_id: g })
        .await
        .unwrap();
    assert_eq!(param(&loc, "guild_id"), Some(g.to_string()));
    let code = param(&loc, "code").expect("code");

    assert_eq!(sb.app_bot_permissions(g, b.client_id), Some(perms));
    // The default bot is as it was.
    assert_eq!(sb.bot_permissions(g), Some(p::MANAGE_ROLES));
    let roles = sb.roles(g);
    let top = roles.last().unwrap();
    assert!(top.managed);
    assert_eq!(top.name, "Merchant Bot");
    assert_eq!(top.permissions, perms);
    assert!(roles.iter().any(|r| Some(r.id) == ids.bot_role_id));

    let id_b = b.client_id.to_string();
    let resp = token_request(
        &sb,
        &[
            ("grant_type", "authorization_code"),
            ("code", &code),
            ("redirect_uri", REDIRECT),
            ("client_id", &id_b),
            ("client_secret", &b.client_secret),
        ],
    )
    .await;
    assert_eq!(resp.status(), 200);
    let tok: Value = resp.json().await.unwrap();
    assert_eq!(tok["guild"]["id"], g.to_string());

    let api_b = Api::with_bot_token(&sb, &b.bot_token);
    assert_eq!(get_guild(&api_b, g).await.status(), 200);
}
