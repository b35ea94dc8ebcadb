//! One sync job: read what the grant should be now, make Discord match it, record what
//! was applied. Level-triggered: a job names a grant, not a command, so duplicate, late
//! or replayed jobs are harmless. The queue worker runs jobs concurrently (the rate
//! limiter orders the calls), but never two of the same customer at once (their
//! grants share a linked account, whose refresh token rotates), nor two that touch the
//! same Discord account in the same server (grants of several customers, even of several
//! businesses, can hold the same role of one account, and each decides whether the
//! others still need it).

use std::collections::HashMap;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use lapin::Channel;
use secrecy::SecretString;
use sqlx::PgPool;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::lanes::{self, Lane, Lanes};
use crate::amqp::{self, Broker, Names};
use crate::crypto::TokenCipher;
use crate::discord::bots::BotError;
use crate::discord::client::{AddMember, MemberChange};
use crate::discord::validate::explain_missing_permissions;
use crate::discord::{Bots, DiscordClient, DiscordError, HumanCode};
use crate::domain::Snowflake;
use crate::domain::plan::{self, Access, Call, MemberState};
use crate::domain::retry;
use crate::domain::{Grant, GrantEventType, GrantStatus};
use crate::grants::link::LinkBuilder;
use crate::metrics::Metrics;
use crate::outbox::emit;
use crate::queue::{self, Outcome};
use crate::store::history;
use crate::store::links::LinkRow;
use crate::store::stops;
use crate::store::sync_parking as parking;
use crate::store::{self, entitlements, grants as grant_store};
use crate::store::{holdings, links};

/// Jobs of one bot handled at once ([`lanes::PER_BOT`]). They mostly wait on the rate
/// limiter; enough of them keep every bucket and the global limit busy.
pub const CONCURRENCY: u16 = lanes::PER_BOT as u16;
/// The channel prefetch: twice a lane, so one bot's full lane leaves room for the
/// deliveries of the others (and for the parking of its own).
pub const PREFETCH: u16 = 2 * CONCURRENCY;

/// A user token this close to expiry is refreshed before it is used.
const REFRESH_MARGIN: chrono::Duration = chrono::Duration::minutes(5);

/// The syncer. Cheap to clone.
#[derive(Clone)]
pub struct SyncWorker {
    pub pool: PgPool,
    pub broker: Broker,
    /// The bots; jobs use the syncer's client of their business's bot.
    pub bots: Bots,
    pub cipher: TokenCipher,
    pub links: LinkBuilder,
    pub retry_delays: Vec<Duration>,
    pub metrics: Arc<Metrics>,
    /// Where tests make a job fail after its Discord calls and before they are
    /// recorded, as when the database goes away (or the process dies) right then.
    faults: crate::faults::SharedFaults,
    locks: KeyedLocks,
    /// A lane per bot (see [`lanes`]).
    lanes: Lanes,
    /// The drainers of parked jobs and the jobs they run.
    drainers: TaskTracker,
}

/// Everything one job reads before calling Discord.
struct Job {
    /// The syncer's client of the business's bot.
    discord: DiscordClient,
    grant: Grant,
    guild: Option<Snowflake>,
    role: Option<Snowflake>,
    link: Option<LinkRow>,
    /// What the grant applied, and what it recorded it is about to apply.
    held: Vec<Access>,
    /// What other live grants (of any customer or business) hold of the same accounts.
    others: Vec<Access>,
    /// Accesses of the same accounts guildgate found already there.
    found: Vec<Access>,
    /// Accesses of the same accounts held before a call whose answer is not on record
    /// yet (this run's, or one a crash interrupted), with when they were about to be
    /// given: the next answer about them settles whether guildgate added them.
    unsettled: Vec<(Access, DateTime<Utc>)>,
    /// Another business holds the entitlement's server now (the grant's business
    /// disconnected it, and another connected it). Read under the job's customer and
    /// account locks, just before the calls: a server connected to another business
    /// in between (milliseconds) is seen by the grant's next job.
    guild_held_by_another: bool,
}

/// Discord's answer, as the history shows it, when a member (or their role) turns out
/// to be there because a run that died before recording it had added them.
const ADDED_BEFORE_A_CRASH: &str = "204 No Content: added by an earlier attempt whose answer was not recorded (joined after guildgate was about to add them)";

/// Why a sync did not finish.
enum SyncFailure {
    /// Discord refused or could not be asked.
    Discord(DiscordError),
    /// Discord's answer could not be recorded before the next call.
    Database(sqlx::Error),
}

impl From<DiscordError> for SyncFailure {
    fn from(e: DiscordError) -> Self {
        Self::Discord(e)
    }
}

/// What a sync run did so far: the accesses Discord added for it, and what was done
/// with Discord's answer, for the grant's history.
#[derive(Default)]
struct Run {
    added: Vec<Access>,
    changes: Vec<(&'static str, Access, &'static str)>,
}

/// After one call: the plan goes on, or is made again from the member Discord showed.
enum Next {
    Go,
    Replan(MemberState),
}

/// What a successful sync did.
struct Synced {
    plan: plan::Plan,
    /// Accesses Discord added for this run (so guildgate's own from now on).
    added: Vec<Access>,
    /// What was done in Discord, with Discord's answer, for the grant's history.
    changes: Vec<(&'static str, Access, &'static str)>,
}

