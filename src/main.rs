//! The `guildgate` binary: one command per job, each with `--help`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use guildgate::app::Options;
use guildgate::config::{Environment, Settings};

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
        /// Do not run database migrations on start (`guildgate migrate` runs them); refuse
        /// to start unless the database has exactly this release's migrations.
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
    /// Inspect, replay and purge dead-lettered messages.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Manage merchants' API keys (`Authorization: Bearer <key>` on the REST API).
    #[command(subcommand)]
    ApiKey(ApiKeyCommand),
    /// Manage the keys of data guildgate encrypts.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Act on one grant.
    #[command(subcommand)]
    Grants(GrantsCommand),
    /// See which business holds a Discord server, and take it from one.
    #[command(subcommand)]
    Guilds(GuildsCommand),
    /// Compare grants with Discord and report drift (a table, or JSON); --apply queues fixes.
    ///
    /// Finds delivered grants whose member lacks the role or left the server, revoked
    /// grants whose member still holds it, and (when the bot may list members) members
    /// holding a gated role without a grant. Discord is read on the small side budget,
    /// never the syncer's. Changes nothing without --apply.
    Reconcile {
        /// Only grants of this business (`bus_…`).
        #[arg(long)]
        business: Option<String>,
        /// Only this Discord server (guild id).
        #[arg(long)]
        guild: Option<String>,
        /// Queue the fixes: `restore` queues a sync of the grant, `revoke` revokes it
        /// (`platform_external`); a revoked grant still held gets a sync that removes the
        /// role. Members without a grant are only reported. A running `serve` carries
        /// the fixes out.
        #[arg(long)]
        apply: bool,
        /// Drift policy for --apply (default: GUILDGATE_RECONCILE__POLICY, `restore`).
        #[arg(long, value_parser = ["restore", "revoke"])]
        policy: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum DlqCommand {
    /// Without QUEUE: every dead-letter queue with its depth. With QUEUE (e.g.
    /// `payment-events`, or a full name): its first messages with type, id, reason and
    /// the broker's x-death record. Nothing is removed.
    List {
        /// A dead-letter queue: `payment-events`, `discord-sync`, `grant-events`,
        /// `webhooks`, `emails`, or its full name.
        queue: Option<String>,
        /// How many messages to show.
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Republish parked messages to the guildgate queue they came from (with publisher
    /// confirms), then remove them from the dead-letter queue.
    Replay {
        /// The dead-letter queue (as for `list`).
        queue: String,
        /// Replay at most this many messages.
        #[arg(long)]
        limit: Option<usize>,
        /// Only messages of this type (e.g. `payment.succeeded`).
        #[arg(long = "type")]
        kind: Option<String>,
        /// Only the message with this id.
        #[arg(long)]
        id: Option<String>,
        /// Show what would be replayed; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Leave a message parked once it was replayed this often.
        #[arg(long, default_value_t = 5)]
        max_replays: i64,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Delete every message of a dead-letter queue.
    Purge {
        /// The dead-letter queue (as for `list`).
        queue: String,
        /// Confirm: without it nothing is deleted.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Subcommand)]
enum GuildsCommand {
    /// Which businesses hold or claim a Discord server: the one holding it (its install
    /// proven) first, with who installed the bot and when.
    Show {
        /// The Discord server (guild id).
        guild_id: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Take a Discord server from a business, so that another can connect it.
    ///
    /// For a dispute: a server belongs to one business at a time, and the one that
    /// connected it keeps it until it disconnects it (an install link followed by
    /// mistake, an admin who has left). The business's entitlements that name the server
    /// keep their grants and keep working there until another business connects it;
    /// from then on they give nothing there. Changes nothing without --yes.
    Release {
        /// The Discord server (guild id).
        guild_id: String,
        /// The business to take it from (`bus_…`).
        #[arg(long)]
        business: String,
        /// Confirm: without it nothing changes.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Subcommand)]
enum GrantsCommand {
    /// Email a grant's customer again: the "Join the Discord" email while the grant waits
    /// for their Discord account, otherwise the link to their access page.
    ///
    /// Queues the email (a running `serve` with email configured sends it) and prints its
    /// id. Refused when email is off (`email.smtp_url` empty), the grant is revoked, or no
    /// address is known for the customer.
    Resend {
        /// The grant (`grant_…`).
        grant_id: String,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Re-encrypt every customer's stored Discord tokens with the current
    /// `secrets.token_encryption_key`.
    ///
    /// Tokens stored with a key listed in `secrets.previous_token_encryption_keys` (or
    /// before keys had ids) are decrypted and written back with the current key, in
    /// batches. Safe while `serve` runs (a link written meanwhile is left as written)
    /// and to run again. Prints what it did; fails if some tokens no configured key
    /// decrypts. Once it reports none remaining, the previous keys can be removed.
    RotateTokens {
        /// Links re-encrypted per transaction.
        #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(i64).range(1..))]
        batch_size: i64,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum ApiKeyCommand {
    /// Create a key for a business (creating the business if new). Prints the key once on
    /// stdout; only its hash is stored, so it cannot be shown again.
    Create {
        /// The platform's business id (`bus_…`), as in its payment events.
        #[arg(long)]
        business_id: String,
        /// A label to recognise the key by (e.g. "production server").
        #[arg(long)]
        name: Option<String>,
    },
    /// Revoke a key by its id (`key_…`, printed when it was created); requests with it
    /// are refused from now on.
    Revoke {
        /// The key's id, `key_…`.
        key_id: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let settings = match Settings::load(cli.config.as_deref()).and_then(|s| {
        if s.email.enabled() {
            guildgate::email::transport::check(&s.email)
                .map_err(|e| guildgate::config::ConfigError::Invalid(format!("email: {e}")))?;
        }
        Ok(s)
    }) {
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
                guildgate::store::ensure_database(&settings.database)
                    .await
                    .map_err(|e| e.to_string())?;
                let pool = guildgate::store::pool(&settings.database).map_err(|e| e.to_string())?;
                guildgate::store::migrate(&pool)
                    .await
                    .map_err(|e| e.to_string())?;
                tracing::info!("migrations applied");
                Ok(())
            }
            Command::ApiKey(cmd) => api_key(&settings, cmd).await,
            Command::Dlq(cmd) => dlq(&settings, cmd).await,
            Command::Keys(cmd) => keys(&settings, cmd).await,
            Command::Grants(cmd) => grants(&settings, cmd).await,
            Command::Guilds(cmd) => guilds(&settings, cmd).await,
            Command::Reconcile {
                business,
                guild,
                apply,
                policy,
                json,
            } => reconcile(&settings, business, guild, apply, policy, json).await,
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

async fn dlq(settings: &Settings, cmd: DlqCommand) -> Result<(), String> {
    use guildgate::queue::dlq as d;
    let broker = guildgate::amqp::Broker::without_declare(settings, "guildgate-dlq");
    let names = guildgate::amqp::Names::from_settings(settings);
    let resolve = |q: &str| {
        d::resolve(&names, q).ok_or_else(|| {
            format!(
                "'{q}' is not one of guildgate's dead-letter queues: {}",
                names.dead_queues().join(", ")
            )
        })
    };
    let ch = broker.try_channel().await.map_err(|e| e.to_string())?;
    let result = match cmd {
        DlqCommand::List {
            queue: None, json, ..
        } => {
            let depths = d::depths(&ch, &names).await.map_err(|e| e.to_string())?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&depths).expect("serializable")
                );
            } else {
                println!("{:<50} {:>9}", "QUEUE", "MESSAGES");
                for q in depths {
                    println!("{:<50} {:>9}", q.queue, q.messages);
                }
            }
            Ok(())
        }
        DlqCommand::List {
            queue: Some(q),
            limit,
            json,
        } => {
            let q = resolve(&q)?;
            let parked = d::peek(&ch, &q, limit).await.map_err(|e| e.to_string())?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&parked).expect("serializable")
                );
            } else {
                println!("{q}: showing {} message(s)", parked.len());
                for p in parked {
                    println!(
                        "- id={} type={} replays={} reason_code={}\n  reason: {}\n  x-death: {}",
                        p.message_id.as_deref().unwrap_or("-"),
                        p.kind.as_deref().unwrap_or("-"),
                        p.replays,
                        p.reason_code.as_deref().unwrap_or("-"),
                        p.reason.as_deref().unwrap_or("-"),
                        p.x_death.as_deref().unwrap_or("-"),
                    );
                }
            }
            Ok(())
        }
        DlqCommand::Replay {
            queue,
            limit,
            kind,
            id,
            dry_run,
            max_replays,
            json,
        } => {
            let q = resolve(&queue)?;
            let publisher = broker.try_channel().await.map_err(|e| e.to_string())?;
            publisher
                .confirm_select(Default::default())
                .await
                .map_err(|e| e.to_string())?;
            let filter = d::ReplayFilter {
                limit,
                kind,
                message_id: id,
                dry_run,
                max_replays,
            };
            let report = d::replay(&ch, &publisher, &names, &q, &filter)
                .await
                .map_err(|e| e.to_string())?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).expect("serializable")
                );
            } else {
                let verb = if dry_run { "would replay" } else { "replayed" };
                println!("{q}: {verb} {} message(s)", report.replayed.len());
                for id in &report.replayed {
                    println!("  {id}");
                }
                if !report.left_parked_too_often.is_empty() {
                    println!(
                        "left parked, replayed {max_replays} times already: {}",
                        report.left_parked_too_often.join(", ")
                    );
                }
                println!("not matching the filter: {}", report.skipped_filter);
            }
            Ok(())
        }
        DlqCommand::Purge { queue, yes } => {
            let q = resolve(&queue)?;
            if !yes {
                return Err(format!("refusing to purge {q} without --yes"));
            }
            let n = d::purge(&ch, &q).await.map_err(|e| e.to_string())?;
            println!("{q}: purged {n} message(s)");
            Ok(())
        }
    };
    broker.close().await;
    result
}

async fn keys(settings: &Settings, cmd: KeysCommand) -> Result<(), String> {
    match cmd {
        KeysCommand::RotateTokens { batch_size, json } => {
            let cipher = settings.token_cipher()?;
            let pool = guildgate::store::pool(&settings.database).map_err(|e| e.to_string())?;
            let report = guildgate::sync::keys::rotate_tokens(&pool, &cipher, batch_size)
                .await
                .map_err(|e| e.to_string())?;
            pool.close().await;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).expect("serializable")
                );
            } else {
                println!(
                    "re-encrypted {} link(s) and {} Discord application(s) with key {}; {} changed meanwhile; {} unreadable; {} link(s) and {} application(s) not on the current key",
                    report.reencrypted,
                    report.applications_reencrypted,
                    cipher.key_id(),
                    report.changed_meanwhile,
                    report.unreadable + report.applications_unreadable,
                    report.remaining,
                    report.applications_remaining
                );
            }
            let mut unreadable = Vec::new();
            if report.unreadable > 0 {
                unreadable.push(format!(
                    "{} link(s) could not be decrypted with any configured key; their customers must authorize again",
                    report.unreadable
                ));
            }
            if report.applications_unreadable > 0 {
                unreadable.push(format!(
                    "{} Discord application(s) could not be decrypted with any configured key; their businesses must register them again",
                    report.applications_unreadable
                ));
            }
            if unreadable.is_empty() {
                Ok(())
            } else {
                Err(unreadable.join("; "))
            }
        }
    }
}

async fn reconcile(
    settings: &Settings,
    business: Option<String>,
    guild: Option<String>,
    apply: bool,
    policy: Option<String>,
    json: bool,
) -> Result<(), String> {
    use guildgate::reconcile::{DriftPolicy, Reconciler, Scope};
    let policy = match policy.as_deref() {
        Some(p) => DriftPolicy::parse(p).ok_or_else(|| format!("--policy: unknown '{p}'"))?,
        None => settings.reconcile.policy,
    };
    if let Some(g) = &guild
        && guildgate::domain::Snowflake::parse(g).is_none()
    {
        return Err(format!("--guild: '{g}' is not a Discord id"));
    }
    let pool = guildgate::store::pool(&settings.database).map_err(|e| e.to_string())?;
    let reconciler = Reconciler::standalone(settings, pool.clone())
        .await
        .map_err(|e| format!("database: {e}"))?;
    let scope = Scope {
        business_id: business,
        guild_id: guild,
    };
    let report = reconciler
        .reconcile(&scope, apply, policy)
        .await
        .map_err(|e| e.to_string())?;
    pool.close().await;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("serializable")
        );
    } else {
        print!("{}", report.table());
    }
    Ok(())
}

