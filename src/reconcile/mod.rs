//! Drift reconciliation: compare grants with what Discord says, report the drift, and
//! optionally queue the fixes.
//!
//! - [`compare`]: the pure core, `(grants, gated roles, Discord state) -> findings`.
//! - [`Reconciler`]: the shell. Reads grants from PostgreSQL, reads Discord on the side
//!   budget (never the syncer's, so a reconcile never starves real-time syncs), and
//!   with `apply` writes the fixes in transactions: a sync job (the syncer makes Discord
//!   match the grant; it is level-triggered) or a `platform_external` revoke with its
//!   webhook. Fixes go through the outbox, relayed by a running `serve`.
//!
//! Members holding a gated role without a grant ([`DriftKind::Ungranted`]) are only
//! reported: guildgate never touches a member it did not grant.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::Duration;

use chrono::Utc;
use serde::Serialize;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

pub use crate::config::DriftPolicy;
use crate::discord::{Bots, DiscordClient};
use crate::domain::Snowflake;
use crate::domain::compare::{DiscordState, DriftKind, Finding, GatedRole, GrantRow, compare};
use crate::domain::{GrantEventType, GrantStatus, RevocationReason};
use crate::grants::link::LinkBuilder;
use crate::outbox::{emit, queue_sync};
use crate::store::grants as grant_store;
use crate::store::reconcile as listing_store;

/// Members per page of `GET /guilds/{g}/members` (Discord's maximum).
const PAGE: u16 = 1000;
/// An interrupted member listing is carried on by a run this soon after; an older one
/// starts again (members change).
pub const RESUMABLE_FOR: Duration = Duration::from_secs(3600);
/// A progress line every this many pages of members.
const PROGRESS_EVERY: u32 = 10;

/// What of a guild's member list the comparison needs: members holding a gated role
/// of the guild, and the users grants name there (to give, or to take back). Everyone
/// else in a large guild is passed over.
#[derive(Default)]
struct Relevant {
    gated: HashMap<Snowflake, HashSet<Snowflake>>,
    users: HashMap<Snowflake, HashSet<Snowflake>>,
}

impl Relevant {
    fn new(grants: &[GrantRow], gated: &[GatedRole]) -> Self {
        let mut r = Self::default();
        for g in gated {
            r.gated.entry(g.guild).or_default().insert(g.role);
        }
        for g in grants {
            for a in [g.applied(), g.desired()].into_iter().flatten() {
                r.users.entry(a.guild).or_default().insert(a.user);
            }
        }
        r
    }

    fn keeps(&self, guild: Snowflake, user: Snowflake, roles: &[Snowflake]) -> bool {
        self.users.get(&guild).is_some_and(|u| u.contains(&user))
            || self
                .gated
                .get(&guild)
                .is_some_and(|g| roles.iter().any(|r| g.contains(r)))
    }
}

impl Scope {
    /// The scope as a key: a listing saved under one scope is carried on by a run of
    /// the same scope only (the members kept depend on its grants).
    fn key(&self) -> String {
        format!(
            "business={};guild={}",
            self.business_id.as_deref().unwrap_or("*"),
            self.guild_id.as_deref().unwrap_or("*")
        )
    }
}

/// Which grants and guilds to look at.
#[derive(Clone, Debug, Default)]
pub struct Scope {
    pub business_id: Option<String>,
    pub guild_id: Option<String>,
}

/// What was done about a finding with `apply`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// A sync job was queued: the syncer makes Discord match the grant.
    SyncQueued,
    /// The grant was revoked (`platform_external`); its webhook and sync were queued.
    Revoked,
    /// The grant was revoked meanwhile; nothing to do.
    AlreadyRevoked,
    /// Reported only (a member guildgate did not grant is never touched).
    ReportedOnly,
    /// Read again right before acting, the grant (or another grant of its customer) no
    /// longer shows this drift: nothing was done; the next run looks again.
    Changed,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::SyncQueued => "sync_queued",
            Action::Revoked => "revoked",
            Action::AlreadyRevoked => "already_revoked",
            Action::ReportedOnly => "reported_only",
            Action::Changed => "changed",
        }
    }
}

/// A finding and, with `apply`, what was done about it.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    #[serde(flatten)]
    pub finding: Finding,
    pub action: Option<Action>,
}

