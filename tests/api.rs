//! The merchant REST API through real HTTP: a real guildgate on its own database and
//! queues, the sandbox Discord in-process, requests sent with reqwest.

use crate::common;
use crate::discord_world;
use crate::smtp;

use std::sync::{Arc, Mutex};

use common::events::*;
use common::wait_for;
use discord_world::{BOT_PERMISSIONS, World};
use guildgate::domain::ids::BusinessId;
use guildgate::lifecycle::moves;
use reqwest::Method;
use sandbox_discord::{Consent, GuildIds, GuildSpec, RoleSpec, permissions};
use secrecy::ExposeSecret;
use serde_json::{Value, json};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/contract/api");
pub(crate) const T0: &str = "2026-05-01T10:31:00Z";

fn fixture(name: &str) -> Value {
    serde_json::from_slice(&std::fs::read(format!("{FIXTURES}/{name}")).unwrap()).unwrap()
}

/// A merchant's client: base URL and API key.
#[derive(Clone)]
pub(crate) struct Client {
    base: String,
    key: Option<String>,
    http: reqwest::Client,
}

impl Client {
    pub(crate) async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(k) = &self.key {
            req = req.bearer_auth(k);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req.send().await.expect("guildgate answers");
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        let v = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        (status, v)
    }
    pub(crate) async fn get(&self, path: &str) -> (u16, Value) {
        self.call(Method::GET, path, None).await
    }
    pub(crate) async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.call(Method::POST, path, Some(body)).await
    }
    pub(crate) async fn patch(&self, path: &str, body: Value) -> (u16, Value) {
        self.call(Method::PATCH, path, Some(body)).await
    }
    pub(crate) async fn put(&self, path: &str, body: Value) -> (u16, Value) {
        self.call(Method::PUT, path, Some(body)).await
    }
    pub(crate) async fn delete(&self, path: &str) -> (u16, Value) {
        self.call(Method::DELETE, path, None).await
    }
    /// `PUT /products/{product}/entitlements`: the product's list becomes `entitlements`,
    /// in order.
    pub(crate) async fn attach(&self, product: &str, entitlements: &[&str]) -> (u16, Value) {
        let list: Vec<Value> = entitlements
            .iter()
            .map(|e| json!({"entitlement_id": e}))
            .collect();
        self.put(
            &format!("/products/{product}/entitlements"),
            json!({"entitlements": list}),
        )
        .await
    }
    /// Raw body with a content type.
    async fn raw(
        &self,
        method: Method,
        path: &str,
        ctype: Option<&str>,
        body: Vec<u8>,
    ) -> (u16, Value) {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .body(body);
        if let Some(k) = &self.key {
            req = req.bearer_auth(k);
        }
        if let Some(c) = ctype {
            req = req.header("content-type", c);
        }
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }
}

/// A key for `business` (created if new), straight through the library.
pub(crate) async fn client(w: &World, business: &str) -> Client {
    keyed_client(w, business).await.1
}

/// [`client`], with the key's id (`key_…`).
async fn keyed_client(w: &World, business: &str) -> (String, Client) {
    let mut conn = w.app.pool.acquire().await.unwrap();
    let (id, key) = guildgate::web::api::auth::create_api_key(
        &mut conn,
        &BusinessId::parse(business).unwrap(),
        Some("test"),
    )
    .await
    .unwrap();
    (id, with_key(w, Some(key.expose_secret())))
}

/// A client presenting `key` as it is (none: no `Authorization`).
fn with_key(w: &World, key: Option<&str>) -> Client {
    Client {
        base: format!("http://{}", w.app.addr),
        key: key.map(str::to_string),
        http: reqwest::Client::new(),
    }
}

fn anonymous(w: &World) -> Client {
    with_key(w, None)
}

/// Connects a sandbox guild to the client's business through the real install flow:
/// install URL → sandbox consent as the guild's owner → guildgate's callback.
pub(crate) async fn connect(w: &World, c: &Client, g: &GuildIds) -> (u16, String) {
    let (s, v) = c.get("/discord/install-url").await;
    assert_eq!(s, 200, "{v}");
    let url = v["url"].as_str().unwrap();
    let callback = w
        .sandbox
        .consent(
            url,
            g.owner_id,
            Consent::InstallBot {
                guild_id: g.guild_id,
            },
        )
        .await
        .expect("consent page works");
    w.get(&callback).await
}

/// A connected guild with a role "Patrons" below the bot's.
pub(crate) async fn connected_guild(w: &World, c: &Client, name: &str) -> GuildIds {
    let g = w.guild(name);
    let (s, page) = connect(w, c, &g).await;
    assert_eq!(s, 200, "{page}");
    g
}

fn create_body(guild: u64, role: Option<u64>) -> Value {
    json!({
        "name": "Patrons Discord Role",
        "integration_type": "discord",
        "integration_config": {"guild_id": guild.to_string(), "role_id": role.map(|r| r.to_string())},
    })
}

pub(crate) async fn create_entitlement(c: &Client, guild: u64, role: Option<u64>) -> Value {
    let (s, v) = c.post("/entitlements", create_body(guild, role)).await;
    assert_eq!(s, 201, "{v}");
    v
}

/// A local webhook receiver answering 204 and recording each body.
#[derive(Clone, Default)]
struct Receiver {
    bodies: Arc<Mutex<Vec<Value>>>,
    url: String,
}

impl Receiver {
    async fn start() -> Self {
        let bodies: Arc<Mutex<Vec<Value>>> = Arc::default();
        let b = bodies.clone();
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |body: axum::body::Bytes| {
                let b = b.clone();
                async move {
                    b.lock()
                        .unwrap()
                        .push(serde_json::from_slice(&body).unwrap());
                    axum::http::StatusCode::NO_CONTENT
                }
            }),
        );
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", l.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
        Self { bodies, url }
    }

    async fn wait_type(&self, grant_id: &str, ty: &str) -> Value {
        wait_for(&format!("{ty} webhook"), || async {
            self.bodies
                .lock()
                .unwrap()
                .iter()
                .find(|b| b["type"] == ty && b["data"]["id"] == grant_id)
                .cloned()
        })
        .await
    }
}

