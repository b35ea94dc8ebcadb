//! The README's run command: `cargo run --example demo`.
//!
//! Starts a sandbox Discord (a stand-in for Discord's API, in-process), then guildgate
//! pointed at it and at the local PostgreSQL and RabbitMQ, and plays one customer's
//! purchase end to end while printing what happens:
//!
//! 1. the merchant's setup: a Discord server with a "Patrons" role, an entitlement for
//!    it attached to a product, a webhook endpoint (a small receiver in this process
//!    that verifies every signature with the `standardwebhooks` crate);
//! 2. the platform publishes `payment.succeeded` → a `Pending` grant with an `oauth_url`,
//!    and guildgate emails the customer a "Join the Discord" link (an SMTP receiver in
//!    this process takes the email and prints it);
//! 3. the customer follows the link in the email, presses Authorize on the consent page,
//!    lands on guildgate's result page → the grant is `Delivered` and the member holds
//!    the role;
//!    her access page (linked from the email) shows the grant and what she can do;
//! 4. the platform publishes `refund.succeeded` → `Revoked`, the role is gone.
//!
//! Uses the database `guildgate_demo` (created if missing) and the queue prefix
//! `guildgate-demo`; `--keep-running` leaves guildgate serving afterwards.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use guildgate::app::{App, Options};
use guildgate::config::Settings;
use guildgate::domain::{Grant, GrantStatus, RevocationReason};
use guildgate::grants::link::LinkBuilder;
use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use sandbox_discord::{Consent, GuildSpec, Sandbox, SandboxConfig, UserSpec, permissions};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

#[path = "common/world.rs"]
mod world;
const BUSINESS: &str = "bus_demo";

fn step(n: u32, text: &str) {
    println!("\n\x1b[1m{n}. {text}\x1b[0m");
}