async fn serve(settings: Settings, no_migrate: bool, no_declare: bool) -> Result<(), String> {
    let options = Options {
        migrate: !no_migrate,
        declare: !no_declare,
        ..Options::default()
    };
    guildgate::app::serve(settings, options).await
}

async fn guilds(settings: &Settings, cmd: GuildsCommand) -> Result<(), String> {
    use guildgate::store::guilds as db;
    if let GuildsCommand::Release {
        guild_id,
        business,
        yes: false,
    } = &cmd
    {
        return Err(format!(
            "refusing to take Discord server {guild_id} from {business} without --yes"
        ));
    }
    let pool = guildgate::store::pool(&settings.database).map_err(|e| e.to_string())?;
    let mut conn = pool.acquire().await.map_err(|e| e.to_string())?;
    match cmd {
        GuildsCommand::Show { guild_id, json } => {
            let rows = db::holders(&mut conn, &guild_id)
                .await
                .map_err(|e| e.to_string())?;
            let state = |r: &db::GuildRow| {
                if r.needs_reinstall {
                    "claimed (needs reinstall)"
                } else {
                    "holds"
                }
            };
            if json {
                let rows: Vec<serde_json::Value> = rows
                    .iter()
                    .map(|r| {
                        serde_json::json!({
                            "business_id": r.business_id,
                            "state": if r.needs_reinstall { "needs_reinstall" } else { "connected" },
                            "name": r.name,
                            "installed_by": r.installed_by,
                            "installed_at": r.installed_at,
                        })
                    })
                    .collect();
                println!(
                    "{}",
                    serde_json::to_string_pretty(&rows).expect("serializable")
                );
            } else if rows.is_empty() {
                println!("no business holds or claims Discord server {guild_id}");
            } else {
                for r in &rows {
                    println!(
                        "{}\t{}\t{}\tinstalled by {} at {}",
                        r.business_id,
                        state(r),
                        r.name.as_deref().unwrap_or("(no name)"),
                        r.installed_by.as_deref().unwrap_or("(unknown)"),
                        r.installed_at.to_rfc3339(),
                    );
                }
            }
            Ok(())
        }
        GuildsCommand::Release {
            guild_id, business, ..
        } => {
            if db::release(&mut conn, &business, &guild_id)
                .await
                .map_err(|e| e.to_string())?
            {
                tracing::info!(business_id = %business, guild_id = %guild_id, "an operator took a Discord server from a business");
                println!(
                    "took Discord server {guild_id} from {business}; another business may connect it now (until one does, {business}'s entitlements naming it keep working there)"
                );
                Ok(())
            } else {
                Err(format!(
                    "{business} neither holds nor claims Discord server {guild_id}"
                ))
            }
        }
    }
}

