//! The `guildgate` binary: one command per job, each with `--help`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use guildgate::app::{App, Options};
use guildgate::config::{Environment, Settings};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "guildgate",
    version,
    about = "Sells access to Discord servers: payment events in, Discord roles and signed webhooks out."
)]
struct Cli {
    /// A TOML file overriding config/default.toml; GUILDGATE_* environment variables override both.
    #[arg(long, global = true, env = "GUILDGATE_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run everything: HTTP, event consumers, outbox relay (migrates and declares topology first).
    Serve {
        /// Do not run database migrations on start.
        #[arg(long)]
        no_migrate: bool,
        /// Do not declare RabbitMQ queues and exchanges on start (they must exist).
        #[arg(long)]
        no_declare: bool,
    },
    /// Apply database migrations and exit.
    Migrate,
    /// Declare RabbitMQ exchanges, queues and bindings and exit; prints their names.
    Topology,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let settings = match Settings::load(cli.config.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("guildgate: {e}");
            return ExitCode::from(2);
        }
    };
    guildgate::telemetry::init(settings.log.format);
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dev = settings.secrets_named_dev();
    if settings.env == Environment::Development && !dev.is_empty() {
        tracing::warn!(
            secrets = ?dev,
            "RUNNING WITH PUBLIC DEVELOPMENT SECRETS. Anyone can forge OAuth links and read stored tokens. Set real ones before exposing this instance (GUILDGATE_ENV=production enforces it)."
        );
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = rt.block_on(async move {
        match cli.command {
            Command::Serve {
                no_migrate,
                no_declare,
            } => serve(settings, no_migrate, no_declare).await,
            Command::Migrate => {
                let pool = guildgate::store::pool(&settings.database).map_err(|e| e.to_string())?;
                guildgate::store::migrate(&pool)
                    .await
                    .map_err(|e| e.to_string())?;
                tracing::info!("migrations applied");
                Ok(())
            }
            Command::Topology => {
                let broker = guildgate::amqp::Broker::new(&settings, "guildgate-topology");
                broker.try_channel().await.map_err(|e| e.to_string())?;
                let names = guildgate::amqp::Names::from_settings(&settings);
                for q in guildgate::amqp::topology::all_queues(&names, &settings) {
                    println!("{q}");
                }
                broker.close().await;
                Ok(())
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "guildgate stopped with an error");
            eprintln!("guildgate: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(settings: Settings, no_migrate: bool, no_declare: bool) -> Result<(), String> {
    let options = Options {
        migrate: !no_migrate,
        declare: !no_declare,
        ..Options::default()
    };
    let app = App::build(settings, options)
        .await
        .map_err(|e| e.to_string())?;
    tracing::info!(addr = %app.local_addr(), "guildgate serving");
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown requested: finishing work in hand");
        signal.cancel();
    });
    app.run_until_stopped(shutdown).await
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
