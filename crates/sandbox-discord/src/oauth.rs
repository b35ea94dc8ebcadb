//! OAuth2: the consent page (`/oauth2/authorize`), the token endpoint
//! (`/api/v10/oauth2/token`) and token revocation (`/api/v10/oauth2/token/revoke`).

use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use base64::Engine;
use serde::Deserialize;
use serde_json::json;
use tokio::time::Instant;

use crate::config::SandboxConfig;
use crate::model::permissions;
use crate::server::json_response;
use crate::state::{CodeGrant, Shared, State};
use crate::util::{append_query, html_escape, random_token};

/// Scopes the consent page accepts.
const KNOWN_SCOPES: &[&str] = &[
    "identify",
    "email",
    "connections",
    "guilds",
    "guilds.join",
    "guilds.members.read",
    "bot",
    "applications.commands",
    "role_connections.write",
    "openid",
];

#[derive(Deserialize, Default, Debug)]
struct AuthorizeParams {
    client_id: Option<String>,
    response_type: Option<String>,
    scope: Option<String>,
    redirect_uri: Option<String>,
    state: Option<String>,
    permissions: Option<String>,
    guild_id: Option<String>,
    disable_guild_select: Option<String>,
    prompt: Option<String>,
    /// Sandbox extension: the user who is "logged in" in the browser.
    login: Option<String>,
    /// Which button was pressed (`authorize` / `cancel`).
    action: Option<String>,
}

struct Validated {
    /// The application being authorized.
    client_id: u64,
    scopes: Vec<String>,
    bot: bool,
    code: bool,
    redirect_uri: Option<String>,
    state: Option<String>,
    permissions: u64,
}

fn validate(st: &State, p: &AuthorizeParams) -> Result<Validated, String> {
    let client_id = p.client_id.as_deref().unwrap_or("");
    if client_id.is_empty() {
        return Err("Missing client_id.".into());
    }
    let Some(app) = st
        .apps
        .iter()
        .find(|a| client_id == a.client_id.to_string())
    else {
        return Err("Unknown Application: invalid client_id.".into());
    };
    let scopes: Vec<String> = p
        .scope
        .as_deref()
        .unwrap_or("")
        .split([' ', '+'])
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    if scopes.is_empty() {
        return Err("Missing scope.".into());
    }
    if let Some(bad) = scopes.iter().find(|s| !KNOWN_SCOPES.contains(&s.as_str())) {
        return Err(format!("Invalid scope: {bad}."));
    }
    let bot = scopes.iter().any(|s| s == "bot");
    let bot_only = scopes
        .iter()
        .all(|s| s == "bot" || s == "applications.commands");
    let code = match p.response_type.as_deref() {
        Some("code") => true,
        Some(other) => return Err(format!("Unsupported response_type: {other}.")),
        None if bot_only => false,
        None => return Err("Missing response_type.".into()),
    };
    let redirect_uri = p.redirect_uri.clone().filter(|r| !r.is_empty());
    match &redirect_uri {
        Some(r) => {
            let allowed = if app.redirect_uris.is_empty() {
                r.starts_with("http://") || r.starts_with("https://")
            } else {
                app.redirect_uris.iter().any(|u| u == r)
            };
            if !allowed {
                return Err("Invalid OAuth2 redirect_uri.".into());
            }
        }
        None if code => return Err("Invalid OAuth2 redirect_uri: missing.".into()),
        None => {}
    }
    let permissions = match p.permissions.as_deref() {
        None | Some("") => 0,
        Some(raw) => raw
            .parse::<u64>()
            .map_err(|_| format!("Invalid permissions: {raw}."))?,
    };
    Ok(Validated {
        client_id: app.client_id,
        scopes,
        bot,
        code,
        redirect_uri,
        state: p.state.clone(),
        permissions,
    })
}

