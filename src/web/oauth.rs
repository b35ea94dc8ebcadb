//! The customer's OAuth callback, `GET /oauth/discord/callback`, and the renewal of a
//! pending grant's expired link.
//!
//! The callback verifies the signed `state` (grant id + link nonce, expiring with the
//! grant's `oauth_expires_at`), exchanges the code, reads the Discord user, stores the
//! customer's link with tokens encrypted at rest, gives the grant a new link nonce (so
//! the used link cannot be replayed), queues a sync of every live grant of the customer
//! (a different account moves their access: each grant records what it applied, and its
//! sync removes that from the old account) and shows a small self-contained page.
//!
//! Every attempt costs Discord requests from the side budget that every customer's
//! sign-in and every merchant's validation share, so attempts are limited per link
//! (`oauth.callback_attempts`) and per client address (`oauth.address_attempts`) before
//! anything is asked of the database or Discord; over either limit the page says when
//! to try again (429, `Retry-After`).

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use chrono::Utc;
use serde::Deserialize;
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::accounts::{
    AuthorizeFailure, Linked, authorize_failure, authorized_row, link_account, revoke_left_tokens,
};
use super::limits::ClientIp;
use super::pool::Caller;
use crate::crypto::StateError;
use crate::discord::DiscordError;
use crate::domain::Snowflake;
use crate::domain::{Grant, GrantStatus};
use crate::grants::link::{GrantState, LinkBuilder};
use crate::store::links::LinkRow;
use crate::store::{entitlements, grants as grant_store, guilds};

/// The route, documented in `/openapi.json` under the `customers` tag.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(callback))
}

/// What Discord appends to the redirect: the code and the state on consent, `error`
/// (and the state) when the customer cancelled.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct CallbackQuery {
    /// The authorization code to exchange for the customer's token.
    code: Option<String>,
    /// The signed state of the grant's link (`oauth_url`).
    state: Option<String>,
    /// Set by Discord when the customer cancelled (`access_denied`).
    error: Option<String>,
}

/// Every page the callback can show.
#[derive(Debug, PartialEq)]
enum Page {
    Connected {
        guild_name: String,
        guild_id: String,
        /// The Discord account linked now, as its owner knows it.
        account: String,
        /// The customer had linked another account before: access moved from it.
        switched: bool,
        /// Another customer of the same business (another checkout) has this account
        /// linked too: both keep their access.
        shared: bool,
    },
    Denied {
        retry_url: Option<String>,
    },
    Expired,
    Tampered,
    Used,
    Revoked,
    DiscordFailed,
    Unavailable,
    /// Too many attempts with this link or from this address; try again after this.
    TooMany {
        retry_after: std::time::Duration,
    },
    /// Too many requests wait for Discord in this process; nothing was sent.
    Busy,
}

/// The pages' words, in every language.
use super::callback_texts as texts;

use crate::i18n::{Lang, escape_html as escape};

impl Page {
    fn status(&self) -> StatusCode {
        match self {
            Page::Connected { .. } | Page::Denied { .. } => StatusCode::OK,
            Page::Expired => StatusCode::GONE,
            Page::Tampered => StatusCode::BAD_REQUEST,
            Page::Used => StatusCode::CONFLICT,
            Page::Revoked => StatusCode::GONE,
            Page::DiscordFailed => StatusCode::BAD_GATEWAY,
            Page::Unavailable | Page::Busy => StatusCode::SERVICE_UNAVAILABLE,
            Page::TooMany { .. } => StatusCode::TOO_MANY_REQUESTS,
        }
    }

