//! OAuth2 consent page and token endpoint.

mod common;

use std::time::Duration;

use common::{Api, client, expect_error, param, relaxed};
use reqwest::Method;
use sandbox_discord::{
    Consent, ConsentError, GuildSpec, Sandbox, SandboxConfig, UserSpec, permissions,
};
use serde_json::Value;

const REDIRECT: &str = "http://127.0.0.1:9/callback";

fn user_authorize_url(sb: &Sandbox, state: &str) -> String {
    format!(
        "{}?client_id={}&response_type=code&scope=identify+guilds.join&redirect_uri={}&state={state}",
        sb.authorize_url(),
        sb.client_id(),
        urlencode(REDIRECT),
    )
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

async fn exchange<V: serde::Serialize>(sb: &Sandbox, form: &[(&str, V)]) -> reqwest::Response {
    client()
        .post(format!("{}/oauth2/token", sb.api_base()))
        .form(form)
        .send()
        .await
        .unwrap()
}

async fn code_for(sb: &Sandbox, user: u64) -> String {
    let loc = sb
        .consent(&user_authorize_url(sb, "s1"), user, Consent::Authorize)
        .await
        .unwrap();
    param(&loc, "code").expect("code in redirect")
}

fn code_form<'a>(sb: &'a Sandbox, code: &'a str, secret: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("grant_type", "authorization_code"),
        ("code", code),
        ("redirect_uri", REDIRECT),
        (
            "client_id",
            CLIENT_ID.get_or_init(|| sb.client_id().to_string()),
        ),
        ("client_secret", secret),
    ]
}

static CLIENT_ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();

