//! The customer's journey in a real headless Chromium: the grant's link, the sandbox
//! Discord's consent page, guildgate's result page. Real RabbitMQ and PostgreSQL, the
//! sandbox Discord in-process, Chromium through chromedriver (`common/browser.rs`).
//!
//! Each page is saved as a PNG under `<target>/browser-screenshots/`;
//! `scripts/refresh-screenshots` copies them to `docs/screenshots/` for the docs.
//! Without Chromium these tests fail (they never skip): `.ci/run` installs it.

use crate::common;
use crate::discord_world;
use crate::webdriver as browser;

use browser::{Browser, ENTER, screenshot_dir};
use common::events::*;
use discord_world::World;

const T0: &str = "2026-05-01T10:31:00Z";
const T1: &str = "2026-05-01T11:00:00Z";

/// A phone-sized window, so the screenshots show what most customers see.
const PHONE: (u32, u32) = (412, 780);

/// The link, as a browser logged in to Discord as `user` opens it (the sandbox's
/// `login` parameter preselects the account).
fn as_user(url: &str, user: u64) -> String {
    let mut u = url::Url::parse(url).unwrap();
    u.query_pairs_mut().append_pair("login", &user.to_string());
    u.into()
}

/// `url` with one character in the middle of its `state` changed.
fn tamper(url: &str) -> String {
    let mut u = url::Url::parse(url).unwrap();
    let pairs: Vec<(String, String)> = u.query_pairs().into_owned().collect();
    u.query_pairs_mut().clear();
    for (k, v) in pairs {
        let v = if k == "state" {
            let mut chars: Vec<char> = v.chars().collect();
            let i = (chars.len() / 3..chars.len())
                .find(|&i| chars[i].is_ascii_alphanumeric())
                .expect("a state with letters");
            chars[i] = if chars[i] == 'A' { 'B' } else { 'A' };
            chars.into_iter().collect()
        } else {
            v
        };
        u.query_pairs_mut().append_pair(&k, &v);
    }
    u.into()
}

/// Opens `url` (a grant's link) on the consent page, saves a screenshot of it as
/// `consent_shot` if given, presses `button` and waits for guildgate's page.
async fn consent(b: &Browser, url: &str, button: &str, consent_shot: Option<&str>) {
    b.goto(url).await;
    b.wait_url("/oauth2/authorize").await;
    if let Some(name) = consent_shot {
        b.screenshot(&screenshot_dir().join(format!("{name}.png")))
            .await;
    }
    let btn = b.find(&format!("button[value={button}]")).await;
    b.click(&btn).await;
    b.wait_url("/oauth/discord/callback").await;
}

/// Checks what every result page must be, saves its screenshot as `name`, and returns
/// its heading.
async fn result_page(b: &Browser, name: &str) -> String {
    b.screenshot(&screenshot_dir().join(format!("{name}.png")))
        .await;
    let src = b.source().await;
    assert!(src.contains("<html lang=\"en\""), "{src}");
    assert!(src.contains("name=\"viewport\""), "{src}");
    // Self-contained: nothing loaded from elsewhere.
    for external in ["<link", "<script", "<img", "src=", "@import", "url("] {
        assert!(!src.contains(external), "{external} in {src}");
    }
    assert_eq!(b.find_all("main").await.len(), 1, "{src}");
    let h1 = b.text(&b.find("main h1").await).await;
    assert_eq!(b.title().await, h1, "the title is the heading");
    // Legible on a phone: nothing wider than the window.
    let overflow = b
        .execute("return document.documentElement.scrollWidth > window.innerWidth")
        .await;
    assert_eq!(
        overflow,
        serde_json::json!(false),
        "{name} scrolls sideways"
    );
    h1
}

