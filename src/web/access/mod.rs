//! The customer's access page, reached from the signed, expiring link in every email
//! (`/access?t=…`, [`crate::grants::link::LinkBuilder::access_url`]): the customer's
//! grants with one business, in their language, with one action each where one applies.
//!
//! - *Connect* (pending) and *Reconnect* (Discord needs a new authorization): to
//!   Discord with the grant's link, renewed when it expired or for a reconnect.
//! - *Get my role back* (delivered) and *Try again* (their account was in too many
//!   servers): a sync of the grant now, through the same queue and Discord budget as
//!   every other sync.
//! - *Use another Discord account*: to Discord with a state that names the customer;
//!   back on the OAuth callback ([`switch_returned`]) the chosen account waits in
//!   `account_switches` while a page shows both accounts and asks to confirm; the
//!   confirmation moves the link and syncs every live grant.
//!
//! Every action is a form that posts the access token back; each costs Discord work,
//! so actions are limited per customer (`oauth.callback_attempts` per
//! `oauth.callback_window`) and per address (`oauth.address_attempts`) like the OAuth
//! callback. The pages are never cached.

// The error of every step is the page to show instead, built once per request: its
// size does not matter.
#![allow(clippy::result_large_err)]

pub mod page;
pub mod texts;

use axum::Form;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use chrono::Utc;
use serde::Deserialize;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use self::page::{Account, Item, Page, Role, State as GrantState};
use crate::crypto::StateError;
use crate::discord::DiscordError;
use crate::domain::GrantStatus;
use crate::grants::link::renew_link;
use crate::grants::link::{AccessToken, LinkBuilder, SWITCH_TTL_MINUTES, SwitchConfirm, Switching};
use crate::i18n::Lang;
use crate::store::access as db;
use crate::store::email as settings_db;
use crate::store::grants as grant_store;
use crate::store::history;
use crate::store::links::LinkRow;
use crate::web::AppState;
use crate::web::accounts::{
    AuthorizeFailure, Linked, authorize_failure, link_account, revoke_left_tokens,
};
use crate::web::limits::ClientIp;
use crate::web::pool::Caller;

/// The routes, documented in `/openapi.json` under the `customers` tag.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(show))
        .routes(routes!(connect))
        .routes(routes!(restore))
        .routes(routes!(switch))
        .routes(routes!(confirm))
}

/// A page in a language, answered with its status, never cached.
struct Shown {
    page: Page,
    lang: Lang,
}

impl Shown {
    fn status(&self) -> StatusCode {
        match self.page {
            Page::Expired => StatusCode::GONE,
            Page::Invalid => StatusCode::BAD_REQUEST,
            Page::TooMany => StatusCode::TOO_MANY_REQUESTS,
            Page::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Page::Refused { .. } => StatusCode::BAD_GATEWAY,
            _ => StatusCode::OK,
        }
    }
}

/// "Something went wrong on our side; try again" (503), in the reader's language: what
/// a page request refused before its handler answered gets (too slow, or too many at
/// once), whichever page it was for.
pub fn try_again_page(headers: &HeaderMap) -> Response {
    Shown {
        page: Page::Unavailable,
        lang: lang_of(headers, None),
    }
    .into_response()
}

impl IntoResponse for Shown {
    fn into_response(self) -> Response {
        let mut r = (self.status(), Html(self.page.html(self.lang))).into_response();
        let h = r.headers_mut();
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        h.insert(
            header::CONTENT_LANGUAGE,
            HeaderValue::from_static(self.lang.tag()),
        );
        // The page's links carry the access token: never send it on as a referrer.
        h.insert(
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        );
        if matches!(self.page, Page::TooMany) {
            h.insert(header::RETRY_AFTER, HeaderValue::from_static("60"));
        }
        r
    }
}

