//! Drift reconciliation (`guildgate reconcile`) end to end: grants delivered through the
//! real flow, drift made in the sandbox Discord and the database, then reconcile through
//! the library, the binary and `serve`'s periodic run.

use crate::common;
use crate::discord_world;

use common::events::*;
use common::{TestConfig, wait_for};
use discord_world::{World, sandbox_env};
use guildgate::app::Options;
use guildgate::domain::Grant;
use guildgate::domain::compare::DriftKind;
use guildgate::reconcile::{Action, DriftPolicy, Reconciler, Report, Scope};
use sandbox_discord::SandboxConfig;
use secrecy::ExposeSecret;

const T0: &str = "2026-05-01T10:31:00Z";

fn id(n: u64) -> String {
    n.to_string()
}

/// A reconciler on the side budget, as `guildgate reconcile` builds it.
fn reconciler(w: &World) -> Reconciler {
    Reconciler {
        pool: w.app.pool.clone(),
        bots: w.app.bots.clone(),
        links: w.links.clone(),
    }
}

/// A world whose bot may list members, with `pdt_sub` gating the Patrons role of its
/// guild: (world, guild, role).
async fn patrons_world(cfg: TestConfig) -> (World, u64, u64) {
    let w = World::start_with(SandboxConfig::default().with_members_intent(true), cfg).await;
    let g = w.guild("Acme Community");
    let (guild, role) = (g.guild_id, g.role("Patrons"));
    w.app
        .entitlement_for("pdt_sub", &id(guild), Some(&id(role)))
        .await;
    (w, guild, role)
}

/// A grant of `pdt_sub` to `customer`, delivered to `user` through the real flow (a
/// returning customer whose link works: the subscription starts, the syncer delivers).
async fn deliver(w: &World, n: u32, customer: &str, user: u64) -> Grant {
    w.link(customer, user).await;
    let biz = w.app.business();
    w.app
        .publish(
            &subscription(
                "active",
                &biz,
                &format!("sub_{n}"),
                customer,
                "pdt_sub",
                "active",
                T0,
            ),
            &format!("evt_{n}"),
        )
        .await;
    let g = w.grant_of(customer).await;
    w.wait_status(&g.id, "Delivered").await
}

fn kinds(r: &Report) -> Vec<(DriftKind, u64, Option<String>)> {
    r.findings
        .iter()
        .map(|f| {
            (
                f.finding.kind,
                f.finding.user_id.get(),
                f.finding.grant_id.clone(),
            )
        })
        .collect()
}