/// The outcome of one reconcile run.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub findings: Vec<Row>,
    /// Grants compared (live ones and revoked ones whose undo is not recorded).
    pub grants_checked: usize,
    /// Guilds whose members were listed, so `ungranted` was checked there.
    pub guilds_listed: Vec<Snowflake>,
    /// Guilds where Discord refused the member list (403 50001: the bot lacks the
    /// privileged members intent): `ungranted` was not checked there.
    pub guilds_not_listed: Vec<Snowflake>,
    /// Discord reads that failed; the grants depending on them were not judged.
    pub errors: Vec<String>,
    pub applied: bool,
    /// The policy applied, with `apply`.
    pub policy: Option<DriftPolicy>,
}

impl Report {
    /// A table for people.
    pub fn table(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{:<12} {:<30} {:<22} {:<20} {:<20} {:<20} ACTION",
            "DRIFT", "GRANT", "BUSINESS", "GUILD", "ROLE", "USER"
        );
        for r in &self.findings {
            let f = &r.finding;
            let _ = writeln!(
                s,
                "{:<12} {:<30} {:<22} {:<20} {:<20} {:<20} {}",
                f.kind.as_str(),
                f.grant_id.as_deref().unwrap_or("-"),
                f.business_id,
                f.guild_id,
                f.role_id.map_or("-".into(), |r| r.to_string()),
                f.user_id,
                r.action.map_or("-", Action::as_str),
            );
        }
        let _ = writeln!(
            s,
            "{} finding(s) among {} grant(s).",
            self.findings.len(),
            self.grants_checked
        );
        if !self.guilds_not_listed.is_empty() {
            let _ = writeln!(
                s,
                "Members holding a gated role without a grant were NOT checked in guild(s) {}: Discord refused to list members (403 50001; enable the bot's Server Members intent).",
                join(&self.guilds_not_listed)
            );
        }
        for e in &self.errors {
            let _ = writeln!(s, "error: {e}");
        }
        match self.policy {
            Some(p) if self.applied => {
                let _ = writeln!(
                    s,
                    "Applied with policy '{}': fixes are queued in the outbox; a running `guildgate serve` carries them out.",
                    p.as_str()
                );
            }
            _ => {
                if !self.findings.is_empty() {
                    let _ = writeln!(s, "Nothing changed; run with --apply to queue the fixes.");
                }
            }
        }
        s
    }
}

fn join(ids: &[Snowflake]) -> String {
    ids.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
}

/// The advisory lock (two-key form: `RECONCILE_LOCK.0` names guildgate's periodic
/// jobs, `.1` this one) that lets one replica at a time run the periodic reconcile.
const RECONCILE_LOCK: (i32, i32) = (0x6767_6174, 1);

/// Compares grants with Discord and, with `apply`, queues the fixes.
#[derive(Clone, Debug)]
pub struct Reconciler {
    pub pool: PgPool,
    /// Each guild is read with its business's bot, on its side budget, never the
    /// syncer's.
    pub bots: Bots,
    pub links: LinkBuilder,
}

impl Reconciler {
    /// A reconciler for a process of its own (`guildgate reconcile`): Discord is read
    /// on the side budget, never the syncer's, shared with every other process
    /// through PostgreSQL.
    pub async fn standalone(
        settings: &crate::config::Settings,
        pool: PgPool,
    ) -> Result<Self, sqlx::Error> {
        let cipher = settings
            .token_cipher()
            .expect("validated when the settings were loaded");
        let bots = Bots::new(
            pool.clone(),
            cipher,
            &settings.discord,
            crate::metrics::Metrics::new(),
        );
        bots.refresh().await?;
        Ok(Self {
            links: LinkBuilder::from_settings(settings).with_directory(bots.directory()),
            bots,
            pool,
        })
    }

    /// The side client of the bot that serves `guild`: its business's (`owners`).
    async fn client_for(
        &self,
        owners: &HashMap<Snowflake, String>,
        guild: Snowflake,
    ) -> Result<DiscordClient, crate::discord::DiscordError> {
        match owners.get(&guild) {
            None => Ok(self.bots.shared().side.clone()),
            Some(business) => self
                .bots
                .of_business(business)
                .await
                .map(|b| b.side)
                .map_err(|e| crate::discord::DiscordError::Retriable(e.to_string())),
        }
    }

    /// Live grants, and revoked ones that still record what they applied (the syncer
    /// clears that once it undid it), in scope.
    async fn grants(&self, scope: &Scope) -> Result<Vec<GrantRow>, sqlx::Error> {
        listing_store::judged_grants(
            &self.pool,
            scope.business_id.as_deref(),
            scope.guild_id.as_deref(),
            None,
        )
        .await
    }