    fn html(&self, lang: Lang) -> String {
        let text = texts::of(lang);
        let (title, body) = match self {
            Page::Connected {
                guild_name,
                guild_id,
                account,
                switched,
                shared,
            } => (
                text.connected_title,
                format!(
                    "<p>{}</p>{}{}<p><a class=\"button\" href=\"https://discord.com/channels/{}\">{}</a></p>",
                    text.connected
                        .replace("{account}", &escape(account))
                        .replace("{guild}", &escape(guild_name)),
                    if *switched {
                        format!("<p class=\"switched\">{}</p>", text.switched)
                    } else {
                        String::new()
                    },
                    if *shared {
                        format!("<p class=\"shared\">{}</p>", text.shared)
                    } else {
                        String::new()
                    },
                    escape(guild_id),
                    text.open_server
                ),
            ),
            Page::Denied { retry_url } => (
                text.denied_title,
                match retry_url {
                    Some(u) => format!(
                        "<p>{}</p><p><a class=\"button\" href=\"{}\">{}</a></p>",
                        text.denied,
                        escape(u),
                        text.try_again
                    ),
                    None => format!("<p>{}</p>", text.denied),
                },
            ),
            Page::Expired => (text.expired_title, format!("<p>{}</p>", text.expired)),
            Page::Tampered => (text.tampered_title, format!("<p>{}</p>", text.tampered)),
            Page::Used => (text.used_title, format!("<p>{}</p>", text.used)),
            Page::Revoked => (text.revoked_title, format!("<p>{}</p>", text.revoked)),
            Page::DiscordFailed => (text.discord_title, format!("<p>{}</p>", text.discord)),
            Page::Unavailable => (
                text.unavailable_title,
                format!("<p>{}</p>", text.unavailable),
            ),
            Page::TooMany { .. } => (text.too_many_title, format!("<p>{}</p>", text.too_many)),
            Page::Busy => (text.busy_title, format!("<p>{}</p>", text.busy)),
        };
        format!(
            "<!doctype html><html lang=\"{lang}\"><head><meta charset=\"utf-8\">\
<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{title}</title>\
<style>body{{font-family:system-ui,sans-serif;background:#f2f3f5;color:#2e3338;display:flex;justify-content:center;padding:4rem 1rem}}\
main{{background:#fff;border-radius:8px;padding:2rem;max-width:28rem;box-shadow:0 2px 10px rgba(0,0,0,.1)}}\
h1{{font-size:1.4rem;margin-top:0}}.button{{display:inline-block;background:#5865f2;color:#fff;padding:.6rem 1.2rem;border-radius:4px;text-decoration:none}}</style>\
</head><body><main><h1>{title}</h1>{body}</main></body></html>",
            lang = lang.tag(),
        )
    }
}

impl Page {
    /// The page in `lang`, with its status; never cached.
    fn respond(self, lang: Lang) -> Response {
        let retry_after = match &self {
            Page::TooMany { retry_after } => Some(crate::web::error::retry_secs(*retry_after)),
            Page::Busy => Some(5),
            _ => None,
        };
        let mut r = (self.status(), Html(self.html(lang))).into_response();
        r.headers_mut().insert(
            axum::http::header::CONTENT_LANGUAGE,
            axum::http::HeaderValue::from_static(lang.tag()),
        );
        if let Some(secs) = retry_after {
            r.headers_mut()
                .insert(axum::http::header::RETRY_AFTER, secs.into());
        }
        // The page is about one customer's link: never cache it.
        r.headers_mut().insert(
            axum::http::header::CACHE_CONTROL,
            axum::http::HeaderValue::from_static("no-store"),
        );
        r
    }
}

/// Where Discord sends the customer's browser after they authorize (the redirect of a
/// grant's `oauth_url`). Shows a self-contained HTML page in every case; never cached.
#[utoipa::path(get, path = "/oauth/discord/callback", tag = "customers",
    params(CallbackQuery),
    responses(
        (status = 200, description = "Connected, or cancelled on Discord with a link to try again (HTML page)", content_type = "text/html"),
        (status = 400, description = "The link is incomplete or was altered (HTML page)", content_type = "text/html"),
        (status = 409, description = "The link was already used (HTML page)", content_type = "text/html"),
        (status = 410, description = "The link expired, or the access it was for has ended (HTML page)", content_type = "text/html"),
        (status = 429, description = "Too many attempts with this link or from this address (HTML page)", content_type = "text/html",
            headers(("Retry-After" = u64, description = "Seconds to wait before trying again"))),
        (status = 502, description = "Discord did not accept the authorization (HTML page)", content_type = "text/html"),
        (status = 503, description = "The database or Discord could not be reached, or Discord is busy (HTML page; `Retry-After` when busy)", content_type = "text/html"),
    ))]
async fn callback(
    State(st): State<AppState>,
    ClientIp(client): ClientIp,
    headers: axum::http::HeaderMap,
    query: Result<Query<CallbackQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let lang = headers
        .get(axum::http::header::ACCEPT_LANGUAGE)
        .and_then(|v| v.to_str().ok())
        .and_then(Lang::negotiate)
        .unwrap_or_default();
    // A query that does not parse (a parameter given twice) is an altered link.
    let Ok(Query(q)) = query else {
        return Page::Tampered.respond(lang);
    };
    if let Some(ip) = client
        && let Err(retry_after) = st.limits.check_address(ip)
    {
        tracing::info!(%ip, "OAuth callback: too many attempts from one address");
        return Page::TooMany { retry_after }.respond(lang);
    }
    // A customer choosing another account from their access page comes back here too
    // (Discord knows one redirect): its state names the customer, not a grant.
    // One that took longer than a switch may is expired, not altered.
    match q
        .state
        .as_deref()
        .map(|s| st.links.verify_switch(s, Utc::now()))
    {
        Some(Ok(who)) => {
            return crate::web::access::switch_returned(&st, &headers, who, q.code, q.error).await;
        }
        Some(Err(StateError::Expired)) => return Page::Expired.respond(lang),
        Some(Err(StateError::Tampered)) | None => {}
    }
    match handle(&st, q, client).await {
        Ok(p) | Err(p) => p.respond(lang),
    }
}