fn keys(v: &Value) -> Vec<String> {
    let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
    k.sort();
    k
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_or_wrong_keys_are_401_with_a_json_body() {
    let w = World::start().await;
    let good = client(&w, "bus_A").await;
    let anon = anonymous(&w);
    let (s, v) = anon.get("/entitlements").await;
    assert_eq!((s, v["code"].as_str()), (401, Some("unauthorized")), "{v}");
    assert!(v["message"].as_str().unwrap().contains("Bearer"));
    for bad in [
        "nonsense".to_string(),
        "gg_aaaaaaaaaaaaaaaaaaaa_bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb".to_string(),
        // The right id with another secret: the last character changed to a different one.
        other_last_char(good.key.as_ref().unwrap()),
    ] {
        assert_ne!(Some(&bad), good.key.as_ref(), "a wrong key must differ");
        let c = Client {
            key: Some(bad.clone()),
            ..good.clone()
        };
        let (s, v) = c.get("/entitlements").await;
        assert_eq!(s, 401, "{bad}: {v}");
        assert_eq!(v["code"], "unauthorized");
    }
    // Another scheme.
    let r = reqwest::Client::new()
        .get(format!("{}/entitlements", good.base))
        .header(
            "authorization",
            format!("Basic {}", good.key.as_ref().unwrap()),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    assert_eq!(good.get("/entitlements").await.0, 200);
    // A revoked key stops working at once.
    let key_id: String = sqlx::query_scalar("SELECT id FROM api_keys WHERE business_id = 'bus_A'")
        .fetch_one(&w.app.pool)
        .await
        .unwrap();
    {
        let mut conn = w.app.pool.acquire().await.unwrap();
        assert!(
            guildgate::web::api::auth::revoke_api_key(&mut conn, &key_id)
                .await
                .unwrap()
        );
    }
    assert_eq!(good.get("/entitlements").await.0, 401);
    // Nothing stored reveals the key.
    let stored: Vec<u8> = sqlx::query_scalar("SELECT key_hash FROM api_keys")
        .fetch_one(&w.app.pool)
        .await
        .unwrap();
    assert_eq!(stored.len(), 32);
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_platforms_create_request_works_as_is_and_entitlements_have_its_shape() {
    let w = World::start().await;
    let c = client(&w, "bus_H4ekzPSlcg").await;
    let g = w.sandbox.add_guild(
        GuildSpec::new("Acme Community")
            .with_id(123456789012345678)
            .with_bot_permissions(BOT_PERMISSIONS)
            .with_role_spec(RoleSpec::new("Patrons", 1).with_id(987654321098765432)),
    );
    assert_eq!(connect(&w, &c, &g).await.0, 200);

    let (s, e) = c
        .post("/entitlements", fixture("entitlement-create-request.json"))
        .await;
    assert_eq!(s, 201, "{e}");
    let want = fixture("entitlement.json");
    // The platform's keys, plus guildgate's one extension (`health`), which the SDKs
    // pass through.
    let mut platform = e.clone();
    assert_eq!(platform["health"], json!({"status": "ok"}), "{e}");
    platform.as_object_mut().unwrap().remove("health");
    assert_eq!(keys(&platform), keys(&want));
    for k in [
        "business_id",
        "name",
        "description",
        "integration_type",
        "integration_config",
        "is_active",
        "metadata",
    ] {
        assert_eq!(e[k], want[k], "{k}");
    }
    assert!(e["id"].as_str().unwrap().starts_with("ent_"));
    assert!(e["created_at"].as_str().unwrap().ends_with('Z'));
    let id = e["id"].as_str().unwrap();

    let (s, one) = c.get(&format!("/entitlements/{id}")).await;
    assert_eq!((s, &one), (200, &e));
    let (s, list) = c.get("/entitlements").await;
    assert_eq!(s, 200);
    assert_eq!(list["items"], json!([e]));

    // Unknown fields are ignored; only what is sent changes.
    let (s, p) = c
        .patch(
            &format!("/entitlements/{id}"),
            json!({"name": "Gold", "description": "VIP", "brand_id": "brd_x", "metadata": {"tier": "gold"}}),
        )
        .await;
    assert_eq!(s, 200, "{p}");
    assert_eq!(p["name"], "Gold");
    assert_eq!(p["description"], "VIP");
    assert_eq!(p["metadata"], json!({"tier": "gold"}));
    assert_eq!(p["integration_config"], want["integration_config"]);
    let (_, p) = c
        .patch(&format!("/entitlements/{id}"), json!({"description": null}))
        .await;
    assert_eq!(p["description"], Value::Null);
    assert_eq!(p["name"], "Gold");

    // Membership only: role_id may be left out.
    let (s, m) = c
        .post(
            "/entitlements",
            json!({"name": "Members", "integration_type": "discord", "integration_config": {"guild_id": "123456789012345678"}}),
        )
        .await;
    assert_eq!(s, 201, "{m}");
    assert_eq!(m["integration_config"]["role_id"], Value::Null);

    // Soft delete: gone from the API and its products, grants kept and not revoked.
    c.attach("pdt_1", &[id]).await;
    w.app
        .publish(
            &payment("bus_H4ekzPSlcg", "pay_1", "cus_1", &["pdt_1"], T0),
            "evt_1",
        )
        .await;
    let grant = w.grant_of("cus_1").await;
    assert_eq!(c.delete(&format!("/entitlements/{id}")).await.0, 204);
    assert_eq!(c.get(&format!("/entitlements/{id}")).await.0, 404);
    assert_eq!(c.delete(&format!("/entitlements/{id}")).await.0, 404);
    assert_eq!(
        c.patch(&format!("/entitlements/{id}"), json!({"name": "x"}))
            .await
            .0,
        404
    );
    let (_, list) = c.get("/entitlements").await;
    assert_eq!(list["items"].as_array().unwrap().len(), 1);
    let (_, attached) = c.get("/products/pdt_1/entitlements").await;
    assert_eq!(attached["items"], json!([]));
    let (s, grants) = c.get(&format!("/entitlements/{id}/grants")).await;
    assert_eq!(s, 200);
    assert_eq!(grants["items"][0]["id"], grant.id.as_str());
    assert_eq!(grants["items"][0]["status"], "Pending");
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_invalid_and_oversized_bodies_get_clear_errors() {
    let w = World::start().await;
    let c = client(&w, "bus_A").await;
    let (s, v) = c
        .raw(
            Method::POST,
            "/entitlements",
            Some("application/json"),
            b"{\"name\": ".to_vec(),
        )
        .await;
    assert_eq!(
        (s, v["code"].as_str()),
        (400, Some("malformed_request")),
        "{v}"
    );
    let (s, v) = c
        .raw(
            Method::POST,
            "/entitlements",
            Some("text/plain"),
            b"{}".to_vec(),
        )
        .await;
    assert_eq!(s, 400, "{v}");
    assert!(
        v["message"].as_str().unwrap().contains("Content-Type"),
        "{v}"
    );

    let (s, v) = c
        .post(
            "/entitlements",
            json!({"integration_type": "discord", "integration_config": {"guild_id": "1"}}),
        )
        .await;
    assert_eq!(s, 422);
    assert!(v["message"].as_str().unwrap().contains("name"), "{v}");
    // Metadata values are strings, numbers or booleans, as the platform's are; every
    // other value is named.
    let (s, v) = c
        .post(
            "/entitlements",
            json!({"name": "x", "integration_type": "discord",
                   "integration_config": {"guild_id": "1"},
                   "metadata": {"ok": "s", "n": 1.5, "b": true,
                                "nested": {"a": 1}, "list": [1], "none": null}}),
        )
        .await;
    assert_eq!((s, v["code"].as_str()), (422, Some("invalid_field")), "{v}");
    let message: String = v["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["message"].as_str().unwrap().to_string() + "\n")
        .collect();
    for key in ["metadata.nested:", "metadata.list:", "metadata.none:"] {
        assert!(message.contains(key), "{key} {v}");
    }
    for key in ["metadata.ok:", "metadata.n:", "metadata.b:"] {
        assert!(!message.contains(key), "{key} {v}");
    }
    let (s, v) = c
        .post("/entitlements", json!({"name": "x", "integration_type": "discord", "integration_config": {"guild_id": 5}}))
        .await;
    assert_eq!(s, 422);
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("integration_config.guild_id"),
        "{v}"
    );
    let (s, v) = c
        .post("/entitlements", json!({"name": " ", "integration_type": "license_key", "integration_config": {"guild_id": "abc", "role_id": "x"}}))
        .await;
    assert_eq!(s, 422, "{v}");
    assert_eq!(v["code"], "unsupported_integration_type");
    let msgs: Vec<&str> = v["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["message"].as_str().unwrap())
        .collect();
    assert_eq!(msgs.len(), 4, "{v}");
    assert!(msgs[1].starts_with("name:"));
    assert!(msgs[2].starts_with("integration_config.guild_id:"));
    assert!(msgs[3].starts_with("integration_config.role_id:"));

    let big = vec![b' '; w.app.settings.http.max_body_bytes + 10];
    let (s, v) = c
        .raw(Method::POST, "/entitlements", Some("application/json"), big)
        .await;
    assert_eq!(
        (s, v["code"].as_str()),
        (413, Some("payload_too_large")),
        "{v}"
    );

    let (s, v) = c.get("/entitlements?page_size=abc").await;
    assert_eq!(s, 422);
    assert!(v["message"].as_str().unwrap().contains("page_size"), "{v}");
    let (s, v) = c.get("/entitlements/ent_nope").await;
    assert_eq!((s, v["code"].as_str()), (404, Some("not_found")));
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bodies_must_be_json_objects() {
    let w = World::start().await;
    let c = client(&w, "bus_A").await;
    let g = connected_guild(&w, &c, "Acme").await;
    let role = g.roles[0].1;
    let not_object = |s: u16, v: &Value| {
        assert_eq!((s, v["code"].as_str()), (422, Some("invalid_body")), "{v}");
        assert!(v["message"].as_str().unwrap().contains("object"), "{v}");
    };

    // serde would fill the struct by position from an array.
    let by_position = json!([
        "Patrons",
        "discord",
        {"guild_id": g.guild_id.to_string(), "role_id": role.to_string()}
    ]);
    let (s, v) = c.post("/entitlements", by_position).await;
    not_object(s, &v);
    for body in [json!("x"), json!(1), json!(null), json!(true)] {
        let (s, v) = c.post("/entitlements", body).await;
        not_object(s, &v);
    }
    assert_eq!(c.get("/entitlements").await.1["items"], json!([]));

    let e = create_entitlement(&c, g.guild_id, Some(role)).await;
    let id = e["id"].as_str().unwrap();
    let (s, v) = c.patch(&format!("/entitlements/{id}"), json!([])).await;
    not_object(s, &v);
    let (s, v) = c
        .put(
            "/products/pdt_life/entitlements",
            json!([[{"entitlement_id": id}]]),
        )
        .await;
    not_object(s, &v);

    let (s, ep) = c
        .post("/webhooks", json!({"url": "http://127.0.0.1:9/hook"}))
        .await;
    assert_eq!(s, 201, "{ep}");
    let ep = ep["id"].as_str().unwrap();
    let (_, before) = c.get(&format!("/webhooks/{ep}/secret")).await;
    // An optional body is left out, never `null` (the document says so too).
    for body in [json!([]), json!(null)] {
        let (s, v) = c.post(&format!("/webhooks/{ep}/secret/rotate"), body).await;
        not_object(s, &v);
    }
    let (s, v) = c
        .raw(
            Method::POST,
            &format!("/webhooks/{ep}/secret/rotate"),
            None,
            b" [ ] ".to_vec(),
        )
        .await;
    not_object(s, &v);
    assert_eq!(c.get(&format!("/webhooks/{ep}/secret")).await.1, before);
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nul_characters_are_refused_naming_where_they_are() {
    let w = World::start().await;
    let c = client(&w, "bus_A").await;
    let g = connected_guild(&w, &c, "Acme").await;
    let role = g.roles[0].1;
    let refused = |(s, v): (u16, Value), code: &str, named: &str| {
        assert_eq!((s, v["code"].as_str()), (422, Some(code)), "{v}");
        let message = v["message"].as_str().unwrap();
        assert!(message.starts_with(&format!("{named}: ")), "{v}");
        assert!(message.contains("U+0000"), "{v}");
    };

    // In a JSON body: a field, a nested metadata value, a metadata key.
    let mut body = create_body(g.guild_id, Some(role));
    body["name"] = json!("Patrons\u{0}");
    refused(
        c.post("/entitlements", body).await,
        "invalid_field",
        "/name",
    );
    let mut body = create_body(g.guild_id, Some(role));
    body["metadata"] = json!({"tier": {"perks": ["chat", "vip\u{0}"]}});
    refused(
        c.post("/entitlements", body).await,
        "invalid_field",
        "/metadata/tier/perks/1",
    );
    assert_eq!(c.get("/entitlements").await.1["items"], json!([]));
    let e = create_entitlement(&c, g.guild_id, Some(role)).await;
    let id = e["id"].as_str().unwrap();
    refused(
        c.patch(
            &format!("/entitlements/{id}"),
            json!({"metadata": {"gift\u{0}note": true}}),
        )
        .await,
        "invalid_field",
        "/metadata/gift\\u0000note",
    );
    refused(
        c.post(
            "/webhooks",
            json!({"url": "http://127.0.0.1:9/hook", "description": "\u{0}"}),
        )
        .await,
        "invalid_field",
        "/description",
    );

    // In a path parameter.
    refused(c.get("/entitlements/ent_%00").await, "invalid_field", "id");
    refused(
        c.delete(&format!("/entitlements/{id}/grants/gr_%00")).await,
        "invalid_field",
        "grant_id",
    );
    refused(
        c.get("/customers/cus_%00/entitlement-grants").await,
        "invalid_field",
        "customer_id",
    );
    refused(c.delete("/webhooks/ep_%00").await, "invalid_field", "id");

    // In a query parameter.
    refused(
        c.get("/entitlements?integration_type=discord%00").await,
        "invalid_query",
        "integration_type",
    );
    refused(
        c.get(&format!("/entitlements/{id}/grants?customer_id=cus_%00"))
            .await,
        "invalid_query",
        "customer_id",
    );

    // Nothing was changed, and the same requests without the NUL work.
    let (s, after) = c.get(&format!("/entitlements/{id}")).await;
    assert_eq!((s, &after), (200, &e));
    assert_eq!(c.get("/webhooks").await.1["data"], json!([]));
    assert_eq!(
        c.get(&format!("/entitlements/{id}/grants?customer_id=cus_1"))
            .await
            .0,
        200
    );
    w.stop().await;
}

/// A percent-encoded path parameter that is not UTF-8 is refused like any invalid
/// parameter, in the error shape, before authentication; not with axum's plain-text 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_parameters_that_are_not_utf8_are_refused_in_the_error_shape() {
    let w = World::start().await;
    let c = client(&w, "bus_A").await;
    for (path, named) in [
        ("/entitlements/ent_%FF", "id"),
        ("/webhooks/ep_%C3%28/secret", "id"),
        ("/customers/cus_%FF/entitlement-grants", "customer_id"),
        ("/entitlements/ent_1/grants/gr_%E2%82", "grant_id"),
    ] {
        for client in [&c, &anonymous(&w)] {
            let (s, v) = client.get(path).await;
            assert_eq!(
                (s, v["code"].as_str()),
                (422, Some("invalid_field")),
                "{path}: {v}"
            );
            let message = v["message"].as_str().unwrap();
            assert!(message.starts_with(&format!("{named}: ")), "{v}");
            assert!(message.contains("UTF-8"), "{v}");
        }
    }
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saving_explains_each_discord_misconfiguration() {
    let w = World::start().await;
    let c = client(&w, "bus_A").await;
    let problem = |v: &Value| {
        (
            v["code"].as_str().unwrap().to_string(),
            v["message"].as_str().unwrap().to_string(),
        )
    };

    // A server the business never connected, even though the bot is in it.
    let other = w.guild("Someone Else's");
    let (s, v) = c
        .post("/entitlements", create_body(other.guild_id, None))
        .await;
    assert_eq!(s, 422, "{v}");
    assert_eq!(problem(&v).0, "discord_guild_not_connected");

    let g = connected_guild(&w, &c, "Acme Community").await;
    let patrons = g.role("Patrons");
    let above = w
        .sandbox
        .add_role(g.guild_id, RoleSpec::new("Moderators", 50));
    let managed = w
        .sandbox
        .add_role(g.guild_id, RoleSpec::new("Booster", 1).managed());
    let cases = [
        (Some(424242), "discord_unknown_role", "does not exist"),
        (
            Some(g.everyone_role_id),
            "discord_role_is_everyone",
            "@everyone",
        ),
        (Some(managed), "discord_role_managed", "Booster"),
        (Some(above), "discord_role_hierarchy", "Moderators"),
    ];
    for (role, code, words) in cases {
        let (s, v) = c.post("/entitlements", create_body(g.guild_id, role)).await;
        assert_eq!(s, 422, "{code}: {v}");
        let (got, msg) = problem(&v);
        assert_eq!(got, code, "{v}");
        assert!(msg.contains(words), "{msg}");
    }

    // Missing permissions: one problem each.
    let bot_role = g.bot_role_id.unwrap();
    w.sandbox
        .set_role_permissions(g.guild_id, bot_role, permissions::MANAGE_ROLES);
    let (s, v) = c
        .post("/entitlements", create_body(g.guild_id, Some(patrons)))
        .await;
    assert_eq!(s, 422, "{v}");
    assert_eq!(v["code"], "discord_missing_permissions");
    let msgs: Vec<String> = v["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["message"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(msgs.len(), 2, "{v}");
    assert!(
        msgs[0].contains("Kick Members") && msgs[1].contains("Create Instant Invite"),
        "{msgs:?}"
    );
    w.sandbox
        .set_role_permissions(g.guild_id, bot_role, BOT_PERMISSIONS);
    let e = create_entitlement(&c, g.guild_id, Some(patrons)).await;

    // The bot removed: saving again says so.
    w.sandbox.remove_bot(g.guild_id);
    let (s, v) = c
        .patch(
            &format!("/entitlements/{}", e["id"].as_str().unwrap()),
            json!({"name": "again"}),
        )
        .await;
    assert_eq!(s, 422, "{v}");
    assert_eq!(problem(&v).0, "discord_bot_not_in_guild");
    let (_, still) = c
        .get(&format!("/entitlements/{}", e["id"].as_str().unwrap()))
        .await;
    assert_eq!(
        still["name"], "Patrons Discord Role",
        "a refused save changes nothing"
    );
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_business_never_sees_or_changes_anothers_objects() {
    let w = World::start().await;
    let a = client(&w, "bus_A").await;
    let b = client(&w, "bus_B").await;
    let g = connected_guild(&w, &b, "B's server").await;
    let e = create_entitlement(&b, g.guild_id, Some(g.role("Patrons"))).await;
    let id = e["id"].as_str().unwrap();
    b.attach("pdt_b", &[id]).await;
    w.app
        .publish(&payment("bus_B", "pay_b", "cus_b", &["pdt_b"], T0), "evt_b")
        .await;
    let grant = wait_for("B's grant", || async {
        let (_, v) = b.get(&format!("/entitlements/{id}/grants")).await;
        v["items"].as_array().and_then(|i| i.first().cloned())
    })
    .await;
    let gid = grant["id"].as_str().unwrap();
    let (_, ep) = b
        .post("/webhooks", json!({"url": "http://127.0.0.1:9/hook"}))
        .await;
    let ep = ep["id"].as_str().unwrap();
    let (s, v) = b
        .put(
            &format!("/entitlements/{id}/translations/fr"),
            json!({"name": "Rôle de B"}),
        )
        .await;
    assert_eq!(s, 201, "{v}");

    assert_eq!(a.get("/entitlements").await.1["items"], json!([]));
    for (m, path) in [
        (Method::GET, format!("/entitlements/{id}")),
        (Method::GET, format!("/entitlements/{id}?locale=fr")),
        (Method::PATCH, format!("/entitlements/{id}")),
        (Method::GET, format!("/entitlements/{id}/translations")),
        (Method::PUT, format!("/entitlements/{id}/translations/fr")),
        (Method::PUT, format!("/entitlements/{id}/translations/de")),
        (
            Method::DELETE,
            format!("/entitlements/{id}/translations/fr"),
        ),
        (Method::DELETE, format!("/entitlements/{id}")),
        (Method::GET, format!("/entitlements/{id}/grants")),
        (Method::GET, format!("/entitlements/{id}/grants/{gid}")),
        (Method::DELETE, format!("/entitlements/{id}/grants/{gid}")),
        (Method::GET, format!("/discord/guilds/{}/roles", g.guild_id)),
        (Method::GET, format!("/webhooks/{ep}")),
        (Method::PATCH, format!("/webhooks/{ep}")),
        (Method::GET, format!("/webhooks/{ep}/secret")),
        (Method::GET, format!("/webhooks/{ep}/headers")),
        (Method::PATCH, format!("/webhooks/{ep}/headers")),
        (Method::POST, format!("/webhooks/{ep}/secret/rotate")),
        (Method::GET, format!("/webhooks/{ep}/messages")),
        (
            Method::POST,
            format!("/webhooks/{ep}/messages/retry-failed"),
        ),
        (Method::DELETE, format!("/webhooks/{ep}")),
    ] {
        let body = matches!(m, Method::PATCH | Method::PUT)
            .then(|| json!({"name": "stolen", "headers": {"x-stolen": "1"}}));
        let (s, v) = a.call(m.clone(), &path, body).await;
        assert_eq!(s, 404, "{m} {path}: {v}");
        assert_eq!(v["code"], "not_found");
    }
    let (s, v) = a.attach("pdt_a", &[id]).await;
    assert_eq!(s, 422, "{v}");
    assert_eq!(
        a.get("/customers/cus_b/entitlement-grants").await.1["items"],
        json!([])
    );
    assert_eq!(
        a.get("/customers/cus_b/entitlements").await.1["items"],
        json!([])
    );
    let (s, v) = a.get("/products/pdt_b").await;
    assert_eq!((s, v["code"].as_str()), (404, Some("not_found")), "{v}");
    let (s, v) = a
        .patch(
            "/products/pdt_b",
            json!({"entitlements": [{"entitlement_id": id}]}),
        )
        .await;
    assert_eq!(s, 422, "{v}");
    assert_eq!(a.get("/discord/guilds").await.1["items"], json!([]));
    assert_eq!(a.get("/webhooks").await.1["data"], json!([]));
    // A cannot build on B's server either.
    let (s, v) = a.post("/entitlements", create_body(g.guild_id, None)).await;
    assert_eq!(
        (s, v["code"].as_str()),
        (422, Some("discord_guild_not_connected"))
    );

    // B's objects are untouched.
    let (_, still) = b.get(&format!("/entitlements/{id}/grants/{gid}")).await;
    assert_eq!(still["status"], "Pending");
    assert_eq!(
        b.get("/products/pdt_b").await.1["entitlements"][0]["id"],
        id
    );
    assert_eq!(
        b.get("/customers/cus_b/entitlements").await.1["items"][0]["grant_id"],
        gid
    );
    assert_eq!(
        b.get(&format!("/entitlements/{id}")).await.1["name"],
        "Patrons Discord Role"
    );
    let (_, translations) = b.get(&format!("/entitlements/{id}/translations")).await;
    assert_eq!(translations["items"].as_array().unwrap().len(), 1);
    assert_eq!(translations["items"][0]["locale"], "fr");
    assert_eq!(translations["items"][0]["name"], "Rôle de B");
    assert_eq!(b.get(&format!("/webhooks/{ep}")).await.0, 200);
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn translations_round_trip_and_show_in_reads_with_a_locale() {
    let w = World::start().await;
    let c = client(&w, "bus_A").await;
    let g = connected_guild(&w, &c, "Acme").await;
    let mut body = create_body(g.guild_id, Some(g.role("Patrons")));
    body["description"] = json!("Access to the patrons' channels");
    let (s, e) = c.post("/entitlements", body).await;
    assert_eq!(s, 201, "{e}");
    let id = e["id"].as_str().unwrap();
    let other = create_entitlement(&c, g.guild_id, None).await;
    let other_id = other["id"].as_str().unwrap();
    let path = |locale: &str| format!("/entitlements/{id}/translations/{locale}");

    // A new locale is 201; replacing it is 200, and replaces the whole translation.
    let (s, t) = c
        .put(
            &path("fr"),
            json!({"name": "Rôle des mécènes", "description": "Accès aux salons"}),
        )
        .await;
    assert_eq!(s, 201, "{t}");
    assert_eq!(
        (&t["locale"], &t["name"], &t["description"]),
        (
            &json!("fr"),
            &json!("Rôle des mécènes"),
            &json!("Accès aux salons")
        )
    );
    assert!(t["updated_at"].as_str().unwrap().ends_with('Z'), "{t}");
    let (s, t) = c.put(&path("fr"), json!({"name": "Rôle mécène"})).await;
    assert_eq!(s, 200, "{t}");
    assert_eq!(
        (&t["name"], &t["description"]),
        (&json!("Rôle mécène"), &Value::Null)
    );
    // Only a description: the name shows the base text in that locale.
    let (s, t) = c.put(&path("pt"), json!({"description": "Acesso"})).await;
    assert_eq!(s, 201, "{t}");
    let (s, t) = c.put(&path("de"), json!({"name": "Gönner-Rolle"})).await;
    assert_eq!(s, 201, "{t}");

    let (s, all) = c.get(&format!("/entitlements/{id}/translations")).await;
    assert_eq!(s, 200, "{all}");
    let locales: Vec<&str> = all["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["locale"].as_str().unwrap())
        .collect();
    assert_eq!(locales, ["de", "fr", "pt"]);
    let (_, some) = c
        .get(&format!(
            "/entitlements/{id}/translations?locale=fr&locale=pt&locale=es"
        ))
        .await;
    assert_eq!(some["items"].as_array().unwrap().len(), 2, "{some}");
    assert_eq!(
        c.get(&format!("/entitlements/{other_id}/translations"))
            .await
            .1["items"],
        json!([])
    );

    // Reads with a locale: the exact code, then its language, else the base text.
    let read = |q: &str| {
        let c = &c;
        let q = q.to_owned();
        async move {
            let (s, v) = c.get(&format!("/entitlements/{id}{q}")).await;
            assert_eq!(s, 200, "{v}");
            (v["name"].clone(), v["description"].clone())
        }
    };
    assert_eq!(
        read("?locale=fr").await,
        (
            json!("Rôle mécène"),
            json!("Access to the patrons' channels")
        )
    );
    assert_eq!(
        read("?locale=pt-BR").await,
        (json!("Patrons Discord Role"), json!("Acesso"))
    );
    assert_eq!(read("?locale=de-AT").await.0, json!("Gönner-Rolle"));
    for base in ["", "?locale=", "?locale=es", "?locale=xx-YY", "?locale=FR"] {
        assert_eq!(
            read(base).await,
            (
                json!("Patrons Discord Role"),
                json!("Access to the patrons' channels")
            ),
            "{base}"
        );
    }
    let (s, list) = c.get("/entitlements?locale=pt-BR&page_size=100").await;
    assert_eq!(s, 200, "{list}");
    let items = list["items"].as_array().unwrap();
    let mine = items.iter().find(|e| e["id"] == id).unwrap();
    assert_eq!(mine["description"], "Acesso");
    assert_eq!(mine["name"], "Patrons Discord Role");
    let theirs = items.iter().find(|e| e["id"] == other_id).unwrap();
    assert_eq!(theirs["name"], "Patrons Discord Role");
    let (_, list) = c.get("/entitlements?locale=fr").await;
    let mine = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["id"] == id)
        .unwrap()
        .clone();
    assert_eq!(mine["name"], "Rôle mécène");
    // The base text itself is unchanged.
    assert_eq!(
        c.get(&format!("/entitlements/{id}")).await.1["name"],
        "Patrons Discord Role"
    );

    // Delete: gone from the list and from reads; a second delete finds nothing.
    let (s, v) = c.delete(&path("fr")).await;
    assert_eq!(s, 204, "{v}");
    let (s, v) = c.delete(&path("fr")).await;
    assert_eq!((s, v["code"].as_str()), (404, Some("not_found")), "{v}");
    assert_eq!(read("?locale=fr").await.0, json!("Patrons Discord Role"));
    let (_, all) = c.get(&format!("/entitlements/{id}/translations")).await;
    assert_eq!(all["items"].as_array().unwrap().len(), 2, "{all}");

    // A deleted entitlement's translations go with it.
    assert_eq!(c.delete(&format!("/entitlements/{id}")).await.0, 204);
    let (s, _) = c.get(&format!("/entitlements/{id}/translations")).await;
    assert_eq!(s, 404);
    let (s, _) = c.put(&path("fr"), json!({"name": "x"})).await;
    assert_eq!(s, 404);
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_translation_refuses_an_unknown_locale_and_invalid_fields() {
    let w = World::start().await;
    let c = client(&w, "bus_A").await;
    let g = connected_guild(&w, &c, "Acme").await;
    let e = create_entitlement(&c, g.guild_id, None).await;
    let id = e["id"].as_str().unwrap();
    for bad in ["xx", "FR", "pt-BR", "fr%20", "fran%C3%A7ais"] {
        let path = format!("/entitlements/{id}/translations/{bad}");
        for (s, v) in [
            c.put(&path, json!({"name": "Rôle"})).await,
            c.delete(&path).await,
        ] {
            assert_eq!(
                (s, v["code"].as_str()),
                (422, Some("invalid_field")),
                "{bad}: {v}"
            );
            assert!(
                v["message"].as_str().unwrap().starts_with("locale: "),
                "{v}"
            );
        }
    }
    let path = format!("/entitlements/{id}/translations/fr");
    for (body, field) in [
        (json!({"name": "  "}), "name"),
        (json!({"name": "n".repeat(256)}), "name"),
        (json!({"description": "d".repeat(2001)}), "description"),
    ] {
        let (s, v) = c.put(&path, body).await;
        assert_eq!((s, v["code"].as_str()), (422, Some("invalid_field")), "{v}");
        assert!(
            v["message"]
                .as_str()
                .unwrap()
                .starts_with(&format!("{field}: ")),
            "{v}"
        );
    }
    // Nothing invalid was saved.
    let (_, all) = c.get(&format!("/entitlements/{id}/translations")).await;
    assert_eq!(all["items"], json!([]), "{all}");
    let (s, v) = c
        .put("/entitlements/ent_nope/translations/fr", json!({}))
        .await;
    assert_eq!((s, v["code"].as_str()), (404, Some("not_found")), "{v}");
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_paginate_and_filter() {
    let w = World::start().await;
    let c = client(&w, "bus_A").await;
    let g = connected_guild(&w, &c, "Acme").await;
    let mut made = Vec::new();
    for _ in 0..5 {
        made.push(
            create_entitlement(&c, g.guild_id, None).await["id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    let mut seen = Vec::new();
    for (n, want) in [(0, 2), (1, 2), (2, 1), (3, 0)] {
        let (s, v) = c
            .get(&format!("/entitlements?page_size=2&page_number={n}"))
            .await;
        assert_eq!(s, 200);
        let items = v["items"].as_array().unwrap();
        assert_eq!(items.len(), want, "page {n}");
        seen.extend(items.iter().map(|e| e["id"].as_str().unwrap().to_string()));
    }
    made.reverse();
    assert_eq!(seen, made, "newest first, each once");
    assert_eq!(
        c.get("/entitlements").await.1["items"]
            .as_array()
            .unwrap()
            .len(),
        5
    );
    assert_eq!(
        c.get("/entitlements?integration_type=discord").await.1["items"]
            .as_array()
            .unwrap()
            .len(),
        5
    );
    assert_eq!(
        c.get("/entitlements?integration_type=license_key").await.1["items"],
        json!([])
    );
    for bad in [
        "page_size=0",
        "page_size=101",
        "page_number=-1",
        "page_number=4294967296",
    ] {
        let (s, v) = c.get(&format!("/entitlements?{bad}")).await;
        assert_eq!(s, 422, "{bad}: {v}");
    }
    // Any u32 is a page number, as the document says (not only an int32).
    let (s, v) = c.get("/entitlements?page_number=4294967295").await;
    assert_eq!((s, &v["items"]), (200, &json!([])), "{v}");

    // Grants: by status, by customer, paginated.
    c.attach("pdt_1", &[&made[0]]).await;
    for i in 0..3 {
        w.app
            .publish(
                &payment(
                    "bus_A",
                    &format!("pay_{i}"),
                    &format!("cus_{i}"),
                    &["pdt_1"],
                    T0,
                ),
                &format!("evt_{i}"),
            )
            .await;
    }
    w.app.wait_processed(3).await;
    let e = &made[0];
    let (_, v) = c
        .get(&format!("/entitlements/{e}/grants?page_size=2"))
        .await;
    assert_eq!(v["items"].as_array().unwrap().len(), 2);
    let (_, v) = c
        .get(&format!("/entitlements/{e}/grants?customer_id=cus_1"))
        .await;
    assert_eq!(v["items"].as_array().unwrap().len(), 1);
    assert_eq!(v["items"][0]["customer_id"], "cus_1");
    assert_eq!(
        c.get(&format!("/entitlements/{e}/grants?status=Pending"))
            .await
            .1["items"]
            .as_array()
            .unwrap()
            .len(),
        3
    );
    assert_eq!(
        c.get(&format!("/entitlements/{e}/grants?status=Revoked"))
            .await
            .1["items"],
        json!([])
    );
    let (s, v) = c
        .get(&format!("/entitlements/{e}/grants?status=pending"))
        .await;
    assert_eq!(s, 422);
    assert!(v["message"].as_str().unwrap().starts_with("status:"), "{v}");
    let (_, v) = c
        .get("/customers/cus_2/entitlement-grants?status=Pending")
        .await;
    assert_eq!(v["items"].as_array().unwrap().len(), 1);
    let want = fixture("grant.json");
    assert_eq!(keys(&v["items"][0]), keys(&want));
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn products_take_up_to_fifty_of_the_businesss_own_entitlements() {
    let w = World::start().await;
    let c = client(&w, "bus_A").await;
    let g = connected_guild(&w, &c, "Acme").await;
    let e1 = create_entitlement(&c, g.guild_id, None).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let e2 = create_entitlement(&c, g.guild_id, Some(g.role("Patrons"))).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (s, v) = c.attach("pdt_1", &[&e2, &e1]).await;
    assert_eq!(s, 200, "{v}");
    let ids = |v: &Value| {
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["id"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(ids(&v), vec![e2.clone(), e1.clone()]);
    assert_eq!(
        ids(&c.get("/products/pdt_1/entitlements").await.1),
        vec![e2.clone(), e1.clone()]
    );
    // Replaces.
    c.attach("pdt_1", &[&e1]).await;
    assert_eq!(
        ids(&c.get("/products/pdt_1/entitlements").await.1),
        vec![e1.clone()]
    );

    let many: Vec<String> = (0..51).map(|_| e1.clone()).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    let (s, v) = c.attach("pdt_1", &many).await;
    assert_eq!(s, 422);
    assert!(v["message"].as_str().unwrap().contains("at most 50"), "{v}");
    let (s, v) = c.attach("pdt_1", &[&e1, &e1]).await;
    assert_eq!(s, 422);
    assert!(v["message"].as_str().unwrap().contains("twice"), "{v}");
    let (s, v) = c.attach("pdt_1", &[&e1, "ent_missing"]).await;
    assert_eq!(s, 422);
    assert!(
        v["message"].as_str().unwrap().contains("entitlements[1]"),
        "{v}"
    );
    assert_eq!(
        ids(&c.get("/products/pdt_1/entitlements").await.1),
        vec![e1.clone()],
        "refused PUTs change nothing"
    );
    let (s, v) = c
        .put("/products/pdt_1/entitlements", json!({"entitlements": "x"}))
        .await;
    assert_eq!(s, 422, "{v}");
    // [] clears.
    let (s, v) = c.attach("pdt_1", &[]).await;
    assert_eq!((s, &v["items"]), (200, &json!([])));
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_url_callback_guilds_and_roles() {
    let w = World::start().await;
    let c = client(&w, "bus_A").await;
    let (s, v) = c.get("/discord/install-url").await;
    assert_eq!(s, 200);
    let url = url::Url::parse(v["url"].as_str().unwrap()).unwrap();
    let q: std::collections::HashMap<String, String> = url.query_pairs().into_owned().collect();
    assert_eq!(q["scope"], "bot identify");
    assert_eq!(
        q["response_type"], "code",
        "a code grant: the exchange names the server"
    );
    assert_eq!(q["permissions"], "268435459");
    let expires = chrono::DateTime::parse_from_rfc3339(v["expires_at"].as_str().unwrap())
        .unwrap()
        .with_timezone(&chrono::Utc);
    let ttl = expires - chrono::Utc::now();
    assert!(
        ttl > chrono::Duration::minutes(9) && ttl <= chrono::Duration::minutes(10),
        "install links live 10 minutes: {ttl}"
    );
    assert_eq!(q["client_id"], w.sandbox.client_id().to_string());
    assert_eq!(
        q["redirect_uri"],
        format!("http://{}/discord/bot/callback", w.app.addr)
    );
    assert!(q.contains_key("state"));

    // A server without the bot yet, with roles of every kind.
    let g = w.sandbox.add_guild(
        GuildSpec::new("Acme <Community>")
            .without_bot()
            .with_role("Patrons", 1)
            .with_role_spec(RoleSpec::new("Booster", 2).managed()),
    );
    let callback = w
        .sandbox
        .consent(
            url.as_str(),
            g.owner_id,
            Consent::InstallBot {
                guild_id: g.guild_id,
            },
        )
        .await
        .unwrap();
    let (s, page) = w.get(&callback).await;
    assert_eq!(s, 200, "{page}");
    assert!(page.contains("Acme &lt;Community&gt;"), "{page}");
    assert_eq!(w.sandbox.bot_permissions(g.guild_id), Some(BOT_PERMISSIONS));
    let (_, guilds) = c.get("/discord/guilds").await;
    assert_eq!(guilds["items"][0]["guild_id"], g.guild_id.to_string());
    assert_eq!(guilds["items"][0]["name"], "Acme <Community>");
    assert_eq!(guilds["items"][0]["installed_by"], g.owner_id.to_string());
    assert_eq!(guilds["items"][0]["status"], "connected");

    // The bot's role was placed on top; one above it now.
    let top = w
        .sandbox
        .add_role(g.guild_id, RoleSpec::new("Admins", 1000));
    let (s, roles) = c
        .get(&format!("/discord/guilds/{}/roles", g.guild_id))
        .await;
    assert_eq!(s, 200, "{roles}");
    let by_name = |n: &str| {
        roles["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == n)
            .cloned()
            .unwrap()
    };
    assert_eq!(by_name("Patrons")["assignable"], true);
    assert_eq!(by_name("Patrons")["problem"], Value::Null);
    assert_eq!(
        by_name("Booster")["problem"]["code"],
        "discord_role_managed"
    );
    assert_eq!(
        by_name("@everyone")["problem"]["code"],
        "discord_role_is_everyone"
    );
    assert_eq!(
        by_name("Admins")["problem"]["code"],
        "discord_role_hierarchy"
    );
    assert_eq!(roles["items"][0]["id"], top.to_string(), "highest first");
    assert_eq!(c.get("/discord/guilds/999/roles").await.0, 404);

    // Altered, cancelled and wrong-purpose states change nothing.
    let tampered = callback.replace("state=", "state=x");
    assert_eq!(w.get(&tampered).await.0, 400);
    let cancelled = w
        .sandbox
        .consent(url.as_str(), g.owner_id, Consent::Cancel)
        .await
        .unwrap();
    assert_eq!(w.get(&cancelled).await.0, 400);

    // The bot was removed from the server since: its roles cannot be read (documented
    // beside the 404 of a server never connected).
    w.sandbox.remove_bot(g.guild_id);
    let (s, v) = c
        .get(&format!("/discord/guilds/{}/roles", g.guild_id))
        .await;
    assert_eq!(
        (s, v["code"].as_str()),
        (422, Some("discord_unknown_guild")),
        "{v}"
    );
    w.stop().await;
}

/// Plays the merchant's install up to Discord's redirect: the callback URL guildgate
/// would receive, not yet opened.
async fn install_callback(w: &World, c: &Client, guild: u64, user: u64) -> String {
    let (s, v) = c.get("/discord/install-url").await;
    assert_eq!(s, 200, "{v}");
    w.sandbox
        .consent(
            v["url"].as_str().unwrap(),
            user,
            Consent::InstallBot { guild_id: guild },
        )
        .await
        .expect("consent page works")
}

/// `url` with query parameter `key` set to `value` (or removed for `None`).
fn with_param(url: &str, key: &str, value: Option<&str>) -> String {
    let mut u = url::Url::parse(url).unwrap();
    let pairs: Vec<(String, String)> = u
        .query_pairs()
        .into_owned()
        .filter(|(k, _)| k != key)
        .collect();
    {
        let mut q = u.query_pairs_mut();
        q.clear();
        for (k, v) in &pairs {
            q.append_pair(k, v);
        }
        if let Some(v) = value {
            q.append_pair(key, v);
        }
    }
    u.into()
}

async fn guild_ids(c: &Client) -> Vec<String> {
    let (s, v) = c.get("/discord/guilds").await;
    assert_eq!(s, 200, "{v}");
    v["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["guild_id"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_install_callback_connects_nothing() {
    let w = World::start().await;
    let a = client(&w, "bus_A").await;
    let b = client(&w, "bus_B").await;
    let victim = connected_guild(&w, &a, "A's server").await;

    // B's own valid state, with A's server in the query and no code: nothing proves
    // which server the bot was added to.
    let (s, v) = b.get("/discord/install-url").await;
    assert_eq!(s, 200, "{v}");
    let url = url::Url::parse(v["url"].as_str().unwrap()).unwrap();
    let state = url
        .query_pairs()
        .find(|(k, _)| k == "state")
        .unwrap()
        .1
        .into_owned();
    let base = format!("http://{}/discord/bot/callback", w.app.addr);
    let forged = with_param(
        &with_param(&base, "state", Some(&state)),
        "guild_id",
        Some(&victim.guild_id.to_string()),
    );
    let (s, page) = w
        .get(&with_param(&forged, "permissions", Some("268435459")))
        .await;
    assert_eq!(s, 400, "{page}");
    assert!(page.contains("no authorization code"), "{page}");
    // A made-up code: Discord confirms nothing.
    let (s, page) = w.get(&with_param(&forged, "code", Some("made-up"))).await;
    assert_eq!(s, 400, "{page}");
    assert!(page.contains("Discord did not confirm"), "{page}");
    assert!(guild_ids(&b).await.is_empty(), "nothing recorded for B");

    // B's real install of its own server, with A's server put in the query: the server
    // Discord's code exchange names is the one connected.
    let own = w.guild("B's server");
    let callback = install_callback(&w, &b, own.guild_id, own.owner_id).await;
    let (s, page) = w
        .get(&with_param(
            &callback,
            "guild_id",
            Some(&victim.guild_id.to_string()),
        ))
        .await;
    assert_eq!(s, 200, "{page}");
    assert!(page.contains("B&#39;s server"), "{page}");
    assert_eq!(guild_ids(&b).await, vec![own.guild_id.to_string()]);
    assert_eq!(guild_ids(&a).await, vec![victim.guild_id.to_string()]);

    // So B cannot sell A's roles.
    let (s, v) = b
        .post(
            "/entitlements",
            create_body(victim.guild_id, Some(victim.roles[0].1)),
        )
        .await;
    assert_eq!(
        (s, v["code"].as_str()),
        (422, Some("discord_guild_not_connected")),
        "{v}"
    );
    let (s, _) = b
        .get(&format!("/discord/guilds/{}/roles", victim.guild_id))
        .await;
    assert_eq!(s, 404);
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_install_link_works_once() {
    let w = World::start().await;
    let a = client(&w, "bus_A").await;
    let g = w.guild("Once");
    let (_, v) = a.get("/discord/install-url").await;
    let url = v["url"].as_str().unwrap();
    // Two passes through Discord with the same link: two codes, one state.
    let mut callbacks = Vec::new();
    for _ in 0..2 {
        callbacks.push(
            w.sandbox
                .consent(
                    url,
                    g.owner_id,
                    Consent::InstallBot {
                        guild_id: g.guild_id,
                    },
                )
                .await
                .unwrap(),
        );
    }
    let (s, page) = w.get(&callbacks[0]).await;
    assert_eq!(s, 200, "{page}");
    let (s, page) = w.get(&callbacks[1]).await;
    assert_eq!(s, 400, "{page}");
    assert!(page.contains("already used"), "{page}");
    // The first callback again: its state is spent too.
    let (s, page) = w.get(&callbacks[0]).await;
    assert_eq!(s, 400, "{page}");
    assert_eq!(guild_ids(&a).await, vec![g.guild_id.to_string()]);
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_belongs_to_one_business_until_it_is_disconnected() {
    let w = World::start().await;
    let a = client(&w, "bus_A").await;
    let b = client(&w, "bus_B").await;
    let g = connected_guild(&w, &a, "Shared").await;

    // The same person manages the server and runs B: B's install is refused.
    let (s, page) = w
        .get(&install_callback(&w, &b, g.guild_id, g.owner_id).await)
        .await;
    assert_eq!(s, 409, "{page}");
    assert!(page.contains("another guildgate account"), "{page}");
    assert!(
        page.contains(&format!("DELETE /discord/guilds/{}", g.guild_id)),
        "{page}"
    );
    assert!(guild_ids(&b).await.is_empty());
    assert_eq!(guild_ids(&a).await, vec![g.guild_id.to_string()]);

    // A cannot let go while an entitlement uses the server.
    let ent = create_entitlement(&a, g.guild_id, Some(g.roles[0].1)).await;
    let path = format!("/discord/guilds/{}", g.guild_id);
    let (s, v) = a.delete(&path).await;
    assert_eq!(
        (s, v["code"].as_str()),
        (409, Some("discord_guild_in_use")),
        "{v}"
    );
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains(ent["id"].as_str().unwrap()),
        "{v}"
    );
    // B cannot disconnect A's server.
    assert_eq!(b.delete(&path).await.0, 404);

    let (s, _) = a
        .delete(&format!("/entitlements/{}", ent["id"].as_str().unwrap()))
        .await;
    assert_eq!(s, 204);
    assert_eq!(a.delete(&path).await.0, 204);
    assert!(guild_ids(&a).await.is_empty());
    assert_eq!(a.delete(&path).await.0, 404);

    // Now B can connect it.
    let (s, page) = w
        .get(&install_callback(&w, &b, g.guild_id, g.owner_id).await)
        .await;
    assert_eq!(s, 200, "{page}");
    assert_eq!(guild_ids(&b).await, vec![g.guild_id.to_string()]);
    w.stop().await;
}

/// A business that keeps a server it should not (an install link followed by mistake,
/// an admin who has left) is not asked: an operator sees who holds it and takes it
/// from that business, and the rightful one connects it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_takes_a_server_from_the_business_holding_it() {
    let w = World::start().await;
    let a = client(&w, "bus_A").await;
    let b = client(&w, "bus_B").await;
    let g = connected_guild(&w, &a, "Disputed").await;
    create_entitlement(&a, g.guild_id, Some(g.roles[0].1)).await;
    let guilds = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_guildgate"))
            .arg("guilds")
            .args(args)
            .env("GUILDGATE_DATABASE__URL", &w.app.db.url)
            .env("RUST_LOG", "error")
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let guild = g.guild_id.to_string();
    let (ok, out, err) = guilds(&["show", &guild, "--json"]);
    assert!(ok, "{err}");
    let shown: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(shown.as_array().unwrap().len(), 1, "{shown}");
    assert_eq!(shown[0]["business_id"], "bus_A");
    assert_eq!(shown[0]["state"], "connected");
    assert_eq!(shown[0]["installed_by"], g.owner_id.to_string());

    // Nothing changes without --yes, nor for a business that does not hold it.
    let (ok, _, err) = guilds(&["release", &guild, "--business", "bus_A"]);
    assert!(!ok && err.contains("--yes"), "{err}");
    let (ok, _, err) = guilds(&["release", &guild, "--business", "bus_B", "--yes"]);
    assert!(!ok && err.contains("neither holds nor claims"), "{err}");
    assert_eq!(guild_ids(&a).await, vec![guild.clone()]);

    let (ok, out, err) = guilds(&["release", &guild, "--business", "bus_A", "--yes"]);
    assert!(ok, "{err}");
    assert!(out.contains("took Discord server"), "{out}");
    assert!(guild_ids(&a).await.is_empty());
    let (ok, out, _) = guilds(&["show", &guild]);
    assert!(ok && out.contains("no business holds"), "{out}");
    let (s, page) = w
        .get(&install_callback(&w, &b, g.guild_id, g.owner_id).await)
        .await;
    assert_eq!(s, 200, "{page}");
    assert_eq!(guild_ids(&b).await, vec![guild]);
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_claimed_by_several_businesses_needs_a_new_install() {
    let w = World::start().await;
    let a = client(&w, "bus_A").await;
    let b = client(&w, "bus_B").await;
    let g = w.guild("Claimed twice");
    // As the upgrade leaves a server that two businesses held without proof.
    for business in ["bus_A", "bus_B"] {
        sqlx::query(
            "INSERT INTO discord_guilds (business_id, guild_id, name, needs_reinstall)
             VALUES ($1, $2, 'Claimed twice', true)",
        )
        .bind(business)
        .bind(g.guild_id.to_string())
        .execute(&w.app.pool)
        .await
        .unwrap();
    }
    let (_, v) = a.get("/discord/guilds").await;
    assert_eq!(v["items"][0]["status"], "needs_reinstall", "{v}");
    let (s, v) = a
        .post("/entitlements", create_body(g.guild_id, Some(g.roles[0].1)))
        .await;
    assert_eq!(
        (s, v["code"].as_str()),
        (422, Some("discord_guild_needs_reinstall")),
        "{v}"
    );
    // Neither its roles nor who holds what there, until the bot is installed again.
    let access = format!(
        "/discord/guilds/{}/members/{}/access",
        g.guild_id, g.owner_id
    );
    for path in [
        format!("/discord/guilds/{}/roles", g.guild_id),
        access.clone(),
    ] {
        let (s, v) = a.get(&path).await;
        assert_eq!(
            (s, v["code"].as_str()),
            (409, Some("discord_guild_needs_reinstall")),
            "{path}: {v}"
        );
    }

    // A proves it manages the server: A's connection counts, B's claim is gone.
    let (s, page) = w
        .get(&install_callback(&w, &a, g.guild_id, g.owner_id).await)
        .await;
    assert_eq!(s, 200, "{page}");
    let (_, v) = a.get("/discord/guilds").await;
    assert_eq!(v["items"][0]["status"], "connected", "{v}");
    assert!(guild_ids(&b).await.is_empty());
    create_entitlement(&a, g.guild_id, Some(g.roles[0].1)).await;
    assert_eq!(a.get(&access).await.0, 200);
    assert_eq!(b.get(&access).await.0, 404);
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upgrade_keeps_sole_connections_and_marks_shared_ones() {
    let db = common::TestDb::create().await;
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    let migrator = &guildgate::store::MIGRATOR;
    migrator.run_to(13, &pool).await.unwrap();
    sqlx::query("INSERT INTO businesses (id) VALUES ('bus_A'), ('bus_B')")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO discord_guilds (business_id, guild_id)
         VALUES ('bus_A', '100'), ('bus_B', '100'), ('bus_A', '200')",
    )
    .execute(&pool)
    .await
    .unwrap();
    migrator.run(&pool).await.unwrap();
    let rows: Vec<(String, String, bool)> = sqlx::query_as(
        "SELECT business_id, guild_id, needs_reinstall FROM discord_guilds
         ORDER BY guild_id, business_id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let row = |b: &str, g: &str, n: bool| (b.to_string(), g.to_string(), n);
    assert_eq!(
        rows,
        vec![
            row("bus_A", "100", true),
            row("bus_B", "100", true),
            row("bus_A", "200", false),
        ]
    );
    pool.close().await;
    db.drop_db().await;
}

/// A message still pending has a delivery under way: sending it again beside it is
/// refused (409). Failed messages are sent again a bounded page at a time, continued
/// with the cursor each page returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_retries_refuse_pending_messages_and_page_failed_ones() {
    use common::TestConfig;
    use guildgate::app::Options;
    let w = World::configured(TestConfig {
        options: Some(Options {
            webhooks: false,
            relay: false,
            ..Options::default()
        }),
        ..TestConfig::default()
    })
    .await;
    let c = client(&w, "bus_A").await;
    let (s, ep) = c
        .post("/webhooks", json!({"url": "http://127.0.0.1:9/hook"}))
        .await;
    assert_eq!(s, 201, "{ep}");
    let ep = ep["id"].as_str().unwrap();
    // Messages 1 to 5 failed, 6 pending, 7 delivered.
    sqlx::query(
        "INSERT INTO webhook_messages (id, endpoint_id, business_id, grant_id, event_type, body, status)
         SELECT 'msg_' || lpad(n::text, 32, '0'), $1, 'bus_A', 'grant_' || n,
                'entitlement_grant.created', '{}',
                CASE WHEN n <= 5 THEN 'failed' WHEN n = 6 THEN 'pending' ELSE 'delivered' END
         FROM generate_series(1, 7) n",
    )
    .bind(ep)
    .execute(&w.app.pool)
    .await
    .unwrap();
    let id = |n: u32| format!("msg_{n:032}");
    let jobs = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM outbox WHERE kind = 'webhook'")
            .fetch_one(&w.app.pool)
            .await
            .unwrap()
    };
    let retry = |n: u32| {
        let c = c.clone();
        let path = format!("/webhooks/{ep}/messages/{}/retry", id(n));
        async move { c.post(&path, json!({})).await }
    };

    let (s, v) = retry(6).await;
    assert_eq!(s, 409, "{v}");
    assert_eq!(v["code"], "message_pending", "{v}");
    assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    assert_eq!(jobs().await, 0, "no second job for a pending message");

    let (s, v) = retry(7).await;
    assert_eq!((s, &v["message_ids"]), (202, &json!([id(7)])), "delivered");
    let (s, v) = retry(1).await;
    assert_eq!((s, &v["message_ids"]), (202, &json!([id(1)])), "failed");
    assert_eq!(retry(1).await.0, 409, "pending again once retried");
    assert_eq!(jobs().await, 2);

    let bulk = |q: String| {
        let c = c.clone();
        let path = format!("/webhooks/{ep}/messages/retry-failed{q}");
        async move { c.post(&path, json!({})).await }
    };
    let too_long = format!("?cursor=msg_{}", "a".repeat(61));
    for bad in ["?limit=0", "?limit=1001", "?cursor=nope", too_long.as_str()] {
        let (s, v) = bulk(bad.to_string()).await;
        assert_eq!(s, 422, "{bad}: {v}");
    }
    let (s, page) = bulk("?limit=3".into()).await;
    assert_eq!(s, 202, "{page}");
    assert_eq!(page["message_ids"], json!([id(2), id(3), id(4)]));
    assert_eq!(page["next_cursor"], json!(id(4)));
    let (s, page) = bulk(format!("?limit=3&cursor={}", id(4))).await;
    assert_eq!(s, 202, "{page}");
    assert_eq!(page["message_ids"], json!([id(5)]));
    assert_eq!(page["next_cursor"], Value::Null);
    assert_eq!(jobs().await, 6);
    // A cursor's 64 are characters, as the document's `maxLength` counts (not bytes).
    let (s, v) = bulk(format!("?cursor=msg_{}", "é".repeat(60))).await;
    assert_eq!(s, 202, "{v}");
    w.stop().await;
}

/// Replays count against a business's hourly budget: a retry one message, a bulk retry
/// its `limit`; past it 429, while another business replays on its own budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_count_against_the_business_hourly_budget() {
    use guildgate::app::Options;
    let w = World::configured(
        load_cfg(&[("GUILDGATE_WEBHOOKS__REPLAYS_PER_HOUR", "4")]).options(Options {
            webhooks: false,
            relay: false,
            ..Options::default()
        }),
    )
    .await;
    // Each business's endpoint with failed messages 1 to 5.
    let mut ends = Vec::new();
    for business in ["bus_A", "bus_B"] {
        let c = client(&w, business).await;
        let (s, ep) = c
            .post("/webhooks", json!({"url": "http://127.0.0.1:9/hook"}))
            .await;
        assert_eq!(s, 201, "{ep}");
        let ep = ep["id"].as_str().unwrap().to_string();
        sqlx::query(
            "INSERT INTO webhook_messages (id, endpoint_id, business_id, grant_id, event_type, body, status)
             SELECT 'msg_' || $2 || lpad(n::text, 26, '0'), $1, $2, 'grant_' || n,
                    'entitlement_grant.created', '{}', 'failed'
             FROM generate_series(1, 5) n",
        )
        .bind(&ep)
        .bind(business)
        .execute(&w.app.pool)
        .await
        .unwrap();
        ends.push((c, ep, business));
    }
    let retry = |(c, ep, business): &(Client, String, &str), n: u32| {
        let c = c.clone();
        let path = format!("/webhooks/{ep}/messages/msg_{business}{n:026}/retry");
        async move { c.post(&path, json!({})).await }
    };
    let bulk = |(c, ep, _): &(Client, String, &str), limit: u32| {
        let c = c.clone();
        let path = format!("/webhooks/{ep}/messages/retry-failed?limit={limit}");
        async move { c.post(&path, json!({})).await }
    };
    let (a, b) = (&ends[0], &ends[1]);
    assert_eq!(retry(a, 1).await.0, 202);
    let (s, page) = bulk(a, 3).await;
    assert_eq!(s, 202, "{page}");
    assert_eq!(page["message_ids"].as_array().unwrap().len(), 3);
    // Four of four spent: the next one waits for the hour to give one back.
    let (s, v) = retry(a, 5).await;
    assert_eq!((s, v["code"].as_str()), (429, Some("rate_limited")), "{v}");
    let (s, v) = bulk(a, 1000).await;
    assert_eq!(s, 429, "{v}");
    // A message that is not there costs nothing.
    let (s, v) =
        b.0.post(
            &format!("/webhooks/{}/messages/msg_nope/retry", b.1),
            json!({}),
        )
        .await;
    assert_eq!(s, 404, "{v}");
    // B's budget is its own; a bulk retry asking more than the whole budget gets it.
    let (s, page) = bulk(b, 1000).await;
    assert_eq!(s, 202, "{page}");
    assert_eq!(page["message_ids"].as_array().unwrap().len(), 4);
    assert!(page["next_cursor"].is_string(), "{page}");
    assert_eq!(retry(b, 5).await.0, 429);
    let jobs: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox WHERE kind = 'webhook'")
        .fetch_one(&w.app.pool)
        .await
        .unwrap();
    assert_eq!(jobs, 8, "a job per message sent again, none for a refusal");
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_endpoints_through_the_api() {
    let w = World::start().await;
    let c = client(&w, "bus_A").await;
    let (s, ep) = c
        .post("/webhooks", json!({"url": "http://127.0.0.1:9/hook", "description": "main", "filter_types": ["entitlement_grant.revoked"], "unknown": 1}))
        .await;
    assert_eq!(s, 201, "{ep}");
    assert!(ep.get("secret").is_none(), "the secret is read separately");
    assert_eq!(ep["filter_types"], json!(["entitlement_grant.revoked"]));
    let id = ep["id"].as_str().unwrap();
    assert_eq!(
        c.get("/webhooks").await.1["data"].as_array().unwrap().len(),
        1
    );
    assert_eq!(c.get(&format!("/webhooks/{id}")).await.1, ep);

    let (s, p) = c
        .patch(
            &format!("/webhooks/{id}"),
            json!({"disabled": true, "filter_types": null}),
        )
        .await;
    assert_eq!(s, 200, "{p}");
    assert_eq!(
        (p["disabled"].clone(), p["filter_types"].clone()),
        (json!(true), Value::Null)
    );
    assert_eq!(p["description"], "main");

    let (_, s1) = c.get(&format!("/webhooks/{id}/secret")).await;
    assert!(s1["secret"].as_str().unwrap().starts_with("whsec_"));
    let (s, s2) = c
        .post(&format!("/webhooks/{id}/secret/rotate"), json!({}))
        .await;
    assert_eq!(s, 200, "{s2}");
    assert_ne!(s1, s2);
    assert_eq!(c.get(&format!("/webhooks/{id}/secret")).await.1, s2);
    let (s, _) = c
        .raw(
            Method::POST,
            &format!("/webhooks/{id}/secret/rotate"),
            None,
            vec![],
        )
        .await;
    assert_eq!(s, 200, "no body at all is fine");
    let (s, v) = c
        .post(
            &format!("/webhooks/{id}/secret/rotate"),
            json!({"secret": "nope"}),
        )
        .await;
    assert_eq!(s, 422);
    assert!(v["message"].as_str().unwrap().starts_with("secret:"), "{v}");

    assert_eq!(
        c.get(&format!("/webhooks/{id}/messages")).await.1["items"],
        json!([])
    );
    let (s, v) = c
        .post(&format!("/webhooks/{id}/messages/retry-failed"), json!({}))
        .await;
    assert_eq!((s, &v["message_ids"]), (202, &json!([])));
    assert_eq!(
        c.post(&format!("/webhooks/{id}/messages/msg_x/retry"), json!({}))
            .await
            .0,
        404
    );

    let (s, v) = c
        .post("/webhooks", json!({"url": "ftp://example.com"}))
        .await;
    assert_eq!(s, 422);
    assert!(v["message"].as_str().unwrap().starts_with("url:"), "{v}");
    for _ in 0..4 {
        assert_eq!(
            c.post("/webhooks", json!({"url": "http://127.0.0.1:9/x"}))
                .await
                .0,
            201
        );
    }
    let (s, v) = c
        .post("/webhooks", json!({"url": "http://127.0.0.1:9/x"}))
        .await;
    assert_eq!((s, v["code"].as_str()), (409, Some("limit_reached")), "{v}");

    assert_eq!(c.delete(&format!("/webhooks/{id}")).await.0, 204);
    assert_eq!(c.get(&format!("/webhooks/{id}")).await.0, 404);
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_documents_exactly_the_real_routes() {
    let w = World::start().await;
    let anon = anonymous(&w);
    let (s, doc) = anon.get("/openapi.json").await;
    assert_eq!(s, 200);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let paths = doc["paths"].as_object().unwrap();
    let mut documented = Vec::new();
    for (path, ops) in paths {
        for (method, op) in ops.as_object().unwrap() {
            documented.push(format!("{} {path}", method.to_uppercase()));
            // Every documented route exists: without a key it answers 401 (or, for the
            // browser callbacks, an error page; for the operations routes, their
            // answer), never 404/405.
            let concrete = path
                .split('/')
                .map(|seg| if seg.starts_with('{') { "x" } else { seg })
                .collect::<Vec<_>>()
                .join("/");
            let m = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let (s, v) = anon.call(m, &concrete, None).await;
            assert!(
                ![404, 405].contains(&s),
                "{method} {path} answered {s}: {v}"
            );
            let open = guildgate::web::error::BROWSER_PAGES.contains(&path.as_str())
                || ["/healthz", "/readyz", "/metrics"].contains(&path.as_str());
            if !open {
                assert_eq!(s, 401, "{method} {path} must require a key");
            }
            // The document says which routes need a key, and what the edge answers
            // them: 401, 429 (per business) and 503 (load), as the real ones do.
            let secured = op["security"]
                .as_array()
                .is_some_and(|s| s.iter().any(|r| r.get("api_key").is_some()));
            assert_eq!(
                secured,
                s == 401,
                "{method} {path}: security {}",
                op["security"]
            );
            let responses = &op["responses"];
            for status in ["401", "429", "503"] {
                let documented = responses.get(status).is_some();
                // The customer's callback, page and actions have limits of their own
                // (per link or customer, per address).
                let own_limit = status == "429"
                    && (path == "/oauth/discord/callback" || path.starts_with("/access"));
                let expected = secured || status == "503" || own_limit;
                assert_eq!(documented, expected, "{method} {path}: {status}");
            }
        }
    }
    documented.sort();
    // Every route of the API is documented.
    let mut want: Vec<String> = [
        "POST /entitlements",
        "GET /entitlements",
        "GET /entitlements/{id}",
        "PATCH /entitlements/{id}",
        "DELETE /entitlements/{id}",
        "PUT /products/{product_id}/entitlements",
        "GET /products/{product_id}/entitlements",
        "GET /products/{product_id}",
        "PATCH /products/{product_id}",
        "GET /entitlements/{id}/translations",
        "PUT /entitlements/{id}/translations/{locale}",
        "DELETE /entitlements/{id}/translations/{locale}",
        "GET /entitlements/{id}/grants",
        "POST /entitlements/{id}/grants",
        "GET /entitlements/{id}/grants/{grant_id}",
        "DELETE /entitlements/{id}/grants/{grant_id}",
        "GET /entitlements/{id}/grants/{grant_id}/history",
        "GET /customers/{customer_id}/entitlement-grants",
        "GET /customers/{customer_id}/entitlements",
        "GET /discord/install-url",
        "GET /discord/bot/callback",
        "GET /discord/guilds",
        "DELETE /discord/guilds/{guild_id}",
        "GET /discord/guilds/{guild_id}/roles",
        "GET /discord/guilds/{guild_id}/members/{user_id}/access",
        "PUT /discord/application",
        "GET /discord/application",
        "DELETE /discord/application",
        "POST /webhooks",
        "GET /webhooks",
        "GET /webhooks/{id}",
        "PATCH /webhooks/{id}",
        "DELETE /webhooks/{id}",
        "GET /webhooks/{id}/secret",
        "GET /webhooks/{id}/headers",
        "PATCH /webhooks/{id}/headers",
        "POST /webhooks/{id}/secret/rotate",
        "GET /webhooks/{id}/messages",
        "POST /webhooks/{id}/messages/{message_id}/retry",
        "POST /webhooks/{id}/messages/retry-failed",
        "GET /oauth/discord/callback",
        "POST /entitlements/{id}/grants/{grant_id}/resend",
        "GET /access",
        "POST /access/connect",
        "POST /access/restore",
        "POST /access/switch",
        "POST /access/switch/confirm",
        "GET /business/settings",
        "PATCH /business/settings",
        "GET /healthz",
        "GET /readyz",
        "GET /metrics",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    want.sort();
    assert_eq!(documented, want);
    assert_eq!(
        doc,
        serde_json::to_value(guildgate::web::openapi::document()).unwrap()
    );
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_grant_read_after_its_link_expired_gets_a_new_link() {
    let w = World::start().await;
    let biz = w.app.business();
    let c = client(&w, &biz).await;
    let g = connected_guild(&w, &c, "Acme").await;
    let e = create_entitlement(&c, g.guild_id, None).await;
    let id = e["id"].as_str().unwrap();
    c.attach("pdt_1", &[id]).await;
    w.app
        .publish(&payment(&biz, "pay_1", "cus_1", &["pdt_1"], T0), "evt_1")
        .await;
    let grant = w.grant_of("cus_1").await;
    let (_, before) = c
        .get(&format!("/entitlements/{id}/grants/{}", grant.id))
        .await;
    sqlx::query("UPDATE grants SET oauth_expires_at = now() - interval '1 minute' WHERE id = $1")
        .bind(&grant.id)
        .execute(&w.app.pool)
        .await
        .unwrap();
    let (s, after) = c
        .get(&format!("/entitlements/{id}/grants/{}", grant.id))
        .await;
    assert_eq!(s, 200);
    assert_ne!(after["oauth_url"], before["oauth_url"]);
    let exp: chrono::DateTime<chrono::Utc> =
        after["oauth_expires_at"].as_str().unwrap().parse().unwrap();
    assert!(
        exp > chrono::Utc::now() + chrono::Duration::days(6),
        "{exp}"
    );
    // The renewed link works: the customer can connect with it.
    let alice = w.user("alice");
    let (_, status, page) = w
        .consent(
            after["oauth_url"].as_str().unwrap(),
            alice,
            Consent::Authorize,
        )
        .await;
    assert_eq!(status, 200, "{page}");
    w.wait_status(&grant.id, "Delivered").await;
    w.stop().await;
}

/// The whole merchant journey: install the bot, list roles, create the entitlement,
/// attach it to a product, register a webhook, a checkout, the customer connects, a
/// manual revoke takes the role away and is announced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_merchant_flow() {
    let w = World::start().await;
    let c = client(&w, "bus_A").await;
    let g = w.sandbox.add_guild(
        GuildSpec::new("Acme Community")
            .without_bot()
            .with_role("Patrons", 1),
    );
    assert_eq!(connect(&w, &c, &g).await.0, 200);
    let (_, roles) = c
        .get(&format!("/discord/guilds/{}/roles", g.guild_id))
        .await;
    let patrons = roles["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "Patrons" && r["assignable"] == true)
        .expect("Patrons is assignable")["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (s, e) = c
        .post("/entitlements", json!({"name": "Patrons", "integration_type": "discord", "integration_config": {"guild_id": g.guild_id.to_string(), "role_id": patrons}}))
        .await;
    assert_eq!(s, 201, "{e}");
    let ent = e["id"].as_str().unwrap();
    assert_eq!(c.attach("pdt_gold", &[ent]).await.0, 200);
    let hook = Receiver::start().await;
    let (s, ep) = c.post("/webhooks", json!({"url": hook.url})).await;
    assert_eq!(s, 201, "{ep}");

    w.app
        .publish(
            &payment("bus_A", "pay_1", "cus_1", &["pdt_gold"], T0),
            "evt_1",
        )
        .await;
    let grant = wait_for("the grant in the API", || async {
        let (_, v) = c.get("/customers/cus_1/entitlement-grants").await;
        v["items"].as_array().and_then(|i| i.first().cloned())
    })
    .await;
    assert_eq!(grant["status"], "Pending");
    let gid = grant["id"].as_str().unwrap().to_string();
    hook.wait_type(&gid, "entitlement_grant.created").await;

    let alice = w.user("alice");
    let (_, status, page) = w
        .consent(
            grant["oauth_url"].as_str().unwrap(),
            alice,
            Consent::Authorize,
        )
        .await;
    assert_eq!(status, 200, "{page}");
    wait_for("Delivered in the API", || async {
        let (_, v) = c.get(&format!("/entitlements/{ent}/grants/{gid}")).await;
        (v["status"] == "Delivered").then_some(())
    })
    .await;
    let role: u64 = patrons.parse().unwrap();
    assert!(w.has_role(g.guild_id, alice, role));
    hook.wait_type(&gid, "entitlement_grant.delivered").await;

    // Manual revoke: idempotent, the role goes, the webhook is sent.
    let (s, r1) = c.delete(&format!("/entitlements/{ent}/grants/{gid}")).await;
    assert_eq!(s, 200, "{r1}");
    assert_eq!(
        (r1["status"].as_str(), r1["revocation_reason"].as_str()),
        (Some("Revoked"), Some("manual"))
    );
    let (s, r2) = c.delete(&format!("/entitlements/{ent}/grants/{gid}")).await;
    assert_eq!((s, &r2["revoked_at"]), (200, &r1["revoked_at"]));
    let revoked = hook.wait_type(&gid, "entitlement_grant.revoked").await;
    assert_eq!(revoked["data"]["revocation_reason"], "manual");
    w.wait_grant(&gid, "role removed", |g| g.applied_user_id.is_none())
        .await;
    assert!(!w.has_role(g.guild_id, alice, role));
    let ep_id = ep["id"].as_str().unwrap();
    let (_, msgs) = c.get(&format!("/webhooks/{ep_id}/messages")).await;
    let types: Vec<&str> = msgs["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["event_type"].as_str().unwrap())
        .collect();
    assert_eq!(
        types
            .iter()
            .filter(|t| **t == "entitlement_grant.revoked")
            .count(),
        1,
        "{types:?}"
    );
    let revoked_msg = msgs["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["event_type"] == "entitlement_grant.revoked")
        .unwrap();
    // Only a settled message is sent again: wait until its delivery is recorded.
    wait_for("the revoked webhook recorded as delivered", || async {
        let (_, v) = c.get(&format!("/webhooks/{ep_id}/messages")).await;
        v["items"]
            .as_array()?
            .iter()
            .any(|m| m["id"] == revoked_msg["id"] && m["status"] == "delivered")
            .then_some(())
    })
    .await;
    let (s, v) = c
        .post(
            &format!(
                "/webhooks/{ep_id}/messages/{}/retry",
                revoked_msg["id"].as_str().unwrap()
            ),
            json!({}),
        )
        .await;
    assert_eq!(s, 202, "{v}");
    // A later subscription-style event never re-grants a manual revoke; a new payment
    // of the same product still grants anew.
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn re_saving_retries_failed_grants_and_a_new_role_moves_delivered_ones() {
    let w = World::start().await;
    let biz = w.app.business();
    let c = client(&w, &biz).await;
    let g = connected_guild(&w, &c, "Acme").await;
    let patrons = g.role("Patrons");
    let e = create_entitlement(&c, g.guild_id, Some(patrons)).await;
    let ent = e["id"].as_str().unwrap();
    c.attach("pdt_1", &[ent]).await;

    // The merchant breaks the hierarchy after saving: the grant fails.
    w.sandbox.set_role_position(g.guild_id, patrons, 500);
    w.app
        .publish(&payment(&biz, "pay_1", "cus_1", &["pdt_1"], T0), "evt_1")
        .await;
    let grant = w.grant_of("cus_1").await;
    let alice = w.user("alice");
    assert_eq!(w.authorize(&grant, alice).await.0, 200);
    let failed = w.wait_status(&grant.id, "Failed").await;
    assert_eq!(failed.error_code.as_deref(), Some("discord_role_hierarchy"));

    // Saving while it is still broken says why; once fixed, saving retries the grant.
    let (s, v) = c.patch(&format!("/entitlements/{ent}"), json!({})).await;
    assert_eq!(
        (s, v["code"].as_str()),
        (422, Some("discord_role_hierarchy")),
        "{v}"
    );
    w.sandbox.set_role_position(g.guild_id, patrons, 1);
    let (s, v) = c.patch(&format!("/entitlements/{ent}"), json!({})).await;
    assert_eq!(s, 200, "{v}");
    w.wait_status(&grant.id, "Delivered").await;
    assert!(w.has_role(g.guild_id, alice, patrons));

    // A new role: the delivered grant moves to it.
    let vip = w.sandbox.add_role(g.guild_id, RoleSpec::new("VIP", 1));
    let (s, v) = c
        .patch(&format!("/entitlements/{ent}"), json!({"integration_config": {"guild_id": g.guild_id.to_string(), "role_id": vip.to_string()}}))
        .await;
    assert_eq!(s, 200, "{v}");
    w.wait_grant(&grant.id, "moved to VIP", |gr| {
        gr.applied_role_id.as_deref() == Some(vip.to_string().as_str())
    })
    .await;
    assert!(w.has_role(g.guild_id, alice, vip));
    assert!(!w.has_role(g.guild_id, alice, patrons));
    w.stop().await;
}

fn relayed_syncs(w: &World) -> u64 {
    w.app
        .metrics
        .outbox_relayed
        .get_or_create(&vec![("kind", "sync".to_string())])
        .get()
}

/// Where an entitlement's move stands: the last grant queued (`""` at the start), if it
/// is under way.
async fn move_cursor(w: &World, ent: &str) -> Option<String> {
    sqlx::query_scalar("SELECT after_grant FROM entitlement_moves WHERE entitlement_id = $1")
        .bind(ent)
        .fetch_optional(&w.app.pool)
        .await
        .unwrap()
}

/// An entitlement of `Patrons` with [`moves::PAGE`] + 7 delivered grants, in a world whose
/// own mover looks once at start and then not for an hour (a test runs one), and a
/// `VIP` role to move it to.
struct LargeEntitlement {
    w: World,
    c: Client,
    ent: String,
    guild: String,
    patrons: u64,
    vip: u64,
}

impl LargeEntitlement {
    async fn start() -> Self {
        let w = World::configured(
            common::TestConfig::ingest_only().env("GUILDGATE_GRANTS__TIMER_INTERVAL", "1h"),
        )
        .await;
        let biz = w.app.business();
        let c = client(&w, &biz).await;
        let g = connected_guild(&w, &c, "Acme").await;
        let patrons = g.role("Patrons");
        let e = create_entitlement(&c, g.guild_id, Some(patrons)).await;
        let ent = e["id"].as_str().unwrap().to_string();
        let (guild, role) = (g.guild_id.to_string(), patrons.to_string());
        let n = moves::PAGE + 7;
        common::world::seed_delivered_grants(&w.app.pool, &biz, &ent, (&guild, &role), n).await;
        let vip = w.sandbox.add_role(g.guild_id, RoleSpec::new("VIP", 1));
        LargeEntitlement {
            w,
            c,
            ent,
            guild,
            patrons,
            vip,
        }
    }

    /// Saves the entitlement with `body`, answered 200.
    async fn save(&self, body: Value) {
        let (s, v) = self
            .c
            .patch(&format!("/entitlements/{}", self.ent), body)
            .await;
        assert_eq!(s, 200, "{v}");
    }

    async fn move_to(&self, role: u64) {
        self.save(
            json!({"integration_config": {"guild_id": self.guild, "role_id": role.to_string()}}),
        )
        .await;
    }

    /// The grant of every sync job relayed so far, in order (the syncer is off).
    async fn sync_jobs(&self) -> Vec<String> {
        let app = &self.w.app;
        app.drain_queue(&app.names.discord_sync())
            .await
            .iter()
            .map(|j| {
                let job: Value = serde_json::from_slice(&j.body).unwrap();
                job["grant_id"].as_str().unwrap().to_string()
            })
            .collect()
    }

    fn mover(&self) -> moves::Mover {
        moves::Mover {
            pool: self.w.app.pool.clone(),
            metrics: self.w.app.metrics.clone(),
            per_second: 1e6,
        }
    }
}

/// A new role for an entitlement with more grants than a save queues itself: the save
/// queues the first page and a mover the rest. A rename meanwhile queues nothing and
/// keeps the move where it is; moving the role back starts the move over, queuing
/// nothing in the save. Every grant gets its job, and nothing more once the move is done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_role_for_a_large_entitlement_moves_every_grant_in_pages() {
    let large = LargeEntitlement::start().await;
    let (w, ent) = (&large.w, large.ent.as_str());
    let (page, n) = (moves::PAGE, moves::PAGE + 7);
    let page_count = u64::try_from(page).unwrap();

    large.move_to(large.vip).await;
    w.app.wait_outbox_empty().await;
    assert_eq!(relayed_syncs(w), page_count, "the save's page");
    let first_cursor = move_cursor(w, ent)
        .await
        .expect("the rest is left to a mover");

    large.save(json!({"name": "Renamed"})).await;
    assert_eq!(
        move_cursor(w, ent).await.as_ref(),
        Some(&first_cursor),
        "kept"
    );

    large.move_to(large.patrons).await;
    w.app.wait_outbox_empty().await;
    assert_eq!(
        relayed_syncs(w),
        page_count,
        "a save during a move queues nothing"
    );
    assert_eq!(
        move_cursor(w, ent).await.as_deref(),
        Some(""),
        "started over"
    );

    let mover = large.mover();
    let stop = tokio_util::sync::CancellationToken::new();
    assert_eq!(mover.pass(&stop).await.unwrap(), page);
    assert_eq!(
        w.app.metrics.entitlement_moves.get(),
        1,
        "one move under way"
    );
    assert_eq!(
        mover.pass(&stop).await.unwrap(),
        7,
        "the rest of the grants"
    );
    assert_eq!(move_cursor(w, ent).await, None, "the move is done");
    assert_eq!(mover.pass(&stop).await.unwrap(), 0);
    assert_eq!(w.app.metrics.entitlement_moves.get(), 0);
    w.app.wait_outbox_empty().await;
    let jobs = large.sync_jobs().await;
    assert_eq!(jobs.len(), 2 * page + 7);
    let granted: std::collections::HashSet<&String> = jobs.iter().collect();
    assert_eq!(granted.len(), n, "every grant has its job");
    large.w.stop().await;
}

/// A save that fixes the merchant's Discord while a move is under way (here a rename
/// after the role was raised back below the bot's) leaves the move going, and once it
/// is done the grants that failed behind it for a configuration cause are handed to the
/// syncer again, and only those.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_save_during_a_move_retries_the_grants_that_failed_behind_it() {
    let large = LargeEntitlement::start().await;
    let w = &large.w;
    large.move_to(large.vip).await;
    w.app.wait_outbox_empty().await;
    // Three of the grants the save's page moved failed: the new role was above the bot's.
    let failed: Vec<String> = sqlx::query_scalar(
        "UPDATE grants SET status = 'Failed', error_code = 'discord_role_hierarchy'
         WHERE id IN (SELECT id FROM grants WHERE entitlement_id = $1
                      ORDER BY created_at DESC, id DESC LIMIT 3)
         RETURNING id",
    )
    .bind(&large.ent)
    .fetch_all(&w.app.pool)
    .await
    .unwrap();
    large.save(json!({"name": "Patrons (fixed)"})).await;
    w.app.wait_outbox_empty().await;
    let before = relayed_syncs(w);
    let stop = tokio_util::sync::CancellationToken::new();
    let mover = large.mover();
    assert_eq!(mover.pass(&stop).await.unwrap(), 7, "the move's last page");
    assert_eq!(
        mover.pass(&stop).await.unwrap(),
        3,
        "the failed grants again"
    );
    assert_eq!(move_cursor(w, &large.ent).await, None, "then done");
    assert_eq!(mover.pass(&stop).await.unwrap(), 0);
    w.app.wait_outbox_empty().await;
    assert_eq!(relayed_syncs(w) - before, 10);
    let jobs = large.sync_jobs().await;
    let last: std::collections::HashSet<String> = jobs[jobs.len() - 3..].iter().cloned().collect();
    assert_eq!(last, failed.into_iter().collect());
    large.w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_creates_and_revokes_keys() {
    let w = World::start().await;
    let bin = env!("CARGO_BIN_EXE_guildgate");
    let run = |args: &[&str]| {
        std::process::Command::new(bin)
            .args(args)
            .env("GUILDGATE_DATABASE__URL", &w.app.db.url)
            .env("GUILDGATE_LOG__FORMAT", "text")
            .env("RUST_LOG", "error")
            .output()
            .unwrap()
    };
    let out = run(&[
        "api-key",
        "create",
        "--business-id",
        "bus_New",
        "--name",
        "ci",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let stderr = String::from_utf8(out.stderr).unwrap();
    let key_id = stderr
        .split_whitespace()
        .find(|w| w.starts_with("key_"))
        .unwrap()
        .to_string();
    let c = with_key(&w, Some(&key));
    assert_eq!(c.get("/entitlements").await.0, 200);
    let stored: Vec<u8> =
        sqlx::query_scalar("SELECT key_hash FROM api_keys WHERE business_id = 'bus_New'")
            .fetch_one(&w.app.pool)
            .await
            .unwrap();
    assert!(
        !String::from_utf8_lossy(&stored).contains(&key[25..]),
        "only a hash is stored"
    );
    let out = run(&["api-key", "revoke", &key_id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(c.get("/entitlements").await.0, 401);
    assert!(!run(&["api-key", "revoke", "key_nope"]).status.success());
    let out = run(&["api-key", "create", "--business-id", "bad id"]);
    assert!(!out.status.success());
    w.stop().await;
}

/// `key` with its last character replaced by a different one (never the same key).
fn other_last_char(key: &str) -> String {
    let (head, last) = key.split_at(key.len() - 1);
    format!("{head}{}", if last == "x" { "y" } else { "x" })
}

#[test]
fn other_last_char_always_differs() {
    for key in ["gg_a_bx", "gg_a_by", "gg_a_b0"] {
        let other = other_last_char(key);
        assert_ne!(other, key);
        assert_eq!(other.len(), key.len());
        assert_eq!(other[..key.len() - 1], key[..key.len() - 1]);
    }
}

// Load isolation: one caller's load never takes the service from the others.

/// A request with the client's key, answered as (status, `Retry-After`, JSON body).
async fn call_with_headers(c: &Client, path: &str) -> (u16, Option<String>, Value) {
    let mut req = c.http.get(format!("{}{path}", c.base));
    if let Some(k) = &c.key {
        req = req.bearer_auth(k);
    }
    let r = req.send().await.expect("guildgate answers");
    let status = r.status().as_u16();
    let retry_after = r
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    (status, retry_after, r.json().await.unwrap_or(Value::Null))
}

fn load_cfg(pairs: &[(&str, &str)]) -> common::TestConfig {
    pairs
        .iter()
        .fold(common::TestConfig::default(), |cfg, (k, v)| cfg.env(k, v))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_business_over_its_rate_gets_429_and_another_is_unaffected() {
    let w = World::configured(load_cfg(&[
        ("GUILDGATE_API__REQUESTS_PER_SECOND", "1"),
        ("GUILDGATE_API__BURST", "3"),
    ]))
    .await;
    let a = client(&w, "bus_A").await;
    let b = client(&w, "bus_B").await;
    // A spends its burst (one request a second comes back: ask until refused).
    let (answered, retry_after, body) = until_refused(&a).await;
    assert_eq!(body["code"], "rate_limited", "{body}");
    assert!(body["message"].as_str().unwrap().contains("Retry-After"));
    let secs: u64 = retry_after.expect("Retry-After").parse().unwrap();
    assert!((1..=2).contains(&secs), "{secs}");
    // B has a budget of its own.
    let (s, _, body) = call_with_headers(&b, "/entitlements").await;
    assert_eq!(s, 200, "{body}");
    // A request without a valid key is refused for that, and spends nobody's budget.
    assert_eq!(
        call_with_headers(&anonymous(&w), "/entitlements").await.0,
        401
    );
    // A's key was read for each request answered, not for its refusal; B's once.
    assert_eq!(key_reads(&w, "database"), answered + 1);
    w.stop().await;
}

/// Keys the process does not know are read within their address's limit: made-up keys
/// cannot cost a database read each, and a key known already is not held back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn made_up_keys_from_one_address_are_read_within_its_limit() {
    let w = World::configured(load_cfg(&[(
        "GUILDGATE_API__KEY_READS_PER_ADDRESS_PER_SECOND",
        "1",
    )]))
    .await;
    let a = client(&w, "bus_A").await;
    assert_eq!(call_with_headers(&a, "/entitlements").await.0, 200);
    let made_up = |n: usize| with_key(&w, Some(&format!("gg_{n:0>20}_{}", "b".repeat(40))));
    // A burst of five reads an address (one a second after): A's first and four made up.
    for n in 0..4 {
        assert_eq!(call_with_headers(&made_up(n), "/entitlements").await.0, 401);
    }
    assert_eq!(key_reads(&w, "database"), 5);
    let (s, retry_after, body) = call_with_headers(&made_up(4), "/entitlements").await;
    assert_eq!(
        (s, body["code"].as_str()),
        (429, Some("rate_limited")),
        "{body}"
    );
    assert!(retry_after.is_some());
    assert_eq!(key_reads(&w, "database"), 5, "refused without a read");
    // A's key is known: read (its revocation would show at once), not held back.
    assert_eq!(call_with_headers(&a, "/entitlements").await.0, 200);
    w.stop().await;
}

/// Asks `GET /entitlements` until the rate refuses (50 times at most): how many were
/// answered (each 200), and the refusal's `Retry-After` and body.
async fn until_refused(c: &Client) -> (u64, Option<String>, Value) {
    for answered in 0..50 {
        let (s, retry_after, body) = call_with_headers(c, "/entitlements").await;
        if s == 429 {
            return (answered, retry_after, body);
        }
        assert_eq!(s, 200, "{body}");
    }
    panic!("still answered after 50 requests: the rate never refused");
}

/// API key reads from `source` (`memory` or `database`) so far.
fn key_reads(w: &World, source: &str) -> u64 {
    w.app
        .metrics
        .api_key_reads
        .get(&vec![("source", source.to_string())])
        .map(|c| c.get())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_past_the_rate_read_no_key_and_a_revoked_key_is_refused_at_once() {
    let w = World::configured(load_cfg(&[
        ("GUILDGATE_API__REQUESTS_PER_SECOND", "1"),
        ("GUILDGATE_API__BURST", "2"),
    ]))
    .await;
    let (key_id, c) = keyed_client(&w, "bus_A").await;
    let text = c.key.clone().unwrap();
    // Answered until the rate refuses: each answer read the key, no refusal did.
    let (answered, _, _) = until_refused(&c).await;
    assert_eq!(key_reads(&w, "database"), answered);
    assert_eq!(call_with_headers(&c, "/entitlements").await.0, 429);
    assert_eq!(
        key_reads(&w, "database"),
        answered,
        "refused without a read"
    );
    assert_eq!(key_reads(&w, "memory"), 2);

    // The key's id with another secret: refused for that, not for the rate.
    let wrong = with_key(&w, Some(&other_last_char(&text)));
    let (s, _, body) = call_with_headers(&wrong, "/entitlements").await;
    assert_eq!(
        (s, body["code"].as_str()),
        (401, Some("unauthorized")),
        "{body}"
    );

    // Revoked: the first request the rate lets through is refused.
    let mut conn = w.app.pool.acquire().await.unwrap();
    assert!(
        guildgate::web::api::auth::revoke_api_key(&mut conn, &key_id)
            .await
            .unwrap()
    );
    drop(conn);
    let status = wait_for("a request the rate lets through", || async {
        let s = call_with_headers(&c, "/entitlements").await.0;
        (s != 429).then_some(s)
    })
    .await;
    assert_eq!(status, 401);
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_slower_than_the_timeout_gets_503_in_the_error_shape() {
    let (w, gate) = World::start_gated(
        sandbox_discord::SandboxConfig::default(),
        load_cfg(&[("GUILDGATE_HTTP__REQUEST_TIMEOUT", "1s")]),
    )
    .await;
    let c = client(&w, "bus_A").await;
    let g = connected_guild(&w, &c, "Acme").await;
    let e = create_entitlement(&c, g.guild_id, None).await;
    let id = e["id"].as_str().unwrap();
    // Discord stops answering: the save cannot finish.
    gate.hold();
    // Without a timeout the answer would never come: give up on it long after 1 s.
    let (s, v) = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        c.patch(&format!("/entitlements/{id}"), json!({"name": "Renamed"})),
    )
    .await
    .expect("guildgate answers a request that outlives its timeout");
    assert_eq!(s, 503, "{v}");
    assert_eq!(v["code"], "request_timeout", "{v}");
    assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()));
    gate.release();
    // Nothing was saved.
    let (_, now) = c.get(&format!("/entitlements/{id}")).await;
    assert_eq!(now["name"], e["name"]);
    w.stop().await;
}

/// Locks entitlement `id`'s row in a transaction of the test's own, as a long writer
/// would: a save of it waits at its read under lock.
async fn lock_entitlement(w: &World, id: &str) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut tx = w.app.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM entitlements WHERE id = $1 FOR UPDATE")
        .bind(id)
        .execute(&mut *tx)
        .await
        .unwrap();
    tx
}

/// A statement of a request that runs past `database.http_statement_timeout` is
/// cancelled by PostgreSQL: the merchant gets 503 `query_timeout` with a way out, its
/// transaction rolls back, and the same request goes through once nothing holds it up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_statement_past_the_statement_timeout_is_cancelled_and_saves_nothing() {
    let w = World::configured(load_cfg(&[(
        "GUILDGATE_DATABASE__HTTP_STATEMENT_TIMEOUT",
        "1s",
    )]))
    .await;
    let c = client(&w, "bus_A").await;
    let g = connected_guild(&w, &c, "Acme").await;
    let e = create_entitlement(&c, g.guild_id, None).await;
    let id = e["id"].as_str().unwrap();
    let path = format!("/entitlements/{id}");
    let lock = lock_entitlement(&w, id).await;
    let (s, v) = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        c.patch(&path, json!({"name": "Renamed"})),
    )
    .await
    .expect("the statement is cancelled long before the request's own timeout");
    assert_eq!(s, 503, "{v}");
    assert_eq!(v["code"], "query_timeout", "{v}");
    assert!(
        v["message"].as_str().unwrap().contains("page_size"),
        "the merchant is told what to ask instead: {v}"
    );
    lock.rollback().await.unwrap();
    let (_, now) = c.get(&path).await;
    assert_eq!(now["name"], e["name"], "nothing was saved");
    let (s, v) = c.patch(&path, json!({"name": "Renamed"})).await;
    assert_eq!((s, v["name"].as_str()), (200, Some("Renamed")), "{v}");
    w.stop().await;
}

/// Requests holding every connection of the HTTP handlers' pool take nothing from the
/// process's work: an event is applied meanwhile and readiness stays 200. Another
/// request waits the pool's acquire timeout and is refused with 503 `overloaded` and
/// `Retry-After`, and is served once the connection is free again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_holding_the_http_pool_take_no_connection_from_ingest() {
    let w = World::configured(load_cfg(&[
        ("GUILDGATE_DATABASE__HTTP_MAX_CONNECTIONS", "1"),
        ("GUILDGATE_DATABASE__HTTP_STATEMENT_TIMEOUT", "15s"),
    ]))
    .await;
    let c = client(&w, &w.app.business()).await;
    let other = client(&w, "bus_B").await;
    let g = connected_guild(&w, &c, "Acme").await;
    let e = create_entitlement(&c, g.guild_id, None).await;
    let id = e["id"].as_str().unwrap().to_string();
    let sold = create_entitlement(&c, g.guild_id, None).await;
    let sold = sold["id"].as_str().unwrap().to_string();
    let (s, v) = c.attach("pdt_gold", &[&sold]).await;
    assert_eq!(s, 200, "{v}");
    let lock = lock_entitlement(&w, &id).await;
    let held = {
        let c = c.clone();
        let path = format!("/entitlements/{id}");
        tokio::spawn(async move { c.patch(&path, json!({"name": "Renamed"})).await })
    };
    // The save holds the pool's one connection, waiting for the row's lock.
    wait_for("the save waiting on the row lock", || async {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()
               AND application_name = 'guildgate-http' AND wait_event_type = 'Lock'",
        )
        .fetch_one(&w.app.pool)
        .await
        .unwrap();
        (waiting == 1).then_some(())
    })
    .await;
    purchase(&w, "pay_held", "cus_held", "pdt_gold", "buyer@example.com").await;
    wait_for("the purchase's grant", || async {
        let granted: i64 =
            sqlx::query_scalar("SELECT count(*) FROM grants WHERE entitlement_id = $1")
                .bind(&sold)
                .fetch_one(&w.app.pool)
                .await
                .unwrap();
        (granted == 1).then_some(())
    })
    .await;
    let ready = reqwest::get(format!("http://{}/readyz", w.app.addr))
        .await
        .unwrap();
    assert_eq!(ready.status(), 200, "readiness asks the work's pool");
    let (s, retry_after, v) = call_with_headers(&other, "/entitlements").await;
    assert_eq!((s, v["code"].as_str()), (503, Some("overloaded")), "{v}");
    assert_eq!(retry_after.as_deref(), Some("1"));
    lock.rollback().await.unwrap();
    let (s, v) = held.await.unwrap();
    assert_eq!(s, 200, "{v}");
    assert_eq!(call_with_headers(&other, "/entitlements").await.0, 200);
    w.stop().await;
}

/// The requests of the handlers' pool waiting on a row lock, by backend.
async fn http_backends_waiting_on_a_lock(w: &World) -> Vec<i32> {
    sqlx::query_scalar(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database()
           AND application_name = 'guildgate-http' AND wait_event_type = 'Lock'",
    )
    .fetch_all(&w.app.pool)
    .await
    .unwrap()
}

/// `n` deletes (or, with `saves`, renames) of entitlement `id` by `c`, spawned, until at
/// least `holding` of them wait on its row lock (held by the caller) and the others
/// wait for a connection. A delete takes two turns (its key, its transaction) and asks
/// nothing of Discord; a rename four, quick reads and Discord's check before its
/// transaction.
async fn requests_behind_a_lock(
    w: &World,
    c: &Client,
    id: &str,
    (n, holding): (usize, usize),
    saves: bool,
) -> Vec<tokio::task::JoinHandle<(u16, Value)>> {
    let requests: Vec<_> = (0..n)
        .map(|i| {
            let (c, path) = (c.clone(), format!("/entitlements/{id}"));
            tokio::spawn(async move {
                match saves {
                    true => {
                        c.patch(&path, json!({"name": format!("Renamed {i}")}))
                            .await
                    }
                    false => c.delete(&path).await,
                }
            })
        })
        .collect();
    wait_for(
        "the requests holding connections and waiting for them",
        || async {
            assert!(
                requests.iter().all(|d| !d.is_finished()),
                "a request was answered while the lock was held"
            );
            let locked = http_backends_waiting_on_a_lock(w).await.len();
            let waiting = w.app.metrics.http_database_waiting.get();
            (locked >= holding && locked + waiting as usize == n).then_some(())
        },
    )
    .await;
    requests
}

/// Answers of requests of [`requests_behind_a_lock`] once the lock went: done (200, 204),
/// found changed or gone (409, 404), or refused before (503).
async fn answers(deletes: Vec<tokio::task::JoinHandle<(u16, Value)>>) -> Vec<u16> {
    let mut statuses = Vec::new();
    for t in deletes {
        let (s, v) = t.await.unwrap();
        assert!([200, 204, 404, 409, 503].contains(&s), "{s} {v}");
        statuses.push(s);
    }
    statuses
}

/// A world whose handlers' pool has `size` connections, `share` per caller, and a
/// business's client with an entitlement whose row the returned transaction locks.
async fn a_locked_entitlement(
    size: &str,
    share: &str,
    more: &[(&str, &str)],
) -> (
    World,
    Client,
    String,
    sqlx::Transaction<'static, sqlx::Postgres>,
) {
    let mut cfg = vec![
        ("GUILDGATE_DATABASE__HTTP_MAX_CONNECTIONS", size),
        ("GUILDGATE_DATABASE__HTTP_MAX_CONNECTIONS_PER_CALLER", share),
        ("GUILDGATE_DATABASE__HTTP_STATEMENT_TIMEOUT", "15s"),
    ];
    cfg.extend_from_slice(more);
    let w = World::configured(load_cfg(&cfg)).await;
    let c = client(&w, &w.app.business()).await;
    let g = connected_guild(&w, &c, "Acme").await;
    let e = create_entitlement(&c, g.guild_id, None).await;
    let id = e["id"].as_str().unwrap().to_string();
    let lock = lock_entitlement(&w, &id).await;
    (w, c, id, lock)
}

/// One business's requests hold at most `database.http_max_connections_per_caller` of
/// the handlers' connections: another business is served from the rest at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_business_holds_at_most_its_share_of_the_http_pool() {
    let (w, c, id, lock) = a_locked_entitlement("3", "2", &[]).await;
    let other = client(&w, "bus_B").await;
    // Two hold a connection each, waiting on the lock; two wait for their turn.
    let deletes = requests_behind_a_lock(&w, &c, &id, (4, 2), false).await;
    let (s, v) = other.get("/entitlements").await;
    assert_eq!(s, 200, "the third connection is the other business's: {v}");
    lock.rollback().await.unwrap();
    // 503 only if the machine took over 5 s to get here.
    let statuses = answers(deletes).await;
    assert!(
        statuses.iter().filter(|s| **s == 204).count() <= 1,
        "{statuses:?}"
    );
    assert_eq!(w.app.metrics.http_database_waiting.get(), 0);
    w.stop().await;
}

/// `c`'s listing of entitlements, spawned.
fn listing(c: &Client) -> tokio::task::JoinHandle<(u16, Value)> {
    let c = c.clone();
    tokio::spawn(async move { c.get("/entitlements").await })
}

/// `c`'s listing, spawned, once it waits for its turn of the handlers' pool.
async fn a_listing_in_line(
    w: &World,
    c: &Client,
    what: &str,
) -> tokio::task::JoinHandle<(u16, Value)> {
    let listed = listing(c);
    wait_for(what, || async {
        (w.app.metrics.http_database_waiting.get() == 1).then_some(())
    })
    .await;
    listed
}

/// A request abandoned while its statement runs (its client went away) counts against
/// its business until the statement ends: the connection is busy until then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_request_counts_until_its_statement_ends() {
    let (w, c, id, lock) = a_locked_entitlement("2", "1", &[]).await;
    let deletes = requests_behind_a_lock(&w, &c, &id, (1, 1), false).await;
    // The client goes away; the delete's statement still waits on the lock.
    for t in deletes {
        t.abort();
        assert!(t.await.unwrap_err().is_cancelled());
    }
    let listed =
        a_listing_in_line(&w, &c, "the listing waiting behind the abandoned statement").await;
    assert_eq!(http_backends_waiting_on_a_lock(&w).await.len(), 1);
    lock.rollback().await.unwrap();
    let (s, v) = listed.await.unwrap();
    assert_eq!(s, 200, "{v}");
    // The abandoned request's transaction was rolled back, not committed.
    let (s, v) = c.get(&format!("/entitlements/{id}")).await;
    assert_eq!(s, 200, "{v}");

    // The same for a read outside a transaction: a listing waiting on the table's lock.
    let mut lock = w.app.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE entitlements IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .unwrap();
    let abandoned = listing(&c);
    wait_for("the listing waiting on the table's lock", || async {
        (http_backends_waiting_on_a_lock(&w).await.len() == 1).then_some(())
    })
    .await;
    abandoned.abort();
    assert!(abandoned.await.unwrap_err().is_cancelled());
    let listed =
        a_listing_in_line(&w, &c, "the next listing waiting behind the abandoned read").await;
    lock.rollback().await.unwrap();
    let (s, v) = listed.await.unwrap();
    assert_eq!(s, 200, "{v}");
    w.stop().await;
}

/// A request abandoned while its `BEGIN` is on its way leaves no transaction open on the
/// connection for the next request to run in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_begin_cut_short_leaves_no_transaction_for_the_next_request() {
    use guildgate::web::pool::{Caller, HttpPool};
    let base = common::database_base_url();
    let u = url::Url::parse(&base).unwrap();
    let target = format!("{}:{}", u.host_str().unwrap(), u.port().unwrap_or(5432));
    let pg = common::proxy::Proxy::start(target.parse().unwrap()).await;
    let mut url = url::Url::parse(&common::replace_host(&base, pg.addr)).unwrap();
    url.set_path("/postgres");
    let settings = guildgate::config::Settings::load_with_env(
        None,
        Some(
            [
                ("GUILDGATE_DATABASE__URL", url.as_str()),
                ("GUILDGATE_DATABASE__HTTP_MAX_CONNECTIONS", "1"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ),
    )
    .unwrap();
    let pool = HttpPool::new(
        guildgate::store::http_pool(&settings.database).unwrap(),
        &settings.database,
        Default::default(),
    );
    let caller = Caller::Business("bus_A");
    // The one connection, opened and back in the pool.
    drop(pool.begin(caller).await.unwrap());
    let in_transaction = || async {
        let mut conn = pool.acquire(caller).await.unwrap();
        sqlx::query_scalar::<_, bool>(
            // Begun before this statement, not with it.
            "SELECT now() < statement_timestamp() - interval '100 milliseconds'",
        )
        .fetch_one(&mut *conn)
        .await
        .unwrap()
    };
    wait_for("the connection back in the pool", || async {
        (!in_transaction().await).then_some(())
    })
    .await;
    // Every answer 2 s late. The request goes away once PostgreSQL ran its `BEGIN`, while
    // the answer is on its way.
    let direct = {
        let mut u = url::Url::parse(&base).unwrap();
        u.set_path("/postgres");
        sqlx::PgPool::connect(u.as_str()).await.unwrap()
    };
    pg.delay_replies(std::time::Duration::from_secs(2));
    let cut = {
        let pool = pool.clone();
        tokio::spawn(async move { pool.begin(Caller::Business("bus_A")).await.map(drop) })
    };
    wait_for("the BEGIN run, its answer on its way", || async {
        let begun: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = 'postgres'
               AND application_name = 'guildgate-http' AND state = 'idle in transaction'",
        )
        .fetch_one(&direct)
        .await
        .unwrap();
        (begun == 1).then_some(())
    })
    .await;
    cut.abort();
    let _ = cut.await;
    pg.delay_replies(std::time::Duration::ZERO);
    assert!(
        !in_transaction().await,
        "the next request ran in the cut one's transaction"
    );
}

/// With every handler connection taken, the next one given back goes to the business
/// waiting that holds the fewest: a customer of another business opening their access
/// page is served ahead of the saves the first business queued before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_given_back_goes_to_the_business_holding_the_fewest() {
    let (w, c, id, lock) = a_locked_entitlement(
        "2",
        "2",
        &[(
            // The saves' checks with Discord do not wait for the side budget.
            "GUILDGATE_DISCORD__SIDE_REQUESTS_PER_S",
            "40",
        )],
    )
    .await;
    client(&w, "bus_B").await;
    // Both connections held on the lock, six more of the business's saves in line, some
    // at their transaction: given a connection, those wait on the lock too.
    let saves = requests_behind_a_lock(&w, &c, &id, (8, 2), true).await;
    let until = chrono::Utc::now() + chrono::Duration::days(2);
    let page = format!(
        "http://{}/access?t={}",
        w.app.addr,
        w.links.access_token("bus_B", "cus_1", until)
    );
    let viewed = tokio::spawn(async move { browser_like("en").get(page).send().await });
    wait_for("the customer's page in line", || async {
        (w.app.metrics.http_database_waiting.get() == 7).then_some(())
    })
    .await;
    // One held save ends (cancelled: 503 `query_timeout`) and gives its connection back.
    let pid = http_backends_waiting_on_a_lock(&w).await[0];
    sqlx::query("SELECT pg_cancel_backend($1)")
        .bind(pid)
        .execute(&w.app.pool)
        .await
        .unwrap();
    let r = viewed.await.unwrap().unwrap();
    assert_eq!(r.status(), 200, "served ahead of the six saves in line");
    lock.rollback().await.unwrap();
    // One cancelled; more 503s only if the machine took over 5 s to get here.
    let statuses = answers(saves).await;
    assert!(statuses.contains(&503), "{statuses:?}");
    w.stop().await;
}

/// Two role listings of `c`'s business (two servers of its own), both in their handler
/// waiting on Discord, which `gate` holds.
async fn two_listings_waiting_on_discord(
    w: &World,
    c: &Client,
    gate: &discord_world::Gate,
) -> Vec<tokio::task::JoinHandle<(u16, Value)>> {
    let g1 = connected_guild(w, c, "Acme").await;
    let g2 = connected_guild(w, c, "Bolt").await;
    gate.hold();
    let slow = [g1.guild_id, g2.guild_id]
        .into_iter()
        .map(|g| {
            let c = c.clone();
            tokio::spawn(async move { c.get(&format!("/discord/guilds/{g}/roles")).await })
        })
        .collect();
    gate.wait_holding(2).await;
    slow
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_over_the_concurrency_limit_are_refused_at_once() {
    let (w, gate) = World::start_gated(
        sandbox_discord::SandboxConfig::default(),
        load_cfg(&[("GUILDGATE_HTTP__MAX_CONCURRENT_REQUESTS", "2")]),
    )
    .await;
    let c = client(&w, "bus_A").await;
    let slow = two_listings_waiting_on_discord(&w, &c, &gate).await;
    let (s, retry_after, body) = call_with_headers(&anonymous(&w), "/healthz").await;
    assert_eq!(s, 503, "{body}");
    assert_eq!(body["code"], "overloaded", "{body}");
    assert_eq!(retry_after.as_deref(), Some("1"));
    // A customer's page refused so is a page to read, in their language, not JSON.
    let r = browser_like("de-DE")
        .get(format!("http://{}/access?t=x", w.app.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "1");
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html"),
        "{:?}",
        r.headers()
    );
    assert_eq!(r.headers()["content-language"], "de");
    gate.release();
    for t in slow {
        let (s, v) = t.await.unwrap();
        assert_eq!(s, 200, "{v}");
    }
    assert_eq!(call_with_headers(&anonymous(&w), "/healthz").await.0, 200);
    w.stop().await;
}

/// A business whose requests are all waiting (here on Discord) gets 429 for one more,
/// so its slow requests cannot hold the pool every business shares; another business
/// is served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_business_has_a_bounded_number_of_requests_in_flight() {
    let (w, gate) = World::start_gated(
        sandbox_discord::SandboxConfig::default(),
        load_cfg(&[("GUILDGATE_API__MAX_IN_FLIGHT_PER_BUSINESS", "2")]),
    )
    .await;
    let c = client(&w, "bus_A").await;
    let other = client(&w, "bus_B").await;
    let slow = two_listings_waiting_on_discord(&w, &c, &gate).await;
    let (s, retry_after, body) = call_with_headers(&c, "/entitlements").await;
    assert_eq!(s, 429, "{body}");
    assert_eq!(body["code"], "rate_limited", "{body}");
    assert_eq!(retry_after.as_deref(), Some("1"));
    assert_eq!(call_with_headers(&other, "/entitlements").await.0, 200);
    gate.release();
    for t in slow {
        let (s, v) = t.await.unwrap();
        assert_eq!(s, 200, "{v}");
    }
    assert_eq!(call_with_headers(&c, "/entitlements").await.0, 200);
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_that_get_no_side_budget_slot_in_time_get_503_not_a_wait() {
    let w = World::configured(load_cfg(&[
        ("GUILDGATE_DISCORD__SIDE_REQUESTS_PER_S", "1"),
        ("GUILDGATE_DISCORD__SIDE_QUEUE_TIMEOUT", "1s"),
    ]))
    .await;
    let c = client(&w, "bus_A").await;
    let g = connected_guild(&w, &c, "Acme").await;
    // Four listings at once need at least eight Discord requests; the budget sends one
    // a second, and nobody waits more than a second for theirs.
    let answers: Vec<_> = (0..4)
        .map(|_| {
            let c = c.clone();
            let path = format!("/discord/guilds/{}/roles", g.guild_id);
            tokio::spawn(async move { call_with_headers(&c, &path).await })
        })
        .collect();
    let mut busy = 0;
    for t in answers {
        let (s, retry_after, v) = t.await.unwrap();
        match s {
            200 => {}
            503 => {
                assert_eq!(v["code"], "discord_busy", "{v}");
                assert!(v["message"].as_str().unwrap().contains("Try again"), "{v}");
                assert_eq!(retry_after.as_deref(), Some("1"));
                busy += 1;
            }
            other => panic!("unexpected {other}: {v}"),
        }
    }
    assert!(busy >= 1, "some callers were told to come back");
    w.stop().await;
}

/// One business asking the shared bot far more than its side budget carries takes at
/// most its seats of it: another business's listing waits behind those, not behind the
/// whole flood, and is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_business_flooding_the_shared_bot_leaves_another_its_turn() {
    // The business's in-flight cap raised: the flood is the side budget's to carry.
    let w = World::configured(load_cfg(&[
        ("GUILDGATE_DISCORD__SIDE_REQUESTS_PER_S", "1"),
        ("GUILDGATE_DISCORD__SIDE_QUEUE_TIMEOUT", "5s"),
        ("GUILDGATE_API__MAX_IN_FLIGHT_PER_BUSINESS", "64"),
    ]))
    .await;
    let a = client(&w, "bus_A").await;
    let b = client(&w, "bus_B").await;
    // Discord's buckets are per server, so a flood spread over several servers reaches
    // the budget's line all at once.
    let mut flooded = Vec::new();
    for i in 0..6 {
        flooded.push(connected_guild(&w, &a, &format!("Flooder {i}")).await);
    }
    let gb = connected_guild(&w, &b, "Neighbour").await;
    let roles = |g: &GuildIds| format!("/discord/guilds/{}/roles", g.guild_id);
    // Two listings of each of A's six servers at once: about thirty-six Discord
    // requests, six at a time in the budget's line, on a budget of one a second whose
    // callers wait five at most. Without seats the neighbour's requests wait behind six
    // of them each; with them, behind two.
    let flood: Vec<_> = flooded
        .iter()
        .flat_map(|g| [roles(g), roles(g)])
        .map(|path| {
            let a = a.clone();
            tokio::spawn(async move { a.get(&path).await })
        })
        .collect();
    let a_paths: Vec<String> = flooded
        .iter()
        .map(|g| format!("/api/v10/guilds/{}", g.guild_id))
        .collect();
    let sent_for_a = || {
        w.sandbox
            .requests()
            .iter()
            .filter(|r| a_paths.iter().any(|p| r.path.starts_with(p)))
            .count()
    };
    let before = sent_for_a();
    wait_for("the flood under way", || async {
        (sent_for_a() > before).then_some(())
    })
    .await;
    let (s, v) = b.get(&roles(&gb)).await;
    assert_eq!(s, 200, "the neighbour's listing is answered: {v}");
    let mut busy = 0;
    for t in flood {
        let (s, v) = t.await.unwrap();
        match s {
            200 => {}
            503 => {
                assert_eq!(v["code"], "discord_busy", "{v}");
                busy += 1;
            }
            other => panic!("unexpected {other}: {v}"),
        }
    }
    assert!(
        busy >= 1,
        "the flood is told to come back, not the neighbour"
    );
    w.stop().await;
}

/// Saves waiting on a slow Discord hold no database connection: with a pool of two and
/// three saves waiting, a request that needs the database is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saves_waiting_on_discord_leave_the_pool_to_others() {
    let (w, gate) = World::start_gated(
        sandbox_discord::SandboxConfig::default(),
        load_cfg(&[("GUILDGATE_DATABASE__MAX_CONNECTIONS", "2")]).options(
            guildgate::app::Options {
                consumers: false,
                relay: false,
                sync: false,
                webhooks: false,
                ..guildgate::app::Options::default()
            },
        ),
    )
    .await;
    let c = client(&w, "bus_A").await;
    let mut ids = Vec::new();
    for name in ["Acme", "Bolt", "Cask"] {
        let g = connected_guild(&w, &c, name).await;
        let e = create_entitlement(&c, g.guild_id, None).await;
        ids.push(e["id"].as_str().unwrap().to_string());
    }
    gate.hold();
    let saves: Vec<_> = ids
        .iter()
        .map(|id| {
            let (c, path) = (c.clone(), format!("/entitlements/{id}"));
            tokio::spawn(async move { c.patch(&path, json!({"name": "Renamed"})).await })
        })
        .collect();
    // Two saves (as many as the pool has connections) are waiting on Discord.
    gate.wait_holding(2).await;
    // Authentication and the read each need a connection.
    let (s, v) = c.get("/entitlements").await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = c.get(&format!("/entitlements/{}", ids[0])).await;
    assert_eq!(s, 200, "{v}");
    gate.release();
    for t in saves {
        let (s, v) = t.await.unwrap();
        assert_eq!(s, 200, "{v}");
        assert_eq!(v["name"], "Renamed");
    }
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_routes_and_methods_answer_in_the_error_shape() {
    let w = World::start().await;
    let c = client(&w, "bus_A").await;
    let (s, v) = c.get("/no/such/route").await;
    assert_eq!((s, v["code"].as_str()), (404, Some("not_found")), "{v}");
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("GET /no/such/route"),
        "{v}"
    );
    // Without a key too: the path is unknown either way.
    let (s, v) = anonymous(&w).get("/no/such/route").await;
    assert_eq!((s, v["code"].as_str()), (404, Some("not_found")), "{v}");
    // A known path with a method it does not take.
    let (s, v) = c.put("/entitlements", json!({})).await;
    assert_eq!(
        (s, v["code"].as_str()),
        (405, Some("method_not_allowed")),
        "{v}"
    );
    w.stop().await;
}

/// The bot loses Manage Roles in one server while thousands of jobs for it wait: the
/// syncer stops calling Discord there after the first refusals (fewer than 20 invalid
/// answers in all), records the jobs as waiting instead of spinning them in the queue,
/// keeps serving the other server, and shows the stop in the entitlement's `health`.
/// The merchant fixes the permission and saves the entitlement: the waiting removals run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_refusing_the_bot_is_stopped_not_hammered() {
    const T0: &str = "2026-05-01T10:31:00Z";
    const T1: &str = "2026-05-02T10:31:00Z";
    let w = World::start().await;
    let biz = w.app.business();
    let c = client(&w, &biz).await;
    let a = connected_guild(&w, &c, "Broken").await;
    let b = connected_guild(&w, &c, "Fine").await;
    let mut ents = Vec::new();
    for (g, product) in [(&a, "pdt_a"), (&b, "pdt_b")] {
        let (s, e) = c
            .post(
                "/entitlements",
                create_body(g.guild_id, Some(g.role("Patrons"))),
            )
            .await;
        assert_eq!(s, 201, "{e}");
        let id = e["id"].as_str().unwrap().to_string();
        w.app.attach(product, &[&id]).await;
        ents.push(id);
    }
    let (ent_a, ent_b) = (ents[0].clone(), ents[1].clone());
    let n = 40;
    let mut users = Vec::new();
    for i in 0..n {
        let u = w.user(&format!("a{i}"));
        w.link(&format!("cus_a{i}"), u).await;
        w.app
            .publish(
                &payment(
                    &biz,
                    &format!("pay_a{i}"),
                    &format!("cus_a{i}"),
                    &["pdt_a"],
                    T0,
                ),
                &format!("evt_a{i}"),
            )
            .await;
        users.push(u);
    }
    let mut grants = Vec::new();
    for i in 0..n {
        let g = w.grant_of(&format!("cus_a{i}")).await;
        grants.push(w.wait_status(&g.id, "Delivered").await.id);
    }

    // Manage Roles removed from the bot in one server, then every purchase refunded and
    // each grant's job queued 50 times more: over 2,000 jobs that would each be refused.
    let bot_role = w
        .sandbox
        .roles(a.guild_id)
        .into_iter()
        .find(|r| r.managed)
        .unwrap()
        .id;
    w.sandbox.set_role_permissions(
        a.guild_id,
        bot_role,
        permissions::KICK_MEMBERS | permissions::CREATE_INSTANT_INVITE,
    );
    w.sandbox.reset_stats();
    let syncs = |outcome: &'static str| {
        let m = w.app.metrics.render();
        common::worker::sample(
            &m,
            "guildgate_discord_syncs_total",
            &[&format!("outcome=\"{outcome}\"")],
        ) as u64
    };
    let stopped_before = syncs("stopped");
    for i in 0..n {
        w.app
            .publish(
                &refund(&biz, &format!("pay_a{i}"), false, T1),
                &format!("evt_r{i}"),
            )
            .await;
    }
    for g in &grants {
        w.wait_status(g, "Revoked").await;
    }
    {
        let mut tx = w.app.pool.begin().await.unwrap();
        for g in &grants {
            for _ in 0..50 {
                guildgate::outbox::queue_sync(&mut tx, g).await.unwrap();
            }
        }
        tx.commit().await.unwrap();
    }
    // Meanwhile the other server is served.
    let fine = w.user("fine");
    w.link("cus_b", fine).await;
    w.app
        .publish(&payment(&biz, "pay_b", "cus_b", &["pdt_b"], T0), "evt_b")
        .await;
    let gb = w.grant_of("cus_b").await;
    w.wait_status(&gb.id, "Delivered").await;
    assert!(w.has_role(b.guild_id, fine, b.role("Patrons")));
    let jobs = (n + n * 50) as u64;
    // Each job is acknowledged as stopped, or parked behind the bot's full lane and then
    // run (the jobs of one grant waiting parked run once: they name the grant).
    wait_for("every job of the stopped server acknowledged", || async {
        let parked: i64 = sqlx::query_scalar("SELECT count(*) FROM discord_sync_parked")
            .fetch_one(&w.app.pool)
            .await
            .unwrap();
        (parked == 0 && syncs("stopped") + syncs("parked") - stopped_before >= jobs).then_some(())
    })
    .await;
    let stats = w.sandbox.stats();
    eprintln!("invalid answers while stopping: {}", stats.invalid_requests);
    assert!(stats.invalid_requests < 20, "{stats:?}");
    let waiting: i64 = sqlx::query_scalar("SELECT count(*) FROM discord_sync_waiting")
        .fetch_one(&w.app.pool)
        .await
        .unwrap();
    assert_eq!(waiting, n as i64);
    // Removals waited: the members keep the role until the bot may remove it.
    assert!(
        users
            .iter()
            .all(|u| w.has_role(a.guild_id, *u, a.role("Patrons")))
    );

    let (_, e) = c.get(&format!("/entitlements/{ent_a}")).await;
    assert_eq!(e["health"]["status"], "stopped", "{e}");
    assert_eq!(e["health"]["code"], "discord_missing_permissions", "{e}");
    assert_eq!(e["health"]["scope"], "entitlement", "{e}");
    let (_, e) = c.get(&format!("/entitlements/{ent_b}")).await;
    assert_eq!(e["health"], json!({"status": "ok"}), "{e}");
    let (_, list) = c.get("/entitlements").await;
    let healths: Vec<&str> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["health"]["status"].as_str().unwrap())
        .collect();
    assert_eq!(
        healths.iter().filter(|s| **s == "stopped").count(),
        1,
        "{list}"
    );
    let m = w.app.metrics.render();
    assert_eq!(
        common::worker::sample(
            &m,
            "guildgate_discord_stops_total",
            &[
                "scope=\"entitlement\"",
                "code=\"discord_missing_permissions\""
            ],
        ),
        1.0
    );

    // A save before the fix does not validate and resumes nothing.
    let (s, e) = c.patch(&format!("/entitlements/{ent_a}"), json!({})).await;
    assert_eq!(s, 422, "{e}");
    // The fix, and a save that validates: the waiting removals run.
    w.sandbox
        .set_role_permissions(a.guild_id, bot_role, BOT_PERMISSIONS);
    let (s, e) = c.patch(&format!("/entitlements/{ent_a}"), json!({})).await;
    assert_eq!(s, 200, "{e}");
    assert_eq!(e["health"], json!({"status": "ok"}), "{e}");
    for u in &users {
        wait_for("the role removed after the resume", || async {
            (!w.has_role(a.guild_id, *u, a.role("Patrons"))).then_some(())
        })
        .await;
    }
    let waiting: i64 = sqlx::query_scalar("SELECT count(*) FROM discord_sync_waiting")
        .fetch_one(&w.app.pool)
        .await
        .unwrap();
    assert_eq!(waiting, 0);
    w.stop().await;
}

/// Support's views of a grant and of a Discord account: the grant's history says what
/// happened (with Discord's answers), and the access view says which of the business's
/// grants give the account what, what guildgate added versus found already there, and
/// only a count of other businesses' grants.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grants_history_and_an_accounts_access_explain_themselves() {
    const T0: &str = "2026-05-01T10:31:00Z";
    const T1: &str = "2026-05-02T10:31:00Z";
    let w = World::start().await;
    let biz = w.app.business();
    let c = client(&w, &biz).await;
    let g = connected_guild(&w, &c, "Acme").await;
    let role = g.role("Patrons");
    let (s, e) = c
        .post("/entitlements", create_body(g.guild_id, Some(role)))
        .await;
    assert_eq!(s, 201, "{e}");
    let ent = e["id"].as_str().unwrap().to_string();
    w.app.attach("pdt_a", &[&ent]).await;
    // A member who had the role before buying.
    let u = w.user("moderated");
    w.sandbox.add_member(g.guild_id, u, &[role]);
    w.link("cus_1", u).await;
    w.app
        .publish(&payment(&biz, "pay_1", "cus_1", &["pdt_a"], T0), "evt_1")
        .await;
    let grant = w.grant_of("cus_1").await;
    w.wait_status(&grant.id, "Delivered").await;

    let access = format!("/discord/guilds/{}/members/{u}/access", g.guild_id);
    let (s, v) = c.get(&access).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["grants"][0]["grant_id"], grant.id.as_str(), "{v}");
    assert_eq!(v["grants"][0]["role_id"], role.to_string(), "{v}");
    let origins: Vec<(Value, Value)> = v["holdings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| (h["role_id"].clone(), h["origin"].clone()))
        .collect();
    assert_eq!(
        origins,
        vec![
            (Value::Null, json!("found")),
            (json!(role.to_string()), json!("found")),
        ],
        "{v}"
    );
    assert_eq!(v["other_businesses_grants"], 0);

    w.app
        .publish(&refund(&biz, "pay_1", false, T1), "evt_2")
        .await;
    w.wait_status(&grant.id, "Revoked").await;
    let history = format!("/entitlements/{ent}/grants/{}/history", grant.id);
    let events = wait_for("the revoke's sync in the history", || async {
        let (_, v) = c.get(&history).await;
        let events: Vec<String> = v["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["event"].as_str().unwrap().to_string())
            .collect();
        events
            .contains(&"left_in_place".to_string())
            .then_some(events)
    })
    .await;
    assert_eq!(
        events,
        [
            "created",
            "member_found",
            "role_found",
            "delivered",
            "revoked",
            "left_in_place",
        ],
    );
    let (_, v) = c.get(&history).await;
    let found = &v["items"][1];
    assert_eq!(
        found["detail"]["answer"], "204 No Content: already a member",
        "{v}"
    );
    let left = &v["items"][5];
    assert_eq!(
        left["detail"]["reason"], "it was there before guildgate gave it",
        "{v}"
    );
    assert_eq!(v["items"][4]["detail"]["reason"], "refund", "{v}");
    assert!(
        w.has_role(g.guild_id, u, role),
        "the role a moderator gave stays"
    );

    // Another business sees neither.
    let other = client(&w, "bus_SomeoneElse1").await;
    assert_eq!(other.get(&access).await.0, 404);
    assert_eq!(other.get(&history).await.0, 404);
    let (s, v) = c
        .get(&format!(
            "/discord/guilds/{}/members/not-an-id/access",
            g.guild_id
        ))
        .await;
    assert_eq!((s, v["code"].as_str()), (422, Some("invalid_field")), "{v}");
    w.stop().await;
}

/// The platform's SDK reads a product with `products.retrieve` and sets its
/// entitlements with `products.update(id, entitlements=[…])`: `GET`/`PATCH
/// /products/{id}`, which share `PUT /products/{id}/entitlements`'s list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn products_read_and_update_as_the_platforms_sdk_calls_them() {
    let w = World::start().await;
    let c = client(&w, "bus_A").await;
    let other = client(&w, "bus_B").await;
    let g = connected_guild(&w, &c, "Acme").await;
    let e1 = create_entitlement(&c, g.guild_id, None).await;
    let e2 = create_entitlement(&c, g.guild_id, Some(g.role("Patrons"))).await;
    let (id1, id2) = (e1["id"].as_str().unwrap(), e2["id"].as_str().unwrap());

    // Never seen: 404 in the error shape.
    let (s, v) = c.get("/products/pdt_new").await;
    assert_eq!((s, v["code"].as_str()), (404, Some("not_found")), "{v}");

    // PATCH with entitlements creates the association, answering no body.
    let (s, v) = c
        .patch(
            "/products/pdt_new",
            json!({"name": "Gold", "price": {"type": "one_time_price", "price": 500, "currency": "USD"},
                   "entitlements": [{"entitlement_id": id2}, {"entitlement_id": id1}]}),
        )
        .await;
    assert_eq!((s, &v), (200, &Value::Null));
    let (s, p) = c.get("/products/pdt_new").await;
    assert_eq!(s, 200, "{p}");
    assert_eq!(p["product_id"], "pdt_new");
    assert_eq!(p["business_id"], "bus_A");
    // No grant yet names a brand: the business's default brand, whose id is its own.
    assert_eq!(p["brand_id"], "bus_A");
    // What guildgate does not know is absent, not null or invented.
    for absent in [
        "price",
        "name",
        "tax_category",
        "is_recurring",
        "created_at",
    ] {
        assert!(p.get(absent).is_none(), "{absent} in {p}");
    }
    let summary = &p["entitlements"][0];
    assert_eq!(
        keys(summary),
        [
            "description",
            "id",
            "integration_config",
            "integration_type",
            "name"
        ]
    );
    assert_eq!(summary["id"], id2);
    assert_eq!(summary["integration_type"], "discord");
    assert_eq!(
        summary["integration_config"]["role_id"],
        g.role("Patrons").to_string()
    );
    assert_eq!(p["entitlements"][1]["id"], id1);
    // The same list as guildgate's own route, both ways.
    let listed = c.get("/products/pdt_new/entitlements").await.1;
    assert_eq!(listed["items"][0]["id"], id2);
    c.attach("pdt_new", &[id1]).await;
    let p = c.get("/products/pdt_new").await.1;
    assert_eq!(p["entitlements"].as_array().unwrap().len(), 1);
    assert_eq!(p["entitlements"][0]["id"], id1);

    // The platform's other fields change nothing; refused lists change nothing.
    let (s, _) = c
        .patch(
            "/products/pdt_new",
            json!({"name": "Platinum", "entitlements": null}),
        )
        .await;
    assert_eq!(s, 200);
    for bad in [
        json!({"entitlements": [{"entitlement_id": id1}, {"entitlement_id": id1}]}),
        json!({"entitlements": [{"entitlement_id": "ent_missing"}]}),
        json!({"entitlements": "x"}),
    ] {
        let (s, v) = c.patch("/products/pdt_new", bad.clone()).await;
        assert_eq!(s, 422, "{bad}: {v}");
    }
    assert_eq!(
        c.get("/products/pdt_new").await.1["entitlements"][0]["id"],
        id1
    );

    // Another business sees nothing of it, and cannot attach this one's entitlements.
    let (s, v) = other.get("/products/pdt_new").await;
    assert_eq!((s, v["code"].as_str()), (404, Some("not_found")));
    let (s, _) = other
        .patch(
            "/products/pdt_new",
            json!({"entitlements": [{"entitlement_id": id1}]}),
        )
        .await;
    assert_eq!(s, 422);
    assert_eq!(other.get("/products/pdt_new").await.0, 404);

    // A grant's brand becomes the business's most recent one.
    w.app
        .publish(
            &payment("bus_A", "pay_1", "cus_1", &["pdt_new"], T0),
            "evt_1",
        )
        .await;
    w.app.wait_processed(1).await;
    assert_eq!(c.get("/products/pdt_new").await.1["brand_id"], "brd_3hQp");

    // `[]` detaches everything: the product is unknown again.
    let (s, _) = c
        .patch("/products/pdt_new", json!({"entitlements": []}))
        .await;
    assert_eq!(s, 200);
    assert_eq!(c.get("/products/pdt_new").await.0, 404);
    w.stop().await;
}

/// `customers.list_entitlements(customer_id)`: what a customer holds through live
/// grants, in the SDK's `CustomerListEntitlementsResponse` shape.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_customers_entitlements_are_its_live_grants_in_the_sdks_shape() {
    let w = World::start().await;
    let c = client(&w, "bus_A").await;
    let other = client(&w, "bus_B").await;
    let g = connected_guild(&w, &c, "Acme").await;
    let e1 = create_entitlement(&c, g.guild_id, None).await;
    let (s, e2) = c
        .post(
            "/entitlements",
            json!({"name": "Gold role", "description": "The gold role",
                   "integration_type": "discord",
                   "integration_config": {"guild_id": g.guild_id.to_string(), "role_id": g.role("Patrons").to_string()}}),
        )
        .await;
    assert_eq!(s, 201, "{e2}");
    let (id1, id2) = (e1["id"].as_str().unwrap(), e2["id"].as_str().unwrap());
    c.attach("pdt_1", &[id1, id2]).await;
    assert_eq!(
        c.get("/customers/cus_1/entitlements").await.1,
        json!({"items": []})
    );
    w.app
        .publish(&payment("bus_A", "pay_1", "cus_1", &["pdt_1"], T0), "evt_1")
        .await;
    w.app
        .publish(&payment("bus_A", "pay_2", "cus_2", &["pdt_1"], T0), "evt_2")
        .await;
    w.app.wait_processed(2).await;

    let (s, v) = c.get("/customers/cus_1/entitlements").await;
    assert_eq!(s, 200, "{v}");
    let items = v["items"].as_array().unwrap();
    assert_eq!(items.len(), 2, "{v}");
    let gold = items.iter().find(|i| i["entitlement_id"] == id2).unwrap();
    assert_eq!(
        keys(gold),
        [
            "created_at",
            "delivered_at",
            "entitlement_description",
            "entitlement_id",
            "entitlement_name",
            "grant_id",
            "integration_type",
            "revoked_at",
            "status",
            "updated_at"
        ]
    );
    assert_eq!(gold["entitlement_name"], "Gold role");
    assert_eq!(gold["entitlement_description"], "The gold role");
    assert_eq!(gold["integration_type"], "discord");
    // Lower case here, as the platform writes this list.
    assert_eq!(gold["status"], "pending");
    let grant = c
        .get(&format!("/entitlements/{id2}/grants?customer_id=cus_1"))
        .await
        .1["items"][0]
        .clone();
    assert_eq!(gold["grant_id"], grant["id"]);
    assert_eq!(gold["created_at"], grant["created_at"]);

    // With `?locale=`, the entitlement's translation shows here and on the product, as on
    // the entitlement itself; a field with none keeps the base text.
    let (s, _) = c
        .put(
            &format!("/entitlements/{id2}/translations/de"),
            json!({"name": "Goldene Rolle"}),
        )
        .await;
    assert_eq!(s, 201);
    let (s, v) = c.get("/customers/cus_1/entitlements?locale=de-CH").await;
    assert_eq!(s, 200, "{v}");
    let gold = v["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["entitlement_id"] == id2)
        .unwrap()
        .clone();
    assert_eq!(
        (&gold["entitlement_name"], &gold["entitlement_description"]),
        (&json!("Goldene Rolle"), &json!("The gold role"))
    );
    let (s, product) = c.get("/products/pdt_1?locale=de").await;
    assert_eq!(s, 200, "{product}");
    let names: Vec<&str> = product["entitlements"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, [e1["name"].as_str().unwrap(), "Goldene Rolle"]);
    assert_eq!(
        c.get("/products/pdt_1").await.1["entitlements"][1]["name"],
        "Gold role"
    );

    // A revoked grant is no longer held.
    let gid = grant["id"].as_str().unwrap();
    let (s, _) = c.delete(&format!("/entitlements/{id2}/grants/{gid}")).await;
    assert_eq!(s, 200);
    let v = c.get("/customers/cus_1/entitlements").await.1;
    let held: Vec<&str> = v["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["entitlement_id"].as_str().unwrap())
        .collect();
    assert_eq!(held, [id1]);

    // Tenant-isolated: another business's customer of the same id holds nothing here.
    assert_eq!(
        other.get("/customers/cus_1/entitlements").await.1,
        json!({"items": []})
    );
    let (s, v) = c.get("/customers/%20/entitlements").await;
    assert_eq!((s, v["code"].as_str()), (422, Some("invalid_field")), "{v}");
    w.stop().await;
}

/// `customers.list_entitlement_grants(…, integration_type=…)`: `discord` is every grant,
/// the platform's other types none, anything else a 422.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_customers_grants_filter_by_integration_type() {
    let w = World::start().await;
    let c = client(&w, "bus_A").await;
    let g = connected_guild(&w, &c, "Acme").await;
    let e = create_entitlement(&c, g.guild_id, None).await;
    c.attach("pdt_1", &[e["id"].as_str().unwrap()]).await;
    w.app
        .publish(&payment("bus_A", "pay_1", "cus_1", &["pdt_1"], T0), "evt_1")
        .await;
    w.app.wait_processed(1).await;
    let path = "/customers/cus_1/entitlement-grants";
    let count = |v: &Value| v["items"].as_array().unwrap().len();
    assert_eq!(count(&c.get(path).await.1), 1);
    let (s, v) = c.get(&format!("{path}?integration_type=discord")).await;
    assert_eq!((s, count(&v)), (200, 1), "{v}");
    for other in [
        "telegram",
        "github",
        "figma",
        "framer",
        "notion",
        "digital_files",
        "license_key",
        "feature_flag",
    ] {
        let (s, v) = c.get(&format!("{path}?integration_type={other}")).await;
        assert_eq!((s, &v), (200, &json!({"items": []})), "{other}");
    }
    for bad in ["Discord", "slack", ""] {
        let (s, v) = c.get(&format!("{path}?integration_type={bad}")).await;
        assert_eq!(s, 422, "{bad:?}: {v}");
        assert_eq!(v["code"], "invalid_query", "{bad:?}");
        assert!(
            v["message"].as_str().unwrap().contains("integration_type"),
            "{v}"
        );
    }
    w.stop().await;
}

/// Every grant has `feature` (null) where the platform's JSON has it, in the API and in
/// webhooks, and a brand: its event's, else the business's most recent, else the
/// business's default brand (its own id).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grants_always_have_a_brand_and_a_null_feature() {
    let w = World::start().await;
    let c = client(&w, "bus_A").await;
    let g = connected_guild(&w, &c, "Acme").await;
    let e = create_entitlement(&c, g.guild_id, None).await;
    let id = e["id"].as_str().unwrap();
    c.attach("pdt_1", &[id]).await;
    let hook = Receiver::start().await;
    let (s, ep) = c.post("/webhooks", json!({"url": hook.url})).await;
    assert_eq!(s, 201, "{ep}");
    let brandless = |pay: &str, cus: &str| {
        let mut ev = payment("bus_A", pay, cus, &["pdt_1"], T0);
        ev["data"].as_object_mut().unwrap().remove("brand_id");
        ev
    };
    let grant_of = |cus: &'static str| {
        let c = c.clone();
        async move {
            c.get(&format!("/entitlements/{id}/grants?customer_id={cus}"))
                .await
                .1["items"][0]
                .clone()
        }
    };

    w.app.publish(&brandless("pay_1", "cus_1"), "evt_1").await;
    w.app.wait_processed(1).await;
    assert_eq!(grant_of("cus_1").await["brand_id"], "bus_A");
    w.app
        .publish(&payment("bus_A", "pay_2", "cus_2", &["pdt_1"], T0), "evt_2")
        .await;
    w.app.wait_processed(2).await;
    assert_eq!(grant_of("cus_2").await["brand_id"], "brd_3hQp");
    w.app.publish(&brandless("pay_3", "cus_3"), "evt_3").await;
    w.app.wait_processed(3).await;
    let third = grant_of("cus_3").await;
    assert_eq!(third["brand_id"], "brd_3hQp");
    // The newest grant of the business decides, whichever entitlement it is of.
    let other = create_entitlement(&c, g.guild_id, None).await;
    let other_id = other["id"].as_str().unwrap();
    c.attach("pdt_2", &[other_id]).await;
    let mut branded = payment("bus_A", "pay_4", "cus_4", &["pdt_2"], T0);
    branded["data"]["brand_id"] = json!("brd_other");
    w.app.publish(&branded, "evt_4").await;
    w.app.wait_processed(4).await;
    w.app.publish(&brandless("pay_5", "cus_5"), "evt_5").await;
    w.app.wait_processed(5).await;
    assert_eq!(grant_of("cus_5").await["brand_id"], "brd_other");

    // The platform's key order, `feature` included, in the API and in webhooks.
    let order = |v: &Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
    assert_eq!(order(&third), order(&fixture("grant.json")));
    assert_eq!(third["feature"], Value::Null);
    let listed = c.get("/customers/cus_3/entitlement-grants").await.1;
    assert_eq!(order(&listed["items"][0]), order(&fixture("grant.json")));
    let body = hook
        .wait_type(third["id"].as_str().unwrap(), "entitlement_grant.created")
        .await;
    let want: Value = serde_json::from_slice(
        &std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/contract/webhooks/entitlement_grant.created.json"
        ))
        .unwrap(),
    )
    .unwrap();
    assert_eq!(order(&body["data"]), order(&want["data"]));
    assert_eq!(body["data"]["feature"], Value::Null);
    assert_eq!(body["data"]["brand_id"], "brd_3hQp");
    w.stop().await;
}

/// Moves a grant's due time into the past (a test cannot wait days), and answers the
/// grant timer that revokes what is due.
async fn pass_due_time(w: &World, grant: &str) -> guildgate::lifecycle::timers::Timers {
    sqlx::query("UPDATE grants SET ends_at = now() - interval '1 second' WHERE id = $1")
        .bind(grant)
        .execute(&w.app.pool)
        .await
        .unwrap();
    guildgate::lifecycle::timers::Timers {
        pool: w.app.pool.clone(),
        links: w.links.clone(),
        metrics: w.app.metrics.clone(),
    }
}

/// A grace period (`integration_config.grace_period_days`, a guildgate extension): a
/// subscription on hold or failed keeps its access until the period ends, an active
/// subscription ends the grace, a cancellation revokes at once, and the durable timer
/// revokes the grant with the hold's reason when its due time has passed, taking the
/// role away. The history shows each step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grace_period_keeps_access_until_it_ends_unless_the_subscription_returns() {
    let w = World::start().await;
    let biz = w.app.business();
    let c = client(&w, &biz).await;
    let g = connected_guild(&w, &c, "Acme").await;
    let role = g.role("Patrons");
    let mut body = create_body(g.guild_id, Some(role));
    body["integration_config"]["grace_period_days"] = json!(3);
    let (s, e) = c.post("/entitlements", body).await;
    assert_eq!(s, 201, "{e}");
    assert_eq!(e["integration_config"]["grace_period_days"], 3, "{e}");
    let ent = e["id"].as_str().unwrap().to_string();
    for bad in [json!(0), json!(366), json!(-1)] {
        let mut config = e["integration_config"].clone();
        config["grace_period_days"] = bad.clone();
        let (s, v) = c
            .patch(
                &format!("/entitlements/{ent}"),
                json!({"integration_config": config}),
            )
            .await;
        assert_eq!(s, 422, "{bad}: {v}");
        assert!(
            v["message"]
                .as_str()
                .unwrap()
                .contains("integration_config.grace_period_days"),
            "{v}"
        );
    }
    // Without the key, a config read back has none.
    let (_, plain) = c
        .post("/entitlements", create_body(g.guild_id, Some(role)))
        .await;
    assert!(
        plain["integration_config"]
            .as_object()
            .unwrap()
            .get("grace_period_days")
            .is_none(),
        "{plain}"
    );
    w.app.attach("pdt_s", &[&ent]).await;

    let at = |minutes_ago: i64| {
        (chrono::Utc::now() - chrono::TimeDelta::minutes(minutes_ago))
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    };
    let sub = |kind: &str, id: &str, customer: &str, status: &str, t: &str, evt: &str| {
        let (kind, id, customer, status, t, evt) = (
            kind.to_string(),
            id.to_string(),
            customer.to_string(),
            status.to_string(),
            t.to_string(),
            evt.to_string(),
        );
        let w = &w;
        let biz = biz.clone();
        async move {
            w.app
                .publish(
                    &subscription(&kind, &biz, &id, &customer, "pdt_s", &status, &t),
                    &evt,
                )
                .await;
        }
    };
    let history = |grant: String| {
        let (c, ent) = (&c, ent.clone());
        async move {
            let (s, v) = c
                .get(&format!("/entitlements/{ent}/grants/{grant}/history"))
                .await;
            assert_eq!(s, 200, "{v}");
            v["items"].as_array().unwrap().clone()
        }
    };
    let has = |items: &[Value], event: &str| items.iter().filter(|e| e["event"] == event).count();

    let u = w.user("una");
    w.link("cus_1", u).await;
    sub("active", "sub_1", "cus_1", "active", &at(10), "evt_1").await;
    let grant = w.grant_of("cus_1").await;
    w.wait_status(&grant.id, "Delivered").await;
    assert!(w.has_role(g.guild_id, u, role));

    // On hold: kept, with its end three days after the event.
    let held_at = at(9);
    sub("on_hold", "sub_1", "cus_1", "on_hold", &held_at, "evt_2").await;
    let items = wait_for("the grace in the history", || async {
        let items = history(grant.id.clone()).await;
        (has(&items, "grace_started") == 1).then_some(items)
    })
    .await;
    let started = items
        .iter()
        .find(|e| e["event"] == "grace_started")
        .unwrap();
    let until =
        chrono::DateTime::parse_from_rfc3339(&held_at).unwrap() + chrono::TimeDelta::days(3);
    assert_eq!(
        started["detail"]["until"],
        until
            .with_timezone(&chrono::Utc)
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    );
    assert_eq!(started["detail"]["reason"], "subscription_on_hold");
    assert_eq!(
        w.wait_status(&grant.id, "Delivered").await.status,
        "Delivered"
    );
    assert!(w.has_role(g.guild_id, u, role));

    // Active again: the grace ends, the grant stays, no second grant.
    sub("active", "sub_1", "cus_1", "active", &at(8), "evt_3").await;
    wait_for("the grace's end in the history", || async {
        let items = history(grant.id.clone()).await;
        (has(&items, "grace_ended") == 1).then_some(())
    })
    .await;
    let (_, grants) = c
        .get(&format!("/entitlements/{ent}/grants?customer_id=cus_1"))
        .await;
    assert_eq!(grants["items"].as_array().unwrap().len(), 1, "{grants}");
    assert_eq!(grants["items"][0]["status"], "Delivered");

    // Failed: a new grace. A second failure keeps its end.
    sub("failed", "sub_1", "cus_1", "failed", &at(7), "evt_4").await;
    sub("failed", "sub_1", "cus_1", "failed", &at(6), "evt_5").await;
    wait_for("the second grace", || async {
        let items = history(grant.id.clone()).await;
        (has(&items, "grace_started") == 2).then_some(())
    })
    .await;
    let ends: Option<chrono::DateTime<chrono::Utc>> =
        sqlx::query_scalar("SELECT ends_at FROM grants WHERE id = $1")
            .bind(&grant.id)
            .fetch_one(&w.app.pool)
            .await
            .unwrap();
    let first_failure = chrono::DateTime::parse_from_rfc3339(&at(7)).unwrap();
    assert!(
        ends.unwrap() <= first_failure + chrono::TimeDelta::days(3) + chrono::TimeDelta::minutes(1)
    );
    assert!(w.has_role(g.guild_id, u, role));

    // Three days pass: the timer revokes it with the failure's reason.
    let timers = pass_due_time(&w, &grant.id).await;
    let fired = timers.fire_due().await.unwrap();
    assert!(fired <= 1);
    let revoked = w.wait_status(&grant.id, "Revoked").await;
    assert_eq!(
        revoked.revocation_reason.map(|r| r.as_str()),
        Some("subscription_failed")
    );
    wait_for("the role taken away", || async {
        (!w.has_role(g.guild_id, u, role)).then_some(())
    })
    .await;
    // Due once: nothing is due any more.
    assert_eq!(timers.fire_due().await.unwrap(), 0);
    let items = history(grant.id.clone()).await;
    let ended: Vec<&Value> = items
        .iter()
        .filter(|e| e["event"] == "grace_ended")
        .collect();
    assert_eq!(ended.len(), 2, "{items:?}");
    assert_eq!(ended[1]["detail"]["outcome"], "revoked");
    // The revoke's sync records its Discord change once it has made it.
    let items = wait_for("the removal in the history", || async {
        let items = history(grant.id.clone()).await;
        (has(&items, "role_removed") == 1).then_some(items)
    })
    .await;
    let order: Vec<&str> = items.iter().map(|e| e["event"].as_str().unwrap()).collect();
    let pos = |event: &str| order.iter().rposition(|e| *e == event).unwrap();
    assert!(pos("grace_ended") <= pos("revoked"), "{order:?}");
    assert!(pos("revoked") < pos("role_removed"), "{order:?}");

    // A cancellation during the grace revokes at once.
    let v = w.user("vera");
    w.link("cus_2", v).await;
    sub("active", "sub_2", "cus_2", "active", &at(10), "evt_6").await;
    let second = w.grant_of("cus_2").await;
    w.wait_status(&second.id, "Delivered").await;
    sub("on_hold", "sub_2", "cus_2", "on_hold", &at(9), "evt_7").await;
    sub("cancelled", "sub_2", "cus_2", "cancelled", &at(8), "evt_8").await;
    let revoked = w.wait_status(&second.id, "Revoked").await;
    assert_eq!(
        revoked.revocation_reason.map(|r| r.as_str()),
        Some("subscription_cancelled")
    );
    w.stop().await;
}

/// Comp access (`POST /entitlements/{id}/grants`, a guildgate extension): a grant without
/// a payment, delivered like any other; asking again answers the live one; another
/// business cannot give or see it; when `expires_at` passes, the grant timer revokes it
/// with `expired` and the role goes; afterwards a new one can be given.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn comp_access_is_given_without_a_payment_and_expires() {
    let w = World::start().await;
    let biz = w.app.business();
    let c = client(&w, &biz).await;
    let other = client(&w, "bus_Other").await;
    let g = connected_guild(&w, &c, "Acme").await;
    let role = g.role("Patrons");
    let e = create_entitlement(&c, g.guild_id, Some(role)).await;
    let ent = e["id"].as_str().unwrap().to_string();
    let path = format!("/entitlements/{ent}/grants");
    let u = w.user("una");
    w.link("cus_1", u).await;

    // Refused: bad customer, bad or past expiry, another business's entitlement.
    for (body, field) in [
        (json!({"customer_id": " "}), "customer_id"),
        (
            json!({"customer_id": "cus_1", "expires_at": "tomorrow"}),
            "expires_at",
        ),
        (
            json!({"customer_id": "cus_1", "expires_at": "2020-01-01T00:00:00Z"}),
            "expires_at",
        ),
    ] {
        let (s, v) = c.post(&path, body.clone()).await;
        assert_eq!(s, 422, "{body}: {v}");
        assert!(v["message"].as_str().unwrap().contains(field), "{v}");
    }
    let (s, v) = other.post(&path, json!({"customer_id": "cus_1"})).await;
    assert_eq!((s, v["code"].as_str()), (404, Some("not_found")), "{v}");

    let expires = (chrono::Utc::now() + chrono::TimeDelta::hours(1))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let (s, first) = c
        .post(
            &path,
            json!({"customer_id": "cus_1", "expires_at": expires}),
        )
        .await;
    assert_eq!(s, 201, "{first}");
    let id = first["id"].as_str().unwrap().to_string();
    assert_eq!(first["payment_id"], Value::Null);
    assert_eq!(first["subscription_id"], Value::Null);
    assert_eq!(first["status"], "Pending");
    // The customer linked Discord before: delivered at once.
    w.wait_status(&id, "Delivered").await;
    assert!(w.has_role(g.guild_id, u, role));
    let (s, again) = c.post(&path, json!({"customer_id": "cus_1"})).await;
    assert_eq!(s, 200, "{again}");
    assert_eq!(again["id"], id.as_str());
    let (s, _) = other.get(&format!("{path}/{id}")).await;
    assert_eq!(s, 404);
    let (_, history) = c.get(&format!("{path}/{id}/history")).await;
    let comp = history["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["event"] == "comp")
        .cloned()
        .unwrap_or_else(|| panic!("{history}"));
    assert_eq!(comp["detail"]["expires_at"], expires.as_str());

    // The hour passes: revoked with `expired`, and the role goes.
    let timers = pass_due_time(&w, &id).await;
    timers.fire_due().await.unwrap();
    let revoked = w.wait_status(&id, "Revoked").await;
    assert_eq!(
        revoked.revocation_reason.map(|r| r.as_str()),
        Some("expired")
    );
    wait_for("the role taken away", || async {
        (!w.has_role(g.guild_id, u, role)).then_some(())
    })
    .await;

    // Given again, without an end: a new grant.
    let (s, next) = c.post(&path, json!({"customer_id": "cus_1"})).await;
    assert_eq!(s, 201, "{next}");
    assert_ne!(next["id"], id.as_str());
    w.wait_status(next["id"].as_str().unwrap(), "Delivered")
        .await;
    let ends: Option<chrono::DateTime<chrono::Utc>> =
        sqlx::query_scalar("SELECT ends_at FROM grants WHERE id = $1")
            .bind(next["id"].as_str().unwrap())
            .fetch_one(&w.app.pool)
            .await
            .unwrap();
    assert_eq!(ends, None);
    w.stop().await;
}

/// Backfill: a business with entitlements has its other products' purchases recorded;
/// attaching an entitlement to such a product gives it to the live subscriptions and
/// paid one-time purchases (not the refunded or cancelled ones), through the same
/// delivery as every grant, and `GET /products/{id}` counts what is left. Detaching
/// revokes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attaching_an_entitlement_gives_it_to_earlier_buyers() {
    const T0: &str = "2026-05-01T10:00:00Z";
    const T1: &str = "2026-05-01T11:00:00Z";
    let w = World::start().await;
    let biz = w.app.business();
    let c = client(&w, &biz).await;
    let g = connected_guild(&w, &c, "Acme").await;
    let role = g.role("Patrons");
    let first = create_entitlement(&c, g.guild_id, None).await;
    w.app
        .attach("pdt_a", &[first["id"].as_str().unwrap()])
        .await;
    let later = create_entitlement(&c, g.guild_id, Some(role)).await;
    let later_id = later["id"].as_str().unwrap().to_string();

    // Purchases of pdt_b, which grants nothing yet.
    let u = w.user("una");
    w.link("cus_1", u).await;
    let events = [
        subscription("active", &biz, "sub_1", "cus_1", "pdt_b", "active", T0),
        payment(&biz, "pay_2", "cus_2", &["pdt_b", "pdt_x"], T0),
        payment(&biz, "pay_3", "cus_3", &["pdt_b"], T0),
        refund(&biz, "pay_3", false, T1),
        subscription("active", &biz, "sub_4", "cus_4", "pdt_b", "active", T0),
        subscription(
            "cancelled",
            &biz,
            "sub_4",
            "cus_4",
            "pdt_b",
            "cancelled",
            T1,
        ),
    ];
    for (i, e) in events.iter().enumerate() {
        w.app.publish(e, &format!("evt_{i}")).await;
    }
    w.app.wait_processed(events.len() as i64).await;
    for customer in ["cus_1", "cus_2", "cus_3", "cus_4"] {
        assert!(w.app.grants_of(customer).await.is_empty(), "{customer}");
    }

    let (s, v) = c.attach("pdt_b", &[&later_id]).await;
    assert_eq!(s, 200, "{v}");
    let (s, product) = c.get("/products/pdt_b").await;
    assert_eq!(s, 200, "{product}");
    assert_eq!(product["backfilling"], 2, "{product}");

    let backfiller = guildgate::lifecycle::backfill::Backfiller {
        pool: w.app.pool.clone(),
        links: w.links.clone(),
        per_second: w.app.settings.grants.backfill_per_second,
        email: false,
    };
    // The process's own backfill task may have given some already.
    let given = backfiller.pass().await.unwrap();
    assert!(given <= 2);
    assert_eq!(backfiller.pass().await.unwrap(), 0);
    assert_eq!(c.get("/products/pdt_b").await.1["backfilling"], 0);

    let sub = w.grant_of("cus_1").await;
    assert_eq!(sub.subscription_id.as_deref(), Some("sub_1"));
    assert_eq!(sub.entitlement_id, later_id);
    w.wait_status(&sub.id, "Delivered").await;
    assert!(w.has_role(g.guild_id, u, role));
    let one_time = w.grant_of("cus_2").await;
    assert_eq!(one_time.payment_id.as_deref(), Some("pay_2"));
    assert_eq!(one_time.status, "Pending");
    assert!(w.app.grants_of("cus_3").await.is_empty(), "refunded");
    assert!(w.app.grants_of("cus_4").await.is_empty(), "cancelled");
    let (_, history) = c
        .get(&format!(
            "/entitlements/{later_id}/grants/{}/history",
            sub.id
        ))
        .await;
    assert!(
        history["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["event"] == "backfilled"),
        "{history}"
    );
    // The subscription's next event finds its grant: no second one.
    w.app
        .publish(
            &subscription("renewed", &biz, "sub_1", "cus_1", "pdt_b", "active", T1),
            "evt_renew",
        )
        .await;
    w.app.wait_processed(events.len() as i64 + 1).await;
    assert_eq!(w.app.grants_of("cus_1").await.len(), 1);

    // Detaching takes nothing away.
    let (s, _) = c
        .put("/products/pdt_b/entitlements", json!({"entitlements": []}))
        .await;
    assert_eq!(s, 200);
    assert_eq!(
        w.wait_status(&sub.id, "Delivered").await.status,
        "Delivered"
    );
    assert!(w.has_role(g.guild_id, u, role));
    w.stop().await;
}

/// One business's many backfills take turns with another's: the open ones a pass
/// reads include every business's oldest, however many the first business has. On a
/// database no process watches (a running backfiller would close these rows, which
/// have no purchases to reach).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfills_take_turns_by_business() {
    use guildgate::store;
    let db = common::TestDb::create().await;
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    store::migrate(&pool).await.unwrap();
    let mut conn = pool.acquire().await.unwrap();
    let mut entitlement = async |business: &str| {
        store::businesses::ensure_business(&mut conn, business)
            .await
            .unwrap();
        store::entitlements::insert_entitlement(&mut conn, business, "gold", "1", Some("2"))
            .await
            .unwrap()
            .id
    };
    let busy = entitlement("bus_busy").await;
    let other = entitlement("bus_other").await;
    // The busy business attached its entitlement to 150 products first.
    for i in 0..150 {
        let product = format!("pdt_{i}");
        store::backfill::start(&mut conn, "bus_busy", &product, std::slice::from_ref(&busy))
            .await
            .unwrap();
    }
    store::backfill::start(
        &mut conn,
        "bus_other",
        "pdt_x",
        std::slice::from_ref(&other),
    )
    .await
    .unwrap();
    let open = store::backfill::open(&mut conn).await.unwrap();
    let seen: Vec<(&str, &str)> = open
        .iter()
        .map(|b| (b.business_id.as_str(), b.product_id.as_str()))
        .collect();
    assert_eq!(seen.len(), 100);
    assert_eq!(
        seen[..3],
        [
            ("bus_busy", "pdt_0"),
            ("bus_other", "pdt_x"),
            ("bus_busy", "pdt_1")
        ],
        "every business's oldest, then every business's next"
    );
    drop(conn);
    pool.close().await;
}

/// A World whose guildgate emails through a real SMTP server (STARTTLS with a private
/// CA, AUTH), with one retry after 1 s and at most `per_hour` emails per recipient.
async fn world_with_email(per_hour: u32) -> (World, smtp::SmtpServer) {
    world_with_email_settings(&[(
        "GUILDGATE_EMAIL__PER_RECIPIENT_PER_HOUR",
        &per_hour.to_string(),
    )])
    .await
}

/// A world whose emails go to a test SMTP server, with `env` besides.
async fn world_with_email_settings(env: &[(&str, &str)]) -> (World, smtp::SmtpServer) {
    let server = smtp::SmtpServer::start().await;
    let cfg = common::TestConfig::default()
        .env("GUILDGATE_EMAIL__SMTP_URL", &server.url())
        .env("GUILDGATE_EMAIL__CA_FILE", server.ca.to_str().unwrap())
        .env("GUILDGATE_EMAIL__FROM", "Acme Access <access@acme.test>")
        .env("GUILDGATE_EMAIL__RETRY_DELAYS", "1s");
    let cfg = env.iter().fold(cfg, |cfg, (k, v)| cfg.env(k, v));
    let w = World::configured(cfg).await;
    (w, server)
}

/// An entitlement of `role`, attached to the product `pdt_gold`; its id.
async fn sold_as_gold(c: &Client, guild: u64, role: u64) -> String {
    let e = create_entitlement(c, guild, Some(role)).await;
    let ent = e["id"].as_str().unwrap().to_string();
    let (s, v) = c.attach("pdt_gold", &[&ent]).await;
    assert_eq!(s, 200, "{v}");
    ent
}

/// A one-time purchase whose event names the buyer's email address.
async fn purchase(w: &World, payment_id: &str, customer: &str, product: &str, email: &str) {
    let mut p = payment(&w.app.business(), payment_id, customer, &[product], T0);
    p["data"]["customer"]["email"] = json!(email);
    w.app.publish(&p, &format!("evt_{payment_id}")).await;
}

async fn email_row(w: &World, id: &str) -> Option<(String, i32, Option<String>)> {
    sqlx::query_as("SELECT status, attempts, detail FROM emails WHERE id = $1")
        .bind(id)
        .fetch_optional(&w.app.pool)
        .await
        .unwrap()
}

async fn wait_email_status(w: &World, id: &str, status: &str) -> (String, i32, Option<String>) {
    wait_for(&format!("email {id} {status}"), || async {
        email_row(w, id).await.filter(|r| r.0 == status)
    })
    .await
}

fn email_count(w: &World, kind: &str, outcome: &str) -> u64 {
    w.app
        .metrics
        .emails
        .get_or_create(&vec![
            ("kind", kind.to_string()),
            ("outcome", outcome.to_string()),
        ])
        .get()
}

/// Delivery email end to end: the business's settings, a buyer who has not linked
/// Discord gets one "Join the Discord" email in the business's language (STARTTLS, AUTH,
/// plain and HTML parts, `Reply-To` the support address) whose link connects them; the
/// same job delivered again sends nothing; a resend of a delivered grant links the access
/// page; an entitlement with emails turned off sends nothing until the merchant resends;
/// a returning customer gets none; another business cannot resend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buyers_are_emailed_a_join_link_and_merchants_can_resend() {
    let (w, mail) = world_with_email(5).await;
    let biz = w.app.business();
    let c = client(&w, &biz).await;
    let g = connected_guild(&w, &c, "Acme").await;
    let role = g.role("Patrons");

    let (s, v) = c.get("/business/settings").await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        v,
        json!({"default_locale": "en", "support_email": null, "reminder_days": [],
               "email_enabled": true, "updated_at": null})
    );
    let (s, v) = c
        .patch(
            "/business/settings",
            json!({"default_locale": "it", "support_email": "nope", "reminder_days": [0]}),
        )
        .await;
    assert_eq!(s, 422, "{v}");
    assert_eq!(v["errors"].as_array().unwrap().len(), 3, "{v}");
    let (s, v) = c
        .patch(
            "/business/settings",
            json!({"default_locale": "de", "support_email": "help@acme.test"}),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["default_locale"], "de");
    assert_eq!(
        c.get("/business/settings").await.1["support_email"],
        "help@acme.test"
    );

    let gold = create_entitlement(&c, g.guild_id, Some(role)).await;
    let gold = gold["id"].as_str().unwrap().to_string();
    let mut body = create_body(g.guild_id, Some(role));
    body["integration_config"]["send_email"] = json!(false);
    let (s, quiet) = c.post("/entitlements", body).await;
    assert_eq!(s, 201, "{quiet}");
    assert_eq!(quiet["integration_config"]["send_email"], false);
    let quiet = quiet["id"].as_str().unwrap().to_string();
    for (product, ent) in [("pdt_gold", &gold), ("pdt_quiet", &quiet)] {
        let (s, v) = c.attach(product, &[ent]).await;
        assert_eq!(s, 200, "{v}");
    }

    purchase(&w, "pay_1", "cus_1", "pdt_gold", "buyer@example.test").await;
    let got = mail.wait_for("buyer@example.test", 1).await;
    let m = &got[0];
    assert_eq!(m.envelope["tls"], true, "sent after STARTTLS");
    assert_eq!(m.envelope["login"], smtp::USER);
    assert_eq!(m.subject(), "Tritt Acme auf Discord bei");
    assert_eq!(m.address("From").as_deref(), Some("access@acme.test"));
    assert_eq!(m.address("To").as_deref(), Some("buyer@example.test"));
    assert_eq!(m.address("Reply-To").as_deref(), Some("help@acme.test"));
    assert_eq!(m.part_types(), ["text/plain", "text/html"]);
    assert_eq!(m.header("Content-Language").as_deref(), Some("de"));
    let grant = w.grant_of("cus_1").await;
    let (_, api) = c
        .get(&format!("/entitlements/{gold}/grants/{}", grant.id))
        .await;
    let join = api["oauth_url"].as_str().unwrap().to_string();
    let text = m.text();
    assert!(text.contains(&join), "{text}");
    assert!(text.contains("Patrons Discord Role") && text.contains("Discord beitreten"));
    let html = m.html();
    assert!(html.contains(&join.replace('&', "&amp;")), "{html}");
    assert!(html.contains("lang=\"de\""));
    let access = text
        .split_whitespace()
        .find(|w| w.contains("/access?t="))
        .expect("an access link");
    let token = access.split_once("?t=").unwrap().1;
    let who = w.links.verify_access(token, chrono::Utc::now()).unwrap();
    assert_eq!((who.b.as_str(), who.c.as_str()), (biz.as_str(), "cus_1"));

    // The link in the email connects the customer.
    let una = w.user("una");
    let (_, status, page) = w.consent(&join, una, Consent::Authorize).await;
    assert_eq!(status, 200, "{page}");
    w.wait_status(&grant.id, "Delivered").await;
    assert!(w.has_role(g.guild_id, una, role));

    // The same job delivered again (a crash before its ack) sends nothing.
    let job = guildgate::email::Job::join(&grant.id, Some("buyer@example.test"));
    w.app
        .publish_to_queue(&w.app.names.emails(), &job.email_id, &job.payload())
        .await;
    wait_for("the duplicate job settled", || async {
        (email_count(&w, "join", "duplicate") >= 1).then_some(())
    })
    .await;
    assert_eq!(mail.wait_for("buyer@example.test", 1).await.len(), 1);

    // A resend of a delivered grant links the access page, not Discord.
    let resend = format!("/entitlements/{gold}/grants/{}/resend", grant.id);
    let (s, v) = c.post(&resend, json!({})).await;
    assert_eq!(s, 202, "{v}");
    assert_eq!(v["email_id"], format!("{}:resend:1", grant.id));
    let got = mail.wait_for("buyer@example.test", 2).await;
    assert_eq!(got[1].subject(), "Dein Zugang zu Acme auf Discord");
    assert!(
        !got[1].text().contains("oauth2/authorize"),
        "{}",
        got[1].text()
    );
    assert!(got[1].text().contains("/access?t="));
    let other = client(&w, "bus_Other").await;
    assert_eq!(other.post(&resend, json!({})).await.0, 404);
    // An operator's resend, through the binary: the third email.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_guildgate"))
        .args(["grants", "resend", &grant.id])
        .env("GUILDGATE_DATABASE__URL", &w.app.db.url)
        .env("GUILDGATE_EMAIL__SMTP_URL", mail.url())
        .env("GUILDGATE_EMAIL__CA_FILE", mail.ca.to_str().unwrap())
        .env("RUST_LOG", "error")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("{}:resend:2", grant.id)
    );
    assert!(!stderr.contains(smtp::PASSWORD), "{stderr}");
    mail.wait_for("buyer@example.test", 3).await;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_guildgate"))
        .args(["grants", "resend", "grant_unknown"])
        .env("GUILDGATE_DATABASE__URL", &w.app.db.url)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no grant grant_unknown"));
    let (_, history) = c
        .get(&format!("/entitlements/{gold}/grants/{}/history", grant.id))
        .await;
    let sent: Vec<&Value> = history["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["event"] == "email_sent")
        .collect();
    assert_eq!(sent.len(), 3, "{history}");
    assert_eq!(
        sent[1]["detail"],
        json!({"email": "resend", "letter": "access"})
    );

    // Emails turned off for an entitlement: nothing, until the merchant asks.
    purchase(&w, "pay_2", "cus_2", "pdt_quiet", "quiet@example.test").await;
    let quiet_grant = wait_for("the quiet grant", || async {
        w.app.grants_of("cus_2").await.into_iter().next()
    })
    .await;
    let (_, _, why) = wait_email_status(&w, &format!("{}:join", quiet_grant.id), "skipped").await;
    assert_eq!(why.as_deref(), Some("turned_off"));
    assert!(
        mail.received()
            .iter()
            .all(|m| m.rcpt() != ["quiet@example.test"])
    );
    let (s, v) = c
        .post(
            &format!("/entitlements/{quiet}/grants/{}/resend", quiet_grant.id),
            json!({}),
        )
        .await;
    assert_eq!(s, 202, "{v}");
    let got = mail.wait_for("quiet@example.test", 1).await;
    assert_eq!(got[0].subject(), "Tritt Acme auf Discord bei");

    // A returning customer is delivered at once: no email.
    purchase(&w, "pay_3", "cus_1", "pdt_gold", "buyer@example.test").await;
    let again = wait_for("the second grant delivered", || async {
        w.app
            .grants_of("cus_1")
            .await
            .into_iter()
            .find(|g| g.payment_id.as_deref() == Some("pay_3") && g.status == "Delivered")
    })
    .await;
    assert_eq!(email_row(&w, &format!("{}:join", again.id)).await, None);
    w.stop().await;
}

/// What the SMTP server does not take: a refusal for good fails the email at once and
/// parks its job with the reason; a temporary refusal is retried on the next tier and
/// then sent; past the per-recipient rate an email waits instead of going out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_emails_are_parked_or_retried_and_a_recipient_is_not_flooded() {
    let (w, mail) = world_with_email(2).await;
    let biz = w.app.business();
    let c = client(&w, &biz).await;
    let g = connected_guild(&w, &c, "Acme").await;
    let ent = sold_as_gold(&c, g.guild_id, g.role("Patrons")).await;

    purchase(&w, "pay_1", "cus_1", "pdt_gold", "reject@example.test").await;
    let rejected = wait_for("a grant", || async {
        w.app.grants_of("cus_1").await.into_iter().next()
    })
    .await;
    let (_, attempts, why) =
        wait_email_status(&w, &format!("{}:join", rejected.id), "failed").await;
    assert_eq!(attempts, 1, "a refusal for good is not retried");
    assert!(why.unwrap().contains("550"));
    let dead = guildgate::amqp::Names::dead(&w.app.names.emails());
    let parked = wait_for("the parked job", || async {
        let got = w.app.drain_queue(&dead).await;
        (!got.is_empty()).then_some(got)
    })
    .await;
    assert_eq!(parked[0].message_id, format!("{}:join", rejected.id));
    assert_eq!(
        parked[0].header("x-guildgate-reason-code").as_deref(),
        Some("rejected")
    );

    purchase(&w, "pay_2", "cus_2", "pdt_gold", "tempfail@example.test").await;
    let got = mail.wait_for("tempfail@example.test", 1).await;
    assert_eq!(got.len(), 1);
    let flaky = w.app.grants_of("cus_2").await.remove(0);
    let (_, attempts, _) = wait_email_status(&w, &format!("{}:join", flaky.id), "sent").await;
    assert_eq!(attempts, 2, "sent on the retry");

    // Two emails an hour for one recipient: the join email and one resend go, the
    // second resend waits.
    purchase(&w, "pay_3", "cus_3", "pdt_gold", "many@example.test").await;
    mail.wait_for("many@example.test", 1).await;
    let grant = w.app.grants_of("cus_3").await.remove(0);
    let resend = format!("/entitlements/{ent}/grants/{}/resend", grant.id);
    assert_eq!(c.post(&resend, json!({})).await.0, 202);
    mail.wait_for("many@example.test", 2).await;
    assert_eq!(c.post(&resend, json!({})).await.0, 202);
    wait_for("the third email held back", || async {
        (email_count(&w, "resend", "deferred") >= 1).then_some(())
    })
    .await;
    let row = email_row(&w, &format!("{}:resend:2", grant.id))
        .await
        .unwrap();
    assert_eq!(row.0, "queued");
    assert_eq!(mail.wait_for("many@example.test", 2).await.len(), 2);
    // A merchant may ask three resends of a grant an hour; the fourth is refused.
    assert_eq!(c.post(&resend, json!({})).await.0, 202);
    let (s, v) = c.post(&resend, json!({})).await;
    assert_eq!((s, v["code"].as_str()), (429, Some("rate_limited")), "{v}");

    // The limit is this business's: another business's email to the same address,
    // meanwhile, goes.
    let other = client(&w, "bus_other").await;
    let og = connected_guild(&w, &other, "Other").await;
    let oent = create_entitlement(&other, og.guild_id, Some(og.role("Patrons"))).await;
    let oent = oent["id"].as_str().unwrap();
    let (s, _) = other
        .post(
            &format!("/entitlements/{oent}/grants"),
            json!({"customer_id": "cus_o", "customer_email": "many@example.test"}),
        )
        .await;
    assert_eq!(s, 201);
    assert_eq!(mail.wait_for("many@example.test", 3).await.len(), 3);
    assert_eq!(
        email_row(&w, &format!("{}:resend:2", grant.id))
            .await
            .unwrap()
            .0,
        "queued",
        "the first business's third email still waits"
    );
    w.stop().await;
}

/// A business sends `email.per_business_per_hour` emails an hour at most, whatever
/// addresses it gives its comp grants: the rest wait, and another business's go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_business_past_its_hourly_emails_waits_and_another_sends() {
    let (w, mail) =
        world_with_email_settings(&[("GUILDGATE_EMAIL__PER_BUSINESS_PER_HOUR", "2")]).await;
    let comp = |c: &Client, ent: &str, customer: &str, email: &str| {
        let (c, path) = (c.clone(), format!("/entitlements/{ent}/grants"));
        let body = json!({"customer_id": customer, "customer_email": email});
        async move {
            let (s, v) = c.post(&path, body).await;
            assert_eq!(s, 201, "{v}");
        }
    };
    let a = client(&w, "bus_A").await;
    let ga = connected_guild(&w, &a, "Acme").await;
    let ea = create_entitlement(&a, ga.guild_id, Some(ga.role("Patrons"))).await;
    let ea = ea["id"].as_str().unwrap();
    for i in 0..3 {
        comp(&a, ea, &format!("cus_{i}"), &format!("a{i}@example.test")).await;
    }
    wait_for("A's third email held back", || async {
        (email_count(&w, "join", "deferred") >= 1).then_some(())
    })
    .await;

    let b = client(&w, "bus_B").await;
    let gb = connected_guild(&w, &b, "Other").await;
    let eb = create_entitlement(&b, gb.guild_id, Some(gb.role("Patrons"))).await;
    comp(&b, eb["id"].as_str().unwrap(), "cus_b", "b@example.test").await;
    mail.wait_for("b@example.test", 1).await;

    let to_a = mail
        .received()
        .iter()
        .flat_map(|m| m.rcpt())
        .filter(|r| r.starts_with('a'))
        .count();
    assert_eq!(to_a, 2, "A's two emails of the hour went, the third waits");
    let queued: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM emails WHERE business_id = 'bus_A' AND status = 'queued'",
    )
    .fetch_one(&w.app.pool)
    .await
    .unwrap();
    assert_eq!(queued, 1);
    w.stop().await;
}

/// A business's emails past its hourly limit wait in PostgreSQL, not round the email
/// queue every business shares: once its hour has room again, the upkeep queues the
/// oldest of them, as many as the room allows, and the rest wait untouched, never
/// handled again while the hour is full.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_business_backlog_of_emails_is_released_as_its_hour_has_room() {
    // The process's own upkeep runs once at the start: this test releases by hand.
    let (w, mail) = world_with_email_settings(&[
        ("GUILDGATE_EMAIL__PER_BUSINESS_PER_HOUR", "2"),
        ("GUILDGATE_GRANTS__TIMER_INTERVAL", "1h"),
    ])
    .await;
    let a = client(&w, "bus_A").await;
    let ga = connected_guild(&w, &a, "Acme").await;
    let ea = create_entitlement(&a, ga.guild_id, Some(ga.role("Patrons"))).await;
    let path = format!("/entitlements/{}/grants", ea["id"].as_str().unwrap());
    for i in 0..5 {
        let body = json!({"customer_id": format!("cus_{i}"), "customer_email": format!("a{i}@example.test")});
        assert_eq!(a.post(&path, body).await.0, 201);
    }
    wait_for("A's last three emails parked", || async {
        (email_count(&w, "join", "deferred") >= 3).then_some(())
    })
    .await;
    let parked = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM emails WHERE business_id = 'bus_A' AND status = 'queued'
               AND parked_until > now() + interval '50 minutes'",
        )
        .fetch_one(&w.app.pool)
        .await
        .unwrap()
    };
    assert_eq!(parked().await, 3, "each waits for the hour to have room");
    let upkeep = guildgate::email::upkeep::Upkeep {
        pool: w.app.pool.clone(),
        send: true,
        prune_every: w.app.settings.ingest.prune_interval,
        per_business_per_hour: 2,
    };
    assert_eq!(upkeep.release().await.unwrap(), 0, "the hour is full");

    // A parked email's job delivered again (a crash between parking and the ack) sends
    // nothing and leaves it parked: the upkeep queues it when it is due.
    let (grant, email): (String, String) = sqlx::query_as(
        "SELECT grant_id, id FROM emails WHERE business_id = 'bus_A' AND parked_until IS NOT NULL
         ORDER BY created_at LIMIT 1",
    )
    .fetch_one(&w.app.pool)
    .await
    .unwrap();
    let job = guildgate::email::Job::join(&grant, None);
    assert_eq!(job.email_id, email);
    w.app
        .publish_to_queue(&w.app.names.emails(), &job.email_id, &job.payload())
        .await;
    wait_for("the job delivered again settled", || async {
        (email_count(&w, "join", "duplicate") >= 1).then_some(())
    })
    .await;
    assert_eq!(parked().await, 3, "still parked");

    // An hour later: the two sent age out. A new email finds room in the hour, but the
    // three older ones are due first: it waits behind them.
    sqlx::query(
        "UPDATE emails SET sent_at = sent_at - interval '61 minutes',
             parked_until = parked_until - interval '61 minutes'
         WHERE business_id = 'bus_A'",
    )
    .execute(&w.app.pool)
    .await
    .unwrap();
    let body = json!({"customer_id": "cus_5", "customer_email": "a5@example.test"});
    assert_eq!(a.post(&path, body).await.0, 201);
    wait_for("the newest parked behind the older ones", || async {
        (email_count(&w, "join", "deferred") >= 4).then_some(())
    })
    .await;

    // The two oldest go; the rest wait untouched.
    assert_eq!(upkeep.release().await.unwrap(), 2);
    assert_eq!(
        upkeep.release().await.unwrap(),
        0,
        "the two on their way fill the hour"
    );
    mail.wait_for("a2@example.test", 1).await;
    mail.wait_for("a3@example.test", 1).await;
    // The sink has a message before its worker records it sent.
    wait_for(
        "the two recorded sent, the newest still parked, in order",
        || async {
            let waiting: Vec<(String, bool)> = sqlx::query_as(
                "SELECT g.customer_id, e.parked_until IS NOT NULL FROM emails e
             JOIN grants g ON g.id = e.grant_id
             WHERE e.business_id = 'bus_A' AND e.status = 'queued' ORDER BY e.created_at",
            )
            .fetch_all(&w.app.pool)
            .await
            .unwrap();
            (waiting == [("cus_4".to_string(), true), ("cus_5".to_string(), true)]).then_some(())
        },
    )
    .await;
    let sent_to = |r: &str| {
        mail.received()
            .iter()
            .flat_map(|m| m.rcpt())
            .any(|x| x == r)
    };
    assert!(!sent_to("a4@example.test") && !sent_to("a5@example.test"));
    assert_eq!(
        email_count(&w, "join", "deferred"),
        4,
        "nothing released that the hour had no room for"
    );
    w.stop().await;
}

/// Reminders go on the business's reminder days to customers who still have not
/// connected, once each; addresses are deleted once the customer has no live grant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_customers_are_reminded_once_and_addresses_are_not_kept() {
    let (w, mail) = world_with_email(5).await;
    let biz = w.app.business();
    let c = client(&w, &biz).await;
    let g = connected_guild(&w, &c, "Acme").await;
    let ent = sold_as_gold(&c, g.guild_id, g.role("Patrons")).await;
    let (s, _) = c
        .patch("/business/settings", json!({"reminder_days": [2, 5]}))
        .await;
    assert_eq!(s, 200);
    purchase(&w, "pay_1", "cus_1", "pdt_gold", "late@example.test").await;
    purchase(&w, "pay_2", "cus_2", "pdt_gold", "early@example.test").await;
    mail.wait_for("late@example.test", 1).await;
    mail.wait_for("early@example.test", 1).await;
    let late = w.app.grants_of("cus_1").await.remove(0);
    sqlx::query("UPDATE grants SET created_at = now() - interval '2 days 1 hour' WHERE id = $1")
        .bind(&late.id)
        .execute(&w.app.pool)
        .await
        .unwrap();
    let upkeep = guildgate::email::upkeep::Upkeep {
        pool: w.app.pool.clone(),
        send: true,
        prune_every: w.app.settings.ingest.prune_interval,
        per_business_per_hour: w.app.settings.email.per_business_per_hour,
    };
    assert_eq!(upkeep.once().await.unwrap().0, 1, "one reminder is due");
    assert_eq!(upkeep.once().await.unwrap().0, 0, "and only once");
    let got = mail.wait_for("late@example.test", 2).await;
    assert_eq!(got[1].subject(), "Reminder: join Acme on Discord");
    assert!(got[1].text().contains("oauth2/authorize"));
    assert_eq!(mail.received().len(), 3, "the newer grant is not reminded");

    // Revoked: the customer has no live grant, and their address goes.
    let (s, _) = c
        .delete(&format!("/entitlements/{ent}/grants/{}", late.id))
        .await;
    assert_eq!(s, 200);
    upkeep.once().await.unwrap();
    let kept: Vec<String> =
        sqlx::query_scalar("SELECT customer_id FROM customer_contacts ORDER BY customer_id")
            .fetch_all(&w.app.pool)
            .await
            .unwrap();
    assert_eq!(kept, ["cus_2"]);
    w.stop().await;
}

/// A client that does not follow redirects, with a language.
fn browser_like(lang: &str) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::ACCEPT_LANGUAGE,
        reqwest::header::HeaderValue::from_str(lang).unwrap(),
    );
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .default_headers(headers)
        .build()
        .unwrap()
}

