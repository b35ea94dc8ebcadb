//! A business's own Discord application ("bring your own bot"): registered through the
//! API, checked with Discord, sealed at rest, and then the bot of every Discord call,
//! OAuth link and bot install of that business, on its own lane through the syncer.

use crate::api::{Client, T0, client, connect, create_entitlement};
use crate::common;
use crate::discord_world::World;

use chrono::Utc;
use common::events::payment;
use common::wait_for;
use guildgate::discord::permissions;
use guildgate::store;
use sandbox_discord::{AppCredentials, GuildIds, GuildSpec};
use serde_json::{Value, json};

fn body(app: &AppCredentials) -> Value {
    json!({
        "client_id": app.client_id.to_string(),
        "client_secret": app.client_secret,
        "bot_token": app.bot_token,
    })
}

/// Registers `app` as `c`'s business's own application.
async fn register(c: &Client, app: &AppCredentials) -> Value {
    let (s, v) = c.put("/discord/application", body(app)).await;
    assert_eq!(s, 200, "{v}");
    v
}

/// The `client_id` of an authorize URL.
fn client_id_of(url: &str) -> String {
    url::Url::parse(url)
        .unwrap()
        .query_pairs()
        .find(|(k, _)| k == "client_id")
        .map(|(_, v)| v.into_owned())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_business_with_its_own_bot_connects_links_and_syncs_through_it_alone() {
    let w = World::start().await;
    let biz = w.app.business();
    let c = client(&w, &biz).await;
    let app = w.sandbox.add_application("Acme Bot");
    let own = app.client_id.to_string();

    let (s, v) = c.get("/discord/application").await;
    assert_eq!((s, v["code"].as_str()), (404, Some("not_found")), "{v}");

    // Refused before anything is stored, each with what to fix.
    let shared_id = w.sandbox.client_id().to_string();
    for (field, value, code) in [
        ("client_id", "acme", "invalid_field"),
        // The shared bot's token is not this application's.
        (
            "bot_token",
            w.sandbox.bot_token(),
            "discord_application_refused",
        ),
        ("bot_token", "not-a-token", "discord_application_refused"),
        (
            "client_secret",
            "not-the-secret",
            "discord_application_refused",
        ),
        ("client_id", shared_id.as_str(), "invalid_field"),
    ] {
        let mut bad = body(&app);
        bad[field] = json!(value);
        let (s, v) = c.put("/discord/application", bad).await;
        assert_eq!((s, v["code"].as_str()), (422, Some(code)), "{field}: {v}");
    }
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM discord_applications")
        .fetch_one(&w.app.pool)
        .await
        .unwrap();
    assert_eq!(stored, 0);

    // Registered: the answer names what to register at Discord, never a secret.
    let v = register(&c, &app).await;
    let public = w
        .app
        .settings
        .http
        .public_url
        .trim_end_matches('/')
        .to_string();
    assert_eq!(v["client_id"], own);
    assert_eq!(v["bot_username"], "Acme Bot");
    assert_eq!(
        v["redirect_uris"],
        json!([
            format!("{public}/oauth/discord/callback"),
            format!("{public}/discord/bot/callback")
        ])
    );
    let (s, got) = c.get("/discord/application").await;
    assert_eq!((s, &got), (200, &v));
    for shown in [v.to_string(), got.to_string()] {
        assert!(!shown.contains(&app.client_secret) && !shown.contains(&app.bot_token));
    }
    // Sealed at rest.
    let (secret, token): (Vec<u8>, Vec<u8>) = sqlx::query_as(
        "SELECT client_secret_enc, bot_token_enc FROM discord_applications WHERE business_id = $1",
    )
    .bind(&biz)
    .fetch_one(&w.app.pool)
    .await
    .unwrap();
    let contains =
        |hay: &[u8], needle: &str| hay.windows(needle.len()).any(|w| w == needle.as_bytes());
    assert!(!contains(&secret, &app.client_secret) && !contains(&token, &app.bot_token));

    // The install link names the business's own application, and installs its bot.
    let (s, v) = c.get("/discord/install-url").await;
    assert_eq!(s, 200);
    assert_eq!(client_id_of(v["url"].as_str().unwrap()), own);
    let g = w
        .sandbox
        .add_guild(GuildSpec::new("Acme").without_bot().with_role("Patrons", 1));
    let (s, page) = connect(&w, &c, &g).await;
    assert_eq!(s, 200, "{page}");
    assert!(page.contains("Your bot is in"), "{page}");
    assert!(
        w.sandbox
            .app_bot_permissions(g.guild_id, app.client_id)
            .is_some()
    );
    assert_eq!(
        w.sandbox.bot_permissions(g.guild_id),
        None,
        "the shared bot stays out"
    );

    // The entitlement is checked by the bot in the server (the shared one is not).
    let patrons = g.role("Patrons");
    let e = create_entitlement(&c, g.guild_id, Some(patrons)).await;
    let ent = e["id"].as_str().unwrap();
    let (s, v) = c.attach("pdt_1", &[ent]).await;
    assert_eq!(s, 200, "{v}");
    w.app
        .publish(&payment(&biz, "pay_1", "cus_1", &["pdt_1"], T0), "evt_1")
        .await;
    let grant = w.grant_of("cus_1").await;
    let (s, v) = c
        .get(&format!("/entitlements/{ent}/grants/{}", grant.id))
        .await;
    assert_eq!(s, 200, "{v}");
    let oauth_url = v["oauth_url"].as_str().unwrap().to_string();
    assert_eq!(
        client_id_of(&oauth_url),
        own,
        "the customer authorizes the business's own application"
    );

    // The customer authorizes it; its bot adds them with the role.
    let alice = w.user("alice");
    let (_, s, page) = w
        .consent(&oauth_url, alice, sandbox_discord::Consent::Authorize)
        .await;
    assert_eq!(s, 200, "{page}");
    w.wait_status(&grant.id, "Delivered").await;
    assert!(w.has_role(g.guild_id, alice, patrons));
    let issuer: Option<String> = sqlx::query_scalar(
        "SELECT client_id FROM discord_links WHERE business_id = $1 AND customer_id = 'cus_1'",
    )
    .bind(&biz)
    .fetch_one(&w.app.pool)
    .await
    .unwrap();
    assert_eq!(issuer.as_deref(), Some(own.as_str()));
    // Every bot call about the server was the business's bot's.
    let guild_path = format!("/api/v10/guilds/{}", g.guild_id);
    let calls: Vec<_> = w
        .sandbox
        .requests()
        .into_iter()
        .filter(|r| r.path.starts_with(&guild_path))
        .collect();
    assert!(!calls.is_empty());
    assert!(
        calls.iter().all(|r| r.client_id == Some(app.client_id)),
        "{:?}",
        calls
            .iter()
            .map(|r| (&r.method, &r.path, r.client_id))
            .collect::<Vec<_>>()
    );

    // Back to the shared bot: the secrets are gone, the links name it again.
    let (s, _) = c.delete("/discord/application").await;
    assert_eq!(s, 204);
    let (s, _) = c.get("/discord/application").await;
    assert_eq!(s, 404);
    let (s, _) = c.delete("/discord/application").await;
    assert_eq!(s, 404);
    let (_, v) = c.get("/discord/install-url").await;
    assert_eq!(
        client_id_of(v["url"].as_str().unwrap()),
        w.sandbox.client_id().to_string()
    );
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_application_serves_one_business_and_stays_its_own() {
    let w = World::start().await;
    let a = client(&w, &w.app.business()).await;
    let b = client(&w, "bus_other").await;
    let app = w.sandbox.add_application("Acme Bot");
    register(&a, &app).await;
    // Without the application's credentials, its id tells nothing of whose it is: the
    // same refusal as for any application the credentials are not of.
    let stranger = w.sandbox.add_application("Nobody's Bot");
    for id in [app.client_id, stranger.client_id] {
        let guess = json!({"client_id": id.to_string(), "client_secret": "guessed-secret",
                           "bot_token": "guessed.bot.token"});
        let (s, v) = b.put("/discord/application", guess).await;
        assert_eq!(
            (s, v["code"].as_str()),
            (422, Some("discord_application_refused")),
            "{v}"
        );
    }
    let (s, v) = b.put("/discord/application", body(&app)).await;
    assert_eq!(
        (s, v["code"].as_str()),
        (409, Some("discord_application_taken")),
        "{v}"
    );
    let (s, _) = b.get("/discord/application").await;
    assert_eq!(s, 404, "another business's application is not shown");
    let (s, _) = b.delete("/discord/application").await;
    assert_eq!(s, 404, "nor removed");
    let (s, _) = a.get("/discord/application").await;
    assert_eq!(s, 200);
    // The other business's links keep naming the shared application.
    let (_, v) = b.get("/discord/install-url").await;
    assert_eq!(
        client_id_of(v["url"].as_str().unwrap()),
        w.sandbox.client_id().to_string()
    );
    // The owner replaces its secrets with the same application's: allowed.
    register(&a, &app).await;
    w.stop().await;
}

/// `n` customers of `business` linked with tokens of `app` (`None`: the shared one),
/// each with a grant of `entitlement` and a sync job, in one transaction.
async fn backlog(
    w: &World,
    business: &str,
    app: Option<&AppCredentials>,
    entitlement: &str,
    n: usize,
) -> Vec<String> {
    backlog_from(w, business, app, entitlement, 0..n).await
}

/// [`backlog`] of the customers `cus_i` (and payments `pay_i`) for `i` in `range`.
async fn backlog_from(
    w: &World,
    business: &str,
    app: Option<&AppCredentials>,
    entitlement: &str,
    range: std::ops::Range<usize>,
) -> Vec<String> {
    let cipher = w.app.settings.token_cipher().unwrap();
    let mut tx = w.app.pool.begin().await.unwrap();
    store::businesses::ensure_business(&mut tx, business)
        .await
        .unwrap();
    let mut ids = Vec::new();
    for i in range {
        ids.push(
            common::world::linked_grant(
                &mut tx,
                &w.sandbox,
                &cipher,
                business,
                app,
                &format!("cus_{i}"),
                entitlement,
                &format!("pay_{i}"),
            )
            .await,
        );
    }
    tx.commit().await.unwrap();
    ids
}

async fn delivered(w: &World, business: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM grants WHERE business_id = $1 AND status = 'Delivered'",
    )
    .bind(business)
    .fetch_one(&w.app.pool)
    .await
    .unwrap()
}

/// A business resets its bot's token at Discord and does not register the new one:
/// every call with the old token would earn another invalid answer. After Discord's
/// first 401 the bot's calls are held back for a while instead of sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_bot_token_is_not_tried_again_at_once() {
    let w = World::start().await;
    let a = w.app.business();
    let app = w.sandbox.add_application("Reset Bot");
    register(&client(&w, &a).await, &app).await;
    let g = w
        .sandbox
        .add_guild(GuildSpec::new("Own").without_bot().with_role("Patrons", 1));
    w.sandbox
        .install_app_bot(g.guild_id, app.client_id, permissions::REQUIRED);
    let ent = {
        let mut conn = w.app.pool.acquire().await.unwrap();
        store::entitlements::insert_entitlement(
            &mut conn,
            &a,
            "own",
            &g.guild_id.to_string(),
            Some(&g.role("Patrons").to_string()),
        )
        .await
        .unwrap()
        .id
    };
    w.sandbox.reset_app_bot_token(app.client_id);
    let refused = || w.sandbox.stats().unauthorized;
    let before = refused();
    let failed = async |ids: &[String]| {
        for id in ids {
            w.wait_status(id, "Failed").await;
        }
    };
    // Three grants' jobs at once into one server: the first call earns the 401, the
    // calls waiting behind it for their slot are not sent, and neither are the retries
    // (the tests' tiers are short).
    failed(&backlog_from(&w, &a, Some(&app), &ent, 0..3).await).await;
    assert_eq!(refused() - before, 1);
    // Nor are the next grants' calls sent, while the refusal is fresh.
    failed(&backlog_from(&w, &a, Some(&app), &ent, 3..6).await).await;
    assert_eq!(
        refused() - before,
        1,
        "no call with the refused token after the first"
    );
    w.stop().await;
}