/// The reader's language (`Accept-Language`), else the business's, else English.
fn lang_of(headers: &HeaderMap, business_default: Option<&str>) -> Lang {
    headers
        .get(header::ACCEPT_LANGUAGE)
        .and_then(|v| v.to_str().ok())
        .and_then(Lang::negotiate)
        .or_else(|| business_default.and_then(Lang::parse))
        .unwrap_or_default()
}

fn invalid(lang: Lang) -> Shown {
    Shown {
        page: Page::Invalid,
        lang,
    }
}

fn failed(e: sqlx::Error, lang: Lang) -> Shown {
    tracing::error!(error = %e, "access page: database error");
    Shown {
        page: Page::Unavailable,
        lang,
    }
}

/// The customer an access token names, or the page that says why not.
fn verify(st: &AppState, token: &str, lang: Lang) -> Result<AccessToken, Shown> {
    st.links
        .verify_access(token, Utc::now())
        .map_err(|e| refused(e, lang))
}

/// The page of a signed value that does not verify.
fn refused(e: StateError, lang: Lang) -> Shown {
    Shown {
        page: match e {
            StateError::Expired => Page::Expired,
            StateError::Tampered => Page::Invalid,
        },
        lang,
    }
}

/// An action costs Discord work: limited per customer and per client address.
fn limit(
    st: &AppState,
    who: &AccessToken,
    ip: Option<std::net::IpAddr>,
    lang: Lang,
) -> Result<(), Shown> {
    let over = ip.is_some_and(|ip| st.limits.check_address(ip).is_err())
        || st
            .limits
            .check_link(&format!("access:{}:{}", who.b, who.c))
            .is_err();
    if over {
        tracing::info!(business_id = %who.b, "access page: too many actions");
        return Err(Shown {
            page: Page::TooMany,
            lang,
        });
    }
    Ok(())
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct ShowQuery {
    /// The signed access token of the customer's link.
    t: Option<String>,
    /// `restore`: say that the access asked back is on its way.
    done: Option<String>,
}

/// The customer's access page (HTML), in the reader's language.
#[utoipa::path(get, path = "/access", tag = "customers",
    params(ShowQuery),
    responses(
        (status = 200, description = "The customer's grants with this business and what they can do (HTML page)", content_type = "text/html"),
        (status = 400, description = "The link is incomplete or was altered (HTML page)", content_type = "text/html"),
        (status = 410, description = "The link expired (HTML page)", content_type = "text/html"),
        (status = 429, description = "Too many views of this page, or from this address (HTML page)", content_type = "text/html",
            headers(("Retry-After" = u64, description = "Seconds to wait"))),
        (status = 503, description = "The database could not be reached (HTML page)", content_type = "text/html"),
    ))]
async fn show(
    State(st): State<AppState>,
    ClientIp(ip): ClientIp,
    headers: HeaderMap,
    query: Result<Query<ShowQuery>, axum::extract::rejection::QueryRejection>,
) -> Shown {
    let lang = lang_of(&headers, None);
    let Some((token, done)) = query.ok().and_then(|Query(q)| q.t.map(|t| (t, q.done))) else {
        return invalid(lang);
    };
    match render(
        &st,
        &headers,
        ip,
        &token,
        done.as_deref() == Some("restore"),
    )
    .await
    {
        Ok(s) | Err(s) => s,
    }
}

