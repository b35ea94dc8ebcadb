//! Guild, member and role routes: success paths and every error code.

mod common;

use common::{Api, expect_error, relaxed};
use reqwest::Method;
use sandbox_discord::{GuildIds, GuildSpec, RoleSpec, Sandbox, UserSpec, permissions as p};
use serde_json::{Value, json};

const MEMBER_ADMIN: u64 = p::CREATE_INSTANT_INVITE | p::KICK_MEMBERS | p::MANAGE_ROLES;

/// A guild where the bot can invite, kick and manage roles; roles
/// "Patrons" (1) and "Staff" (5), bot role at 3.
async fn setup() -> (Sandbox, Api, GuildIds) {
    let sb = Sandbox::start(relaxed()).await;
    let ids = sb.add_guild(
        GuildSpec::new("Acme Community")
            .with_bot_permissions(MEMBER_ADMIN)
            .with_bot_role_position(3)
            .with_role("Patrons", 1)
            .with_role("Staff", 5),
    );
    let api = Api::new(&sb);
    (sb, api, ids)
}

#[tokio::test]
async fn get_guild_roles_and_member() {
    let (sb, api, ids) = setup().await;
    let g = ids.guild_id;
    let guild: Value = api
        .bot(Method::GET, &format!("/guilds/{g}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(guild["id"], g.to_string());
    assert_eq!(guild["name"], "Acme Community");
    assert_eq!(guild["owner_id"], ids.owner_id.to_string());
    let roles = guild["roles"].as_array().unwrap();
    assert_eq!(roles.len(), 4, "@everyone, Patrons, bot, Staff");
    assert_eq!(roles[0]["id"], g.to_string());
    assert_eq!(roles[0]["name"], "@everyone");
    assert_eq!(roles[0]["position"], 0);
    assert!(roles.iter().all(|r| r["permissions"].is_string()));

    let roles2: Value = api
        .bot(Method::GET, &format!("/guilds/{g}/roles"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(&roles2, &guild["roles"]);
    let bot_role = roles2
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["managed"] == true)
        .unwrap();
    assert_eq!(bot_role["permissions"], MEMBER_ADMIN.to_string());
    assert_eq!(bot_role["tags"]["bot_id"], sb.bot_user_id().to_string());

    let alice = sb.add_user(UserSpec::new("alice"));
    sb.add_member(g, alice, &[ids.role("Patrons")]);
    let m: Value = api
        .bot(Method::GET, &format!("/guilds/{g}/members/{alice}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(m["user"]["id"], alice.to_string());
    assert_eq!(m["user"]["username"], "alice");
    assert_eq!(m["roles"], json!([ids.role("Patrons").to_string()]));
    assert!(m["joined_at"].as_str().unwrap().ends_with("+00:00"));

    let resp = api
        .bot(Method::GET, &format!("/guilds/{g}/members/1234"))
        .send()
        .await
        .unwrap();
    expect_error(resp, 404, 10007).await;
}

#[tokio::test]
async fn unknown_guild_vs_guild_without_bot() {
    let (sb, api, _) = setup().await;
    let resp = api.bot(Method::GET, "/guilds/999").send().await.unwrap();
    expect_error(resp, 404, 10004).await;
    let other = sb.add_guild(GuildSpec::new("No Bot").without_bot());
    for path in [
        format!("/guilds/{}", other.guild_id),
        format!("/guilds/{}/roles", other.guild_id),
        format!("/guilds/{}/members/{}", other.guild_id, other.owner_id),
    ] {
        let resp = api.bot(Method::GET, &path).send().await.unwrap();
        expect_error(resp, 403, 50001).await;
    }
    let resp = api
        .bot(Method::GET, "/guilds/not-a-number")
        .send()
        .await
        .unwrap();
    let body = expect_error(resp, 400, 50035).await;
    assert!(body["errors"]["guild_id"].is_object());
    assert_eq!(sb.stats().forbidden, 3);
}

#[tokio::test]
async fn bot_routes_need_bot_token() {
    let (sb, api, ids) = setup().await;
    let path = format!("{}/guilds/{}", sb.api_base(), ids.guild_id);
    let resp = api.http.get(&path).send().await.unwrap();
    expect_error(resp, 401, 0).await;
    let resp = api
        .http
        .get(&path)
        .header("Authorization", "Bot nope")
        .send()
        .await
        .unwrap();
    expect_error(resp, 401, 0).await;
    let alice = sb.add_user(UserSpec::new("alice"));
    let tok = sb.issue_token(alice, &["identify", "guilds.join"]);
    let resp = api
        .bearer(
            Method::GET,
            &format!("/guilds/{}", ids.guild_id),
            &tok.access_token,
        )
        .send()
        .await
        .unwrap();
    expect_error(resp, 401, 0).await;
    let s = sb.stats();
    assert_eq!(s.unauthorized, 3);
    assert_eq!(s.invalid_requests, 3);
}

#[tokio::test]
async fn add_member_201_then_204_ignoring_roles() {
    let (sb, api, ids) = setup().await;
    let g = ids.guild_id;
    let alice = sb.add_user(UserSpec::new("alice"));
    let tok = sb.issue_token(alice, &["identify", "guilds.join"]);
    let patrons = ids.role("Patrons").to_string();

    let resp = api
        .add_member(
            g,
            alice,
            json!({ "access_token": tok.access_token, "roles": [patrons] }),
        )
        .await;
    assert_eq!(resp.status(), 201);
    let m: Value = resp.json().await.unwrap();
    assert_eq!(m["user"]["id"], alice.to_string());
    assert_eq!(m["roles"], json!([patrons]));
    assert_eq!(
        sb.member(g, alice).unwrap().roles,
        vec![ids.role("Patrons")]
    );

    sb.remove_member(g, alice);
    sb.add_member(g, alice, &[]);
    let resp = api
        .add_member(
            g,
            alice,
            json!({ "access_token": tok.access_token, "roles": [patrons] }),
        )
        .await;
    assert_eq!(resp.status(), 204);
    assert_eq!(resp.text().await.unwrap(), "");
    assert!(
        sb.member(g, alice).unwrap().roles.is_empty(),
        "roles ignored for existing members"
    );
}

#[tokio::test]
async fn add_member_errors() {
    let (sb, api, ids) = setup().await;
    let g = ids.guild_id;
    let alice = sb.add_user(UserSpec::new("alice"));
    let bob = sb.add_user(UserSpec::new("bob"));
    let alice_tok = sb
        .issue_token(alice, &["identify", "guilds.join"])
        .access_token;

    // Token of someone else / garbage / without guilds.join → 50025.
    let resp = api
        .add_member(g, bob, json!({ "access_token": alice_tok }))
        .await;
    expect_error(resp, 403, 50025).await;
    let resp = api
        .add_member(g, alice, json!({ "access_token": "garbage" }))
        .await;
    expect_error(resp, 403, 50025).await;
    let ident_only = sb.issue_token(alice, &["identify"]).access_token;
    let resp = api
        .add_member(g, alice, json!({ "access_token": ident_only }))
        .await;
    expect_error(resp, 403, 50025).await;

    // Unknown user, missing token, bad JSON.
    let resp = api
        .add_member(g, 4242, json!({ "access_token": alice_tok }))
        .await;
    expect_error(resp, 404, 10013).await;
    let resp = api.add_member(g, alice, json!({})).await;
    expect_error(resp, 400, 50035).await;
    let resp = api
        .bot(Method::PUT, &format!("/guilds/{g}/members/{alice}"))
        .header("content-type", "application/json")
        .body("{nope")
        .send()
        .await
        .unwrap();
    expect_error(resp, 400, 50109).await;

    // Unknown role in the list.
    let resp = api
        .add_member(
            g,
            alice,
            json!({ "access_token": alice_tok, "roles": ["777"] }),
        )
        .await;
    expect_error(resp, 404, 10011).await;
    // Role above the bot.
    let staff = ids.role("Staff").to_string();
    let resp = api
        .add_member(
            g,
            alice,
            json!({ "access_token": alice_tok, "roles": [staff] }),
        )
        .await;
    expect_error(resp, 403, 50013).await;
    // Nick without Manage Nicknames.
    let resp = api
        .add_member(g, alice, json!({ "access_token": alice_tok, "nick": "A" }))
        .await;
    expect_error(resp, 403, 50013).await;
    assert!(sb.member(g, alice).is_none());

    // Banned.
    let carol = sb.add_user(UserSpec::new("carol").banned_from(g));
    let carol_tok = sb.issue_token(carol, &["guilds.join"]).access_token;
    let body = expect_error(
        api.add_member(g, carol, json!({ "access_token": carol_tok }))
            .await,
        403,
        40007,
    )
    .await;
    assert_eq!(body["message"], "The user is banned from this guild.");
    let dave = sb.add_user(UserSpec::new("dave"));
    sb.ban(g, dave);
    let dave_tok = sb.issue_token(dave, &["guilds.join"]).access_token;
    expect_error(
        api.add_member(g, dave, json!({ "access_token": dave_tok }))
            .await,
        403,
        40007,
    )
    .await;

    // Too many guilds.
    let erin = sb.add_user(UserSpec::new("erin").at_guild_limit());
    let erin_tok = sb.issue_token(erin, &["guilds.join"]).access_token;
    expect_error(
        api.add_member(g, erin, json!({ "access_token": erin_tok.clone() }))
            .await,
        400,
        30001,
    )
    .await;
    sb.set_at_guild_limit(erin, false);
    assert_eq!(
        api.add_member(g, erin, json!({ "access_token": erin_tok }))
            .await
            .status(),
        201
    );
}

#[tokio::test]
async fn add_member_needs_create_instant_invite_and_manage_roles_for_roles() {
    let sb = Sandbox::start(relaxed()).await;
    let ids = sb.add_guild(
        GuildSpec::new("G")
            .with_bot_permissions(p::KICK_MEMBERS)
            .with_role("Patrons", 1),
    );
    let api = Api::new(&sb);
    let alice = sb.add_user(UserSpec::new("alice"));
    let tok = sb.issue_token(alice, &["guilds.join"]).access_token;
    expect_error(
        api.add_member(ids.guild_id, alice, json!({ "access_token": tok }))
            .await,
        403,
        50013,
    )
    .await;

    sb.set_role_permissions(
        ids.guild_id,
        ids.bot_role_id.unwrap(),
        p::CREATE_INSTANT_INVITE,
    );
    let patrons = ids.role("Patrons").to_string();
    let resp = api
        .add_member(
            ids.guild_id,
            alice,
            json!({ "access_token": tok, "roles": [patrons] }),
        )
        .await;
    expect_error(resp, 403, 50013).await;
    assert_eq!(
        api.add_member(ids.guild_id, alice, json!({ "access_token": tok }))
            .await
            .status(),
        201
    );
}

#[tokio::test]
async fn role_add_remove_is_idempotent() {
    let (sb, api, ids) = setup().await;
    let g = ids.guild_id;
    let patrons = ids.role("Patrons");
    let alice = sb.add_user(UserSpec::new("alice"));
    sb.add_member(g, alice, &[]);
    for _ in 0..2 {
        let resp = api.put_role(g, alice, patrons).await;
        assert_eq!(resp.status(), 204);
        assert_eq!(sb.member(g, alice).unwrap().roles, vec![patrons]);
    }
    for _ in 0..2 {
        assert_eq!(api.delete_role(g, alice, patrons).await.status(), 204);
        assert!(sb.member(g, alice).unwrap().roles.is_empty());
    }
}

#[tokio::test]
async fn role_errors_and_hierarchy() {
    let (sb, api, ids) = setup().await;
    let g = ids.guild_id;
    let alice = sb.add_user(UserSpec::new("alice"));
    sb.add_member(g, alice, &[]);

    expect_error(api.put_role(g, alice, 31337).await, 404, 10011).await;
    expect_error(
        api.put_role(g, 31337, ids.role("Patrons")).await,
        404,
        10007,
    )
    .await;
    // Above the bot (5 > 3), equal to the bot (its own managed role), managed.
    expect_error(api.put_role(g, alice, ids.role("Staff")).await, 403, 50013).await;
    expect_error(
        api.put_role(g, alice, ids.bot_role_id.unwrap()).await,
        403,
        50013,
    )
    .await;
    expect_error(
        api.delete_role(g, alice, ids.role("Staff")).await,
        403,
        50013,
    )
    .await;
    let same = sb.add_role(g, RoleSpec::new("Same", 3));
    expect_error(api.put_role(g, alice, same).await, 403, 50013).await;
    let integ = sb.add_role(g, RoleSpec::new("Integration", 2).managed());
    expect_error(api.put_role(g, alice, integ).await, 403, 50013).await;

    // Moving the bot's role up fixes the hierarchy problem.
    sb.set_role_position(g, ids.bot_role_id.unwrap(), 6);
    assert_eq!(
        api.put_role(g, alice, ids.role("Staff")).await.status(),
        204
    );
    // Moving Patrons above the bot breaks it.
    sb.set_role_position(g, ids.role("Patrons"), 7);
    expect_error(
        api.put_role(g, alice, ids.role("Patrons")).await,
        403,
        50013,
    )
    .await;
}

#[tokio::test]
async fn role_routes_need_manage_roles_unless_admin_or_owner() {
    let sb = Sandbox::start(relaxed()).await;
    let api = Api::new(&sb);
    let ids = sb.add_guild(
        GuildSpec::new("G")
            .with_bot_permissions(p::CREATE_INSTANT_INVITE)
            .with_role("Patrons", 1),
    );
    let (g, patrons) = (ids.guild_id, ids.role("Patrons"));
    let alice = sb.add_user(UserSpec::new("alice"));
    sb.add_member(g, alice, &[]);
    expect_error(api.put_role(g, alice, patrons).await, 403, 50013).await;

    // ADMINISTRATOR via another role implies Manage Roles.
    let admin = sb.add_role(g, RoleSpec::new("Admin", 1).permissions(p::ADMINISTRATOR));
    sb.add_member(g, sb.bot_user_id(), &[ids.bot_role_id.unwrap(), admin]);
    assert_eq!(sb.bot_permissions(g), Some(p::ALL));
    assert_eq!(api.put_role(g, alice, patrons).await.status(), 204);

    // @everyone permissions count too.
    let ids2 = sb.add_guild(
        GuildSpec::new("G2")
            .with_everyone_permissions(p::MANAGE_ROLES)
            .with_role("Patrons", 1),
    );
    sb.add_member(ids2.guild_id, alice, &[]);
    assert_eq!(
        api.put_role(ids2.guild_id, alice, ids2.role("Patrons"))
            .await
            .status(),
        204
    );

    // An owner bot bypasses permissions and hierarchy.
    let ids3 = sb.add_guild(
        GuildSpec::new("Bot owned")
            .with_owner(sb.bot_user_id())
            .with_bot_role_position(1)
            .with_role("Top", 9),
    );
    sb.add_member(ids3.guild_id, alice, &[]);
    assert_eq!(
        api.put_role(ids3.guild_id, alice, ids3.role("Top"))
            .await
            .status(),
        204
    );
}

#[tokio::test]
async fn kick_member() {
    let (sb, api, ids) = setup().await;
    let g = ids.guild_id;
    let alice = sb.add_user(UserSpec::new("alice"));
    let boss = sb.add_user(UserSpec::new("boss"));
    sb.add_member(g, alice, &[ids.role("Patrons")]);
    sb.add_member(g, boss, &[ids.role("Staff")]);
    let kick = |u: u64| {
        api.bot(Method::DELETE, &format!("/guilds/{g}/members/{u}"))
            .send()
    };

    assert_eq!(kick(alice).await.unwrap().status(), 204);
    assert!(sb.member(g, alice).is_none());
    expect_error(kick(alice).await.unwrap(), 404, 10007).await;
    expect_error(kick(boss).await.unwrap(), 403, 50013).await; // above the bot
    expect_error(kick(ids.owner_id).await.unwrap(), 403, 50013).await; // owner

    sb.set_role_permissions(g, ids.bot_role_id.unwrap(), p::MANAGE_ROLES);
    sb.add_member(g, alice, &[]);
    expect_error(kick(alice).await.unwrap(), 403, 50013).await; // no Kick Members
}

#[tokio::test]
async fn list_members_requires_intent_and_paginates() {
    let (sb, api, ids) = setup().await;
    let g = ids.guild_id;
    let path = |q: &str| format!("/guilds/{g}/members{q}");
    expect_error(
        api.bot(Method::GET, &path("?limit=10"))
            .send()
            .await
            .unwrap(),
        403,
        50001,
    )
    .await;

    sb.set_members_intent(true);
    for i in 0..5 {
        let u = sb.add_user(UserSpec::new(format!("user{i}")));
        sb.add_member(g, u, &[]);
    }
    // owner + bot + 5 users
    let all: Vec<Value> = api
        .bot(Method::GET, &path("?limit=1000"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(all.len(), 7);
    let one: Vec<Value> = api
        .bot(Method::GET, &path(""))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(one.len(), 1, "default limit is 1");

    let first: Vec<Value> = api
        .bot(Method::GET, &path("?limit=3"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let last_id = first[2]["user"]["id"].as_str().unwrap();
    let next: Vec<Value> = api
        .bot(Method::GET, &path(&format!("?limit=3&after={last_id}")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(next.len(), 3);
    assert_eq!(next[0]["user"]["id"], all[3]["user"]["id"]);

    for bad in ["?limit=0", "?limit=1001", "?limit=x"] {
        expect_error(
            api.bot(Method::GET, &path(bad)).send().await.unwrap(),
            400,
            50035,
        )
        .await;
    }
}

#[tokio::test]
async fn current_user_guilds() {
    let (sb, api, ids) = setup().await;
    sb.add_guild(GuildSpec::new("Elsewhere").without_bot());
    let owned = sb.add_guild(GuildSpec::new("Mine").with_owner(sb.bot_user_id()));
    let guilds: Vec<Value> = api
        .bot(Method::GET, "/users/@me/guilds")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(guilds.len(), 2);
    assert_eq!(guilds[0]["id"], ids.guild_id.to_string());
    assert_eq!(guilds[0]["owner"], false);
    assert_eq!(guilds[0]["permissions"], MEMBER_ADMIN.to_string());
    assert_eq!(guilds[1]["id"], owned.guild_id.to_string());
    assert_eq!(guilds[1]["owner"], true);

    let alice = sb.add_user(UserSpec::new("alice"));
    sb.add_member(ids.guild_id, alice, &[]);
    let tok = sb.issue_token(alice, &["identify", "guilds"]).access_token;
    let mine: Vec<Value> = api
        .bearer(Method::GET, "/users/@me/guilds", &tok)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(mine.len(), 1);
    assert_eq!(mine[0]["name"], "Acme Community");
}

#[tokio::test]
async fn unknown_routes_and_methods() {
    let (_sb, api, ids) = setup().await;
    expect_error(api.bot(Method::GET, "/nope").send().await.unwrap(), 404, 0).await;
    expect_error(
        api.bot(Method::POST, &format!("/guilds/{}/members/1", ids.guild_id))
            .send()
            .await
            .unwrap(),
        405,
        0,
    )
    .await;
}