const STYLE: &str = "body{font-family:sans-serif;background:#313338;color:#dbdee1;display:flex;\
justify-content:center;padding-top:4em}main{background:#2b2d31;padding:2em;border-radius:8px;\
max-width:28em}button{padding:.6em 1.4em;margin-right:.6em;border:0;border-radius:4px;cursor:pointer}\
button[value=authorize]{background:#5865f2;color:#fff}select{width:100%;margin:.3em 0 1em}";

fn page(status: StatusCode, title: &str, body: &str) -> Response {
    let html = format!(
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{}</title>\
<style>{STYLE}</style></head><body><main>{body}</main></body></html>",
        html_escape(title)
    );
    (status, Html(html)).into_response()
}

fn error_page(message: &str) -> Response {
    page(
        StatusCode::BAD_REQUEST,
        "Discord Sandbox - Error",
        &format!(
            "<h1>Something went wrong</h1><p class=\"error\">{}</p>",
            html_escape(message)
        ),
    )
}

fn hidden(name: &str, value: &str) -> String {
    format!(
        "<input type=\"hidden\" name=\"{}\" value=\"{}\">",
        html_escape(name),
        html_escape(value)
    )
}

fn scope_description(scope: &str) -> &'static str {
    match scope {
        "identify" => "Access your username, avatar, and banner",
        "email" => "Access your email address",
        "guilds" => "Know what servers you're in",
        "guilds.join" => "Join servers for you",
        "guilds.members.read" => "Read your member info in servers you're in",
        "connections" => "Access your third-party connections",
        "bot" => "Add a bot to a server",
        "applications.commands" => "Create commands",
        _ => "Other access",
    }
}

fn consent_page(st: &State, p: &AuthorizeParams, v: &Validated) -> Response {
    let login = p.login.as_deref().and_then(|l| l.parse::<u64>().ok());
    let mut form = String::from("<form method=\"post\" action=\"/oauth2/authorize\">");
    for (name, value) in [
        ("client_id", &p.client_id),
        ("response_type", &p.response_type),
        ("scope", &p.scope),
        ("redirect_uri", &p.redirect_uri),
        ("state", &p.state),
        ("permissions", &p.permissions),
        ("prompt", &p.prompt),
    ] {
        if let Some(value) = value {
            form.push_str(&hidden(name, value));
        }
    }
    form.push_str("<label for=\"login\">Logged in as</label><select id=\"login\" name=\"login\">");
    for user in st.world.users.values().filter(|u| !u.bot) {
        let selected = if Some(user.id) == login {
            " selected"
        } else {
            ""
        };
        form.push_str(&format!(
            "<option value=\"{}\"{selected}>{}</option>",
            user.id,
            html_escape(&user.username)
        ));
    }
    form.push_str("</select>");
    if v.bot {
        let wanted = p.guild_id.as_deref().and_then(|g| g.parse::<u64>().ok());
        let locked = p.disable_guild_select.as_deref() == Some("true");
        if let (Some(g), true) = (wanted, locked) {
            form.push_str(&hidden("guild_id", &g.to_string()));
        } else {
            form.push_str(
                "<label for=\"guild_id\">Add to server</label><select id=\"guild_id\" name=\"guild_id\">",
            );
            for g in st
                .world
                .guilds
                .values()
                .filter(|g| login.is_none_or(|u| manages(g, u)))
            {
                let selected = if Some(g.id) == wanted {
                    " selected"
                } else {
                    ""
                };
                form.push_str(&format!(
                    "<option value=\"{}\"{selected}>{}</option>",
                    g.id,
                    html_escape(&g.name)
                ));
            }
            form.push_str("</select>");
        }
        form.push_str(&format!(
            "<p>Requested permissions: <code>{}</code></p>",
            v.permissions
        ));
    }
    form.push_str(
        "<button type=\"submit\" name=\"action\" value=\"authorize\">Authorize</button>\
<button type=\"submit\" name=\"action\" value=\"cancel\">Cancel</button></form>",
    );
    let scopes: String = v
        .scopes
        .iter()
        .map(|s| format!("<li>{}</li>", scope_description(s)))
        .collect();
    let app_name = st.app(v.client_id).map_or("", |a| a.bot_username.as_str());
    let body = format!(
        "<h1>{} wants to access your account</h1><ul class=\"scopes\">{scopes}</ul>{form}",
        html_escape(app_name)
    );
    page(StatusCode::OK, "Discord Sandbox - Authorize", &body)
}