async fn main_text(b: &Browser) -> String {
    b.text(&b.find("main").await).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn customer_authorizes_in_the_browser_and_gets_the_role() {
    let started = std::time::Instant::now();
    let b = Browser::start().await;
    b.set_window_size(PHONE.0, PHONE.1).await;
    let w = World::start().await;
    let g = w.guild("Acme Community");
    let role = g.role("Patrons");
    let alice = w.user("alice");
    let biz = w.app.business();
    w.app
        .entitlement_for("pdt_a", &g.guild_id.to_string(), Some(&role.to_string()))
        .await;
    w.app
        .publish(&payment(&biz, "pay_1", "cus_1", &["pdt_a"], T0), "evt_1")
        .await;
    let grant = w.grant_of("cus_1").await;
    assert_eq!(grant.status, "Pending");

    consent(
        &b,
        &as_user(&w.oauth_url(&grant), alice),
        "authorize",
        Some("consent"),
    )
    .await;
    let h1 = result_page(&b, "connected").await;
    assert_eq!(h1, "You're in");
    let text = main_text(&b).await;
    assert!(text.contains("Acme Community"), "{text}");
    let open = b.find("main a").await;
    assert_eq!(b.text(&open).await, "Open the server in Discord");
    assert_eq!(
        b.attribute(&open, "href").await.as_deref(),
        Some(format!("https://discord.com/channels/{}", g.guild_id).as_str())
    );

    w.wait_status(&grant.id, "Delivered").await;
    assert!(w.has_role(g.guild_id, alice, role), "alice has the role");

    // The same link a second time: already used.
    consent(&b, &as_user(&w.oauth_url(&grant), alice), "authorize", None).await;
    assert_eq!(result_page(&b, "used").await, "This link was already used");
    w.stop().await;
    drop(b);
    eprintln!("browser journey took {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_expired_tampered_and_revoked_links_each_get_their_own_page() {
    let started = std::time::Instant::now();
    let b = Browser::start().await;
    b.set_window_size(PHONE.0, PHONE.1).await;
    let w = World::start().await;
    let g = w.guild("Acme Community");
    let role = g.role("Patrons");
    let dave = w.user("dave");
    let biz = w.app.business();
    w.app
        .entitlement_for("pdt_a", &g.guild_id.to_string(), Some(&role.to_string()))
        .await;
    w.app
        .publish(&payment(&biz, "pay_1", "cus_1", &["pdt_a"], T0), "evt_1")
        .await;
    w.app
        .publish(&payment(&biz, "pay_2", "cus_2", &["pdt_a"], T0), "evt_2")
        .await;
    let grant = w.grant_of("cus_1").await;
    let url = w.oauth_url(&grant);

    // Cancel on Discord: a page that offers the same link again.
    consent(&b, &as_user(&url, dave), "cancel", None).await;
    assert_eq!(
        result_page(&b, "cancelled").await,
        "Authorization cancelled"
    );
    let again = b.find("main a").await;
    assert_eq!(b.text(&again).await, "Try again");
    assert_eq!(
        b.attribute(&again, "href").await.as_deref(),
        Some(url.as_str())
    );

    // An altered link.
    consent(&b, &as_user(&tamper(&url), dave), "authorize", None).await;
    assert_eq!(result_page(&b, "tampered").await, "This link is not valid");
    assert!(main_text(&b).await.contains("altered"));

    // An expired link.
    sqlx::query("UPDATE grants SET oauth_expires_at = now() - interval '1 minute' WHERE id = $1")
        .bind(&grant.id)
        .execute(&w.app.pool)
        .await
        .unwrap();
    let expired = w.grant_of("cus_1").await;
    consent(
        &b,
        &as_user(&w.oauth_url(&expired), dave),
        "authorize",
        None,
    )
    .await;
    assert_eq!(result_page(&b, "expired").await, "This link has expired");
    assert!(main_text(&b).await.contains("fresh one"));

    // A grant revoked (refunded) before the customer used its link.
    let second = w.grant_of("cus_2").await;
    w.app
        .publish(&refund(&biz, "pay_2", false, T1), "evt_3")
        .await;
    w.wait_status(&second.id, "Revoked").await;
    consent(&b, &as_user(&w.oauth_url(&second), dave), "authorize", None).await;
    assert_eq!(result_page(&b, "revoked").await, "This access has ended");
    assert!(main_text(&b).await.contains("refunded"));

    // None of it gave anyone access.
    assert!(w.sandbox.member(g.guild_id, dave).is_none());
    w.stop().await;
    drop(b);
    eprintln!("browser error pages took {:?}", started.elapsed());
}

/// Checks what every access page must be at a phone's width: in `lang`, self-contained,
/// no sideways scrolling, no axe-core violation of serious or critical impact. Saves
/// its screenshot as `name`.
async fn access_page(b: &Browser, name: &str, lang: &str) {
    b.screenshot(&screenshot_dir().join(format!("{name}.png")))
        .await;
    let src = b.source().await;
    assert!(src.contains(&format!("<html lang=\"{lang}\"")), "{src}");
    for external in ["<link", "<script", "<img", "src=", "@import", "url("] {
        assert!(!src.contains(external), "{external} in {src}");
    }
    assert!(!b.scrolls_sideways().await, "{name} scrolls sideways");
    let violations = b.serious_accessibility_violations().await;
    assert!(violations.is_empty(), "{name}: {violations:?}");
}

/// The customer's access page in Chromium at a phone's width, by keyboard alone: Tab to
/// *Connect Discord*, Enter, authorize on Discord; back on the page Tab to *Get my role
/// back* after leaving the server, Enter; Tab to *Use another Discord account*, choose
/// another account on Discord, Tab to the confirmation, Enter. Every page of ours is
/// checked with axe-core and for sideways scrolling, and saved as a screenshot; a
/// German browser gets the German page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_page_works_by_keyboard_on_a_phone() {
    let b = Browser::start().await;
    b.set_window_size(PHONE.0, PHONE.1).await;
    let w = World::start().await;
    let g = w.guild("Acme Community");
    let role = g.role("Patrons");
    let (alice, bob) = (w.user("alice"), w.user("bob"));
    let biz = w.app.business();
    w.app
        .entitlement_for("pdt_a", &g.guild_id.to_string(), Some(&role.to_string()))
        .await;
    sqlx::query("UPDATE entitlements SET role_name = 'Patrons', name = 'Patrons of Acme'")
        .execute(&w.app.pool)
        .await
        .unwrap();
    sqlx::query("INSERT INTO discord_guilds (business_id, guild_id, name) VALUES ($1, $2, 'Acme Community')")
        .bind(&biz)
        .bind(g.guild_id.to_string())
        .execute(&w.app.pool)
        .await
        .unwrap();
    w.app
        .publish(&payment(&biz, "pay_1", "cus_1", &["pdt_a"], T0), "evt_1")
        .await;
    let grant = w.grant_of("cus_1").await;
    let page = w.links.access_url(
        &biz,
        "cus_1",
        chrono::Utc::now() + chrono::TimeDelta::hours(1),
    );

    // The check can fail: a page with an unlabelled button and an image without text.
    b.goto("data:text/html,<html lang=en><title>x</title><main><button></button><img src=x></main></html>")
        .await;
    let found: Vec<String> = b
        .serious_accessibility_violations()
        .await
        .into_iter()
        .map(|v| v.0)
        .collect();
    assert!(found.contains(&"button-name".to_string()), "{found:?}");

    b.goto(&page).await;
    b.wait_url("/access").await;
    access_page(&b, "access-pending", "en").await;
    assert!(main_text(&b).await.contains("Patrons of Acme"));
    b.tab_to("Connect Discord").await;
    b.press(&[ENTER]).await;
    let discord = b.wait_url("/oauth2/authorize").await;
    b.goto(&as_user(&discord, alice)).await;
    b.wait_url("/oauth2/authorize").await;
    b.click(&b.find("button[value=authorize]").await).await;
    b.wait_url("/oauth/discord/callback").await;
    w.wait_status(&grant.id, "Delivered").await;

    // Left the server: the role back, by keyboard.
    w.sandbox.remove_member(g.guild_id, alice);
    b.goto(&page).await;
    b.wait_url("/access").await;
    access_page(&b, "access-delivered", "en").await;
    b.tab_to("Get my role back").await;
    b.press(&[ENTER]).await;
    b.wait_url("done=restore").await;
    access_page(&b, "access-restored", "en").await;
    assert!(
        b.text(&b.find(".notice").await)
            .await
            .contains("being restored")
    );
    wait_for_role(&w, g.guild_id, alice, role).await;

    // Another account, confirmed on a page that shows both.
    b.tab_to("Use another Discord account").await;
    b.press(&[ENTER]).await;
    let discord = b.wait_url("/oauth2/authorize").await;
    b.goto(&as_user(&discord, bob)).await;
    b.wait_url("/oauth2/authorize").await;
    b.click(&b.find("button[value=authorize]").await).await;
    b.wait_url("/oauth/discord/callback").await;
    access_page(&b, "access-confirm-switch", "en").await;
    let text = main_text(&b).await;
    assert!(text.contains("alice") && text.contains("bob"), "{text}");
    b.tab_to("Switch to bob").await;
    b.press(&[ENTER]).await;
    b.wait_url("/access/switch/confirm").await;
    access_page(&b, "access-switched", "en").await;
    wait_for_role(&w, g.guild_id, bob, role).await;
    w.stop().await;
    drop(b);

    // A German browser.
    let de = Browser::start_in("de-DE").await;
    de.set_window_size(PHONE.0, PHONE.1).await;
    let w = World::start().await;
    let biz = w.app.business();
    let g = w.guild("Acme Community");
    w.app
        .entitlement_for("pdt_a", &g.guild_id.to_string(), None)
        .await;
    w.app
        .publish(&payment(&biz, "pay_1", "cus_1", &["pdt_a"], T0), "evt_1")
        .await;
    w.grant_of("cus_1").await;
    let page = w.links.access_url(
        &biz,
        "cus_1",
        chrono::Utc::now() + chrono::TimeDelta::hours(1),
    );
    de.goto(&page).await;
    de.wait_url("/access").await;
    access_page(&de, "access-de", "de").await;
    let text = main_text(&de).await;
    assert!(
        text.contains("Dein Discord-Zugang") && text.contains("Mitgliedschaft im Server"),
        "{text}"
    );
    de.tab_to("Discord verbinden").await;
    de.press(&[ENTER]).await;
    let discord = de.wait_url("/oauth2/authorize").await;
    let carla = w.user("carla");
    de.goto(&as_user(&discord, carla)).await;
    de.wait_url("/oauth2/authorize").await;
    de.click(&de.find("button[value=authorize]").await).await;
    de.wait_url("/oauth/discord/callback").await;
    // The callback's page speaks German too.
    access_page(&de, "connected-de", "de").await;
    assert_eq!(de.text(&de.find("main h1").await).await, "Du bist dabei");
    w.stop().await;
}

async fn wait_for_role(w: &World, guild: u64, user: u64, role: u64) {
    common::wait_for("the role in Discord", || async {
        w.has_role(guild, user, role).then_some(())
    })
    .await;
}