async fn render(
    st: &AppState,
    headers: &HeaderMap,
    ip: Option<std::net::IpAddr>,
    token: &str,
    restored: bool,
) -> Result<Shown, Shown> {
    let lang = lang_of(headers, None);
    let who = verify(st, token, lang)?;
    // Each view costs reads on the pool every tenant shares: limited before them.
    if st
        .limits
        .check_page_view(&format!("{}:{}", who.b, who.c), ip)
        .is_err()
    {
        tracing::info!(business_id = %who.b, "access page: too many views");
        return Err(Shown {
            page: Page::TooMany,
            lang,
        });
    }
    let mut conn = st
        .pool
        .acquire(Caller::Business(&who.b))
        .await
        .map_err(|e| failed(e, lang))?;
    let settings = settings_db::settings(&mut conn, &who.b)
        .await
        .map_err(|e| failed(e, lang))?;
    let lang = lang_of(headers, Some(&settings.default_locale));
    let rows = db::grants(&mut conn, &who.b, &who.c, translation_locale(lang).as_str())
        .await
        .map_err(|e| failed(e, lang))?;
    let linked = db::linked_account(&mut conn, &who.b, &who.c)
        .await
        .map_err(|e| failed(e, lang))?;
    let reauthorize = linked.as_ref().is_some_and(|l| l.3);
    let account = linked.map(|(id, username, global_name, _)| Account {
        id,
        username,
        global_name,
    });
    let items = rows
        .into_iter()
        .map(|r| Item {
            state: GrantState::of(
                &r.status,
                r.error_code.as_deref(),
                r.revocation_reason.as_deref(),
            ),
            product: r.translated_name.unwrap_or(r.entitlement_name),
            server: r.guild_name.unwrap_or(r.guild_id),
            role: match (r.role_id, r.role_name) {
                (None, _) => Role::Membership,
                (Some(_), Some(name)) => Role::Named(name),
                (Some(_), None) => Role::Unnamed,
            },
            grant_id: r.id,
        })
        .collect();
    Ok(Shown {
        page: Page::Access {
            token: token.to_string(),
            account,
            reauthorize,
            items,
            restored,
        },
        lang,
    })
}

/// A form of an action on one grant.
#[derive(Deserialize, ToSchema)]
struct GrantForm {
    /// The access token.
    t: String,
    /// One of the customer's grants.
    grant: String,
}

/// The customer's grant a form names (never another customer's), live.
async fn grant_of(
    st: &AppState,
    who: &AccessToken,
    grant_id: &str,
    lang: Lang,
) -> Result<crate::domain::Grant, Shown> {
    let mut conn = st
        .pool
        .acquire(Caller::Business(&who.b))
        .await
        .map_err(|e| failed(e, lang))?;
    grant_store::get(&mut conn, grant_id)
        .await
        .map_err(|e| failed(e, lang))?
        .filter(|g| g.business_id == who.b && g.customer_id == who.c)
        .filter(|g| g.status != GrantStatus::Revoked)
        .ok_or(invalid(lang))
}

type FormResult<T> = Result<Form<T>, axum::extract::rejection::FormRejection>;

/// What an action on one grant starts with: its form, the customer the token names
/// (within the action limits), and their live grant the form names.
async fn action_on_grant(
    st: &AppState,
    ip: Option<std::net::IpAddr>,
    lang: Lang,
    form: FormResult<GrantForm>,
) -> Result<(GrantForm, crate::domain::Grant), Shown> {
    let Form(f) = form.map_err(|_| invalid(lang))?;
    let who = verify(st, &f.t, lang)?;
    limit(st, &who, ip, lang)?;
    let g = grant_of(st, &who, &f.grant, lang).await?;
    Ok((f, g))
}

/// *Connect* or *Reconnect*: to Discord with the grant's link. A pending grant's
/// expired link is renewed; a grant that needs a new authorization gets a new link.
#[utoipa::path(post, path = "/access/connect", tag = "customers",
    request_body(content = GrantForm, content_type = "application/x-www-form-urlencoded"),
    responses(
        (status = 303, description = "To Discord's authorization with the grant's link"),
        (status = 400, description = "The form is incomplete, altered, or names no live grant of the customer (HTML page)", content_type = "text/html"),
        (status = 410, description = "The link expired (HTML page)", content_type = "text/html"),
        (status = 429, description = "Too many actions (HTML page)", content_type = "text/html",
            headers(("Retry-After" = u64, description = "Seconds to wait"))),
        (status = 503, description = "The database could not be reached (HTML page)", content_type = "text/html"),
    ))]