    /// Roles that entitlements (not deleted) gate, in scope.
    async fn gated(&self, scope: &Scope) -> Result<Vec<GatedRole>, sqlx::Error> {
        listing_store::gated_roles(
            &self.pool,
            scope.business_id.as_deref(),
            scope.guild_id.as_deref(),
        )
        .await
    }

    /// The roles guildgate found already there in `guilds` (its holdings).
    async fn found_roles(
        &self,
        guilds: &BTreeSet<Snowflake>,
    ) -> Result<HashSet<(Snowflake, Snowflake, Snowflake)>, sqlx::Error> {
        listing_store::found_roles(&self.pool, guilds).await
    }

    /// The members of `guild` that matter to the comparison (see [`Relevant`]), page
    /// by page on the side budget; `Ok(None)` if Discord refuses the list. Memory
    /// follows the members kept, not the guild's size. Each page is saved
    /// ([`crate::store::reconcile`]) so that a run interrupted midway is carried on by
    /// the next run of the same scope within [`RESUMABLE_FOR`]; saving is best-effort
    /// (a database error costs the resumption, not the listing).
    async fn list_members(
        &self,
        discord: &DiscordClient,
        guild: Snowflake,
        relevant: &Relevant,
        scope: &str,
    ) -> Result<Option<HashMap<Snowflake, Vec<Snowflake>>>, crate::discord::DiscordError> {
        let key = guild.to_string();
        let mut saving = true;
        let progress = match self.pool.acquire().await {
            Ok(mut conn) => listing_store::begin(
                &mut conn,
                &key,
                scope,
                RESUMABLE_FOR.as_secs_f64(),
            )
            .await
            .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        }
        .unwrap_or_else(|e| {
            tracing::warn!(guild = %guild, error = %e, "cannot save the listing's progress; it starts from the beginning");
            saving = false;
            listing_store::Progress::default()
        });
        let mut out: HashMap<Snowflake, Vec<Snowflake>> = progress
            .kept
            .iter()
            .filter_map(|(u, roles)| {
                Some((
                    Snowflake::parse(u)?,
                    roles.iter().filter_map(|r| Snowflake::parse(r)).collect(),
                ))
            })
            .collect();
        let mut after = progress.after_user.as_deref().and_then(Snowflake::parse);
        let mut listed = progress.listed;
        if after.is_some() {
            tracing::info!(guild = %guild, listed, kept = out.len(), "carrying on an interrupted member listing");
        }
        let mut pages = 0u32;
        loop {
            let Some(page) = discord.members_page(guild, PAGE, after).await? else {
                return Ok(None);
            };
            let n = page.len();
            let from = after;
            let mut kept_now: Vec<(String, Vec<String>)> = Vec::new();
            for m in page {
                let Some(u) = m.user else { continue };
                after = Some(after.map_or(u.id, |a: Snowflake| a.max(u.id)));
                if relevant.keeps(guild, u.id, &m.roles) {
                    kept_now.push((
                        u.id.to_string(),
                        m.roles.iter().map(ToString::to_string).collect(),
                    ));
                    out.insert(u.id, m.roles);
                }
            }
            listed += i64::try_from(n).unwrap_or(i64::MAX);
            pages += 1;
            if n < PAGE as usize {
                if saving && let Ok(mut conn) = self.pool.acquire().await {
                    let _ = listing_store::finish(&mut conn, &key, scope).await;
                }
                tracing::info!(guild = %guild, listed, kept = out.len(), "listed every member");
                return Ok(Some(out));
            }
            if saving && let Some(to) = after {
                saving = self
                    .save_page(&key, scope, from, to, listed, &kept_now)
                    .await;
            }
            if pages.is_multiple_of(PROGRESS_EVERY) {
                tracing::info!(guild = %guild, listed, kept = out.len(), "listing members");
            }
        }
    }

    /// Saves a listed page; `false` once saving stops (another run took the listing
    /// over, or the database failed).
    async fn save_page(
        &self,
        guild: &str,
        scope: &str,
        from: Option<Snowflake>,
        to: Snowflake,
        listed: i64,
        kept: &[(String, Vec<String>)],
    ) -> bool {
        let from = from.map(|f| f.to_string());
        let saved = match self.pool.acquire().await {
            Ok(mut conn) => {
                listing_store::save_page(
                    &mut conn,
                    guild,
                    scope,
                    from.as_deref(),
                    &to.to_string(),
                    listed,
                    kept,
                )
                .await
            }
            Err(e) => Err(e),
        };
        match saved {
            Ok(true) => true,
            Ok(false) => {
                tracing::info!(
                    guild,
                    "another run took this member listing over; this one no longer saves its progress"
                );
                false
            }
            Err(e) => {
                tracing::warn!(guild, error = %e, "cannot save the listing's progress; it goes on unsaved");
                false
            }
        }
    }