fn db_failed(e: sqlx::Error) -> Page {
    tracing::error!(error = %e, "OAuth callback: database error");
    Page::Unavailable
}

fn discord_failed(e: DiscordError) -> Page {
    match authorize_failure(&e, "OAuth callback") {
        AuthorizeFailure::Refused => Page::DiscordFailed,
        AuthorizeFailure::Busy => Page::Busy,
        AuthorizeFailure::Unavailable => Page::Unavailable,
    }
}

async fn handle(
    st: &AppState,
    q: CallbackQuery,
    client: Option<std::net::IpAddr>,
) -> Result<Page, Page> {
    let now = Utc::now();
    let (claims, grant) = grant_of_link(st, &q, client, now).await?;
    let code = q
        .code
        .as_deref()
        .filter(|c| !c.is_empty())
        .ok_or(Page::Tampered)?;
    // The business's own application, if it has one: the link was made for it.
    let bot = st.bots.of_business(&grant.business_id).await.map_err(|e| {
        tracing::error!(error = %e, "OAuth callback: the business's bot cannot be used");
        Page::Unavailable
    })?;
    let tokens = bot
        .side
        .exchange_code(code, st.links.redirect_uri())
        .await
        .map_err(discord_failed)?;
    let user = bot
        .side
        .user(&tokens.access_token)
        .await
        .map_err(discord_failed)?;
    let Recorded {
        guild_id,
        known_name,
        previous,
        shared,
    } = record_link(st, &claims.n, &grant, &bot, &tokens, &user, now).await?;
    let switched = previous.is_some();
    if let Some(old) = previous {
        revoke_left_tokens(st, old, &grant.customer_id).await;
    }
    tracing::info!(grant_id = %grant.id, discord_user_id = %user.id, "customer linked a Discord account");
    // The server's name is a courtesy: if Discord does not answer, show the id.
    let guild_name = match (known_name, Snowflake::parse(&guild_id)) {
        (Some(name), _) => name,
        (None, Some(g)) => bot
            .side
            .guild(g)
            .await
            .map(|g| g.name)
            .unwrap_or_else(|_| "the server".into()),
        (None, None) => "the server".into(),
    };
    Ok(Page::Connected {
        guild_name,
        guild_id,
        account: user
            .global_name
            .clone()
            .unwrap_or_else(|| user.username.clone()),
        switched,
        shared,
    })
}

/// The grant a callback's link names, checked: signed, within its per-link limit, for a
/// grant that exists, is not revoked and still has this link (nonce). A link the customer
/// cancelled on Discord is offered again.
async fn grant_of_link(
    st: &AppState,
    q: &CallbackQuery,
    client: Option<std::net::IpAddr>,
    now: chrono::DateTime<Utc>,
) -> Result<(GrantState, Grant), Page> {
    let state = q.state.as_deref().ok_or(Page::Tampered)?;
    let claims = st.links.verify(state, now).map_err(|e| match e {
        StateError::Tampered => Page::Tampered,
        StateError::Expired => Page::Expired,
    })?;
    // Per link: one link's attempts, junk codes or not, cannot use up the side budget.
    st.limits
        .check_link(&format!("{}:{}", claims.g, claims.n))
        .map_err(|retry_after| {
            tracing::info!(grant_id = %claims.g, "OAuth callback: too many attempts with one link");
            Page::TooMany { retry_after }
        })?;
    let grant = {
        // The grant names its business only once read: its client's network's turn.
        let mut conn = st
            .pool
            .acquire(Caller::Address(client))
            .await
            .map_err(db_failed)?;
        grant_store::get(&mut conn, &claims.g)
            .await
            .map_err(db_failed)?
            // A validly signed state for a grant we do not have: another database.
            .ok_or(Page::Tampered)?
    };
    if grant.status == GrantStatus::Revoked {
        return Err(Page::Revoked);
    }
    if grant.oauth_nonce != claims.n {
        return Err(Page::Used);
    }
    if q.error.is_some() {
        // The link was not used: offer it again.
        return Err(Page::Denied {
            retry_url: Some(st.links.url(
                &grant.business_id,
                &grant.id,
                &grant.oauth_nonce,
                grant.oauth_expires_at,
            )),
        });
    }
    Ok((claims, grant))
}