/// Whether `user` may install a bot into `guild` (owner or Manage Server).
fn manages(guild: &crate::model::Guild, user: u64) -> bool {
    guild.permissions_of(user) & permissions::MANAGE_GUILD != 0
}

fn redirect(location: &str) -> Response {
    (StatusCode::FOUND, [(header::LOCATION, location.to_owned())]).into_response()
}

fn is_form(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/x-www-form-urlencoded"))
}

/// `GET` shows the consent page; `POST` handles its form.
pub(crate) fn authorize_page(
    shared: &Shared,
    method: &Method,
    query: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Response {
    let cfg = &shared.cfg;
    let params: AuthorizeParams = if *method == Method::GET {
        match serde_urlencoded::from_str(query) {
            Ok(p) => p,
            Err(_) => return error_page("Malformed query string."),
        }
    } else if *method == Method::POST {
        if !is_form(headers) {
            return error_page("The consent form must be submitted form-encoded.");
        }
        match serde_urlencoded::from_bytes(body) {
            Ok(p) => p,
            Err(_) => return error_page("Malformed form body."),
        }
    } else {
        return page(
            StatusCode::METHOD_NOT_ALLOWED,
            "Method Not Allowed",
            "<p>405</p>",
        );
    };
    let mut st = shared.lock();
    let v = match validate(&st, &params) {
        Ok(v) => v,
        Err(msg) => return error_page(&msg),
    };
    if *method == Method::GET {
        return consent_page(&st, &params, &v);
    }

    let state_param = v.state.clone();
    if params.action.as_deref() == Some("cancel") {
        let Some(uri) = &v.redirect_uri else {
            return page(
                StatusCode::OK,
                "Discord Sandbox - Cancelled",
                "<p>Authorization cancelled.</p>",
            );
        };
        let mut q = vec![
            ("error", "access_denied"),
            (
                "error_description",
                "The resource owner or authorization server denied the request",
            ),
        ];
        if let Some(s) = &state_param {
            q.push(("state", s));
        }
        return redirect(&append_query(uri, &q));
    }

    let Some(user_id) = params
        .login
        .as_deref()
        .and_then(|l| l.parse::<u64>().ok())
        .filter(|id| st.world.users.get(id).is_some_and(|u| !u.bot))
    else {
        return error_page("Choose which user is logged in.");
    };

    let mut guild_id = None;
    if v.bot {
        let Some(g) = params
            .guild_id
            .as_deref()
            .and_then(|g| g.parse::<u64>().ok())
        else {
            return error_page("Choose a server to add the bot to.");
        };
        let Some(guild) = st.world.guilds.get(&g) else {
            return error_page("Unknown server.");
        };
        if !manages(guild, user_id) {
            return error_page("You need the Manage Server permission in that server.");
        }
        st.install_bot(v.client_id, g, v.permissions, None);
        guild_id = Some(g);
    }

    let code = v.code.then(|| {
        let code = random_token(&mut st.rng, 30);
        st.oauth.codes.insert(
            code.clone(),
            CodeGrant {
                client_id: v.client_id,
                user_id,
                redirect_uri: v.redirect_uri.clone(),
                scopes: v.scopes.clone(),
                expires_at: Instant::now() + cfg.code_lifetime,
                guild_id,
            },
        );
        code
    });
    drop(st);

    let Some(uri) = &v.redirect_uri else {
        return page(
            StatusCode::OK,
            "Discord Sandbox - Authorized",
            "<h1>Authorized</h1><p>You may now close this window.</p>",
        );
    };
    let guild_str = guild_id.map(|g| g.to_string());
    let perms_str = v.permissions.to_string();
    let mut q: Vec<(&str, &str)> = Vec::new();
    if let Some(c) = &code {
        q.push(("code", c));
    }
    if let Some(s) = &state_param {
        q.push(("state", s));
    }
    if let Some(g) = &guild_str {
        q.push(("guild_id", g));
        q.push(("permissions", &perms_str));
    }
    redirect(&append_query(uri, &q))
}

// ---------------------------------------------------------------------------
// Token endpoint
// ---------------------------------------------------------------------------

#[derive(Deserialize, Default)]
struct TokenForm {
    grant_type: Option<String>,
    code: Option<String>,
    redirect_uri: Option<String>,
    refresh_token: Option<String>,
    client_id: Option<String>,
    client_secret: Option<String>,
}

fn oauth_error(status: StatusCode, error: &str, description: &str) -> Response {
    json_response(
        status,
        &json!({ "error": error, "error_description": description }),
    )
}

fn invalid_request(description: &str) -> Response {
    oauth_error(StatusCode::BAD_REQUEST, "invalid_request", description)
}

fn invalid_grant(description: &str) -> Response {
    oauth_error(StatusCode::BAD_REQUEST, "invalid_grant", description)
}

fn basic_auth(headers: &HeaderMap) -> Option<(String, String)> {
    let raw = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let b64 = raw.strip_prefix("Basic ")?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (id, secret) = text.split_once(':')?;
    Some((id.to_owned(), secret.to_owned()))
}

/// Checks an application's credentials: HTTP Basic, or `client_id` and
/// `client_secret` in the form. `Ok` is the authenticated application's client
/// id, `Err` the refusal to answer with.
#[allow(clippy::result_large_err)]
fn authenticate_client(
    st: &State,
    headers: &HeaderMap,
    client_id: Option<String>,
    client_secret: Option<String>,
) -> Result<u64, Response> {
    let credentials =
        basic_auth(headers).or_else(|| Some((client_id?, client_secret.unwrap_or_default())));
    credentials
        .and_then(|(id, secret)| {
            st.apps
                .iter()
                .find(|a| id == a.client_id.to_string() && secret == a.client_secret)
        })
        .map(|a| a.client_id)
        .ok_or_else(|| {
            oauth_error(
                StatusCode::UNAUTHORIZED,
                "invalid_client",
                "Invalid client credentials",
            )
        })
}

/// `POST /api/v10/oauth2/token` (form-encoded only).
pub(crate) fn token_exchange(
    cfg: &SandboxConfig,
    st: &mut State,
    headers: &HeaderMap,
    body: &[u8],
) -> Response {
    // Like Discord, a non-form body is simply not understood: no grant_type.
    let form: TokenForm = if is_form(headers) {
        serde_urlencoded::from_bytes(body).unwrap_or_default()
    } else {
        TokenForm::default()
    };
    let grant_type = form.grant_type.clone().unwrap_or_default();
    if !matches!(
        grant_type.as_str(),
        "authorization_code" | "refresh_token" | "client_credentials"
    ) {
        let shown = form.grant_type.as_deref().unwrap_or("None");
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            &format!("Grant type {shown} is not supported"),
        );
    }

    let client_id = match authenticate_client(
        st,
        headers,
        form.client_id.clone(),
        form.client_secret.clone(),
    ) {
        Ok(c) => c,
        Err(resp) => return resp,
    };

    if grant_type == "client_credentials" {
        // A token for the application's owner, as Discord gives one; nothing else
        // of the sandbox accepts it.
        let token = crate::util::random_token(&mut st.rng, 30);
        return json_response(
            StatusCode::OK,
            &json!({
                "token_type": "Bearer",
                "access_token": token,
                "expires_in": 604_800,
                "scope": "identify",
            }),
        );
    }

    let (user_id, scopes, guild_id, authorization) = if grant_type == "authorization_code" {
        let Some(code) = form.code.as_deref() else {
            return invalid_request("Missing \"code\" in request.");
        };
        // A code issued for another application is unknown to this one (and stays
        // usable by its own application).
        let Some(needs_redirect) = st
            .oauth
            .codes
            .get(code)
            .filter(|c| c.client_id == client_id)
            .map(|c| c.redirect_uri.is_some())
        else {
            return invalid_grant("Invalid \"code\" in request.");
        };
        if needs_redirect && form.redirect_uri.is_none() {
            return invalid_request("Missing \"redirect_uri\" in request.");
        }
        // Codes are single-use: any exchange attempt consumes them.
        let Some(grant) = st.oauth.codes.remove(code) else {
            return invalid_grant("Invalid \"code\" in request.");
        };
        if Instant::now() >= grant.expires_at {
            return invalid_grant("Invalid \"code\" in request.");
        }
        if grant.redirect_uri.is_some() && grant.redirect_uri != form.redirect_uri {
            return invalid_grant("Invalid \"redirect_uri\" in request.");
        }
        (grant.user_id, grant.scopes, grant.guild_id, None)
    } else {
        let Some(refresh) = form.refresh_token.as_deref() else {
            return invalid_request("Missing \"refresh_token\" in request.");
        };
        // A refresh token of another application is unknown to this one.
        if st
            .oauth
            .refresh
            .get(refresh)
            .is_none_or(|g| g.client_id != client_id)
        {
            return invalid_grant("Invalid \"refresh_token\" in request.");
        }
        // Refresh tokens rotate: the presented one dies now.
        let Some(grant) = st.oauth.refresh.remove(refresh) else {
            return invalid_grant("Invalid \"refresh_token\" in request.");
        };
        (grant.user_id, grant.scopes, None, Some(grant.authorization))
    };

    let tokens = match authorization {
        Some(a) => st.issue_tokens_of(cfg, client_id, user_id, scopes, a),
        None => st.issue_tokens(cfg, client_id, user_id, scopes),
    };
    let mut body = json!({
        "token_type": "Bearer",
        "access_token": tokens.access_token,
        "expires_in": tokens.expires_in.as_secs(),
        "refresh_token": tokens.refresh_token,
        "scope": tokens.scope,
    });
    if let Some(guild) = guild_id.and_then(|g| st.world.guilds.get(&g)) {
        body["guild"] = guild.json();
    }
    json_response(StatusCode::OK, &body)
}