/// Runs the real binary against the test's database and sandbox.
async fn cli(w: &World, args: &[&str]) -> (bool, String, String) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_guildgate"));
    cmd.args(args)
        .env(
            "GUILDGATE_DATABASE__URL",
            w.app.settings.database.url.expose_secret(),
        )
        .env(
            "GUILDGATE_HTTP__PUBLIC_URL",
            &w.app.settings.http.public_url,
        );
    for (k, v) in sandbox_env(&w.sandbox, TestConfig::default()).env {
        cmd.env(k, v);
    }
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finds_every_kind_of_drift_and_restore_fixes_it() {
    let (w, guild, role) = patrons_world(TestConfig::default()).await;
    let (alice, bob, carol, dave) = (
        w.user("alice"),
        w.user("bob"),
        w.user("carol"),
        w.user("dave"),
    );
    let ga = deliver(&w, 1, "cus_a", alice).await;
    let gb = deliver(&w, 2, "cus_b", bob).await;
    let gc = deliver(&w, 3, "cus_c", carol).await;
    let r = reconciler(&w);
    let clean = r.check(&Scope::default()).await.unwrap();
    assert!(clean.findings.is_empty(), "{}", clean.table());
    assert_eq!(clean.guilds_listed.len(), 1);

    // Drift: alice loses the role, bob leaves, carol's grant is revoked behind the
    // syncer's back, dave is given the role by hand.
    w.sandbox.add_member(guild, alice, &[]);
    w.sandbox.remove_member(guild, bob);
    sqlx::query(
        "UPDATE grants SET status = 'Revoked', revoked_at = now(), revocation_reason = 'manual' WHERE id = $1",
    )
    .bind(&gc.id)
    .execute(&w.app.pool)
    .await
    .unwrap();
    w.sandbox.add_member(guild, dave, &[role]);

    let report = r.check(&Scope::default()).await.unwrap();
    assert_eq!(
        kinds(&report),
        vec![
            (DriftKind::MissingRole, alice, Some(ga.id.clone())),
            (DriftKind::LeftServer, bob, Some(gb.id.clone())),
            (DriftKind::StillHolds, carol, Some(gc.id.clone())),
            (DriftKind::Ungranted, dave, None),
        ],
        "{}",
        report.table()
    );
    let missing = &report.findings[0].finding;
    assert_eq!(missing.business_id, w.app.business());
    assert_eq!(missing.guild_id.get(), guild);
    assert_eq!(missing.role_id.map(|r| r.get()), Some(role));
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert!(!w.has_role(guild, alice, role), "a check changes nothing");

    // Scoped to another guild: nothing.
    let other = r
        .check(&Scope {
            business_id: None,
            guild_id: Some("1".into()),
        })
        .await
        .unwrap();
    assert!(other.findings.is_empty());

    // The binary reports the same, as JSON.
    let (ok, out, err) = cli(
        &w,
        &["reconcile", "--json", "--business", &w.app.business()],
    )
    .await;
    assert!(ok, "{err}");
    let json: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let got: Vec<(String, String)> = json["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["kind"].as_str().unwrap().to_string(),
                f["user_id"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            ("missing_role".into(), id(alice)),
            ("left_server".into(), id(bob)),
            ("still_holds".into(), id(carol)),
            ("ungranted".into(), id(dave)),
        ]
    );
    assert_eq!(json["findings"][0]["grant_id"], ga.id.as_str());
    assert_eq!(json["findings"][0]["guild_id"], id(guild).as_str());
    assert_eq!(json["applied"], false);
    assert!(!w.has_role(guild, alice, role));

    // Apply with restore: the syncer gives back alice's role and bob's membership,
    // removes carol's, and leaves dave alone.
    let applied = r
        .reconcile(&Scope::default(), true, DriftPolicy::Restore)
        .await
        .unwrap();
    let actions: Vec<Option<Action>> = applied.findings.iter().map(|f| f.action).collect();
    assert_eq!(
        actions,
        vec![
            Some(Action::SyncQueued),
            Some(Action::SyncQueued),
            Some(Action::SyncQueued),
            Some(Action::ReportedOnly),
        ]
    );
    wait_for("the syncer to restore and remove", || async {
        (w.has_role(guild, alice, role)
            && w.has_role(guild, bob, role)
            && !w.has_role(guild, carol, role))
        .then_some(())
    })
    .await;
    assert!(
        w.has_role(guild, dave, role),
        "a member without a grant is never touched"
    );
    let after = wait_for("only the ungranted member left", || async {
        let r = r.check(&Scope::default()).await.unwrap();
        (kinds(&r) == vec![(DriftKind::Ungranted, dave, None)]).then_some(r)
    })
    .await;
    assert!(after.errors.is_empty());
    assert_eq!(
        w.wait_status(&ga.id, "Delivered").await.revocation_reason,
        None
    );
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_policy_revokes_with_platform_external_through_the_binary() {
    // No members intent; webhook workers off so the grant events stay in their queue.
    let w = World::start_with(
        SandboxConfig::default(),
        TestConfig {
            options: Some(Options {
                webhooks: false,
                ..Options::default()
            }),
            ..TestConfig::default()
        },
    )
    .await;
    let g = w.guild("Acme Community");
    let role = g.role("Patrons");
    let guild = g.guild_id;
    w.app
        .entitlement_for("pdt_sub", &id(guild), Some(&id(role)))
        .await;
    let alice = w.user("alice");
    let ga = deliver(&w, 1, "cus_a", alice).await;
    w.sandbox.add_member(guild, alice, &[]);

    let report = reconciler(&w).check(&Scope::default()).await.unwrap();
    assert_eq!(
        kinds(&report),
        vec![(DriftKind::MissingRole, alice, Some(ga.id.clone()))]
    );
    assert_eq!(
        report
            .guilds_not_listed
            .iter()
            .map(|g| g.get())
            .collect::<Vec<_>>(),
        vec![guild]
    );
    assert!(report.guilds_listed.is_empty());

    // The table says the ungranted check was skipped.
    let (ok, out, err) = cli(&w, &["reconcile", "--guild", &id(guild)]).await;
    assert!(ok, "{err}");
    assert!(out.contains("missing_role"), "{out}");
    assert!(out.contains(&ga.id), "{out}");
    assert!(out.contains("NOT checked"), "{out}");
    assert_eq!(w.wait_status(&ga.id, "Delivered").await.status, "Delivered");

    let (ok, out, err) = cli(
        &w,
        &["reconcile", "--apply", "--policy", "revoke", "--json"],
    )
    .await;
    assert!(ok, "{err}");
    let json: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(json["findings"][0]["action"], "revoked", "{out}");
    assert_eq!(json["policy"], "revoke");
    assert_eq!(json["guilds_not_listed"][0], id(guild).as_str());

    let revoked = w
        .wait_grant(&ga.id, "revoked and synced", |g| {
            g.status == "Revoked" && g.applied_user_id.is_none()
        })
        .await;
    assert_eq!(
        revoked.revocation_reason.map(|r| r.as_str()),
        Some("platform_external")
    );
    let queue = w.app.names.grant_events();
    let wanted = format!("{}:entitlement_grant.revoked", ga.id);
    let seen = std::sync::Mutex::new(Vec::new());
    let msg = wait_for("the revoked webhook on grant-events", || async {
        let taken = w.app.drain_queue(&queue).await;
        let mut seen = seen.lock().unwrap();
        seen.extend(taken);
        seen.iter()
            .find(|m| m.message_id == wanted)
            .map(|m| m.json())
    })
    .await;
    assert_eq!(msg["type"], "entitlement_grant.revoked");
    assert_eq!(msg["data"]["revocation_reason"], "platform_external");

    // Nothing is left to reconcile: the grant is revoked and its undo recorded.
    let again = reconciler(&w).check(&Scope::default()).await.unwrap();
    assert!(again.findings.is_empty(), "{}", again.table());
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_reconciles_on_its_interval() {
    let (w, guild, role) = patrons_world(
        TestConfig::default()
            .env("GUILDGATE_RECONCILE__INTERVAL", "300ms")
            .env("GUILDGATE_RECONCILE__POLICY", "restore"),
    )
    .await;
    let alice = w.user("alice");
    deliver(&w, 1, "cus_a", alice).await;
    w.sandbox.add_member(guild, alice, &[]);
    wait_for("serve's reconcile to restore the role", || async {
        w.has_role(guild, alice, role).then_some(())
    })
    .await;
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_acts_only_on_drift_the_grant_still_shows() {
    let w = World::start().await;
    let g = w.guild("Acme Community");
    let role = g.role("Patrons");
    let guild = g.guild_id;
    w.app
        .entitlement_for("pdt_sub", &id(guild), Some(&id(role)))
        .await;
    let alice = w.user("alice");
    let bob = w.user("bob");
    let ga = deliver(&w, 1, "cus_a", alice).await;
    // Alice loses the role: reconcile reads a missing role for her.
    w.sandbox.add_member(guild, alice, &[]);
    let r = reconciler(&w);
    let (report, discord) = r.observe(&Scope::default()).await.unwrap();
    assert_eq!(
        kinds(&report),
        vec![(DriftKind::MissingRole, alice, Some(ga.id.clone()))]
    );

    // Before the fixes are made, the customer moves the grant to another account, which
    // holds the role.
    let (status, page) = w.authorize(&ga, bob).await;
    assert_eq!(status, 200, "{page}");
    w.wait_grant(&ga.id, "moved to bob", |g| {
        g.applied_user_id.as_deref() == Some(id(bob).as_str())
    })
    .await;

    // A revoke judged on the old read would take bob's access away; read again, the grant
    // no longer shows the drift.
    let applied = r
        .apply(report, &discord, DriftPolicy::Revoke)
        .await
        .unwrap();
    assert_eq!(applied.findings[0].action, Some(Action::Changed));
    let now = w.wait_status(&ga.id, "Delivered").await;
    assert_eq!(now.applied_user_id.as_deref(), Some(id(bob).as_str()));
    assert!(w.has_role(guild, bob, role));
    w.stop().await;
}

/// One Discord account linked under two customers (two checkouts): both grants give it
/// the role. Nothing is drift while the role is there. When someone removes it in
/// Discord, neither grant has its access and no holding explains it: the `revoke`
/// policy revokes both, and the role is not given back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_accounts_removed_role_revokes_every_grant_that_gave_it() {
    let w = World::start().await;
    let g = w.guild("Acme Community");
    let role = g.role("Patrons");
    let guild = g.guild_id;
    w.app
        .entitlement_for("pdt_sub", &id(guild), Some(&id(role)))
        .await;
    let alice = w.user("alice");
    let first = deliver(&w, 1, "cus_a", alice).await;
    let second = deliver(&w, 2, "cus_b", alice).await;
    let r = reconciler(&w);
    let report = r.check(&Scope::default()).await.unwrap();
    assert!(report.findings.is_empty(), "{}", report.table());

    w.sandbox.add_member(guild, alice, &[]);
    let (report, discord) = r.observe(&Scope::default()).await.unwrap();
    let mut found = kinds(&report);
    found.sort_by(|a, b| a.2.cmp(&b.2));
    let mut want = vec![
        (DriftKind::MissingRole, alice, Some(first.id.clone())),
        (DriftKind::MissingRole, alice, Some(second.id.clone())),
    ];
    want.sort_by(|a, b| a.2.cmp(&b.2));
    assert_eq!(found, want);
    let applied = r
        .apply(report, &discord, DriftPolicy::Revoke)
        .await
        .unwrap();
    assert!(
        applied
            .findings
            .iter()
            .all(|f| f.action == Some(Action::Revoked)),
        "{}",
        applied.table()
    );
    for grant in [&first, &second] {
        let revoked = w
            .wait_grant(&grant.id, "revoked and synced", |g| {
                g.status == "Revoked" && g.applied_user_id.is_none()
            })
            .await;
        assert_eq!(
            revoked.revocation_reason.map(|r| r.as_str()),
            Some("platform_external")
        );
    }
    assert!(!w.has_role(guild, alice, role));
    let again = r.check(&Scope::default()).await.unwrap();
    assert!(again.findings.is_empty(), "{}", again.table());
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_process_at_a_time_runs_the_periodic_reconcile() {
    let w = World::start().await;
    let first = reconciler(&w);
    let second = reconciler(&w);
    let held = first
        .lock_periodic_run()
        .await
        .unwrap()
        .expect("nobody holds the lock yet");
    assert!(
        second.lock_periodic_run().await.unwrap().is_none(),
        "a second process skips while the first runs"
    );
    // The lock goes with its connection (a process that dies releases it).
    drop(held);
    let again = wait_for("the lock released with its connection", || async {
        second.lock_periodic_run().await.unwrap()
    })
    .await;
    drop(again);
    w.stop().await;
}

/// The member-list requests the sandbox saw for `guild`, as their `after` values.
fn listings(w: &World, guild: u64) -> Vec<String> {
    let path = format!("/api/v10/guilds/{guild}/members");
    w.sandbox
        .requests()
        .into_iter()
        .filter(|r| r.method == "GET" && r.path == path)
        .map(|r| {
            r.query
                .unwrap_or_default()
                .split('&')
                .find_map(|kv| kv.strip_prefix("after=").map(str::to_owned))
                .unwrap_or_default()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_guild_is_listed_keeping_only_what_matters_and_carried_on_after_an_interruption() {
    let (w, guild, role) = patrons_world(TestConfig::default()).await;
    let alice = w.user("alice");
    let ga = deliver(&w, 1, "cus_a", alice).await;
    w.sandbox.add_member(guild, alice, &[]);
    // 20,000 more members; every thousandth holds the gated role without a grant.
    let crowd = w.sandbox.add_crowd(guild, 20_000, |i| {
        if i % 1000 == 7 { vec![role] } else { vec![] }
    });
    let holders: Vec<u64> = crowd.iter().skip(7).step_by(1000).copied().collect();
    assert_eq!(holders.len(), 20);
    w.sandbox.set_latency(sandbox_discord::Latency::Fixed(
        std::time::Duration::from_millis(30),
    ));

    // The first run is interrupted (its task dropped, as a killed process would be)
    // after a few pages.
    let r = reconciler(&w);
    let first = tokio::spawn({
        let r = reconciler(&w);
        async move { r.check(&Scope::default()).await }
    });
    wait_for("five pages of members listed", || async {
        (listings(&w, guild).len() >= 5).then_some(())
    })
    .await;
    first.abort();
    let _ = first.await;
    let (listed, kept): (i64, i64) = sqlx::query_as(
        "SELECT l.listed, (SELECT count(*) FROM reconcile_listed_members m
                           WHERE m.guild_id = l.guild_id AND m.scope = l.scope)
         FROM reconcile_listings l WHERE l.guild_id = $1",
    )
    .bind(id(guild))
    .fetch_one(&w.app.pool)
    .await
    .unwrap();
    assert!(listed >= 3000, "pages were saved as they came: {listed}");
    // What it kept of those thousands: the role holders among them and alice.
    assert!(kept <= 6, "only members that matter are kept: {kept}");
    let before = listings(&w, guild).len();

    // The next run carries on where the first stopped, and finds everything.
    w.sandbox.set_latency(sandbox_discord::Latency::None);
    let report = r.check(&Scope::default()).await.unwrap();
    let second = &listings(&w, guild)[before..];
    assert_ne!(
        second[0], "0",
        "the second run did not start from the beginning"
    );
    assert!(
        second.len() < 21,
        "the second run listed {} pages of 21",
        second.len()
    );
    let mut want: Vec<(DriftKind, u64, Option<String>)> = holders
        .iter()
        .map(|u| (DriftKind::Ungranted, *u, None))
        .collect();
    want.push((DriftKind::MissingRole, alice, Some(ga.id.clone())));
    let mut got = kinds(&report);
    got.sort_by_key(|k| (k.1, format!("{:?}", k.0)));
    want.sort_by_key(|k| (k.1, format!("{:?}", k.0)));
    assert_eq!(got, want, "{}", report.table());
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM reconcile_listings")
        .fetch_one(&w.app.pool)
        .await
        .unwrap();
    assert_eq!(left, 0, "a finished listing leaves nothing behind");

    // A third run starts from the beginning.
    let n = listings(&w, guild).len();
    r.check(&Scope::default()).await.unwrap();
    assert_eq!(listings(&w, guild)[n], "0");
    w.app.stop().await;
}