/// Posts a form; returns (status, Location or body).
async fn post_form(http: &reqwest::Client, url: &str, form: &[(&str, &str)]) -> (u16, String) {
    let r = http.post(url).form(form).send().await.unwrap();
    let status = r.status().as_u16();
    let location = r
        .headers()
        .get("location")
        .map(|l| l.to_str().unwrap().to_string());
    (
        status,
        location.unwrap_or(r.text().await.unwrap_or_default()),
    )
}

/// The value of a hidden input in a page.
fn hidden_value(page: &str, name: &str) -> String {
    let at = page
        .find(&format!("name=\"{name}\" value=\""))
        .unwrap_or_else(|| panic!("no {name} in {page}"));
    let rest = &page[at + name.len() + 15..];
    rest[..rest.find('"').unwrap()].replace("&amp;", "&")
}

/// The access token in a page's or a redirect's link to the access page.
fn access_token_in(text: &str) -> String {
    let at = text
        .find("/access?t=")
        .unwrap_or_else(|| panic!("no access link in {text}"));
    text[at + "/access?t=".len()..]
        .split(|c: char| !(c.is_ascii_alphanumeric() || "-_.".contains(c)))
        .next()
        .unwrap()
        .to_string()
}

/// Each view of the access page costs reads on the pool every tenant shares: one
/// customer's page viewed in a loop is refused after a minute's worth, before any read,
/// and another customer's page is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_access_page_viewed_in_a_loop_is_refused_before_it_reads() {
    let w = World::start().await;
    let biz = w.app.business();
    client(&w, &biz).await;
    let until = chrono::Utc::now() + chrono::Duration::days(2);
    let http = browser_like("en");
    let page = |customer: &str| {
        format!(
            "http://{}/access?t={}",
            w.app.addr,
            w.links.access_token(&biz, customer, until)
        )
    };
    let mine = page("cus_1");
    for n in 0..guildgate::web::limits::PAGE_VIEWS_PER_MINUTE {
        let s = http.get(&mine).send().await.unwrap().status();
        assert_eq!(s, 200, "view {n}");
    }
    let r = http.get(&mine).send().await.unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "60");
    assert!(r.text().await.unwrap().contains("Too many attempts"));
    assert_eq!(http.get(page("cus_2")).send().await.unwrap().status(), 200);
    w.stop().await;
}