/// What recording a link did.
struct Recorded {
    guild_id: String,
    /// The server's name when the merchant connected it.
    known_name: Option<String>,
    /// The account the customer had linked before, when it was another one.
    previous: Option<LinkRow>,
    /// Another customer of the business has this account linked too.
    shared: bool,
}

/// Links the authorized account to the grant's customer, in one transaction with the
/// grant locked and its nonce checked again (of two callbacks racing with one link,
/// exactly one wins), and spends the link.
async fn record_link(
    st: &AppState,
    nonce: &str,
    of: &Grant,
    bot: &crate::discord::Bot,
    tokens: &crate::discord::client::TokenSet,
    user: &crate::discord::client::User,
    now: chrono::DateTime<Utc>,
) -> Result<Recorded, Page> {
    let mut tx = st
        .pool
        .begin(Caller::Business(&of.business_id))
        .await
        .map_err(db_failed)?;
    // The customer's lock before their grant's: another callback of theirs waits here,
    // not holding its grant, so this one's link spends that grant's link too.
    crate::store::links::lock_customer(&mut tx, &of.business_id, &of.customer_id)
        .await
        .map_err(db_failed)?;
    // Locked, and the nonce checked again: of two callbacks racing with one link,
    // exactly one wins.
    let grant = grant_store::get_for_update(&mut tx, &of.id)
        .await
        .map_err(db_failed)?
        .ok_or(Page::Tampered)?;
    if grant.status == GrantStatus::Revoked {
        return Err(Page::Revoked);
    }
    if grant.oauth_nonce != nonce {
        return Err(Page::Used);
    }
    let row = authorized_row(
        st,
        bot,
        (&grant.business_id, &grant.customer_id),
        user,
        tokens,
        now,
    );
    grant_store::set_nonce(
        &mut tx,
        &grant.id,
        &LinkBuilder::new_nonce(),
        now + st.links.ttl,
        now,
    )
    .await
    .map_err(db_failed)?;
    let names = (user.username.as_str(), user.global_name.as_deref());
    let Linked { previous, shared } = link_account(&mut tx, &row, names, Some(&grant.id), now)
        .await
        .map_err(db_failed)?;
    let ent = entitlements::entitlement(&mut tx, &grant.entitlement_id)
        .await
        .map_err(db_failed)?;
    let guild_id = ent.map(|e| e.guild_id).unwrap_or_default();
    // The name the server had when the merchant connected it: asking Discord would
    // cost every customer's sign-in a third request of the shared side budget.
    let known_name = guilds::guild_name(&mut tx, &grant.business_id, &guild_id)
        .await
        .map_err(db_failed)?;
    tx.commit().await.map_err(db_failed)?;
    Ok(Recorded {
        guild_id,
        known_name,
        previous,
        shared,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_refused_code_asks_the_customer_to_authorize_again() {
        assert_eq!(
            discord_failed(DiscordError::BadUserToken),
            Page::DiscordFailed
        );
        let secret_reset = DiscordError::Unexpected {
            status: 401,
            code: None,
            message: "invalid_client".into(),
        };
        assert_eq!(discord_failed(secret_reset), Page::Unavailable);
        let busy = DiscordError::Busy {
            waited: std::time::Duration::from_secs(1),
        };
        assert_eq!(discord_failed(busy), Page::Busy);
    }

    #[test]
    fn pages_escape_and_link_the_server() {
        let p = Page::Connected {
            guild_name: "<Acme & co>".into(),
            guild_id: "123".into(),
            account: "una<script>".into(),
            switched: false,
            shared: false,
        };
        let text = texts::of(Lang::En);
        let h = p.html(Lang::En);
        assert!(h.contains("&lt;Acme &amp; co&gt;"), "{h}");
        assert!(h.contains("<b>una&lt;script&gt;</b>"), "{h}");
        assert!(!h.contains(text.switched) && !h.contains(text.shared));
        let h = Page::Connected {
            guild_name: "Acme".into(),
            guild_id: "123".into(),
            account: "una".into(),
            switched: true,
            shared: true,
        }
        .html(Lang::Fr);
        let fr = texts::of(Lang::Fr);
        assert!(h.contains(fr.switched) && h.contains(fr.shared), "{h}");
        assert!(h.contains("<html lang=\"fr\">"), "{h}");
        assert!(h.contains("https://discord.com/channels/123"));
        assert_eq!(Page::Expired.status(), StatusCode::GONE);
        assert_eq!(Page::Tampered.status(), StatusCode::BAD_REQUEST);
    }
}