async fn connect(
    State(st): State<AppState>,
    ClientIp(ip): ClientIp,
    headers: HeaderMap,
    form: FormResult<GrantForm>,
) -> Response {
    let lang = lang_of(&headers, None);
    let r = async {
        let (_, g) = action_on_grant(&st, ip, lang, form).await?;
        let now = Utc::now();
        let mut conn = st
            .pool
            .acquire(Caller::Business(&g.business_id))
            .await
            .map_err(|e| failed(e, lang))?;
        let g = if g.status == GrantStatus::Pending {
            renew_link(&mut conn, &st.links, &g, now).await
        } else {
            grant_store::set_nonce(
                &mut conn,
                &g.id,
                &LinkBuilder::new_nonce(),
                now + st.links.ttl,
                now,
            )
            .await
        }
        .map_err(|e| failed(e, lang))?;
        Ok::<_, Shown>(
            Redirect::to(
                &st.links
                    .url(&g.business_id, &g.id, &g.oauth_nonce, g.oauth_expires_at),
            )
            .into_response(),
        )
    }
    .await;
    r.unwrap_or_else(IntoResponse::into_response)
}

/// *Get my role back* / *Try again*: a sync of the grant, now.
#[utoipa::path(post, path = "/access/restore", tag = "customers",
    request_body(content = GrantForm, content_type = "application/x-www-form-urlencoded"),
    responses(
        (status = 303, description = "Back to the access page, which says the access is on its way"),
        (status = 400, description = "The form is incomplete, altered, or names no live grant of the customer (HTML page)", content_type = "text/html"),
        (status = 410, description = "The link expired (HTML page)", content_type = "text/html"),
        (status = 429, description = "Too many actions (HTML page)", content_type = "text/html",
            headers(("Retry-After" = u64, description = "Seconds to wait"))),
        (status = 503, description = "The database could not be reached (HTML page)", content_type = "text/html"),
    ))]
async fn restore(
    State(st): State<AppState>,
    ClientIp(ip): ClientIp,
    headers: HeaderMap,
    form: FormResult<GrantForm>,
) -> Response {
    let lang = lang_of(&headers, None);
    let r = async {
        let (f, g) = action_on_grant(&st, ip, lang, form).await?;
        let mut tx = st
            .pool
            .begin(Caller::Business(&g.business_id))
            .await
            .map_err(|e| failed(e, lang))?;
        crate::outbox::queue_sync(&mut tx, &g.id)
            .await
            .map_err(|e| failed(e, lang))?;
        history::record(
            &mut tx,
            &g.id,
            Utc::now(),
            "restore_requested",
            serde_json::json!({"by": "customer"}),
        )
        .await
        .map_err(|e| failed(e, lang))?;
        tx.commit().await.map_err(|e| failed(e, lang))?;
        tracing::info!(grant_id = %g.id, "customer asked for their access back");
        Ok::<_, Shown>(Redirect::to(&format!("/access?t={}&done=restore", f.t)).into_response())
    }
    .await;
    r.unwrap_or_else(IntoResponse::into_response)
}

#[derive(Deserialize, ToSchema)]
struct TokenForm {
    /// The access token.
    t: String,
}

/// *Use another Discord account*: to Discord, to choose one. Nothing changes until the
/// customer confirms on the page they come back to.
#[utoipa::path(post, path = "/access/switch", tag = "customers",
    request_body(content = TokenForm, content_type = "application/x-www-form-urlencoded"),
    responses(
        (status = 303, description = "To Discord's authorization, to choose an account"),
        (status = 400, description = "The form is incomplete or altered (HTML page)", content_type = "text/html"),
        (status = 410, description = "The link expired (HTML page)", content_type = "text/html"),
        (status = 429, description = "Too many actions (HTML page)", content_type = "text/html",
            headers(("Retry-After" = u64, description = "Seconds to wait"))),
    ))]
