//! Shared helpers for the integration tests.
#![allow(dead_code)]

use std::time::Duration;

use reqwest::{Method, RequestBuilder, Response};
use sandbox_discord::{RateLimitConfig, Sandbox, SandboxConfig};
use serde_json::Value;

/// A config whose buckets are generous enough for functional tests.
pub fn relaxed() -> SandboxConfig {
    SandboxConfig::default().with_rate_limits(
        RateLimitConfig::default()
            .with_default_bucket(10_000, Duration::from_secs(1))
            .with_global(10_000, Duration::from_secs(1)),
    )
}

pub fn client() -> reqwest::Client {
    // In a workspace build, reqwest's features are unified with the product's, which
    // bring rustls without a built-in provider; these tests speak plain HTTP, but the
    // client still needs one installed.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client")
}

pub struct Api {
    pub http: reqwest::Client,
    pub base: String,
    pub bot_token: String,
}

impl Api {
    pub fn new(sb: &Sandbox) -> Self {
        Self {
            http: client(),
            base: sb.api_base(),
            bot_token: sb.bot_token().to_owned(),
        }
    }

    /// Calls as another application's bot.
    pub fn with_bot_token(sb: &Sandbox, bot_token: &str) -> Self {
        Self {
            http: client(),
            base: sb.api_base(),
            bot_token: bot_token.to_owned(),
        }
    }

    pub fn bot(&self, method: Method, path: &str) -> RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.base))
            .header("Authorization", format!("Bot {}", self.bot_token))
    }

    pub fn bearer(&self, method: Method, path: &str, token: &str) -> RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.base))
            .header("Authorization", format!("Bearer {token}"))
    }

    pub async fn add_member(&self, guild: u64, user: u64, body: Value) -> Response {
        self.bot(Method::PUT, &format!("/guilds/{guild}/members/{user}"))
            .json(&body)
            .send()
            .await
            .expect("send")
    }

    pub async fn put_role(&self, guild: u64, user: u64, role: u64) -> Response {
        self.bot(
            Method::PUT,
            &format!("/guilds/{guild}/members/{user}/roles/{role}"),
        )
        .send()
        .await
        .expect("send")
    }

    pub async fn delete_role(&self, guild: u64, user: u64, role: u64) -> Response {
        self.bot(
            Method::DELETE,
            &format!("/guilds/{guild}/members/{user}/roles/{role}"),
        )
        .send()
        .await
        .expect("send")
    }
}

/// Asserts a Discord JSON error `{code, message}` with this status and code.
pub async fn expect_error(resp: Response, status: u16, code: u64) -> Value {
    assert_eq!(resp.status().as_u16(), status, "unexpected status");
    let body: Value = resp.json().await.expect("json error body");
    assert_eq!(body["code"].as_u64(), Some(code), "body: {body}");
    assert!(body["message"].is_string(), "body: {body}");
    body
}

pub fn header<'a>(resp: &'a Response, name: &str) -> Option<&'a str> {
    resp.headers().get(name).and_then(|v| v.to_str().ok())
}

/// Query parameters of a URL.
pub fn query_of(url: &str) -> Vec<(String, String)> {
    let q = url.split_once('?').map_or("", |(_, q)| q);
    serde_urlencoded_parse(q)
}

fn serde_urlencoded_parse(q: &str) -> Vec<(String, String)> {
    reqwest::Url::parse(&format!("http://x/?{q}"))
        .expect("url")
        .query_pairs()
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

pub fn param(url: &str, name: &str) -> Option<String> {
    query_of(url)
        .into_iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v)
}