#[derive(Deserialize, Default)]
struct RevokeForm {
    token: Option<String>,
    /// `access_token` or `refresh_token`; like Discord, only a hint: either kind is
    /// found whatever it says.
    #[allow(dead_code)]
    token_type_hint: Option<String>,
    client_id: Option<String>,
    client_secret: Option<String>,
}

/// `POST /api/v10/oauth2/token/revoke` (form-encoded, with the application's
/// credentials): revokes the authorization the token belongs to, so its access and
/// refresh tokens stop working. 200 with an empty body, also for a token that is
/// unknown, already revoked or another application's (RFC 7009; nothing is revoked
/// then); 401 for bad client credentials.
pub(crate) fn token_revoke(st: &mut State, headers: &HeaderMap, body: &[u8]) -> Response {
    let form: RevokeForm = if is_form(headers) {
        serde_urlencoded::from_bytes(body).unwrap_or_default()
    } else {
        RevokeForm::default()
    };
    let client_id =
        match authenticate_client(st, headers, form.client_id.clone(), form.client_secret) {
            Ok(c) => c,
            Err(resp) => return resp,
        };
    let Some(token) = form.token.filter(|t| !t.is_empty()) else {
        return invalid_request("Missing \"token\" in request.");
    };
    st.revoke(client_id, &token);
    StatusCode::OK.into_response()
}