#[tokio::test]
async fn consent_page_is_self_contained_html_with_form() {
    let sb = Sandbox::start(relaxed()).await;
    sb.add_user(UserSpec::new("alice"));
    let resp = client()
        .get(user_authorize_url(&sb, "abc"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        common::header(&resp, "content-type")
            .unwrap()
            .starts_with("text/html")
    );
    let html = resp.text().await.unwrap();
    assert!(html.contains("<form method=\"post\" action=\"/oauth2/authorize\">"));
    assert!(html.contains("name=\"login\""));
    assert!(html.contains(">alice</option>"));
    assert!(html.contains("value=\"authorize\"") && html.contains("value=\"cancel\""));
    assert!(
        !html.contains("http://") || !html.contains("<script src"),
        "no external assets"
    );
    assert!(!html.contains("<link"));
}

#[tokio::test]
async fn code_flow_issues_tokens_and_code_is_single_use() {
    let sb = Sandbox::start(relaxed()).await;
    let alice = sb.add_user(UserSpec::new("alice").global_name("Alice"));
    let loc = sb
        .consent(&user_authorize_url(&sb, "st4te"), alice, Consent::Authorize)
        .await
        .unwrap();
    assert!(loc.starts_with(REDIRECT), "{loc}");
    assert_eq!(param(&loc, "state").as_deref(), Some("st4te"));
    let code = param(&loc, "code").unwrap();

    let resp = exchange(&sb, &code_form(&sb, &code, sb.client_secret())).await;
    assert_eq!(resp.status(), 200);
    let tok: Value = resp.json().await.unwrap();
    assert_eq!(tok["token_type"], "Bearer");
    assert_eq!(tok["scope"], "identify guilds.join");
    assert_eq!(tok["expires_in"], 7 * 24 * 3600);
    let access = tok["access_token"].as_str().unwrap();
    assert!(tok["refresh_token"].is_string());

    // The token identifies alice.
    let api = Api::new(&sb);
    let me: Value = api
        .bearer(Method::GET, "/users/@me", access)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(me["id"], alice.to_string());
    assert_eq!(me["username"], "alice");
    assert_eq!(me["global_name"], "Alice");
    assert_eq!(me["discriminator"], "0");
    assert!(me["avatar"].is_null());

    // Second use of the code fails.
    let again = exchange(&sb, &code_form(&sb, &code, sb.client_secret())).await;
    assert_eq!(again.status(), 400);
    let err: Value = again.json().await.unwrap();
    assert_eq!(err["error"], "invalid_grant");
    assert!(err["error_description"].is_string());
}

#[tokio::test]
async fn code_requires_matching_redirect_uri_and_client() {
    let sb = Sandbox::start(relaxed()).await;
    let alice = sb.add_user(UserSpec::new("alice"));
    let code = code_for(&sb, alice).await;
    let id = sb.client_id().to_string();

    let bad_secret = exchange(&sb, &code_form(&sb, &code, "nope")).await;
    assert_eq!(bad_secret.status(), 401);
    let err: Value = bad_secret.json().await.unwrap();
    assert_eq!(err["error"], "invalid_client");

    let wrong_uri = exchange(
        &sb,
        &[
            ("grant_type", "authorization_code"),
            ("code", &code),
            ("redirect_uri", "http://127.0.0.1:9/other"),
            ("client_id", &id),
            ("client_secret", sb.client_secret()),
        ],
    )
    .await;
    assert_eq!(wrong_uri.status(), 400);
    assert_eq!(
        wrong_uri.json::<Value>().await.unwrap()["error"],
        "invalid_grant"
    );

    let unknown = exchange(&sb, &code_form(&sb, "not-a-code", sb.client_secret())).await;
    assert_eq!(unknown.status(), 400);
    assert_eq!(
        unknown.json::<Value>().await.unwrap()["error"],
        "invalid_grant"
    );
}

#[tokio::test]
async fn client_auth_via_http_basic() {
    let sb = Sandbox::start(relaxed()).await;
    let alice = sb.add_user(UserSpec::new("alice"));
    let code = code_for(&sb, alice).await;
    let resp = client()
        .post(format!("{}/oauth2/token", sb.api_base()))
        .basic_auth(sb.client_id(), Some(sb.client_secret()))
        .form(&[
            ("grant_type", "authorization_code"),
            ("code", code.as_str()),
            ("redirect_uri", REDIRECT),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn token_endpoint_is_form_only() {
    let sb = Sandbox::start(relaxed()).await;
    let alice = sb.add_user(UserSpec::new("alice"));
    let code = code_for(&sb, alice).await;
    let resp = client()
        .post(format!("{}/oauth2/token", sb.api_base()))
        .json(&serde_json::json!({
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": REDIRECT,
            "client_id": sb.client_id().to_string(),
            "client_secret": sb.client_secret(),
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let err: Value = resp.json().await.unwrap();
    assert_eq!(err["error"], "unsupported_grant_type");
    // The JSON attempt did not burn the code.
    let ok = exchange(&sb, &code_form(&sb, &code, sb.client_secret())).await;
    assert_eq!(ok.status(), 200);
}

#[tokio::test]
async fn refresh_tokens_rotate() {
    let sb = Sandbox::start(relaxed()).await;
    let alice = sb.add_user(UserSpec::new("alice"));
    let code = code_for(&sb, alice).await;
    let tok: Value = exchange(&sb, &code_form(&sb, &code, sb.client_secret()))
        .await
        .json()
        .await
        .unwrap();
    let r1 = tok["refresh_token"].as_str().unwrap().to_owned();
    let id = sb.client_id().to_string();
    let refresh = |rt: String| {
        let sb = &sb;
        let id = id.clone();
        async move {
            exchange(
                sb,
                &[
                    ("grant_type", "refresh_token"),
                    ("refresh_token", &rt),
                    ("client_id", &id),
                    ("client_secret", sb.client_secret()),
                ],
            )
            .await
        }
    };
    let resp = refresh(r1.clone()).await;
    assert_eq!(resp.status(), 200);
    let tok2: Value = resp.json().await.unwrap();
    let r2 = tok2["refresh_token"].as_str().unwrap().to_owned();
    assert_ne!(r1, r2);
    assert_ne!(tok["access_token"], tok2["access_token"]);
    assert_eq!(tok2["scope"], "identify guilds.join");

    let old = refresh(r1).await;
    assert_eq!(old.status(), 400);
    assert_eq!(old.json::<Value>().await.unwrap()["error"], "invalid_grant");
    assert_eq!(refresh(r2).await.status(), 200);
}

#[tokio::test]
async fn unsupported_grant_type_is_rejected() {
    let sb = Sandbox::start(relaxed()).await;
    let id = sb.client_id().to_string();
    let resp = exchange(
        &sb,
        &[
            ("grant_type", "password"),
            ("client_id", &id),
            ("client_secret", sb.client_secret()),
        ],
    )
    .await;
    assert_eq!(resp.status(), 400);
    assert_eq!(
        resp.json::<Value>().await.unwrap()["error"],
        "unsupported_grant_type"
    );
}

#[tokio::test]
async fn client_credentials_prove_the_secret_and_give_an_owner_token() {
    let sb = Sandbox::start(relaxed()).await;
    let id = sb.client_id().to_string();
    let grant = |secret: String| {
        let (sb, id) = (&sb, id.clone());
        async move {
            exchange(
                sb,
                &[
                    ("grant_type", "client_credentials"),
                    ("scope", "identify"),
                    ("client_id", &id),
                    ("client_secret", &secret),
                ],
            )
            .await
        }
    };
    let ok = grant(sb.client_secret().to_string()).await;
    assert_eq!(ok.status(), 200);
    let body: Value = ok.json().await.unwrap();
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["scope"], "identify");
    assert!(body.get("refresh_token").is_none());
    let wrong = grant("not-the-secret".into()).await;
    assert_eq!(wrong.status(), 401);
    assert_eq!(
        wrong.json::<Value>().await.unwrap()["error"],
        "invalid_client"
    );
}

#[tokio::test]
async fn codes_and_access_tokens_expire() {
    let cfg = relaxed()
        .with_code_lifetime(Duration::from_millis(100))
        .with_access_token_lifetime(Duration::from_millis(150));
    let sb = Sandbox::start(cfg).await;
    let alice = sb.add_user(UserSpec::new("alice"));

    let code = code_for(&sb, alice).await;
    tokio::time::sleep(Duration::from_millis(120)).await;
    let late = exchange(&sb, &code_form(&sb, &code, sb.client_secret())).await;
    assert_eq!(late.status(), 400);

    let code = code_for(&sb, alice).await;
    let tok: Value = exchange(&sb, &code_form(&sb, &code, sb.client_secret()))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(tok["expires_in"], 0, "lifetime below a second rounds down");
    let access = tok["access_token"].as_str().unwrap();
    let api = Api::new(&sb);
    assert_eq!(
        api.bearer(Method::GET, "/users/@me", access)
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    tokio::time::sleep(Duration::from_millis(170)).await;
    let resp = api
        .bearer(Method::GET, "/users/@me", access)
        .send()
        .await
        .unwrap();
    let body = expect_error(resp, 401, 0).await;
    assert_eq!(body["message"], "401: Unauthorized");
}

#[tokio::test]
async fn cancel_redirects_with_access_denied() {
    let sb = Sandbox::start(relaxed()).await;
    let alice = sb.add_user(UserSpec::new("alice"));
    let loc = sb
        .consent(&user_authorize_url(&sb, "keep-me"), alice, Consent::Cancel)
        .await
        .unwrap();
    assert!(loc.starts_with(REDIRECT));
    assert_eq!(param(&loc, "error").as_deref(), Some("access_denied"));
    assert!(param(&loc, "error_description").is_some());
    assert_eq!(param(&loc, "state").as_deref(), Some("keep-me"));
    assert!(param(&loc, "code").is_none());
}

#[tokio::test]
async fn bad_authorize_requests_show_an_error_page() {
    let sb = Sandbox::start(relaxed()).await;
    let alice = sb.add_user(UserSpec::new("alice"));
    let base = sb.authorize_url();
    let cases = [
        format!("{base}?client_id=42&response_type=code&scope=identify&redirect_uri={REDIRECT}"),
        format!("{base}?response_type=code&scope=identify&redirect_uri={REDIRECT}"),
        format!(
            "{base}?client_id={}&response_type=code&redirect_uri={REDIRECT}",
            sb.client_id()
        ),
        format!(
            "{base}?client_id={}&response_type=code&scope=identify",
            sb.client_id()
        ),
        format!(
            "{base}?client_id={}&response_type=code&scope=bogus&redirect_uri={REDIRECT}",
            sb.client_id()
        ),
        format!(
            "{base}?client_id={}&response_type=token&scope=identify&redirect_uri={REDIRECT}",
            sb.client_id()
        ),
    ];
    for url in cases {
        let resp = client().get(&url).send().await.unwrap();
        assert_eq!(resp.status(), 400, "{url}");
        assert!(resp.headers().get("location").is_none());
        match sb.consent(&url, alice, Consent::Authorize).await {
            Err(ConsentError::Page { status: 400, .. }) => {}
            other => panic!("{url}: {other:?}"),
        }
    }
}

#[tokio::test]
async fn registered_redirect_uris_are_enforced() {
    let sb = Sandbox::start(relaxed().with_redirect_uris([REDIRECT])).await;
    let alice = sb.add_user(UserSpec::new("alice"));
    assert!(
        sb.consent(&user_authorize_url(&sb, "x"), alice, Consent::Authorize)
            .await
            .is_ok()
    );
    let other = format!(
        "{}?client_id={}&response_type=code&scope=identify&redirect_uri=http://evil.example/cb",
        sb.authorize_url(),
        sb.client_id()
    );
    assert!(matches!(
        sb.consent(&other, alice, Consent::Authorize).await,
        Err(ConsentError::Page { status: 400, .. })
    ));
}

#[tokio::test]
async fn consent_for_unknown_user_fails_like_a_browser_would() {
    let sb = Sandbox::start(relaxed()).await;
    sb.add_user(UserSpec::new("alice"));
    let err = sb
        .consent(&user_authorize_url(&sb, "x"), 12345, Consent::Authorize)
        .await
        .unwrap_err();
    assert!(
        matches!(err, ConsentError::NoSuchOption { ref field, .. } if field == "login"),
        "{err}"
    );
}

#[tokio::test]
async fn raw_form_post_without_login_is_rejected() {
    let sb = Sandbox::start(relaxed()).await;
    let resp = client()
        .post(sb.authorize_url())
        .form(&[
            ("client_id", sb.client_id().to_string().as_str()),
            ("response_type", "code"),
            ("scope", "identify"),
            ("redirect_uri", REDIRECT),
            ("action", "authorize"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
}

#[tokio::test]
async fn bot_install_adds_bot_with_exact_permissions() {
    let sb = Sandbox::start(relaxed()).await;
    let owner = sb.add_user(UserSpec::new("owner"));
    let ids = sb.add_guild(
        GuildSpec::new("Fresh Server")
            .with_owner(owner)
            .without_bot()
            .with_role("Mods", 1)
            .with_role("Patrons", 2),
    );
    let other = sb.add_guild(GuildSpec::new("Not Yours").without_bot());
    assert_eq!(sb.bot_permissions(ids.guild_id), None);

    let perms = permissions::CREATE_INSTANT_INVITE | permissions::MANAGE_ROLES;
    let url = format!(
        "{}?client_id={}&scope=bot+applications.commands&permissions={perms}&response_type=code&redirect_uri={}&state=inst",
        sb.authorize_url(),
        sb.client_id(),
        urlencode(REDIRECT)
    );
    // The page only offers servers the user manages.
    let html = client()
        .get(format!("{url}&login={owner}"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(html.contains("Fresh Server") && !html.contains("Not Yours"));
    let err = sb
        .consent(
            &url,
            owner,
            Consent::InstallBot {
                guild_id: other.guild_id,
            },
        )
        .await
        .unwrap_err();
    assert!(matches!(err, ConsentError::NoSuchOption { .. }), "{err}");

    let loc = sb
        .consent(
            &url,
            owner,
            Consent::InstallBot {
                guild_id: ids.guild_id,
            },
        )
        .await
        .unwrap();
    assert_eq!(param(&loc, "guild_id"), Some(ids.guild_id.to_string()));
    assert_eq!(param(&loc, "permissions"), Some(perms.to_string()));
    assert_eq!(param(&loc, "state").as_deref(), Some("inst"));
    let code = param(&loc, "code").expect("code with response_type=code");
    assert_eq!(sb.bot_permissions(ids.guild_id), Some(perms));

    // The managed bot role sits above the existing roles.
    let roles = sb.roles(ids.guild_id);
    let top = roles.last().unwrap();
    assert!(top.managed);
    assert_eq!(top.name, sb.config().bot_username);
    assert_eq!(top.permissions, perms);
    assert!(top.position > 2);

    // The code's token response carries the guild.
    let tok: Value = exchange(&sb, &code_form(&sb, &code, sb.client_secret()))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(tok["guild"]["id"], ids.guild_id.to_string());
    assert_eq!(tok["scope"], "bot applications.commands");

    // Guild routes now work for the bot.
    let api = Api::new(&sb);
    let resp = api
        .bot(Method::GET, &format!("/guilds/{}", ids.guild_id))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn bot_install_without_code_by_non_owner_is_refused() {
    let sb = Sandbox::start(relaxed()).await;
    let owner = sb.add_user(UserSpec::new("owner"));
    let stranger = sb.add_user(UserSpec::new("stranger"));
    let ids = sb.add_guild(GuildSpec::new("Server").with_owner(owner).without_bot());
    let url = format!(
        "{}?client_id={}&scope=bot&permissions=8&redirect_uri={}&guild_id={}&disable_guild_select=true",
        sb.authorize_url(),
        sb.client_id(),
        urlencode(REDIRECT),
        ids.guild_id
    );
    let err = sb
        .consent(&url, stranger, Consent::Authorize)
        .await
        .unwrap_err();
    assert!(
        matches!(err, ConsentError::NoRedirect { status: 400, .. }),
        "{err}"
    );
    let loc = sb.consent(&url, owner, Consent::Authorize).await.unwrap();
    assert!(param(&loc, "code").is_none());
    assert_eq!(param(&loc, "permissions").as_deref(), Some("8"));
    assert_eq!(sb.bot_permissions(ids.guild_id), Some(permissions::ALL));
}

#[tokio::test]
async fn users_me_with_bot_token_and_bad_tokens() {
    let sb = Sandbox::start(relaxed()).await;
    let api = Api::new(&sb);
    let me: Value = api
        .bot(Method::GET, "/users/@me")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(me["id"], sb.bot_user_id().to_string());
    assert_eq!(me["bot"], true);

    let resp = api
        .bearer(Method::GET, "/users/@me", "garbage")
        .send()
        .await
        .unwrap();
    expect_error(resp, 401, 0).await;
    let resp = client()
        .get(format!("{}/users/@me", sb.api_base()))
        .header("Authorization", "Bot wrong")
        .send()
        .await
        .unwrap();
    expect_error(resp, 401, 0).await;
    let resp = client()
        .get(format!("{}/users/@me", sb.api_base()))
        .send()
        .await
        .unwrap();
    expect_error(resp, 401, 0).await;

    // A token without `identify` cannot read /users/@me.
    let alice = sb.add_user(UserSpec::new("alice"));
    let tok = sb.issue_token(alice, &["guilds.join"]);
    let resp = api
        .bearer(Method::GET, "/users/@me", &tok.access_token)
        .send()
        .await
        .unwrap();
    expect_error(resp, 401, 0).await;
    assert_eq!(sb.stats().unauthorized, 4);

    let _ = SandboxConfig::default();
}

async fn revoke(sb: &Sandbox, form: &[(&str, &str)]) -> reqwest::Response {
    client()
        .post(format!("{}/oauth2/token/revoke", sb.api_base()))
        .form(form)
        .send()
        .await
        .unwrap()
}

async fn me_status(sb: &Sandbox, access: &str) -> u16 {
    Api::new(sb)
        .bearer(Method::GET, "/users/@me", access)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

async fn refresh_status(sb: &Sandbox, refresh: &str) -> u16 {
    let id = sb.client_id().to_string();
    exchange(
        sb,
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh),
            ("client_id", &id),
            ("client_secret", sb.client_secret()),
        ],
    )
    .await
    .status()
    .as_u16()
}

#[tokio::test]
async fn revoking_either_token_ends_the_authorization() {
    let sb = Sandbox::start(relaxed()).await;
    let alice = sb.add_user(UserSpec::new("alice"));
    let id = sb.client_id().to_string();
    for hint in ["access_token", "refresh_token"] {
        let t = sb.issue_token(alice, &["identify", "guilds.join"]);
        let other = sb.issue_token(alice, &["identify"]);
        let token = if hint == "access_token" {
            &t.access_token
        } else {
            &t.refresh_token
        };
        let resp = revoke(
            &sb,
            &[
                ("token", token),
                ("token_type_hint", hint),
                ("client_id", &id),
                ("client_secret", sb.client_secret()),
            ],
        )
        .await;
        assert_eq!(resp.status(), 200, "{hint}");
        assert!(resp.bytes().await.unwrap().is_empty(), "empty body");
        assert_eq!(me_status(&sb, &t.access_token).await, 401, "{hint}");
        assert_eq!(refresh_status(&sb, &t.refresh_token).await, 400, "{hint}");
        // Another authorization of the same user is untouched.
        assert_eq!(me_status(&sb, &other.access_token).await, 200, "{hint}");
    }
}

#[tokio::test]
async fn revoking_after_a_refresh_ends_the_refreshed_tokens_too() {
    let sb = Sandbox::start(relaxed()).await;
    let alice = sb.add_user(UserSpec::new("alice"));
    let id = sb.client_id().to_string();
    let t = sb.issue_token(alice, &["identify"]);
    let tok: Value = exchange(
        &sb,
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", t.refresh_token.as_str()),
            ("client_id", &id),
            ("client_secret", sb.client_secret()),
        ],
    )
    .await
    .json()
    .await
    .unwrap();
    let new_access = tok["access_token"].as_str().unwrap();
    let resp = client()
        .post(format!("{}/oauth2/token/revoke", sb.api_base()))
        .basic_auth(sb.client_id(), Some(sb.client_secret()))
        .form(&[("token", t.access_token.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(me_status(&sb, new_access).await, 401);
}

#[tokio::test]
async fn revoke_accepts_unknown_tokens_and_refuses_bad_client_credentials() {
    let sb = Sandbox::start(relaxed()).await;
    let alice = sb.add_user(UserSpec::new("alice"));
    let id = sb.client_id().to_string();
    let t = sb.issue_token(alice, &["identify"]);
    let unknown = revoke(
        &sb,
        &[
            ("token", "not-a-token"),
            ("client_id", &id),
            ("client_secret", sb.client_secret()),
        ],
    )
    .await;
    assert_eq!(unknown.status(), 200);
    assert!(unknown.bytes().await.unwrap().is_empty());

    let bad = revoke(
        &sb,
        &[
            ("token", t.access_token.as_str()),
            ("client_id", &id),
            ("client_secret", "nope"),
        ],
    )
    .await;
    assert_eq!(bad.status(), 401);
    assert_eq!(
        bad.json::<Value>().await.unwrap()["error"],
        "invalid_client"
    );
    let anonymous = revoke(&sb, &[("token", t.access_token.as_str())]).await;
    assert_eq!(anonymous.status(), 401);
    assert_eq!(me_status(&sb, &t.access_token).await, 200, "still valid");

    let missing = revoke(
        &sb,
        &[
            ("client_id", id.as_str()),
            ("client_secret", sb.client_secret()),
        ],
    )
    .await;
    assert_eq!(missing.status(), 400);
    assert_eq!(
        missing.json::<Value>().await.unwrap()["error"],
        "invalid_request"
    );
}