/// On the shared bot, businesses take turns at the lane's parked jobs: another
/// business's job parked behind a deep backlog of one business runs at the next turn,
/// not once the backlog has drained.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn businesses_on_the_shared_bot_take_turns_at_its_parked_jobs() {
    let w = World::start().await;
    // Business A has a backlog of 150 deliveries into one server: at the sandbox's 5
    // member additions a second there, 30 seconds of work, most of it parked.
    let (a, b) = (w.app.business(), "bus_turn".to_string());
    let (ga, gb) = (w.guild("Busy"), w.guild("Calm"));
    let mut conn = w.app.pool.acquire().await.unwrap();
    for business in [&a, &b] {
        store::businesses::ensure_business(&mut conn, business)
            .await
            .unwrap();
    }
    let mut entitlement = async |business: &str, g: &GuildIds| {
        store::entitlements::insert_entitlement(
            &mut conn,
            business,
            "gated",
            &g.guild_id.to_string(),
            Some(&g.role("Patrons").to_string()),
        )
        .await
        .unwrap()
        .id
    };
    let (ent_a, ent_b) = (entitlement(&a, &ga).await, entitlement(&b, &gb).await);
    drop(conn);
    const BACKLOG: usize = 150;
    backlog(&w, &a, None, &ent_a, BACKLOG).await;
    wait_for("most of A's jobs parked", || async {
        let parked: i64 =
            sqlx::query_scalar("SELECT count(*) FROM discord_sync_parked WHERE taken_by IS NULL")
                .fetch_one(&w.app.pool)
                .await
                .unwrap();
        (parked > 60).then_some(())
    })
    .await;
    let ids = backlog(&w, &b, None, &ent_b, 1).await;
    w.wait_status(&ids[0], "Delivered").await;
    // Oldest first, B's job would have waited for every job of A parked before it,
    // running with at most a lane (64) of them left.
    let a_left = BACKLOG - delivered(&w, &a).await as usize;
    assert!(
        a_left > 100,
        "B's job waited until A had only {a_left} of {BACKLOG} left"
    );
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bot_with_a_deep_backlog_holds_up_no_other_bots_jobs() {
    let w = World::start().await;
    // Business A brings its own bot and has a backlog of 250 deliveries into one server:
    // at Discord's 10 member additions a second there, 25 seconds of work.
    let (a, b) = (w.app.business(), "bus_shared".to_string());
    let app = w.sandbox.add_application("Busy Bot");
    register(&client(&w, &a).await, &app).await;
    let ga = w
        .sandbox
        .add_guild(GuildSpec::new("Busy").without_bot().with_role("Patrons", 1));
    w.sandbox
        .install_app_bot(ga.guild_id, app.client_id, permissions::REQUIRED);
    let gb = w.guild("Calm");
    let mut conn = w.app.pool.acquire().await.unwrap();
    store::businesses::ensure_business(&mut conn, &b)
        .await
        .unwrap();
    let ent_a = store::entitlements::insert_entitlement(
        &mut conn,
        &a,
        "busy",
        &ga.guild_id.to_string(),
        Some(&ga.role("Patrons").to_string()),
    )
    .await
    .unwrap();
    let ent_b = store::entitlements::insert_entitlement(
        &mut conn,
        &b,
        "calm",
        &gb.guild_id.to_string(),
        Some(&gb.role("Patrons").to_string()),
    )
    .await
    .unwrap();
    drop(conn);
    const BACKLOG: usize = 250;
    backlog(&w, &a, Some(&app), &ent_a.id, BACKLOG).await;
    // The backlog's jobs are in the syncer's hands (its lane full, the rest parked)
    // before the other business's one job is queued behind them.
    wait_for("A's jobs being synced and parked", || async {
        let parked: i64 = sqlx::query_scalar("SELECT count(*) FROM discord_sync_parked")
            .fetch_one(&w.app.pool)
            .await
            .unwrap();
        (parked > 0).then_some(())
    })
    .await;
    let ids = backlog(&w, &b, None, &ent_b.id, 1).await;
    w.wait_status(&ids[0], "Delivered").await;
    // Queued behind A's jobs, B's ran while more of them were left than the syncer's
    // prefetch holds: it did not wait for A's backlog to drain into the prefetch.
    let a_left = BACKLOG - delivered(&w, &a).await as usize;
    assert!(
        a_left > guildgate::sync::worker::PREFETCH as usize,
        "the shared bot's job waited until the busy bot had only {a_left} of {BACKLOG} left"
    );
    // The backlog completes, each grant once, on its own bot, within its limits.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while (delivered(&w, &a).await as usize) < BACKLOG {
        assert!(
            std::time::Instant::now() < deadline,
            "A's backlog not delivered in 120 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let own = w.sandbox.app_stats(app.client_id);
    assert!(own.total_requests >= BACKLOG as u64, "{own:?}");
    assert_eq!(
        (own.global_rate_limited, own.violations()),
        (0, 0),
        "{own:?}"
    );
    // A run's row goes once its outcome is settled, just after the grant's commit.
    wait_for("every parked job ran and left", || async {
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM discord_sync_parked")
            .fetch_one(&w.app.pool)
            .await
            .unwrap();
        (left == 0).then_some(())
    })
    .await;
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_customer_who_authorized_another_application_is_asked_again_not_added_with_it() {
    let w = World::start().await;
    let biz = w.app.business();
    let c = client(&w, &biz).await;
    // Linked while the shared bot served the business.
    let alice = w.user("alice");
    w.link("cus_1", alice).await;
    // Then the business brings its own bot and installs it.
    let app = w.sandbox.add_application("Acme Bot");
    register(&c, &app).await;
    let g = w
        .sandbox
        .add_guild(GuildSpec::new("Acme").without_bot().with_role("Patrons", 1));
    let (s, page) = connect(&w, &c, &g).await;
    assert_eq!(s, 200, "{page}");
    let e = create_entitlement(&c, g.guild_id, Some(g.role("Patrons"))).await;
    c.attach("pdt_1", &[e["id"].as_str().unwrap()]).await;
    w.app
        .publish(&payment(&biz, "pay_1", "cus_1", &["pdt_1"], T0), "evt_1")
        .await;
    let grant = w.grant_of("cus_1").await;
    let failed = w.wait_status(&grant.id, "Failed").await;
    assert_eq!(
        failed.error_code.as_deref(),
        Some("discord_reauthorization_required")
    );
    let member_path = format!("/api/v10/guilds/{}/members/{alice}", g.guild_id);
    assert!(
        !w.sandbox
            .requests()
            .iter()
            .any(|r| r.method == "PUT" && r.path == member_path),
        "the other application's token was never offered to Discord"
    );
    // Authorizing the business's own application delivers.
    let (s, page) = w.authorize(&failed, alice).await;
    assert_eq!(s, 200, "{page}");
    w.wait_status(&grant.id, "Delivered").await;
    assert!(w.has_role(g.guild_id, alice, g.role("Patrons")));
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_jobs_run_once_more_when_asked_again_and_outlive_their_drainer() {
    use guildgate::store::sync_parking as lanes;
    use guildgate::sync::lanes::LEASE;
    // The rows alone, in a database no syncer watches (a running one would start
    // draining them): a job asked again while it runs runs once more, at the back.
    let db = common::TestDb::create().await;
    let bare = sqlx::PgPool::connect(&db.url).await.unwrap();
    store::migrate(&bare).await.unwrap();
    let pool = &bare;
    lanes::park(pool, "grant_x", "bot_1", "bus_x", 2)
        .await
        .unwrap();
    lanes::park(pool, "grant_x", "bot_1", "bus_x", 0)
        .await
        .unwrap();
    assert!(
        lanes::lease(pool, "bot_1", "me", true, LEASE)
            .await
            .unwrap()
    );
    assert!(
        !lanes::lease(pool, "bot_1", "other", true, LEASE)
            .await
            .unwrap(),
        "one holder"
    );
    assert_eq!(
        lanes::take(pool, "bot_1", "me", "", &[]).await.unwrap(),
        Some(lanes::Taken {
            grant_id: "grant_x".to_string(),
            attempt: 0,
            business_id: "bus_x".to_string()
        }),
        "one row per grant, at its lowest attempt"
    );
    assert_eq!(
        lanes::take(pool, "bot_1", "me", "", &[]).await.unwrap(),
        None
    );
    lanes::park(pool, "grant_x", "bot_1", "bus_x", 0)
        .await
        .unwrap();
    lanes::finish(pool, "grant_x", "me").await.unwrap();
    assert_eq!(
        lanes::parked(pool, "bot_1").await.unwrap(),
        1,
        "asked again: it stays"
    );
    assert!(
        lanes::take(pool, "bot_1", "me", "", &[])
            .await
            .unwrap()
            .is_some()
    );
    lanes::finish(pool, "grant_x", "me").await.unwrap();
    assert_eq!(lanes::parked(pool, "bot_1").await.unwrap(), 0);

    // Businesses take turns, each its oldest first, round and round; rows parked
    // without a business (by an earlier release) take theirs as one.
    for (grant, business) in [
        ("a1", "bus_a"),
        ("a2", "bus_a"),
        ("a3", "bus_a"),
        ("c1", "bus_c"),
        ("old", ""),
        ("b1", "bus_b"),
        ("c2", "bus_c"),
    ] {
        lanes::park(pool, grant, "bot_1", business, 0)
            .await
            .unwrap();
    }
    lanes::park(pool, "other_bot", "bot_2", "bus_a", 0)
        .await
        .unwrap();
    let mut order = Vec::new();
    let mut turn = String::new();
    // bus_c holds its share of the seats from its second job on: passed over while
    // another business waits, and taken when only its jobs are left.
    let mut full = Vec::new();
    while let Some(t) = lanes::take(pool, "bot_1", "me", &turn, &full)
        .await
        .unwrap()
    {
        if t.business_id == "bus_c" {
            full = vec!["bus_c".to_string()];
        }
        order.push(t.grant_id);
        turn = t.business_id;
    }
    assert_eq!(order, ["a1", "b1", "c1", "old", "a2", "a3", "c2"]);
    lanes::release(pool, "bot_1", "me").await.unwrap();
    bare.close().await;

    // A grant whose parked job a process took and never finished (it died), its lease
    // run out: the running syncer finds it, takes the lease, gives the job back and
    // runs it.
    let w = World::start().await;
    let pool = &w.app.pool;
    let g = w.guild("Acme");
    let alice = w.user("alice");
    w.link("cus_1", alice).await;
    let mut conn = pool.acquire().await.unwrap();
    let ent = store::entitlements::insert_entitlement(
        &mut conn,
        &w.app.business(),
        "acme",
        &g.guild_id.to_string(),
        Some(&g.role("Patrons").to_string()),
    )
    .await
    .unwrap();
    let now = Utc::now();
    let grant = store::grants::insert(
        &mut conn,
        store::grants::NewGrant {
            business_id: &w.app.business(),
            brand_id: &w.app.business(),
            entitlement_id: &ent.id,
            customer_id: "cus_1",
            payment_id: Some("pay_1"),
            subscription_id: None,
            oauth_nonce: "n_1",
            oauth_expires_at: now + chrono::Duration::days(7),
            now,
        },
    )
    .await
    .unwrap();
    drop(conn);
    let bot = w.sandbox.client_id().to_string();
    lanes::park(pool, &grant.id, &bot, &w.app.business(), 0)
        .await
        .unwrap();
    sqlx::query("UPDATE discord_sync_parked SET taken_by = 'syncer_gone'")
        .execute(pool)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO discord_sync_draining (bot, holder, lease_until)
         VALUES ($1, 'syncer_gone', clock_timestamp() - interval '1 second')",
    )
    .bind(&bot)
    .execute(pool)
    .await
    .unwrap();
    w.wait_status(&grant.id, "Delivered").await;
    assert!(w.has_role(g.guild_id, alice, g.role("Patrons")));
    wait_for("the parked row gone", || async {
        (lanes::parked(pool, &bot).await.unwrap() == 0).then_some(())
    })
    .await;
    w.stop().await;
}

/// A business that had a server once: its entitlement still names it, its grant is
/// live, and its bot now is one the server does not have. While nobody holds the server,
/// Discord's refusal stops that entitlement, not the server; once another business
/// holds it, such a grant is refused before any call. Either way the server's owner is
/// not held back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_former_owners_grant_stops_its_own_entitlement_not_the_server() {
    let w = World::start().await;
    let a = w.app.business();
    let ca = client(&w, &a).await;
    let g = w.guild("Acme");
    let former_entitlement = async |former: &str, app: &AppCredentials| {
        register(&client(&w, former).await, app).await;
        let mut conn = w.app.pool.acquire().await.unwrap();
        store::entitlements::insert_entitlement(
            &mut conn,
            former,
            "old",
            &g.guild_id.to_string(),
            Some(&g.role("Patrons").to_string()),
        )
        .await
        .unwrap()
        .id
    };
    let former = "bus_former";
    let app = w.sandbox.add_application("Former Bot");
    let ent_former = former_entitlement(former, &app).await;
    backlog(&w, former, Some(&app), &ent_former, 1).await;
    let stops = || async {
        sqlx::query_as::<_, (Option<String>, String)>(
            "SELECT entitlement_id, code FROM discord_stops WHERE guild_id = $1",
        )
        .bind(g.guild_id.to_string())
        .fetch_all(&w.app.pool)
        .await
        .unwrap()
    };
    let recorded = wait_for("the former owner's grant refused", || async {
        let s = stops().await;
        (!s.is_empty()).then_some(s)
    })
    .await;
    assert_eq!(
        recorded,
        vec![(
            Some(ent_former.clone()),
            "discord_unknown_guild".to_string()
        )],
        "its own entitlement stops, not the server"
    );
    // The server's owner connects it and is not held back.
    let (s, page) = connect(&w, &ca, &g).await;
    assert_eq!(s, 200, "{page}");
    let ent_a = create_entitlement(&ca, g.guild_id, Some(g.role("Patrons"))).await;
    let ent_a = ent_a["id"].as_str().unwrap().to_string();
    backlog(&w, &a, None, &ent_a, 1).await;
    wait_for("the owner's grant delivered", || async {
        (delivered(&w, &a).await == 1).then_some(())
    })
    .await;
    assert_eq!(stops().await.len(), 1);

    // Another former owner's grant, now that the server is held: refused without a
    // call, so it earns no invalid answer and records no stop.
    let later = "bus_former_later";
    let app_later = w.sandbox.add_application("Later Bot");
    let ent_later = former_entitlement(later, &app_later).await;
    let sent = w.sandbox.app_stats(app_later.client_id).total_requests;
    let grant = backlog(&w, later, Some(&app_later), &ent_later, 1).await;
    let failed = wait_for("the later former owner's grant refused", || async {
        let g: (String, Option<String>) =
            sqlx::query_as("SELECT status, error_code FROM grants WHERE id = $1")
                .bind(&grant[0])
                .fetch_one(&w.app.pool)
                .await
                .unwrap();
        (g.0 == "Failed").then_some(g)
    })
    .await;
    assert_eq!(failed.1.as_deref(), Some("discord_guild_held_by_another"));
    assert_eq!(
        w.sandbox.app_stats(app_later.client_id).total_requests,
        sent
    );
    assert_eq!(stops().await.len(), 1);
    w.stop().await;
}
