//! A guildgate seeded with one of everything the merchant API shows, for the tests that
//! drive the API from outside (a schema fuzzer, the platform's SDK).
#![allow(dead_code)]

use guildgate::domain::ids::BusinessId;
use reqwest::Method;
use sandbox_discord::{Consent, SandboxConfig};
use secrecy::ExposeSecret;
use serde_json::{Value, json};

use crate::common;
use crate::discord_world::World;

/// Where the seeded webhook endpoint points.
pub enum Endpoint {
    /// A private address, refused at delivery as in production (URLs are checked as
    /// there): the grant's message fails.
    Unreachable,
    /// A receiver on this machine (private targets are allowed): the grant's message is
    /// delivered there, signed with [`SECRET`].
    At(String),
}

/// The seeded endpoint's signing secret.
pub const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// A running guildgate with one of everything the API shows, and what a run needs.
pub struct Seeded {
    pub world: World,
    pub key: String,
    /// Kind of object (`entitlement`, `grant`, `customer`, `product`, `guild`,
    /// `role`, `endpoint`, `message`) → the seeded one's id.
    pub ids: Vec<(&'static str, String)>,
}

/// A guildgate whose business has a connected server, an entitlement attached to a
/// product, a customer's grant of it, and a webhook endpoint with the message of that
/// grant (failed or delivered, as `endpoint` decides), so that lists answer real objects
/// and operations on one object can be given real ids.
pub async fn seeded(endpoint: Endpoint) -> Seeded {
    let (url, private_targets, outcome) = match endpoint {
        Endpoint::Unreachable => (
            "https://127.0.0.1:9/guildgate".to_string(),
            "false",
            "failed",
        ),
        Endpoint::At(url) => (url, "true", "delivered"),
    };
    let w = World::start_with(
        SandboxConfig::default(),
        common::TestConfig::default()
            // Far above what a fuzzer sends: a 429 is documented, but would answer in
            // place of the handler the request was generated for.
            .env("GUILDGATE_API__REQUESTS_PER_SECOND", "1000000")
            .env("GUILDGATE_API__BURST", "1000000")
            .env("GUILDGATE_API__MAX_IN_FLIGHT_PER_BUSINESS", "1000000")
            .env("GUILDGATE_WEBHOOKS__ALLOW_PRIVATE_TARGETS", private_targets),
    )
    .await;
    let business = w.app.business();
    let key = {
        let mut conn = w.app.pool.acquire().await.unwrap();
        let (_, key) = guildgate::web::api::auth::create_api_key(
            &mut conn,
            &BusinessId::parse(business.clone()).unwrap(),
            Some("seeded"),
        )
        .await
        .unwrap();
        key.expose_secret().to_string()
    };
    let base = format!("http://{}", w.app.addr);
    let call = |method: Method, path: &str, body: Option<Value>| {
        let mut req = w
            .http
            .request(method, format!("{base}{path}"))
            .bearer_auth(&key);
        if let Some(b) = body {
            req = req.json(&b);
        }
        async move {
            let r = req.send().await.expect("guildgate answers");
            (
                r.status().as_u16(),
                r.json::<Value>().await.unwrap_or(Value::Null),
            )
        }
    };
    // A server connected through the real install flow.
    let g = w.guild("Acme");
    let (s, v) = call(Method::GET, "/discord/install-url", None).await;
    assert_eq!(s, 200, "{v}");
    let callback = w
        .sandbox
        .consent(
            v["url"].as_str().unwrap(),
            g.owner_id,
            Consent::InstallBot {
                guild_id: g.guild_id,
            },
        )
        .await
        .expect("consent page works");
    let (s, page) = w.get(&callback).await;
    assert_eq!(s, 200, "{page}");
    let (s, e) = call(
        Method::POST,
        "/entitlements",
        Some(json!({
            "name": "Patrons Discord Role",
            "integration_type": "discord",
            "integration_config": {"guild_id": g.guild_id.to_string(), "role_id": g.role("Patrons").to_string()},
            "metadata": {"tier": "gold"},
        })),
    )
    .await;
    assert_eq!(s, 201, "{e}");
    let entitlement = e["id"].as_str().unwrap().to_string();
    let (s, v) = call(
        Method::PUT,
        "/products/pdt_fuzz/entitlements",
        Some(json!({"entitlements": [{"entitlement_id": entitlement}]})),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    common::add_webhook_endpoint(&w.app.pool, &business, url, SECRET).await;
    let (_, v) = call(Method::GET, "/webhooks", None).await;
    let endpoint = v["data"][0]["id"].as_str().unwrap().to_string();
    w.app
        .publish(
            &common::events::payment(
                &business,
                "pay_fuzz",
                "cus_fuzz",
                &["pdt_fuzz"],
                "2026-05-01T10:31:00Z",
            ),
            "evt_fuzz",
        )
        .await;
    let grant = w.grant_of("cus_fuzz").await.id;
    let message = common::wait_for("the grant's webhook message to settle", || {
        let path = format!("/webhooks/{endpoint}/messages");
        let call = &call;
        async move {
            let (_, v) = call(Method::GET, &path, None).await;
            let m = &v["items"][0];
            (m["status"] == outcome).then(|| m["id"].as_str().unwrap().to_string())
        }
    })
    .await;
    Seeded {
        world: w,
        key,
        ids: vec![
            ("entitlement", entitlement),
            ("grant", grant),
            ("customer", "cus_fuzz".into()),
            ("product", "pdt_fuzz".into()),
            ("guild", g.guild_id.to_string()),
            ("role", g.role("Patrons").to_string()),
            ("endpoint", endpoint),
            ("message", message),
        ],
    }
}