async fn wait_grant(
    pool: &sqlx::PgPool,
    customer: &str,
    what: &str,
    pred: impl Fn(&Grant) -> bool,
) -> Grant {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let g: Option<Grant> =
            sqlx::query_as("SELECT * FROM grants WHERE business_id = $1 AND customer_id = $2 ORDER BY created_at DESC LIMIT 1")
                .bind(BUSINESS)
                .bind(customer)
                .fetch_optional(pool)
                .await
                .expect("database");
        if let Some(g) = g.filter(|g| pred(g)) {
            return g;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out waiting for the grant to be {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn publish(conn: &Connection, exchange: &str, event: &Value, id: &str) {
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    let rk = event["type"].as_str().unwrap();
    let confirm = ch
        .basic_publish(
            exchange.into(),
            rk.into(),
            BasicPublishOptions::default(),
            &serde_json::to_vec(event).unwrap(),
            BasicProperties::default()
                .with_delivery_mode(2)
                .with_message_id(id.into()),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(confirm.is_ack());
    println!("   published {rk} (event id {id})");
}

#[tokio::main]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    world::help(
        "demo [--keep-running]\n\
         Plays one customer's purchase end to end against a sandbox Discord and the local\n\
         PostgreSQL and RabbitMQ; --keep-running keeps guildgate serving afterwards, until Ctrl-C.",
    );
    let keep_running = std::env::args().any(|a| a == "--keep-running");

    // --- A sandbox Discord with the merchant's server.
    let sandbox = Sandbox::start(SandboxConfig::default()).await;
    let guild = sandbox.add_guild(
        GuildSpec::new("Acme Community")
            .with_bot_permissions(
                permissions::MANAGE_ROLES
                    | permissions::KICK_MEMBERS
                    | permissions::CREATE_INSTANT_INVITE,
            )
            .with_role("Patrons", 1),
    );
    let role = guild.role("Patrons");
    let ada = sandbox.add_user(UserSpec::new("ada"));

    // --- A webhook receiver that verifies what guildgate signs.
    let received: Arc<Mutex<Vec<String>>> = Arc::default();
    let secret = "whsec_ZGVtby13ZWJob29rLXNlY3JldC0zMi1ieXRlcyE=";
    let verifier = Arc::new(standardwebhooks::Webhook::new(secret).expect("valid secret"));
    let rx = received.clone();
    let receiver = axum::Router::new().route(
        "/hooks",
        axum::routing::post(move |headers: HeaderMap, body: Bytes| {
            let (rx, verifier) = (rx.clone(), verifier.clone());
            async move {
                let ok = verifier.verify(&body, &headers).is_ok();
                let v: Value = serde_json::from_slice(&body).unwrap_or_default();
                let line = format!(
                    "   webhook {} (status {}), signature {}",
                    v["type"].as_str().unwrap_or("?"),
                    v["data"]["status"].as_str().unwrap_or("?"),
                    if ok { "verified" } else { "INVALID" }
                );
                println!("{line}");
                rx.lock().unwrap().push(line);
                StatusCode::NO_CONTENT
            }
        }),
    );
    let hooks = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hooks_url = format!("http://{}/hooks", hooks.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(hooks, receiver).await });

    // --- An SMTP receiver for guildgate's emails.
    let (smtp_port, mut inbox) = smtp_receiver::start().await;

    // --- guildgate, pointed at the sandbox.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let env: HashMap<String, String> = [
        (
            "GUILDGATE_DATABASE__URL",
            std::env::var("GUILDGATE_DATABASE__URL")
                .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/guildgate_demo".into()),
        ),
        ("GUILDGATE_AMQP__QUEUE_PREFIX", "guildgate-demo".into()),
        ("GUILDGATE_AMQP__EXCHANGE", "guildgate-demo.payments".into()),
        ("GUILDGATE_HTTP__ADDR", format!("127.0.0.1:{port}")),
        (
            "GUILDGATE_HTTP__PUBLIC_URL",
            format!("http://127.0.0.1:{port}"),
        ),
        ("GUILDGATE_WEBHOOKS__ALLOW_PRIVATE_TARGETS", "true".into()),
        (
            "GUILDGATE_EMAIL__SMTP_URL",
            format!("smtp://127.0.0.1:{smtp_port}"),
        ),
        (
            "GUILDGATE_EMAIL__FROM",
            "Acme Community <access@acme.example>".into(),
        ),
    ]
    .into_iter()
    .chain(world::sandbox_env(&sandbox))
    .map(|(k, v)| (k.to_string(), v))
    .chain(std::env::vars().filter(|(k, _)| k.starts_with("GUILDGATE_AMQP__URL")))
    .collect();
    let settings = Settings::load_with_env(None, Some(env)).expect("settings");
    let app = App::build_with_listener(settings.clone(), Options::default(), listener)
        .await
        .expect("guildgate starts (are PostgreSQL and RabbitMQ running? see README)");
    let pool = app.pool.clone();
    let links = LinkBuilder::from_settings(&settings);
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(app.run_until_stopped(shutdown.clone()));
    println!(
        "guildgate is serving on http://127.0.0.1:{port}; sandbox Discord on {}",
        sandbox.base_url()
    );

    step(
        1,
        "The merchant connects 'Acme Community', sells its 'Patrons' role, and registers a webhook",
    );
    let product = "pdt_patrons_lifetime";
    {
        let mut c = pool.acquire().await.unwrap();
        guildgate::store::businesses::ensure_business(&mut c, BUSINESS)
            .await
            .unwrap();
        // The merchant's bot install, as Discord confirmed it (the API's install flow
        // records this; tests/api.rs walks it).
        guildgate::store::guilds::connect(
            &mut c,
            guildgate::store::guilds::Install {
                business_id: BUSINESS,
                guild_id: &guild.guild_id.to_string(),
                name: "Acme Community",
                permissions: None,
                installed_by: None,
                now: chrono::Utc::now(),
            },
        )
        .await
        .unwrap();
        let ent = guildgate::store::entitlements::insert_entitlement(
            &mut c,
            BUSINESS,
            "Patrons Discord Role",
            &guild.guild_id.to_string(),
            Some(&role.to_string()),
        )
        .await
        .unwrap();
        guildgate::store::entitlements::set_product_entitlements(
            &mut c,
            BUSINESS,
            product,
            std::slice::from_ref(&ent.id),
        )
        .await
        .unwrap();
        // One demo endpoint at a time: remove the ones earlier runs registered.
        for e in guildgate::store::endpoints::list(&mut c, BUSINESS)
            .await
            .unwrap()
        {
            let _ = guildgate::webhooks::endpoints::delete(&mut c, BUSINESS, &e.id).await;
        }
        guildgate::webhooks::endpoints::create(
            &mut c,
            BUSINESS,
            guildgate::webhooks::endpoints::NewEndpoint {
                url: hooks_url.clone(),
                description: Some("demo receiver".into()),
                filter_types: None,
                secret: Some(secret.into()),
                ..Default::default()
            },
            guildgate::webhooks::ssrf::TargetPolicy {
                allow_private: true,
            },
        )
        .await
        .expect("endpoint saved");
        println!(
            "   entitlement {} → guild {} role {}; product {product}",
            ent.id, guild.guild_id, role
        );
    }

    let amqp = Connection::connect(
        &std::env::var("GUILDGATE_AMQP__URL")
            .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into()),
        ConnectionProperties::default(),
    )
    .await
    .unwrap();
    let run = chrono::Utc::now().timestamp_millis();
    let (payment, customer) = (format!("pay_demo{run}"), format!("cus_demo{run}"));
    let now = chrono::Utc::now().to_rfc3339();

    step(2, "The platform publishes payment.succeeded");
    // An address of this run's own: the demo's database is kept between runs, and one
    // address gets at most `email.per_recipient_per_hour` emails from the business.
    let address = format!("ada+{run}@example.com");
    let cust = json!({"customer_id": customer, "email": address, "name": "Ada Lovelace", "metadata": {}, "phone_number": null});
    publish(&amqp, &settings.amqp.exchange, &json!({
        "business_id": BUSINESS, "type": "payment.succeeded", "timestamp": now,
        "data": {"payload_type": "Payment", "payment_id": payment, "business_id": BUSINESS, "brand_id": "brd_demo",
                 "customer": cust, "subscription_id": null, "product_cart": [{"product_id": product, "quantity": 1}],
                 "total_amount": 4900, "currency": "USD", "status": "succeeded"}
    }), &format!("evt_pay{run}")).await;
    let g = wait_grant(&pool, &customer, "Pending", |g| {
        g.status == GrantStatus::Pending
    })
    .await;
    let url = links.url(&g.business_id, &g.id, &g.oauth_nonce, g.oauth_expires_at);
    println!("   grant {} is Pending", g.id);
    let raw = tokio::time::timeout(Duration::from_secs(30), inbox.recv())
        .await
        .expect("guildgate emails the customer within 30 s")
        .expect("the SMTP receiver runs");
    let email = mail_parser::MessageParser::default()
        .parse(&raw)
        .expect("a MIME message");
    let text = email.body_text(0).unwrap_or_default();
    println!(
        "   email received by the SMTP receiver:\n   From: {}\n   To: {}\n   Subject: {}\n",
        email
            .from()
            .and_then(|a| a.first())
            .and_then(|a| a.address())
            .unwrap_or("?"),
        email
            .to()
            .and_then(|a| a.first())
            .and_then(|a| a.address())
            .unwrap_or("?"),
        email.subject().unwrap_or("?"),
    );
    for line in text.lines() {
        println!("   | {line}");
    }
    assert!(text.contains(&url), "the email carries the grant's link");
    let access = text
        .split_whitespace()
        .find(|w| w.contains("/access?t="))
        .expect("the email links the access page")
        .to_string();

    step(
        3,
        "Ada opens the link in the email, presses Authorize, and lands on guildgate's page",
    );
    let callback = sandbox
        .consent(&url, ada, Consent::Authorize)
        .await
        .expect("consent");
    let page = reqwest::get(&callback)
        .await
        .expect("callback")
        .text()
        .await
        .unwrap_or_default();
    let title = page
        .split("<title>")
        .nth(1)
        .and_then(|t| t.split("</title>").next())
        .unwrap_or("?");
    println!("   result page: \"{title}\"");
    let g = wait_grant(&pool, &customer, "Delivered", |g| {
        g.status == GrantStatus::Delivered
    })
    .await;
    let member = sandbox.member(guild.guild_id, ada).expect("ada joined");
    println!(
        "   grant {} is Delivered; in Discord ada holds roles {:?} (Patrons = {role})",
        g.id, member.roles
    );

    println!(
        "   Ada opens her access page from the email ({}/access?t=…):",
        settings.http.public_url
    );
    let page = reqwest::get(&access)
        .await
        .expect("access page")
        .text()
        .await
        .unwrap_or_default();
    for (label, value) in page
        .split("<dt>")
        .skip(1)
        .filter_map(|d| d.split_once("</dt><dd>"))
        .map(|(l, rest)| (l, rest.split("</dd>").next().unwrap_or("")))
    {
        println!("   | {label}: {value}");
    }
    println!("   | actions: Get my role back, Use another Discord account");

    step(4, "The platform publishes refund.succeeded");
    publish(&amqp, &settings.amqp.exchange, &json!({
        "business_id": BUSINESS, "type": "refund.succeeded", "timestamp": chrono::Utc::now().to_rfc3339(),
        "data": {"payload_type": "Refund", "refund_id": format!("ref_demo{run}"), "payment_id": payment, "business_id": BUSINESS,
                 "is_partial": false, "amount": 4900, "currency": "USD", "status": "succeeded"}
    }), &format!("evt_ref{run}")).await;
    let g = wait_grant(&pool, &customer, "Revoked", |g| {
        g.status == GrantStatus::Revoked
    })
    .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while sandbox
        .member(guild.guild_id, ada)
        .is_some_and(|m| m.roles.contains(&role))
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let roles = sandbox
        .member(guild.guild_id, ada)
        .map(|m| m.roles)
        .unwrap_or_default();
    println!(
        "   grant {} is Revoked ({}); ada's roles now {:?}",
        g.id,
        g.revocation_reason.map_or("?", RevocationReason::as_str),
        roles
    );

    // The four webhooks arrive asynchronously; give them a moment.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while received.lock().unwrap().len() < 3 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "\nDone: {} signed webhooks received.",
        received.lock().unwrap().len()
    );
    if keep_running {
        println!("guildgate keeps serving on http://127.0.0.1:{port} (Ctrl-C to stop)");
        let _ = tokio::signal::ctrl_c().await;
    }
    shutdown.cancel();
    let _ = running.await;
}