async fn switch(
    State(st): State<AppState>,
    ClientIp(ip): ClientIp,
    headers: HeaderMap,
    form: FormResult<TokenForm>,
) -> Response {
    let lang = lang_of(&headers, None);
    let r = (|| {
        let Form(f) = form.map_err(|_| invalid(lang))?;
        let (who, until) = st
            .links
            .verify_access_until(&f.t, Utc::now())
            .map_err(|e| refused(e, lang))?;
        limit(&st, &who, ip, lang)?;
        let switching = Switching {
            b: who.b,
            c: who.c,
            x: Some(until),
        };
        Ok::<_, Shown>(Redirect::to(&st.links.switch_url(&switching, Utc::now())).into_response())
    })();
    r.unwrap_or_else(IntoResponse::into_response)
}

/// Back from Discord with the account the customer chose to switch to: shows both
/// accounts and asks to confirm (or says it is the same account). Nothing changes yet.
pub async fn switch_returned(
    st: &AppState,
    headers: &HeaderMap,
    switching: Switching,
    code: Option<String>,
    error: Option<String>,
) -> Response {
    let lang = lang_of(headers, None);
    let back = st
        .links
        .access_url_back(&switching.b, &switching.c, switching.x, Utc::now());
    let until = switching.x;
    let who = AccessToken {
        b: switching.b,
        c: switching.c,
    };
    if error.is_some() {
        // Cancelled on Discord: nothing to confirm; back to the page.
        return Redirect::to(&back).into_response();
    }
    let r = async {
        let Some(code) = code.filter(|c| !c.is_empty()) else {
            return Err(invalid(lang));
        };
        limit(st, &who, None, lang)?;
        let chosen = chosen_account(st, &who, &code, &back, lang).await?;
        pend_switch(st, &who, until, chosen, back, lang).await
    }
    .await;
    match r {
        Ok(s) | Err(s) => s.into_response(),
    }
}

/// The account a customer authorized on Discord, with its tokens sealed for their link.
struct Chosen {
    user: crate::discord::client::User,
    row: LinkRow,
}

impl Chosen {
    /// The account as the pages show it.
    fn account(&self) -> Account {
        Account {
            id: self.user.id.to_string(),
            username: Some(self.user.username.clone()),
            global_name: self.user.global_name.clone(),
        }
    }
}

/// Exchanges the authorization `code` with the business's bot and reads whose it is; a
/// code Discord refuses shows the page that leads `back` to choose again.
async fn chosen_account(
    st: &AppState,
    who: &AccessToken,
    code: &str,
    back: &str,
    lang: Lang,
) -> Result<Chosen, Shown> {
    let unavailable = || Shown {
        page: Page::Unavailable,
        lang,
    };
    let bot = st.bots.of_business(&who.b).await.map_err(|e| {
        tracing::error!(error = %e, "account switch: the business's bot cannot be used");
        unavailable()
    })?;
    let asked = async {
        let tokens = bot
            .side
            .exchange_code(code, st.links.redirect_uri())
            .await?;
        let user = bot.side.user(&tokens.access_token).await?;
        Ok::<_, DiscordError>((tokens, user))
    };
    let (tokens, user) = asked.await.map_err(|e| discord_refused(e, back, lang))?;
    let row =
        super::accounts::authorized_row(st, &bot, (&who.b, &who.c), &user, &tokens, Utc::now());
    Ok(Chosen { user, row })
}

/// The page for a Discord error on the way back from a switch.
fn discord_refused(e: DiscordError, back: &str, lang: Lang) -> Shown {
    let page = match authorize_failure(&e, "account switch") {
        // The same address cannot succeed, choosing the account again can.
        AuthorizeFailure::Refused => Page::Refused {
            back: back.to_string(),
        },
        AuthorizeFailure::Busy | AuthorizeFailure::Unavailable => Page::Unavailable,
    };
    Shown { page, lang }
}