    /// Compares grants in `scope` with Discord; nothing is changed.
    pub async fn check(&self, scope: &Scope) -> Result<Report, ReconcileError> {
        Ok(self.observe(scope).await?.0)
    }

    /// [`Reconciler::check`], also returning what Discord said, which
    /// [`Reconciler::apply`] judges each fix against again right before making it.
    pub async fn observe(&self, scope: &Scope) -> Result<(Report, DiscordState), ReconcileError> {
        let grants = self.grants(scope).await?;
        let gated = self.gated(scope).await?;
        let mut discord = DiscordState::default();
        let mut report = Report {
            findings: Vec::new(),
            grants_checked: grants.len(),
            guilds_listed: Vec::new(),
            guilds_not_listed: Vec::new(),
            errors: Vec::new(),
            applied: false,
            policy: None,
        };
        let guilds: BTreeSet<Snowflake> = gated.iter().map(|g| g.guild).collect();
        discord.found = self.found_roles(&guilds).await?;
        let relevant = Relevant::new(&grants, &gated);
        let scope_key = scope.key();
        // Which business each guild is read for: its bot is the one in the server.
        let mut owners: HashMap<Snowflake, String> = HashMap::new();
        for g in &gated {
            owners
                .entry(g.guild)
                .or_insert_with(|| g.business_id.clone());
        }
        for g in &grants {
            for guild in [g.entitlement_guild, g.applied_guild].into_iter().flatten() {
                owners.entry(guild).or_insert_with(|| g.business_id.clone());
            }
        }
        for guild in guilds {
            let listed = match self.client_for(&owners, guild).await {
                Ok(discord) => {
                    self.list_members(&discord, guild, &relevant, &scope_key)
                        .await
                }
                Err(e) => Err(e),
            };
            match listed {
                Ok(Some(members)) => {
                    discord.listed.insert(guild, members);
                    report.guilds_listed.push(guild);
                }
                Ok(None) => report.guilds_not_listed.push(guild),
                Err(e) => report
                    .errors
                    .push(format!("listing the members of guild {guild}: {e}")),
            }
        }
        // Members the listings did not cover, each read once.
        let mut wanted: BTreeSet<(Snowflake, Snowflake)> = BTreeSet::new();
        for g in &grants {
            let a = match g.status {
                GrantStatus::Delivered => g.expected(),
                GrantStatus::Revoked => g.applied(),
                _ => None,
            };
            if let Some(a) = a
                && !discord.listed.contains_key(&a.guild)
            {
                wanted.insert((a.guild, a.user));
            }
        }
        let mut failed_guilds: HashSet<Snowflake> = HashSet::new();
        for (guild, user) in wanted {
            if failed_guilds.contains(&guild) {
                continue;
            }
            let read = match self.client_for(&owners, guild).await {
                Ok(discord) => discord.member(guild, user).await,
                Err(e) => Err(e),
            };
            match read {
                Ok(m) => {
                    discord.members.insert((guild, user), m.map(|m| m.roles));
                }
                Err(e) => {
                    if e.human_code().is_some() {
                        // The guild itself is unreadable (bot removed, …): one error.
                        failed_guilds.insert(guild);
                        report
                            .errors
                            .push(format!("reading members of guild {guild}: {e}"));
                    } else {
                        report
                            .errors
                            .push(format!("reading member {user} of guild {guild}: {e}"));
                    }
                }
            }
        }
        report.findings = compare(&grants, &gated, &discord)
            .into_iter()
            .map(|finding| Row {
                finding,
                action: None,
            })
            .collect();
        Ok((report, discord))
    }

    /// Compares and queues the fixes by `policy`.
    pub async fn reconcile(
        &self,
        scope: &Scope,
        apply: bool,
        policy: DriftPolicy,
    ) -> Result<Report, ReconcileError> {
        let (report, discord) = self.observe(scope).await?;
        if !apply {
            return Ok(report);
        }
        self.apply(report, &discord, policy).await
    }

    /// Makes the fixes of an observed report by `policy`, each only if the grant still
    /// shows its drift when read again.
    pub async fn apply(
        &self,
        mut report: Report,
        discord: &DiscordState,
        policy: DriftPolicy,
    ) -> Result<Report, ReconcileError> {
        for row in &mut report.findings {
            row.action = Some(self.fix(&row.finding, policy, discord).await?);
        }
        report.applied = true;
        report.policy = Some(policy);
        Ok(report)
    }