impl SyncWorker {
    pub fn new(
        pool: PgPool,
        broker: Broker,
        bots: Bots,
        cipher: TokenCipher,
        links: LinkBuilder,
        retry_delays: Vec<Duration>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            pool,
            broker,
            bots,
            cipher,
            links,
            retry_delays,
            metrics,
            faults: crate::faults::none(),
            locks: KeyedLocks::default(),
            lanes: Lanes::default(),
            drainers: TaskTracker::new(),
        }
    }

    /// The same syncer, failing where `faults` says (tests).
    pub fn with_faults(mut self, faults: crate::faults::SharedFaults) -> Self {
        self.faults = faults;
        self
    }

    /// Handles one job: `attempt` is how many retries it had. A database error is
    /// returned as such; the loop holds the job and tries again.
    #[tracing::instrument(name = "discord_sync", skip_all, fields(grant_id = %grant_id, attempt))]
    pub async fn handle(&self, grant_id: &str, attempt: u32) -> Result<Outcome, sqlx::Error> {
        let (customer, business) = {
            let mut conn = self.pool.acquire().await?;
            match grant_store::get(&mut conn, grant_id).await? {
                Some(g) => (
                    format!("{}/{}", g.business_id, g.customer_id),
                    g.business_id,
                ),
                None => return Ok(Outcome::Ack("unknown_grant")),
            }
        };
        let discord = match self.bots.of_business(&business).await {
            Ok(bot) => bot.syncer,
            Err(BotError::Db(e)) => return Err(e),
            Err(e @ BotError::Sealed) => {
                tracing::error!(business_id = %business, error = %e, "cannot use the business's bot");
                let reason = e.to_string();
                return Ok(
                    match retry::next(attempt, Duration::ZERO, &self.retry_delays) {
                        Some(r) => Outcome::Retry {
                            attempt: r.tiers_used(),
                            delay: r.delay,
                            reason,
                        },
                        None => Outcome::DeadLetter {
                            code: "discord_application_unreadable",
                            reason,
                        },
                    },
                );
            }
        };
        let _turn = self.locks.lock(&customer).await;
        // Read again under the customer's lock: the job before may have changed it.
        let Some(job) = self.load(grant_id, false, &discord).await? else {
            return Ok(Outcome::Ack("unknown_grant"));
        };
        // Then the Discord accounts it touches, in a fixed order (no two jobs wait on
        // each other), and read once more: a job of another customer holding the same
        // account may have just changed what the others hold.
        let mut accounts: Vec<String> = Self::accounts(&job)
            .into_iter()
            .map(|(g, u)| format!("{g}/{u}"))
            .collect();
        accounts.sort();
        accounts.dedup();
        let mut _accounts = Vec::with_capacity(accounts.len());
        for a in &accounts {
            _accounts.push(self.locks.lock(&format!("account:{a}")).await);
        }
        let Some(mut job) = self.load(grant_id, true, &discord).await? else {
            return Ok(Outcome::Ack("unknown_grant"));
        };
        let outcome = match self.stop_covering(&job).await? {
            Some(stop) => self.wait_for_resume(&job, &stop, attempt).await?,
            None => {
                if let Some(guild) = job.guild {
                    job.discord
                        .forget_stop(guild, job.role, crate::discord::stops::SETTLED);
                }
                self.record_intent(&mut job).await?;
                if self.faults.fails(crate::faults::Point::BeforeDiscord) {
                    return Err(sqlx::Error::Protocol(
                        "injected failure before the Discord calls".into(),
                    ));
                }
                let synced = self.sync(&job).await;
                if self.faults.fails(crate::faults::Point::AfterDiscord) {
                    return Err(sqlx::Error::Protocol(
                        "injected failure after the Discord calls".into(),
                    ));
                }
                match synced {
                    Ok(s) => self.record_success(&job, s).await?,
                    Err(SyncFailure::Discord(e)) => {
                        self.record_failure_or_stop(&job, e, attempt).await?
                    }
                    Err(SyncFailure::Database(e)) => return Err(e),
                }
            }
        };
        let label = match &outcome {
            Outcome::Ack(l) => *l,
            Outcome::Retry { .. } => "retry",
            Outcome::DeadLetter { .. } | Outcome::DeadLetterParts(_) => "dead_lettered",
            Outcome::Defer => "deferred",
        };
        tracing::debug!(outcome = label, "sync job handled");
        self.metrics
            .syncs
            .get_or_create(&vec![("outcome", label.to_string())])
            .inc();
        Ok(outcome)
    }

    /// The server a job's calls go to: the entitlement's, or for a grant whose
    /// entitlement lost its server, the one it applied access in.
    fn guild_of(job: &Job) -> Option<String> {
        job.guild
            .map(|g| g.to_string())
            .or_else(|| job.grant.applied_guild_id.clone())
    }

    /// The stop covering the job's server or entitlement, if one is recorded.
    async fn stop_covering(&self, job: &Job) -> Result<Option<stops::Stop>, sqlx::Error> {
        let Some(guild) = Self::guild_of(job) else {
            return Ok(None);
        };
        let mut conn = self.pool.acquire().await?;
        stops::covering(&mut conn, &guild, &job.grant.entitlement_id).await
    }

    /// A job under a stop: not sent to Discord. The grant is recorded as waiting (the
    /// resume queues it again); one not yet delivered becomes `Failed` with the stop's
    /// code, as if Discord had refused it, and one delivered stays delivered (the
    /// entitlement's `health` tells the merchant).
    async fn wait_for_resume(
        &self,
        job: &Job,
        stop: &stops::Stop,
        attempt: u32,
    ) -> Result<Outcome, sqlx::Error> {
        let g = &job.grant;
        {
            let now = Utc::now();
            let mut tx = self.pool.begin().await?;
            let waiting =
                stops::wait(&mut tx, &g.id, &stop.guild_id, &g.entitlement_id, now).await?;
            if waiting == stops::Waiting::Lifted {
                // Resumed since the stop was read: the job runs again, as the same attempt.
                tx.rollback().await?;
                return Ok(Outcome::Retry {
                    attempt,
                    delay: Duration::ZERO,
                    reason: "the stop holding it back was lifted".into(),
                });
            }
            if waiting == stops::Waiting::Started {
                history::record(
                    &mut tx,
                    &g.id,
                    now,
                    "waiting",
                    serde_json::json!({ "code": stop.code, "guild_id": stop.guild_id }),
                )
                .await?;
            }
            tx.commit().await?;
        }
        self.fail(g, &stop.code, &stop.message).await?;
        Ok(Outcome::Ack("stopped"))
    }

    /// A failed sync. Discord saying the bot has no access to the server, or may not do
    /// what the entitlement needs there, stops further calls for it (see
    /// [`stops`]); every other failure is the job's own.
    async fn record_failure_or_stop(
        &self,
        job: &Job,
        e: DiscordError,
        attempt: u32,
    ) -> Result<Outcome, sqlx::Error> {
        let Some(guild) = Self::guild_of(job) else {
            return self.record_failure(job, e, attempt).await;
        };
        let scope = match e.human_code() {
            Some(HumanCode::UnknownGuild) => stops::Scope::Server,
            Some(HumanCode::MissingPermissions | HumanCode::RoleHierarchy) => {
                stops::Scope::Entitlement(&job.grant.entitlement_id)
            }
            _ if matches!(e, DiscordError::Stopped { .. }) => {
                // Held back by the client's memory of a stop just seen: the job that
                // saw it records the stop (within moments), and this one waits with
                // the others. No stop recorded even after that: a resume removed it,
                // so forget the memory and go again, as the same attempt.
                if let Some(stop) = self.stop_covering(job).await? {
                    return self.wait_for_resume(job, &stop, attempt).await;
                }
                tokio::time::sleep(crate::discord::stops::SETTLED).await;
                if let Some(stop) = self.stop_covering(job).await? {
                    return self.wait_for_resume(job, &stop, attempt).await;
                }
                if let Some(g) = job.guild {
                    job.discord.forget_stop(g, job.role, Duration::ZERO);
                }
                return Ok(Outcome::Retry {
                    attempt,
                    delay: Duration::ZERO,
                    reason: "the stop holding it back was lifted".into(),
                });
            }
            _ => return self.record_failure(job, e, attempt).await,
        };
        let code = e.human_code().expect("matched above").as_str();
        let message = e.to_string();
        let now = Utc::now();
        let mut conn = self.pool.acquire().await?;
        // The whole server stops only for the business connected to it: a grant of one
        // that is not (it had the server once, its bot is not there) stops its own
        // entitlement, never the server's owner.
        let scope = match scope {
            stops::Scope::Server
                if crate::store::guilds::get(&mut conn, &job.grant.business_id, &guild)
                    .await?
                    .is_none() =>
            {
                stops::Scope::Entitlement(&job.grant.entitlement_id)
            }
            scope => scope,
        };
        let recorded = stops::record(&mut conn, &guild, scope, code, &message, now).await?;
        drop(conn);
        if recorded {
            tracing::warn!(guild_id = %guild, entitlement_id = %job.grant.entitlement_id, scope = scope.label(), code, %message, "Discord refused the bot; calls stopped until the entitlement is saved again");
            self.metrics
                .discord_stops
                .get_or_create(&vec![
                    ("scope", scope.label().to_string()),
                    ("code", code.to_string()),
                ])
                .inc();
        }
        let stop = stops::Stop {
            guild_id: guild,
            entitlement_id: scope.entitlement().map(str::to_string),
            code: code.to_string(),
            message,
            since: now,
        };
        self.wait_for_resume(job, &stop, attempt).await
    }

    /// The `(guild, Discord user)` accounts a job touches: those it holds, and the one
    /// it is to deliver to.
    fn accounts(job: &Job) -> Vec<(Snowflake, Snowflake)> {
        accounts_of(&job.held, job.guild, job.link.as_ref())
    }

    /// Before any call that gives something, records what the grant is about to apply
    /// (as the grant's applied access on a first delivery, as its intent beside what it
    /// holds on an account switch or a role change) and holds the accesses as added.
    /// Should the Discord calls succeed and their record fail (a crash, the database
    /// gone), whatever runs next still knows what to take away. Recording more than was
    /// applied is harmless: removing a role a member lacks, or a member who is not
    /// there, changes nothing.
    async fn record_intent(&self, job: &mut Job) -> Result<(), sqlx::Error> {
        let g = &job.grant;
        // Refused before any call ([`Self::sync`]): nothing is about to be applied, and
        // a claim recorded anyway would hold the access against the server's owner.
        if !g.status.is_live() || job.guild_held_by_another {
            return Ok(());
        }
        let user = job
            .link
            .as_ref()
            .and_then(|l| Snowflake::parse(&l.discord_user_id));
        let (Some(user), Some(guild)) = (user, job.guild) else {
            return Ok(());
        };
        let want = Access {
            user,
            guild,
            role: job.role,
        };
        // Held already: recorded, with its holdings, when it was first given.
        if job.held.contains(&want) {
            return Ok(());
        }
        let mut keys = vec![access_key(&Access { role: None, ..want })];
        if want.role.is_some() {
            keys.push(access_key(&want));
        }
        let now = Utc::now();
        let mut tx = self.pool.begin().await?;
        if job.held.is_empty() {
            let (g_id, u, r) = access_key(&want);
            grant_store::set_applied(&mut tx, &g.id, Some((u, g_id, r)), now).await?;
        } else {
            grant_store::set_intent(&mut tx, &g.id, &access_key(&want), now).await?;
        }
        job.held.push(want);
        let created = holdings::hold(&mut tx, &keys, now).await?;
        tx.commit().await?;
        job.unsettled
            .extend(created.into_iter().filter_map(access_of).map(|a| (a, now)));
        Ok(())
    }

    /// Reads what a job needs. `holders`: also what other grants hold of the same
    /// accounts and what was found there, and whether another business holds the
    /// server; without it, enough to know the accounts.
    async fn load(
        &self,
        grant_id: &str,
        holders: bool,
        discord: &DiscordClient,
    ) -> Result<Option<Job>, sqlx::Error> {
        let mut conn = self.pool.acquire().await?;
        let Some(grant) = grant_store::get(&mut conn, grant_id).await? else {
            return Ok(None);
        };
        let ent = entitlements::entitlement(&mut conn, &grant.entitlement_id).await?;
        let (guild, role) = match &ent {
            Some(e) => (
                Snowflake::parse(&e.guild_id),
                e.role_id.as_deref().and_then(Snowflake::parse),
            ),
            None => (None, None),
        };
        // Only the load a sync runs on (with `holders`) needs it; the first one, for the
        // accounts to lock, does not.
        let guild_held_by_another = match guild {
            Some(g) if holders => {
                crate::store::guilds::held_by_another(&mut conn, &grant.business_id, &g.to_string())
                    .await?
            }
            _ => false,
        };
        let link = links::link_of(&mut conn, &grant.business_id, &grant.customer_id).await?;
        let held = held_by(&grant);
        let (mut others, mut found, mut unsettled) = (Vec::new(), Vec::new(), Vec::new());
        if holders {
            let accounts: Vec<(String, String)> = accounts_of(&held, guild, link.as_ref())
                .into_iter()
                .map(|(g, u)| (g.to_string(), u.to_string()))
                .collect();
            for h in holdings::other_holders(&mut conn, &accounts, &grant.id).await? {
                // Only what another grant applied (or recorded it is applying) keeps an
                // access. Not what it is yet to deliver: it may be revoked before its
                // delivery runs, and then nothing would ever take the access away. Its
                // own delivery gives the access back, after a moment without it.
                others.extend(held_by(&h));
            }
            found = holdings::found_accesses(&mut conn, &accounts)
                .await?
                .into_iter()
                .filter_map(access_of)
                .collect();
            unsettled = holdings::unsettled_accesses(&mut conn, &accounts)
                .await?
                .into_iter()
                .filter_map(|(key, since)| Some((access_of(key)?, since)))
                .collect();
        }
        Ok(Some(Job {
            discord: discord.clone(),
            grant,
            guild,
            role,
            link,
            held,
            others,
            found,
            unsettled,
            guild_held_by_another,
        }))
    }

    /// Makes Discord match the grant. Replans when an answer shows the member differs
    /// from what was assumed; every call is idempotent.
    async fn sync(&self, job: &Job) -> Result<Synced, SyncFailure> {
        let g = &job.grant;
        let live = g.status.is_live();
        let Some(guild) = job.guild else {
            if live {
                return Err(DiscordError::human(
                    HumanCode::UnknownGuild,
                    "The entitlement's Discord server id is not valid. Fix the entitlement's guild_id.",
                )
                .into());
            }
            // A revoked grant whose entitlement is broken: undo what it applied, if
            // anything, using the recorded guild.
            return Ok(self.undo_only(job).await?);
        };
        // A server belongs to one business at a time: once another holds it, a grant of
        // the one that left gives nothing there (what it gave is still taken away when
        // it ends).
        if live && job.guild_held_by_another {
            return Err(DiscordError::human(
                HumanCode::GuildHeldByAnother,
                format!(
                    "Discord server {guild} is connected to another guildgate account now, so this grant gives nothing there. Revoke the grant, or give the customer an entitlement in a server this account holds."
                ),
            )
            .into());
        }
        let linked_user = job
            .link
            .as_ref()
            .and_then(|l| Snowflake::parse(&l.discord_user_id));
        let desired = linked_user.map(|user| Access {
            user,
            guild,
            role: job.role,
        });
        // A delivered grant is checked against Discord (level-triggered); a first
        // delivery just tries to add, which also says whether they were in.
        let mut member = MemberState::Unknown;
        if live
            && g.status == GrantStatus::Delivered
            && let Some(d) = desired
            && job.held == [d]
        {
            member = match job.discord.member(d.guild, d.user).await? {
                None => MemberState::Absent,
                Some(m) => MemberState::Present { roles: m.roles },
            };
        }
        // What this run may take away but whose Discord answer was never recorded (a run
        // died after recording its intent): settled from the member first, so nothing
        // that was there before is taken away.
        let mut found = job.found.clone();
        let kept = if live { desired } else { None };
        found.extend(self.settle_before_release(job, kept).await?);
        let reasons = Reasons::of(job, desired);
        let mut token: Option<SecretString> = None;
        let mut run = Run::default();
        for _ in 0..4 {
            let p = plan::plan(&plan::Input {
                live,
                guild,
                role: job.role,
                linked_user,
                held: &job.held,
                member: member.clone(),
                others: &job.others,
                found: &found,
            });
            let mut replanned = None;
            for call in &p.calls {
                if let Next::Replan(m) = self
                    .make_call(job, *call, &reasons, &mut token, &mut run)
                    .await?
                {
                    replanned = Some(m);
                    break;
                }
            }
            match replanned {
                None => {
                    return Ok(Synced {
                        plan: p,
                        added: run.added,
                        changes: run.changes,
                    });
                }
                Some(m) => member = m,
            }
        }
        Err(DiscordError::Retriable(
            "the member changed under every attempt; trying again later".into(),
        )
        .into())
    }

    /// Makes one planned call and records what it did in `run`; says whether the plan
    /// goes on or must be made again from the member Discord showed.
    async fn make_call(
        &self,
        job: &Job,
        call: Call,
        reasons: &Reasons,
        token: &mut Option<SecretString>,
        run: &mut Run,
    ) -> Result<Next, SyncFailure> {
        match call {
            Call::AddMember { guild, user, role } => {
                if token.is_none() {
                    *token = Some(self.user_token(job).await?);
                }
                let t = token.as_ref().expect("set above");
                let roles: Vec<Snowflake> = role.into_iter().collect();
                match job
                    .discord
                    .add_member(guild, user, t, &roles, &reasons.add)
                    .await
                {
                    Ok(AddMember::Added) => {
                        run.added.push(Access {
                            role: None,
                            user,
                            guild,
                        });
                        if role.is_some() {
                            run.added.push(Access { role, user, guild });
                        }
                        Ok(Next::Go)
                    }
                    Ok(AddMember::AlreadyMember) => Ok(Next::Replan(
                        self.already_member(job, guild, user, role, run).await?,
                    )),
                    Err(e) => Err(self.explain(job, e, guild, role).await.into()),
                }
            }
            Call::AddRole { guild, user, role } => {
                match job.discord.add_role(guild, user, role, &reasons.add).await {
                    Ok(MemberChange::Done) => {
                        let a = Access {
                            role: Some(role),
                            user,
                            guild,
                        };
                        run.changes.push(("role_added", a, "204 No Content"));
                        run.added.push(a);
                        Ok(Next::Go)
                    }
                    Ok(MemberChange::NotMember) => Ok(Next::Replan(MemberState::Absent)),
                    Err(e) => Err(self.explain(job, e, guild, Some(role)).await.into()),
                }
            }
            Call::RemoveRole { guild, user, role } => {
                match job
                    .discord
                    .remove_role(guild, user, role, &reasons.remove)
                    .await
                {
                    Ok(c) => {
                        let a = Access {
                            role: Some(role),
                            user,
                            guild,
                        };
                        run.changes.push(("role_removed", a, answer(c)));
                        Ok(Next::Go)
                    }
                    Err(e) => Err(self.explain(job, e, guild, Some(role)).await.into()),
                }
            }
            Call::RemoveMember { guild, user } => {
                match job
                    .discord
                    .remove_member(guild, user, &reasons.remove)
                    .await
                {
                    Ok(c) => {
                        let a = Access {
                            role: None,
                            user,
                            guild,
                        };
                        run.changes.push(("member_removed", a, answer(c)));
                        Ok(Next::Go)
                    }
                    Err(e) => Err(self.explain(job, e, guild, None).await.into()),
                }
            }
        }
    }

    /// Discord answered 204 to adding the member: that changes nothing, they were a
    /// member already, and whether they hold the role only their member object says
    /// (adding a role answers 204 either way). Reads it, settles what the job held
    /// unsettled of it, and returns it for the next plan.
    async fn already_member(
        &self,
        job: &Job,
        guild: Snowflake,
        user: Snowflake,
        role: Option<Snowflake>,
        run: &mut Run,
    ) -> Result<MemberState, SyncFailure> {
        let Some(m) = job.discord.member(guild, user).await? else {
            return Ok(MemberState::Absent);
        };
        let seen = self
            .settle_present(job, guild, user, role, &m)
            .await
            .map_err(SyncFailure::Database)?;
        for (a, by_us) in seen {
            let event = match (a.role, by_us) {
                (None, false) => "member_found",
                (None, true) => "member_added",
                (Some(_), false) => "role_found",
                (Some(_), true) => "role_added",
            };
            let answer = match (a.role, by_us) {
                (_, true) => ADDED_BEFORE_A_CRASH,
                (None, false) => "204 No Content: already a member",
                (Some(_), false) => "already held",
            };
            run.changes.push((event, a, answer));
            if by_us {
                run.added.push(a);
            }
        }
        Ok(MemberState::Present { roles: m.roles })
    }

    /// Unsettled accesses this run would let go of (not the one it delivers), settled
    /// from their member's current state before anything is removed; returns those
    /// found already there. Only after a run died between recording its intent and
    /// recording Discord's answer: one member read per account, whatever it holds there.
    async fn settle_before_release(
        &self,
        job: &Job,
        kept: Option<Access>,
    ) -> Result<Vec<Access>, SyncFailure> {
        let unsettled = |a: &Access| job.unsettled.iter().any(|(u, _)| u == a);
        let pending: Vec<Access> = job
            .held
            .iter()
            .filter(|a| Some(**a) != kept && unsettled(a))
            .copied()
            .collect();
        let mut accounts: Vec<(Snowflake, Snowflake)> =
            pending.iter().map(|a| (a.guild, a.user)).collect();
        accounts.sort();
        accounts.dedup();
        let mut found = Vec::new();
        for (guild, user) in accounts {
            let here = pending
                .iter()
                .filter(|a| (a.guild, a.user) == (guild, user));
            match job.discord.member(guild, user).await? {
                // Not in the server: nothing of it is there to take away or keep.
                None => {
                    let keys: Vec<holdings::AccessKey> = here.map(access_key).collect();
                    let mut tx = self.pool.begin().await.map_err(SyncFailure::Database)?;
                    holdings::set_found(&mut tx, &keys, false)
                        .await
                        .map_err(SyncFailure::Database)?;
                    tx.commit().await.map_err(SyncFailure::Database)?;
                }
                Some(m) => {
                    for a in here {
                        let seen = self
                            .settle_present(job, guild, user, a.role, &m)
                            .await
                            .map_err(SyncFailure::Database)?;
                        found.extend(
                            seen.into_iter()
                                .filter(|(x, by_us)| !by_us && unsettled(x))
                                .map(|(x, _)| x),
                        );
                    }
                }
            }
        }
        found.sort_by_key(|a| (a.guild, a.user, a.role));
        found.dedup();
        Ok(found)
    }

    /// The member is in the server (Discord answered 204 to adding them) and `m` is
    /// their member object. Settles, before any further call, whether guildgate added
    /// what the job holds unsettled of it: the membership by when they joined (after
    /// guildgate was about to add them: an earlier attempt's add, whose answer a crash
    /// lost), the role by whether they hold it (held by a member who joined after
    /// guildgate was about to give it: the add that joined them carried it; held
    /// otherwise: found; not held: it is about to be added, so recorded as added before
    /// the call). Returns the membership
    /// and, if held, the role, each with whether guildgate added it.
    async fn settle_present(
        &self,
        job: &Job,
        guild: Snowflake,
        user: Snowflake,
        role: Option<Snowflake>,
        m: &crate::discord::client::Member,
    ) -> Result<Vec<(Access, bool)>, sqlx::Error> {
        let since = |a: &Access| {
            job.unsettled
                .iter()
                .find(|(u, _)| u == a)
                .map(|(_, since)| *since)
        };
        let membership = Access {
            role: None,
            user,
            guild,
        };
        // Discord's clock against this host's: both kept by NTP, and the add always
        // comes at least a commit after `since`. A member without `joined_at` is
        // taken as found: never taken away on a guess.
        let joined_after = |since: DateTime<Utc>| m.joined_at.is_some_and(|joined| joined >= since);
        let member_by_us = since(&membership).is_some_and(joined_after);
        let mut seen = vec![(membership, member_by_us)];
        let (mut found, mut ours) = (Vec::new(), Vec::new());
        if since(&membership).is_some() {
            if member_by_us { &mut ours } else { &mut found }.push(access_key(&membership));
        }
        if let Some(r) = role {
            let a = Access {
                role: Some(r),
                user,
                guild,
            };
            let held = m.roles.contains(&r);
            // Held by a member who joined after guildgate was about to give the role:
            // the add that joined them carried it. Held by one who was there before:
            // found, since guildgate records a role as its own before adding it alone.
            let role_by_us = held && since(&a).is_some_and(joined_after);
            if held {
                seen.push((a, role_by_us));
            }
            if since(&a).is_some() {
                if held && !role_by_us {
                    &mut found
                } else {
                    &mut ours
                }
                .push(access_key(&a));
            }
        }
        if !found.is_empty() || !ours.is_empty() {
            let mut tx = self.pool.begin().await?;
            holdings::set_found(&mut tx, &found, true).await?;
            holdings::set_found(&mut tx, &ours, false).await?;
            tx.commit().await?;
        }
        Ok(seen)
    }

    async fn undo_only(&self, job: &Job) -> Result<Synced, DiscordError> {
        let reasons = Reasons::of(job, None);
        let p = plan::plan(&plan::Input {
            live: false,
            guild: job.held.first().map_or(Snowflake::new(0), |a| a.guild),
            role: None,
            linked_user: None,
            held: &job.held,
            member: MemberState::Unknown,
            others: &job.others,
            found: &job.found,
        });
        for call in &p.calls {
            match *call {
                Call::RemoveRole { guild, user, role } => {
                    job.discord
                        .remove_role(guild, user, role, &reasons.remove)
                        .await?;
                }
                Call::RemoveMember { guild, user } => {
                    job.discord
                        .remove_member(guild, user, &reasons.remove)
                        .await?;
                }
                _ => {}
            }
        }
        Ok(Synced {
            plan: p,
            added: Vec::new(),
            changes: Vec::new(),
        })
    }

    /// "Missing Permissions" covers both a missing permission and the role hierarchy;
    /// ask Discord which, so the merchant reads what to fix.
    async fn explain(
        &self,
        job: &Job,
        e: DiscordError,
        guild: Snowflake,
        role: Option<Snowflake>,
    ) -> DiscordError {
        match e.human_code() {
            Some(HumanCode::MissingPermissions) => {
                explain_missing_permissions(&job.discord, guild, role, e).await
            }
            _ => e,
        }
    }

    /// The customer's access token, refreshed first if it is about to expire (the new
    /// tokens are stored at once: the old refresh token no longer works).
    async fn user_token(&self, job: &Job) -> Result<SecretString, DiscordError> {
        let Some(link) = &job.link else {
            return Err(DiscordError::BadUserToken);
        };
        // Discord lets a bot add only users who authorized its own application: tokens
        // issued to another one (the business changed bots since) need a new
        // authorization, and asking Discord would only earn a 403.
        let issuer = link
            .client_id
            .as_deref()
            .unwrap_or(self.bots.shared().client_id());
        if issuer != job.discord.client_id() {
            return Err(DiscordError::BadUserToken);
        }
        if link.expires_at > Utc::now() + REFRESH_MARGIN {
            return link
                .access_token(&self.cipher)
                .map_err(|_| DiscordError::BadUserToken);
        }
        let refresh = link
            .refresh_token(&self.cipher)
            .and_then(Result::ok)
            .ok_or(DiscordError::BadUserToken)?;
        let tokens = job.discord.refresh(&refresh).await?;
        let now = Utc::now();
        let sealed = links::SealedTokens::seal(
            &self.cipher,
            &link.business_id,
            &link.customer_id,
            &tokens.access_token,
            tokens.refresh_token.as_ref(),
        );
        let expires_at = now + chrono::Duration::from_std(tokens.expires_in).unwrap_or_default();
        let stored = async {
            let mut conn = self.pool.acquire().await?;
            links::store_refreshed(&mut conn, link, &sealed, expires_at, &tokens.scope, now).await
        }
        .await;
        match stored {
            Ok(true) => {}
            Ok(false) => {
                // The customer linked again while this refresh ran: their new link
                // stands, and its own sync jobs (queued by the callback) use it. These
                // tokens belong to the account they left.
                tracing::info!(
                    "the customer linked again during a token refresh; keeping the newer link"
                );
                // Nobody will use these tokens of the account they left: revoke them
                // (best effort: a failure is logged, and the tokens are kept nowhere).
                if let Err(e) = revoke_tokens(
                    &job.discord,
                    Some(&tokens.access_token),
                    tokens.refresh_token.as_ref(),
                )
                .await
                {
                    tracing::warn!(error = %e, "cannot revoke the tokens of a superseded refresh; dropping them");
                }
                return Err(DiscordError::Retriable(
                    "the customer linked again meanwhile".into(),
                ));
            }
            Err(e) => {
                // The refresh token rotated; without storing it the customer must
                // authorize again. Retry the job: the access token stays valid for now.
                tracing::error!(error = %e, "cannot store refreshed Discord tokens");
                return Err(DiscordError::Retriable(
                    "cannot store refreshed tokens".into(),
                ));
            }
        }
        Ok(tokens.access_token)
    }

    async fn record_success(&self, job: &Job, s: Synced) -> Result<Outcome, sqlx::Error> {
        let now = Utc::now();
        let mut tx = self.pool.begin().await?;
        let Some(grant) = grant_store::get_for_update(&mut tx, &job.grant.id).await? else {
            return Ok(Outcome::Ack("unknown_grant"));
        };
        let applied = s.plan.applied_after.map(|a| {
            (
                a.user.to_string(),
                a.guild.to_string(),
                a.role.map(|r| r.to_string()),
            )
        });
        grant_store::set_applied(&mut tx, &grant.id, applied, now).await?;
        // What was there before it was given was settled as found when Discord said so.
        // Added by Discord for this run: guildgate's to take away, whatever was
        // recorded before (a found role a moderator removed since, given back now).
        let added: Vec<holdings::AccessKey> = s.added.iter().map(access_key).collect();
        holdings::set_found(&mut tx, &added, false).await?;
        // Let go of by their last holder: removed at Discord (or left there, if found).
        for (a, kept) in &s.plan.released {
            if !kept {
                holdings::forget_holding(&mut tx, &access_key(a)).await?;
            }
        }
        for (event, a, answer) in &s.changes {
            let mut detail = access_detail(a);
            detail["answer"] = (*answer).into();
            history::record(&mut tx, &grant.id, now, event, detail).await?;
        }
        for (a, kept) in &s.plan.released {
            let why = if *kept {
                "another live grant holds it"
            } else if job.found.contains(a) {
                "it was there before guildgate gave it"
            } else {
                continue;
            };
            let mut detail = access_detail(a);
            detail["reason"] = why.into();
            history::record(&mut tx, &grant.id, now, "left_in_place", detail).await?;
        }
        let mut label = if s.plan.awaiting_link {
            "awaiting_link"
        } else if !job.grant.status.is_live() {
            "revoked"
        } else {
            "in_sync"
        };
        // Revoked meanwhile: keep the record of what was applied (the revoke's own job
        // undoes it), but do not deliver.
        if s.plan.delivers
            && grant.status.is_live()
            && let Some(delivered) = grant_store::mark_delivered(&mut tx, &grant.id, now).await?
        {
            emit(
                &mut tx,
                &self.links,
                &delivered,
                GrantEventType::Delivered,
                now,
            )
            .await?;
            history::record(&mut tx, &grant.id, now, "delivered", serde_json::json!({})).await?;
            label = "delivered";
        }
        tx.commit().await?;
        Ok(Outcome::Ack(label))
    }

    async fn record_failure(
        &self,
        job: &Job,
        e: DiscordError,
        attempt: u32,
    ) -> Result<Outcome, sqlx::Error> {
        let g = &job.grant;
        if let Some(code) = e.human_code() {
            let message = match &e {
                DiscordError::BadUserToken => "The customer's Discord authorization expired or was revoked. They must open the grant's oauth_url and authorize again.".to_string(),
                other => other.to_string(),
            };
            tracing::warn!(grant_id = %g.id, code = code.as_str(), %message, "grant needs a human");
            if code == crate::discord::HumanCode::ReauthorizationRequired {
                // Also for a delivered grant, which keeps its status: the customer's
                // access page asks them to connect again.
                let mut conn = self.pool.acquire().await?;
                crate::store::access::needs_authorization(
                    &mut conn,
                    &g.business_id,
                    &g.customer_id,
                )
                .await?;
            }
            self.fail(g, code.as_str(), &message).await?;
            return Ok(Outcome::Ack("needs_human"));
        }
        let wait = e.retry_after().unwrap_or_default();
        match retry::next(attempt, wait, &self.retry_delays) {
            Some(r) => {
                let (attempt, delay) = (r.tiers_used(), r.delay);
                tracing::info!(grant_id = %g.id, error = %e, attempt, ?delay, "Discord sync will be retried");
                Ok(Outcome::Retry {
                    attempt,
                    delay,
                    reason: e.to_string(),
                })
            }
            None => {
                let message = format!(
                    "Discord kept failing after {} retries: {e}",
                    self.retry_delays.len()
                );
                tracing::error!(grant_id = %g.id, %message, "Discord sync retries exhausted");
                self.fail(g, "retries_exhausted", &message).await?;
                Ok(Outcome::DeadLetter {
                    code: "retries_exhausted",
                    reason: message,
                })
            }
        }
    }

    /// A live grant not yet delivered becomes `Failed` (one `failed` webhook per grant).
    /// A delivered or revoked one keeps its status: a grant only moves forward.
    async fn fail(&self, g: &Grant, code: &str, message: &str) -> Result<(), sqlx::Error> {
        if !matches!(g.status, GrantStatus::Pending | GrantStatus::Failed) {
            return Ok(());
        }
        let now = Utc::now();
        let mut tx = self.pool.begin().await?;
        let moved = grant_store::mark_failed(&mut tx, &g.id, code, message, now).await?;
        if let Some(failed) = &moved {
            emit(&mut tx, &self.links, failed, GrantEventType::Failed, now).await?;
        }
        // Once per failure, not once per job that finds it still failing.
        if moved.is_some() || g.error_code.as_deref() != Some(code) {
            history::record(
                &mut tx,
                &g.id,
                now,
                "failed",
                serde_json::json!({ "code": code, "message": message }),
            )
            .await?;
        }
        tx.commit().await
    }

    // -- the consume loop ---------------------------------------------------------

    /// Consumes until `shutdown`: stops taking jobs, finishes the ones in hand (and the
    /// parked ones being run), returns. Jobs run concurrently on the queue worker
    /// ([`queue::run_concurrent`]); meanwhile a watch starts drainers for bots whose
    /// parked jobs nobody drains.
    pub async fn run(self, shutdown: CancellationToken) {
        // No wait on taking over from another process (start-up or failover): the
        // bot's budget is shared in the database, so the previous owner's requests of
        // the last second are counted there already.
        let watch = async {
            let mut every = tokio::time::interval(lanes::WATCH_EVERY);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = every.tick() => self.drain_undrained(&shutdown).await,
                }
            }
        };
        let broker = self.broker.clone();
        tokio::join!(
            queue::run_concurrent(self.clone(), &broker, shutdown.clone()),
            watch
        );
        // The drainers stop taking parked jobs and finish the ones they run.
        self.drainers.close();
        self.drainers.wait().await;
    }

    /// One delivered job: run now if its bot's lane has a seat, else parked in the
    /// database for the lane's drainer (see [`lanes`]).
    async fn handle_delivered(
        &self,
        job: &queue::Job,
        shutdown: &CancellationToken,
    ) -> Result<Outcome, sqlx::Error> {
        #[derive(serde::Deserialize)]
        struct SyncJob {
            grant_id: String,
        }
        let grant = match serde_json::from_slice::<SyncJob>(&job.body) {
            Ok(j) => j.grant_id,
            Err(e) => {
                return Ok(Outcome::DeadLetter {
                    code: "invalid_sync_job",
                    reason: format!("not a sync job: {e}"),
                });
            }
        };
        let (lane, business) = self.lane_of(&grant).await?;
        if let Some(_seat) = lane.seat_now() {
            return self.handle(&grant, job.attempt).await;
        }
        parking::park(&self.pool, &grant, &lane.bot, &business, job.attempt).await?;
        lane.set_backlog(true);
        self.metrics
            .syncs
            .get_or_create(&vec![("outcome", "parked".to_string())])
            .inc();
        self.start_drainer(lane, shutdown);
        Ok(Outcome::Ack("parked"))
    }

    /// Runs `f` until the database answers: a database failure is never the job's fault,
    /// so the job is held (never dead-lettered) and `f` tried again. `None` on shutdown.
    async fn held<T, F, Fut>(&self, shutdown: &CancellationToken, mut f: F) -> Option<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, sqlx::Error>>,
    {
        let mut backoff = amqp::reconnect_backoff();
        loop {
            match f().await {
                Ok(v) => return Some(v),
                Err(e) => {
                    let wait = backoff.next().unwrap_or(Duration::from_secs(5));
                    tracing::warn!(error = %e, transient = store::is_transient(&e), retry_in = ?wait, "database unavailable; holding the sync job");
                    tokio::select! {
                        _ = shutdown.cancelled() => return None,
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
    }

    /// The lane of the bot that serves the grant's business, and the business (the
    /// shared bot's lane, and no business, for a grant that does not exist: its job is
    /// acked as such).
    async fn lane_of(&self, grant_id: &str) -> Result<(Arc<Lane>, String), sqlx::Error> {
        let business = grant_store::business_of(&self.pool, grant_id).await?;
        let bot = business
            .as_deref()
            .and_then(|b| self.bots.directory().client_id_of(b))
            .unwrap_or_else(|| self.bots.shared().client_id().to_string());
        Ok((self.lanes.lane(&bot), business.unwrap_or_default()))
    }

    /// Starts the drainer of `lane`'s parked jobs, unless one runs in this process.
    fn start_drainer(&self, lane: Arc<Lane>, shutdown: &CancellationToken) {
        if !lane.start_draining() {
            return;
        }
        let (w, s) = (self.clone(), shutdown.clone());
        self.drainers.spawn(async move {
            w.drain(&lane, &s).await;
            lane.stop_draining();
        });
    }

    /// Starts drainers for the bots whose parked jobs nobody drains (their drainer's
    /// process stopped, or a park came as the drainer finished).
    async fn drain_undrained(&self, shutdown: &CancellationToken) {
        match parking::undrained(&self.pool).await {
            Ok(bots) => {
                for bot in bots {
                    let lane = self.lanes.lane(&bot);
                    lane.set_backlog(true);
                    self.start_drainer(lane, shutdown);
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot look for parked sync jobs"),
        }
    }

    /// Runs `lane`'s parked jobs as its seats free up, while this process holds the
    /// bot's lease, until none waits or `shutdown`.
    async fn drain(&self, lane: &Arc<Lane>, shutdown: &CancellationToken) {
        let pool = &self.pool;
        let holder = self.lanes.holder.clone();
        let Ok(publisher) = self.broker.confirm_channel(shutdown).await else {
            return;
        };
        let mut jobs: JoinSet<()> = JoinSet::new();
        let mut fresh = true;
        // Whose turn the last job taken was (businesses take turns), and how many of the
        // lane's seats each business's parked jobs hold now.
        let mut turn = String::new();
        let running: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
        let pause = |d: Duration| async move {
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = tokio::time::sleep(d) => {}
            }
        };
        while !shutdown.is_cancelled() {
            while jobs.try_join_next().is_some() {}
            match parking::lease(pool, &lane.bot, &holder, fresh, lanes::LEASE).await {
                Ok(true) => fresh = false,
                Ok(false) => {
                    // Another process drains the bot; look again while jobs wait.
                    match parking::parked(pool, &lane.bot).await {
                        Ok(0) => break,
                        _ => {
                            pause(lanes::LEASE / 3).await;
                            continue;
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, bot = %lane.bot, "cannot take the lease of parked sync jobs");
                    pause(Duration::from_secs(1)).await;
                    continue;
                }
            }
            // A seat, renewing the lease while the lane is full.
            let seat = tokio::select! {
                _ = shutdown.cancelled() => break,
                seat = lane.seat() => seat,
                _ = tokio::time::sleep(lanes::LEASE / 3) => continue,
            };
            // A business whose jobs hold their share of the seats (they wait long on
            // Discord, say) is passed over while another's wait.
            let full: Vec<String> = running
                .lock()
                .expect("running jobs")
                .iter()
                .filter(|(_, n)| **n >= lanes::PER_BUSINESS)
                .map(|(b, _)| b.clone())
                .collect();
            match parking::take(pool, &lane.bot, &holder, &turn, &full).await {
                Ok(Some(parking::Taken {
                    grant_id: grant,
                    attempt,
                    business_id,
                })) => {
                    *running
                        .lock()
                        .expect("running jobs")
                        .entry(business_id.clone())
                        .or_default() += 1;
                    turn = business_id.clone();
                    let (w, p, s, h, r) = (
                        self.clone(),
                        publisher.clone(),
                        shutdown.clone(),
                        holder.clone(),
                        running.clone(),
                    );
                    jobs.spawn(async move {
                        w.run_parked(&grant, attempt, &p, &s, &h).await;
                        let mut r = r.lock().expect("running jobs");
                        if let Some(n) = r.get_mut(&business_id) {
                            *n -= 1;
                            if *n == 0 {
                                r.remove(&business_id);
                            }
                        }
                        drop(seat);
                    });
                }
                Ok(None) => {
                    drop(seat);
                    // None waits: new jobs take seats again, unless one parked meanwhile.
                    lane.set_backlog(false);
                    match parking::parked(pool, &lane.bot).await {
                        Ok(0) => break,
                        Ok(_) => {
                            lane.set_backlog(true);
                            // Being run: wait for those before looking again.
                            if jobs.join_next().await.is_none() {
                                pause(Duration::from_millis(200)).await;
                            }
                        }
                        Err(_) => lane.set_backlog(true),
                    }
                }
                Err(e) => {
                    drop(seat);
                    tracing::warn!(error = %e, bot = %lane.bot, "cannot take a parked sync job");
                    pause(Duration::from_secs(1)).await;
                }
            }
        }
        while jobs.join_next().await.is_some() {}
        if let Err(e) = parking::release(pool, &lane.bot, &holder).await {
            tracing::warn!(error = %e, bot = %lane.bot, "cannot end the lease of parked sync jobs; it runs out by itself");
        }
        let _ = publisher.close(200, "drained".into()).await;
    }

    /// Runs one parked job, publishes a retry or dead letter, and ends its row.
    async fn run_parked(
        &self,
        grant_id: &str,
        attempt: u32,
        publisher: &Channel,
        shutdown: &CancellationToken,
        holder: &str,
    ) {
        // Left taken on shutdown: the bot's next drainer gives it back.
        let Some(outcome) = self.held(shutdown, || self.handle(grant_id, attempt)).await else {
            return;
        };
        let (message_id, body) = crate::outbox::produce::sync_job(grant_id);
        let job = queue::Job {
            message_id: Some(message_id),
            body,
            attempt,
            ..queue::Job::default()
        };
        if let Err(e) = queue::publish(self, self.broker.names(), &job, &outcome, publisher).await {
            tracing::warn!(error = %e, grant_id, "cannot publish the outcome of a parked sync job; it runs again");
            let _ = self
                .held(shutdown, || {
                    parking::give_back(&self.pool, grant_id, holder)
                })
                .await;
            return;
        }
        let _ = self
            .held(shutdown, || parking::finish(&self.pool, grant_id, holder))
            .await;
    }
}

impl queue::Handler for SyncWorker {
    fn queue(&self, names: &Names) -> String {
        names.discord_sync()
    }

    fn consumer_tag(&self) -> &'static str {
        "guildgate-syncer"
    }
}

impl queue::Concurrent for SyncWorker {
    type Arrival = ();
    type Error = sqlx::Error;

    fn prefetch(&self) -> u16 {
        PREFETCH
    }

    /// As many as the prefetch: jobs mostly wait on the rate limiter, and a bot's lane
    /// bounds how many of its jobs run (the rest are parked).
    fn workers(&self) -> usize {
        usize::from(PREFETCH)
    }

    fn arrive(&self, _job: &queue::Job) {}

    async fn handle_one(
        &self,
        job: &queue::Job,
        _arrival: &mut (),
        _slot: &mut Option<tokio::sync::OwnedSemaphorePermit>,
        shutdown: &CancellationToken,
    ) -> Result<Outcome, sqlx::Error> {
        self.handle_delivered(job, shutdown).await
    }
}

/// Revokes a customer's tokens at Discord: the refresh token first (it ends the
/// authorization), then the access token. Either may be absent.
pub async fn revoke_tokens(
    discord: &DiscordClient,
    access: Option<&SecretString>,
    refresh: Option<&SecretString>,
) -> Result<(), DiscordError> {
    if let Some(r) = refresh {
        discord.revoke_token(r, "refresh_token").await?;
    }
    if let Some(a) = access {
        discord.revoke_token(a, "access_token").await?;
    }
    Ok(())
}

/// Discord's answer to a removal, for the grant's history.
fn answer(c: MemberChange) -> &'static str {
    match c {
        MemberChange::Done => "204 No Content",
        MemberChange::NotMember => "404 Unknown Member: not in the server",
    }
}

/// An access as the grant's history shows it.
fn access_detail(a: &Access) -> serde_json::Value {
    serde_json::json!({
        "guild_id": a.guild.to_string(),
        "discord_user_id": a.user.to_string(),
        "role_id": a.role.map(|r| r.to_string()),
    })
}

/// What the server's audit log says of guildgate's changes (`X-Audit-Log-Reason`), so
/// moderators can tell why a role came or went.
struct Reasons {
    add: String,
    remove: String,
}

impl Reasons {
    fn of(job: &Job, desired: Option<Access>) -> Self {
        let g = &job.grant;
        let moved = desired.is_some_and(|d| job.held.iter().any(|h| *h != d));
        let add = if moved {
            format!(
                "guildgate: {} moved to the customer's current account or role",
                g.id
            )
        } else {
            format!("guildgate: {} delivered", g.id)
        };
        let remove = if g.status.is_live() {
            format!("guildgate: {} moved to another account or role", g.id)
        } else {
            format!(
                "guildgate: {} revoked ({})",
                g.id,
                g.revocation_reason
                    .map_or("revoked", crate::domain::RevocationReason::as_str)
            )
        };
        Self { add, remove }
    }
}

/// The `(guild, Discord user)` accounts of what is held, and of the linked account in
/// the entitlement's guild.
fn accounts_of(
    held: &[Access],
    guild: Option<Snowflake>,
    link: Option<&LinkRow>,
) -> Vec<(Snowflake, Snowflake)> {
    let mut out: Vec<(Snowflake, Snowflake)> = held.iter().map(|a| (a.guild, a.user)).collect();
    if let (Some(g), Some(u)) = (
        guild,
        link.and_then(|l| Snowflake::parse(&l.discord_user_id)),
    ) {
        out.push((g, u));
    }
    out
}

/// An access as `discord_holdings` keys it.
fn access_key(a: &Access) -> holdings::AccessKey {
    (
        a.guild.to_string(),
        a.user.to_string(),
        a.role.map(|r| r.to_string()),
    )
}

/// An access read back from its key.
fn access_of((g, u, r): holdings::AccessKey) -> Option<Access> {
    Some(Access {
        guild: Snowflake::parse(&g)?,
        user: Snowflake::parse(&u)?,
        role: r.as_deref().and_then(Snowflake::parse),
    })
}

/// What a grant holds: what it applied, and what it recorded it is about to apply.
fn held_by(g: &Grant) -> Vec<Access> {
    [
        access(
            g.applied_user_id.as_deref(),
            g.applied_guild_id.as_deref(),
            g.applied_role_id.as_deref(),
        ),
        access(
            g.intent_user_id.as_deref(),
            g.intent_guild_id.as_deref(),
            g.intent_role_id.as_deref(),
        ),
    ]
    .into_iter()
    .flatten()
    .collect()
}

fn access(user: Option<&str>, guild: Option<&str>, role: Option<&str>) -> Option<Access> {
    Some(Access {
        user: Snowflake::parse(user?)?,
        guild: Snowflake::parse(guild?)?,
        role: role.and_then(Snowflake::parse),
    })
}

/// One async mutex per key, created on demand and dropped when nobody holds or waits.
#[derive(Clone, Default)]
struct KeyedLocks {
    map: Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>,
}

struct KeyedGuard {
    key: String,
    map: Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl KeyedLocks {
    async fn lock(&self, key: &str) -> KeyedGuard {
        let m = self
            .map
            .lock()
            .expect("keyed locks")
            .entry(key.to_string())
            .or_default()
            .clone();
        KeyedGuard {
            key: key.to_string(),
            map: self.map.clone(),
            guard: Some(m.lock_owned().await),
        }
    }
}

impl Drop for KeyedGuard {
    fn drop(&mut self) {
        let mut map = self.map.lock().expect("keyed locks");
        self.guard.take();
        // Only the map holds it now: nobody waits, so forget the key.
        if map
            .get(&self.key)
            .is_some_and(|m| Arc::strong_count(m) == 1)
        {
            map.remove(&self.key);
        }
    }
}