/// A customer of a business with a client, holding an access link that ends in two
/// days, and a browser in `lang`: where the switch tests start.
struct Switching {
    w: World,
    biz: String,
    until: chrono::DateTime<chrono::Utc>,
    token: String,
    base: String,
    http: reqwest::Client,
    una: u64,
}

impl Switching {
    async fn start(lang: &str) -> Self {
        let w = World::start().await;
        let biz = w.app.business();
        client(&w, &biz).await;
        let until = chrono::Utc::now() + chrono::Duration::days(2);
        let token = w.links.access_token(&biz, "cus_1", until);
        let base = format!("http://{}", w.app.addr);
        let una = w.user("una");
        Self {
            w,
            biz,
            until,
            token,
            base,
            http: browser_like(lang),
            una,
        }
    }
}

/// Going through "Use another Discord account" and back, cancelled on Discord or with an
/// account chosen, never gives the customer a link that works longer than the one they
/// came with, so a leaked link cannot be kept alive that way; a switch that took too
/// long says the link expired, not that it was altered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switch_never_makes_an_access_link_last_longer() {
    let Switching {
        w,
        biz,
        until,
        token,
        base,
        http,
        una,
    } = Switching::start("en").await;
    let ends = |t: &str| {
        let (who, x) = w.links.verify_access_until(t, chrono::Utc::now()).unwrap();
        assert_eq!(who.c, "cus_1");
        x
    };

    // Cancelled on Discord: back to the page, with a link that ends with the first.
    let (s, to) = post_form(&http, &format!("{base}/access/switch"), &[("t", &token)]).await;
    assert_eq!(s, 303, "{to}");
    let callback = w.sandbox.consent(&to, una, Consent::Cancel).await.unwrap();
    let r = http.get(&callback).send().await.unwrap();
    assert_eq!(r.status(), 303);
    let back = r.headers()["location"].to_str().unwrap().to_string();
    assert_eq!(ends(&access_token_in(&back)), until.timestamp(), "{back}");

    // An account chosen (none was linked: it is linked at once): the page's way back
    // ends with the first link too.
    let (_, to) = post_form(&http, &format!("{base}/access/switch"), &[("t", &token)]).await;
    let (_, status, page) = w.consent(&to, una, Consent::Authorize).await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(ends(&access_token_in(&page)), until.timestamp(), "{page}");

    // Another account: the confirmation page's way back, and the switched page's after
    // the confirmation, end with the first link too.
    let vic = w.user("vic");
    let (_, to) = post_form(&http, &format!("{base}/access/switch"), &[("t", &token)]).await;
    let (_, status, confirm) = w.consent(&to, vic, Consent::Authorize).await;
    assert_eq!(status, 200, "{confirm}");
    assert_eq!(
        ends(&access_token_in(&confirm)),
        until.timestamp(),
        "{confirm}"
    );
    let s_value = hidden_value(&confirm, "s");
    let (s, done) = post_form(
        &http,
        &format!("{base}/access/switch/confirm"),
        &[("s", &s_value)],
    )
    .await;
    assert_eq!(s, 200, "{done}");
    assert!(done.contains("vic"), "{done}");
    assert_eq!(ends(&access_token_in(&done)), until.timestamp(), "{done}");

    // A switch's state a quarter of an hour old: expired.
    let old = w.links.switch_url(
        &guildgate::grants::link::Switching {
            b: biz.to_string(),
            c: "cus_1".into(),
            x: Some(until.timestamp()),
        },
        chrono::Utc::now() - chrono::Duration::minutes(16),
    );
    let state = url::Url::parse(&old)
        .unwrap()
        .query_pairs()
        .find(|(k, _)| k == "state")
        .unwrap()
        .1
        .into_owned();
    let r = http
        .get(format!(
            "{base}/oauth/discord/callback?state={state}&code=c"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 410);
    let page = r.text().await.unwrap();
    assert!(page.contains("This link has expired"), "{page}");
    w.stop().await;
}