/// What the chosen account means for the customer's link: with nothing linked, or the
/// same account authorized again (a reconnect), it is stored at once and every live
/// grant synced; another account is kept as a pending switch for them to confirm.
async fn pend_switch(
    st: &AppState,
    who: &AccessToken,
    until: Option<i64>,
    chosen: Chosen,
    back: String,
    lang: Lang,
) -> Result<Shown, Shown> {
    let now = Utc::now();
    let mut tx = st
        .pool
        .begin(Caller::Business(&who.b))
        .await
        .map_err(|e| failed(e, lang))?;
    // Decided under the customer's lock: a callback linking another account meanwhile
    // is seen, and asks for a confirmation, rather than replaced without one.
    crate::store::links::lock_customer(&mut tx, &who.b, &who.c)
        .await
        .map_err(|e| failed(e, lang))?;
    let current = db::linked_account(&mut tx, &who.b, &who.c)
        .await
        .map_err(|e| failed(e, lang))?
        .map(|(id, username, global_name, _)| Account {
            id,
            username,
            global_name,
        });
    let account = chosen.account();
    let now_account = match current {
        Some(a) if a.id != account.id => a,
        other => {
            let user = &chosen.user;
            let names = (user.username.as_str(), user.global_name.as_deref());
            let Linked { previous, .. } = link_account(&mut tx, &chosen.row, names, None, now)
                .await
                .map_err(|e| failed(e, lang))?;
            tx.commit().await.map_err(|e| failed(e, lang))?;
            // None under the lock (the same account, or none); revoked if ever there.
            if let Some(old) = previous {
                revoke_left_tokens(st, old, &who.c).await;
            }
            let page = match other {
                Some(_) => Page::Same { account, back },
                None => Page::Switched { account, back },
            };
            return Ok(Shown { page, lang });
        }
    };
    let row = chosen.row;
    let pending = db::Switch {
        id: crate::domain::ids::mint("asw"),
        business_id: who.b.clone(),
        customer_id: who.c.clone(),
        discord_user_id: account.id.clone(),
        username: chosen.user.username,
        global_name: chosen.user.global_name,
        access_token_enc: row.access_token_enc,
        refresh_token_enc: row.refresh_token_enc,
        token_key_id: row.token_key_id.unwrap_or_default(),
        token_expires_at: row.expires_at,
        scopes: row.scopes,
        expires_at: now + chrono::Duration::minutes(SWITCH_TTL_MINUTES),
        client_id: row.client_id,
    };
    db::save_switch(&mut tx, &pending)
        .await
        .map_err(|e| failed(e, lang))?;
    tx.commit().await.map_err(|e| failed(e, lang))?;
    let confirmation = st.links.sign_confirm(
        &SwitchConfirm {
            b: who.b.clone(),
            c: who.c.clone(),
            p: pending.id,
            x: until,
        },
        now,
    );
    Ok(Shown {
        page: Page::Confirm {
            now: now_account,
            new: account,
            confirmation,
            back,
        },
        lang,
    })
}

#[derive(Deserialize, ToSchema)]
struct ConfirmForm {
    /// The signed confirmation of the pending switch.
    s: String,
}

/// The customer confirmed the switch: the link moves to the chosen account and every
/// live grant follows it.
#[utoipa::path(post, path = "/access/switch/confirm", tag = "customers",
    request_body(content = ConfirmForm, content_type = "application/x-www-form-urlencoded"),
    responses(
        (status = 200, description = "Switched (HTML page)", content_type = "text/html"),
        (status = 400, description = "The form is incomplete or altered (HTML page)", content_type = "text/html"),
        (status = 410, description = "The confirmation expired or was used (HTML page)", content_type = "text/html"),
        (status = 429, description = "Too many actions (HTML page)", content_type = "text/html",
            headers(("Retry-After" = u64, description = "Seconds to wait"))),
        (status = 503, description = "The database could not be reached (HTML page)", content_type = "text/html"),
    ))]
