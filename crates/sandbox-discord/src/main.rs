//! `sandbox-discord [--addr HOST:PORT]` — runs a Discord API sandbox with one
//! demo guild, role and user, and prints their ids (plus URLs and
//! credentials) as one JSON line on stdout. Stops on Ctrl-C / SIGTERM.

use std::net::SocketAddr;

use sandbox_discord::{GuildSpec, Sandbox, SandboxConfig, UserSpec, permissions};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut addr: SocketAddr = "127.0.0.1:8081".parse()?;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--addr" => addr = args.next().ok_or("--addr needs a value")?.parse()?,
            "-h" | "--help" => {
                println!("usage: sandbox-discord [--addr HOST:PORT]   (default 127.0.0.1:8081)");
                return Ok(());
            }
            other => return Err(format!("unknown argument {other:?}").into()),
        }
    }

    let config = SandboxConfig::default().with_members_intent(true);
    let sandbox = Sandbox::start_on(config, addr).await?;
    let ids = sandbox.add_guild(
        GuildSpec::new("Demo Guild")
            .with_bot_permissions(
                permissions::CREATE_INSTANT_INVITE
                    | permissions::KICK_MEMBERS
                    | permissions::MANAGE_ROLES,
            )
            .with_role("Patrons", 1),
    );
    let user_id = sandbox.add_user(UserSpec::new("demo_user").global_name("Demo User"));
    let seed = serde_json::json!({
        "base_url": sandbox.base_url(),
        "api_base": sandbox.api_base(),
        "authorize_url": sandbox.authorize_url(),
        "bot_token": sandbox.bot_token(),
        "bot_user_id": sandbox.bot_user_id().to_string(),
        "client_id": sandbox.client_id().to_string(),
        "client_secret": sandbox.client_secret(),
        "guild_id": ids.guild_id.to_string(),
        "owner_id": ids.owner_id.to_string(),
        "role_id": ids.role("Patrons").to_string(),
        "user_id": user_id.to_string(),
    });
    println!("{seed}");

    shutdown_signal().await;
    sandbox.shutdown().await;
    Ok(())
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("install SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