/// Coming back from Discord with an authorization it refuses (the callback's address
/// opened a second time: its code is spent) shows a page that says Discord did not
/// confirm the account and leads back to the customer's page, not "try again later",
/// which the same address could never satisfy; the account chosen the first time stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switch_discord_refuses_leads_back_to_choose_again() {
    let Switching {
        w,
        biz,
        until,
        token,
        base,
        http,
        una,
    } = Switching::start("fr-FR,fr;q=0.9").await;

    let (s, to) = post_form(&http, &format!("{base}/access/switch"), &[("t", &token)]).await;
    assert_eq!(s, 303, "{to}");
    let (callback, status, page) = w.consent(&to, una, Consent::Authorize).await;
    assert_eq!(status, 200, "{page}");

    let r = http.get(&callback).send().await.unwrap();
    assert_eq!(r.status(), 502);
    assert_eq!(r.headers()["cache-control"], "no-store");
    assert_eq!(r.headers()["content-language"], "fr");
    let page = r.text().await.unwrap();
    assert!(
        page.contains("Discord n’a pas confirmé le compte"),
        "{page}"
    );
    let back = access_token_in(&page);
    let (who, x) = w
        .links
        .verify_access_until(&back, chrono::Utc::now())
        .unwrap();
    assert_eq!((who.b.as_str(), who.c.as_str()), (biz.as_str(), "cus_1"));
    assert_eq!(
        x,
        until.timestamp(),
        "the way back ends with the first link"
    );
    let shown = http
        .get(format!("{base}/access?t={back}"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(shown.contains("<b>una</b>"), "still linked: {shown}");
    w.stop().await;
}

/// The customer's access page end to end over HTTP: reached from the email's link, in
/// the reader's language; Connect, Get my role back (after leaving the server), and Use
/// another Discord account with its confirmation; another customer's grant, an altered
/// or expired link, and a used confirmation are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_page_lets_customers_connect_restore_and_switch() {
    let (w, mail) = world_with_email(10).await;
    let biz = w.app.business();
    let c = client(&w, &biz).await;
    let g = connected_guild(&w, &c, "Acme").await;
    let role = g.role("Patrons");
    let ent = sold_as_gold(&c, g.guild_id, role).await;
    purchase(&w, "pay_1", "cus_1", "pdt_gold", "buyer@example.test").await;
    purchase(&w, "pay_2", "cus_2", "pdt_gold", "other@example.test").await;
    let got = mail.wait_for("buyer@example.test", 1).await;
    let access = got[0]
        .text()
        .split_whitespace()
        .find(|w| w.contains("/access?t="))
        .unwrap()
        .to_string();
    let token = access.split_once("?t=").unwrap().1.to_string();
    let base = format!("http://{}", w.app.addr);
    let de = browser_like("de-DE,de;q=0.9,en;q=0.5");

    let r = de.get(&access).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["cache-control"], "no-store");
    assert_eq!(r.headers()["content-language"], "de");
    let page = r.text().await.unwrap();
    assert!(page.contains("<html lang=\"de\">"), "{page}");
    assert!(page.contains("Patrons Discord Role") && page.contains("Acme"));
    assert!(page.contains("Patrons"), "the role by its name");
    assert!(page.contains("Discord verbinden"), "{page}");
    let grant = w.grant_of("cus_1").await;
    assert_eq!(hidden_value(&page, "grant"), grant.id);

    // Refused: an altered link, an expired one, another customer's grant.
    let (s, _) = w.get(&format!("{base}/access?t={token}x")).await;
    assert_eq!(s, 400);
    let old = w.links.access_token(
        &biz,
        "cus_1",
        chrono::Utc::now() - chrono::TimeDelta::minutes(1),
    );
    let (s, page) = w.get(&format!("{base}/access?t={old}")).await;
    assert_eq!(s, 410, "{page}");
    let theirs = w.grant_of("cus_2").await;
    let (s, _) = post_form(
        &de,
        &format!("{base}/access/connect"),
        &[("t", &token), ("grant", &theirs.id)],
    )
    .await;
    assert_eq!(s, 400);

    // Connect: to Discord with the grant's link.
    let (s, to) = post_form(
        &de,
        &format!("{base}/access/connect"),
        &[("t", &token), ("grant", &grant.id)],
    )
    .await;
    assert_eq!(s, 303, "{to}");
    let una = w.user("una");
    let (_, status, page) = w.consent(&to, una, Consent::Authorize).await;
    assert_eq!(status, 200, "{page}");
    w.wait_status(&grant.id, "Delivered").await;
    wait_for("una holds the role", || async {
        w.has_role(g.guild_id, una, role).then_some(())
    })
    .await;
    let page = de.get(&access).send().await.unwrap().text().await.unwrap();
    assert!(
        page.contains("Aktiv") && page.contains("Meine Rolle zurückholen"),
        "{page}"
    );
    assert!(page.contains("<b>una</b>"), "the account connected: {page}");

    // Left the server: Get my role back.
    w.sandbox.remove_member(g.guild_id, una);
    let (s, to) = post_form(
        &de,
        &format!("{base}/access/restore"),
        &[("t", &token), ("grant", &grant.id)],
    )
    .await;
    assert_eq!(s, 303, "{to}");
    assert!(to.ends_with("&done=restore"), "{to}");
    let page = de
        .get(format!("{base}{to}"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("role=\"status\""), "{page}");
    wait_for("una back in the server with the role", || async {
        w.has_role(g.guild_id, una, role).then_some(())
    })
    .await;

    // Discord forgot the authorization: a new grant fails asking for a new one, and
    // Reconnect gets the customer a fresh link.
    w.sandbox.revoke_tokens(una);
    purchase(&w, "pay_3", "cus_1", "pdt_gold", "buyer@example.test").await;
    let second = wait_for("the second grant", || async {
        w.app
            .grants_of("cus_1")
            .await
            .into_iter()
            .find(|g| g.payment_id.as_deref() == Some("pay_3"))
    })
    .await;
    let failed = w.wait_status(&second.id, "Failed").await;
    assert_eq!(
        failed.error_code.as_deref(),
        Some("discord_reauthorization_required")
    );
    let page = de.get(&access).send().await.unwrap().text().await.unwrap();
    assert!(page.contains("Discord neu verbinden"), "{page}");
    // The account itself is marked: a delivered grant keeps its status, so the page
    // also asks beside the account.
    assert!(page.contains("class=\"warning\""), "{page}");
    let (s, to) = post_form(
        &de,
        &format!("{base}/access/connect"),
        &[("t", &token), ("grant", &second.id)],
    )
    .await;
    assert_eq!(s, 303, "{to}");
    let (_, status, page) = w.consent(&to, una, Consent::Authorize).await;
    assert_eq!(status, 200, "{page}");
    w.wait_status(&second.id, "Delivered").await;
    let page = de.get(&access).send().await.unwrap().text().await.unwrap();
    assert!(
        !page.contains("class=\"warning\""),
        "connected again: {page}"
    );

    // Use another Discord account: nothing changes until the customer confirms.
    let vic = w.user("vic");
    let (s, to) = post_form(&de, &format!("{base}/access/switch"), &[("t", &token)]).await;
    assert_eq!(s, 303, "{to}");
    let (_, status, confirm) = w.consent(&to, vic, Consent::Authorize).await;
    assert_eq!(status, 200, "{confirm}");
    assert!(
        confirm.contains("una") && confirm.contains("vic"),
        "{confirm}"
    );
    assert!(w.has_role(g.guild_id, una, role), "nothing moved yet");
    let s_value = hidden_value(&confirm, "s");
    let (s, done) = post_form(
        &de,
        &format!("{base}/access/switch/confirm"),
        &[("s", &s_value)],
    )
    .await;
    assert_eq!(s, 200, "{done}");
    assert!(done.contains("vic"), "{done}");
    wait_for("the role moved to vic", || async {
        (w.has_role(g.guild_id, vic, role) && !w.has_role(g.guild_id, una, role)).then_some(())
    })
    .await;
    let (s, _) = post_form(
        &de,
        &format!("{base}/access/switch/confirm"),
        &[("s", &s_value)],
    )
    .await;
    assert_eq!(s, 410, "a confirmation works once");

    // Choosing the account already connected keeps it, with its fresh authorization
    // (the page Discord sends back to is in the business's language here: the sandbox
    // sends no Accept-Language).
    let (_, to) = post_form(&de, &format!("{base}/access/switch"), &[("t", &token)]).await;
    let (_, status, same) = w.consent(&to, vic, Consent::Authorize).await;
    assert_eq!(status, 200);
    assert!(same.contains("Connected again"), "{same}");

    let (_, history) = c
        .get(&format!("/entitlements/{ent}/grants/{}/history", grant.id))
        .await;
    let events: Vec<&str> = history["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert!(
        events.contains(&"restore_requested") && events.contains(&"switched"),
        "{events:?}"
    );
    w.stop().await;
}