    /// Makes one fix, after reading the grant's customer's grants again (the grant
    /// locked, so nothing changes it meanwhile) and judging them against what Discord
    /// said: a finding read minutes earlier is acted on only if it still holds.
    async fn fix(
        &self,
        f: &Finding,
        policy: DriftPolicy,
        discord: &DiscordState,
    ) -> Result<Action, sqlx::Error> {
        let Some(grant_id) = &f.grant_id else {
            return Ok(Action::ReportedOnly);
        };
        let mut tx = self.pool.begin().await?;
        let customer = grant_store::customer_for_update(&mut tx, grant_id).await?;
        let still = match &customer {
            Some(customer) => {
                let scope = Scope {
                    business_id: Some(f.business_id.clone()),
                    guild_id: None,
                };
                let now = listing_store::judged_grants(
                    &mut *tx,
                    scope.business_id.as_deref(),
                    scope.guild_id.as_deref(),
                    Some(customer),
                )
                .await?;
                compare(&now, &[], discord)
                    .iter()
                    .any(|again| again.grant_id == f.grant_id && again.kind == f.kind)
            }
            None => false,
        };
        if !still {
            tracing::info!(grant_id = %grant_id, drift = f.kind.as_str(), "reconcile left a finding the grant no longer shows");
            return Ok(Action::Changed);
        }
        let action = match (f.kind, policy) {
            (DriftKind::MissingRole | DriftKind::LeftServer, DriftPolicy::Revoke) => {
                let now = Utc::now();
                match grant_store::revoke(
                    &mut tx,
                    grant_id,
                    RevocationReason::PlatformExternal,
                    now,
                )
                .await?
                {
                    // The status change, its webhook and the sync job commit together.
                    Some(revoked) => {
                        emit(&mut tx, &self.links, &revoked, GrantEventType::Revoked, now).await?;
                        Action::Revoked
                    }
                    None => Action::AlreadyRevoked,
                }
            }
            // Restore, and a revoked grant still held: the syncer makes Discord match
            // what the grant says now (it removes what a revoked grant applied).
            (DriftKind::MissingRole | DriftKind::LeftServer, DriftPolicy::Restore)
            | (DriftKind::StillHolds, _) => {
                queue_sync(&mut tx, grant_id).await?;
                Action::SyncQueued
            }
            (DriftKind::Ungranted, _) => Action::ReportedOnly,
        };
        tx.commit().await?;
        tracing::info!(
            grant_id = %grant_id,
            drift = f.kind.as_str(),
            action = action.as_str(),
            "reconcile fixed drift"
        );
        Ok(action)
    }

    /// A connection of its own holding the periodic-reconcile lock, or `None` when
    /// another process holds it.
    pub async fn lock_periodic_run(&self) -> Result<Option<sqlx::PgConnection>, sqlx::Error> {
        use sqlx::Connection;
        let mut conn = sqlx::PgConnection::connect_with(&self.pool.connect_options()).await?;
        let locked = crate::store::try_session_lock(&mut conn, RECONCILE_LOCK).await?;
        Ok(locked.then_some(conn))
    }

    /// Reconciles everything every `every` (first after one interval), applying the
    /// fixes by `policy`, until `shutdown` fires. Only one process at a time runs it;
    /// the others skip the interval.
    pub async fn run_every(
        self,
        every: Duration,
        policy: DriftPolicy,
        shutdown: CancellationToken,
    ) {
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            // One replica at a time: the lock lives on a connection of its own (not one
            // of the pool's, which stays free for everything else) and goes with it, also
            // when this process dies mid-run.
            let mut lock = match self.lock_periodic_run().await {
                Ok(Some(conn)) => conn,
                Ok(None) => {
                    tracing::info!("another replica is reconciling; skipping this interval");
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot take the reconcile lock; trying again next interval");
                    continue;
                }
            };
            let scope = Scope::default();
            let run = self.reconcile(&scope, true, policy);
            let result = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = run => r,
            };
            let _ = crate::store::session_unlock(&mut lock, RECONCILE_LOCK).await;
            drop(lock);
            match result {
                Ok(r) => tracing::info!(
                    findings = r.findings.len(),
                    grants = r.grants_checked,
                    not_listed = r.guilds_not_listed.len(),
                    errors = r.errors.len(),
                    policy = policy.as_str(),
                    "reconcile done"
                ),
                Err(e) => {
                    tracing::warn!(error = %e, "reconcile failed; trying again next interval")
                }
            }
        }
    }
}