/// A plain SMTP receiver on loopback for the demo's emails: it accepts every message
/// and hands its bytes to the demo. Not a mail server (no TLS, no auth, one client at
/// a time): just enough of RFC 5321 for guildgate to deliver to it.
mod smtp_receiver {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    use tokio::net::TcpListener;
    use tokio::sync::mpsc;

    pub async fn start() -> (u16, mpsc::UnboundedReceiver<Vec<u8>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let tx = tx.clone();
                tokio::spawn(async move {
                    let _ = session(socket, tx).await;
                });
            }
        });
        (port, rx)
    }

    async fn session(
        socket: tokio::net::TcpStream,
        tx: mpsc::UnboundedSender<Vec<u8>>,
    ) -> std::io::Result<()> {
        let (read, mut write) = socket.into_split();
        let mut lines = BufReader::new(read);
        write.write_all(b"220 demo SMTP receiver\r\n").await?;
        let mut line = String::new();
        loop {
            line.clear();
            if lines.read_line(&mut line).await? == 0 {
                return Ok(());
            }
            let verb = line.get(..4).unwrap_or("").to_ascii_uppercase();
            let reply: &[u8] = match verb.as_str() {
                "EHLO" => b"250-demo\r\n250 8BITMIME\r\n",
                "HELO" | "MAIL" | "RCPT" | "RSET" | "NOOP" => b"250 OK\r\n",
                "DATA" => {
                    write.write_all(b"354 end with .\r\n").await?;
                    let mut message = Vec::new();
                    loop {
                        line.clear();
                        if lines.read_line(&mut line).await? == 0 {
                            return Ok(());
                        }
                        if line == ".\r\n" || line == ".\n" {
                            break;
                        }
                        // Dot-stuffing (RFC 5321 4.5.2).
                        let l = line.strip_prefix('.').unwrap_or(&line);
                        message.extend_from_slice(l.as_bytes());
                    }
                    let _ = tx.send(message);
                    b"250 accepted\r\n"
                }
                "QUIT" => {
                    write.write_all(b"221 bye\r\n").await?;
                    return Ok(());
                }
                _ => b"502 not implemented\r\n",
            };
            write.write_all(reply).await?;
        }
    }
}