async fn confirm(
    State(st): State<AppState>,
    ClientIp(ip): ClientIp,
    headers: HeaderMap,
    form: FormResult<ConfirmForm>,
) -> Response {
    let lang = lang_of(&headers, None);
    let r = async {
        let Form(f) = form.map_err(|_| invalid(lang))?;
        let now = Utc::now();
        let c = st
            .links
            .verify_confirm(&f.s, now)
            .map_err(|e| refused(e, lang))?;
        let who = AccessToken {
            b: c.b.clone(),
            c: c.c.clone(),
        };
        limit(&st, &who, ip, lang)?;
        let mut tx = st.pool.begin(Caller::Business(&who.b)).await.map_err(|e| failed(e, lang))?;
        // Taken once: a second confirm (a double click, a replay) finds nothing.
        let Some(p) = db::take_switch(&mut tx, &c.p, &c.b, &c.c, now)
            .await
            .map_err(|e| failed(e, lang))?
        else {
            return Err(Shown {
                page: Page::Expired,
                lang,
            });
        };
        let row = LinkRow {
            business_id: p.business_id.clone(),
            customer_id: p.customer_id.clone(),
            discord_user_id: p.discord_user_id.clone(),
            access_token_enc: p.access_token_enc,
            refresh_token_enc: p.refresh_token_enc,
            expires_at: p.token_expires_at,
            scopes: p.scopes,
            token_version: 0,
            token_key_id: Some(p.token_key_id),
            client_id: p.client_id,
        };
        let Linked { previous, .. } =
            link_account(&mut tx, &row, (&p.username, p.global_name.as_deref()), None, now)
                .await
                .map_err(|e| failed(e, lang))?;
        tx.commit().await.map_err(|e| failed(e, lang))?;
        if let Some(old) = previous {
            revoke_left_tokens(&st, old, &c.c).await;
        }
        tracing::info!(business_id = %c.b, discord_user_id = %p.discord_user_id, "customer switched Discord account");
        Ok::<_, Shown>(Shown {
            page: Page::Switched {
                account: Account {
                    id: p.discord_user_id,
                    username: Some(p.username),
                    global_name: p.global_name,
                },
                back: st.links.access_url_back(&c.b, &c.c, c.x, now),
            },
            lang,
        })
    }
    .await;
    match r {
        Ok(s) | Err(s) => s.into_response(),
    }
}

/// The platform's locale code of the merchant's translations for a customer's language.
fn translation_locale(lang: Lang) -> crate::web::api::translations::Locale {
    use crate::web::api::translations::Locale;
    match lang {
        Lang::En => Locale::En,
        Lang::De => Locale::De,
        Lang::Fr => Locale::Fr,
        Lang::Es => Locale::Es,
        Lang::PtBr => Locale::Pt,
        Lang::Ja => Locale::Ja,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_refused_code_sends_the_customer_back_to_choose_again() {
        let back = "https://gg.example/access?t=a\"b";
        let shown = discord_refused(DiscordError::BadUserToken, back, Lang::default());
        assert_eq!(shown.status(), StatusCode::BAD_GATEWAY);
        assert!(
            matches!(&shown.page, Page::Refused { back: b } if b == back),
            "{:?}",
            shown.page
        );
        let html = shown.page.html(Lang::default());
        assert!(html.contains("access?t=a&quot;b"), "escaped: {html}");
        for e in [
            DiscordError::Unexpected {
                status: 401,
                code: None,
                message: "invalid_client".into(),
            },
            DiscordError::Retriable("502".into()),
            DiscordError::Busy {
                waited: std::time::Duration::from_secs(1),
            },
        ] {
            let shown = discord_refused(e, back, Lang::default());
            assert_eq!(shown.status(), StatusCode::SERVICE_UNAVAILABLE);
        }
    }
}