async fn grants(settings: &Settings, cmd: GrantsCommand) -> Result<(), String> {
    let pool = guildgate::store::pool(&settings.database).map_err(|e| e.to_string())?;
    match cmd {
        GrantsCommand::Resend { grant_id } => {
            let mut tx = pool.begin().await.map_err(|e| e.to_string())?;
            let grant = guildgate::store::grants::get(&mut tx, &grant_id)
                .await
                .map_err(|e| e.to_string())?
                .ok_or_else(|| format!("no grant {grant_id}"))?;
            let job = guildgate::email::resend::queue(
                &mut tx,
                &grant,
                settings.email.enabled(),
                guildgate::email::resend::AskedBy::Operator,
            )
            .await
            .map_err(|e| e.to_string())?
            .map_err(|r| format!("not resent: {r}"))?;
            tx.commit().await.map_err(|e| e.to_string())?;
            eprintln!("Queued email {} for grant {grant_id}.", job.email_id);
            println!("{}", job.email_id);
            Ok(())
        }
    }
}

async fn api_key(settings: &Settings, cmd: ApiKeyCommand) -> Result<(), String> {
    use secrecy::ExposeSecret;
    guildgate::store::ensure_database(&settings.database)
        .await
        .map_err(|e| e.to_string())?;
    let pool = guildgate::store::pool(&settings.database).map_err(|e| e.to_string())?;
    guildgate::store::migrate(&pool)
        .await
        .map_err(|e| e.to_string())?;
    let mut conn = pool.acquire().await.map_err(|e| e.to_string())?;
    match cmd {
        ApiKeyCommand::Create { business_id, name } => {
            let business = guildgate::domain::ids::BusinessId::parse(business_id)
                .map_err(|e| format!("--business-id: {e}"))?;
            let (id, key) =
                guildgate::web::api::auth::create_api_key(&mut conn, &business, name.as_deref())
                    .await
                    .map_err(|e| e.to_string())?;
            // The key alone on stdout, so `KEY=$(guildgate api-key create …)` works;
            // the explanation on stderr.
            eprintln!(
                "Created API key {id} for business {business}. Store it now: it is not shown again."
            );
            println!("{}", key.expose_secret());
            Ok(())
        }
        ApiKeyCommand::Revoke { key_id } => {
            if guildgate::web::api::auth::revoke_api_key(&mut conn, &key_id)
                .await
                .map_err(|e| e.to_string())?
            {
                eprintln!("Revoked API key {key_id}.");
                Ok(())
            } else {
                Err(format!("no API key {key_id}"))
            }
        }
    }
}
