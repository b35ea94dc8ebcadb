//! Checks an entitlement's Discord configuration (guild, optional role) against Discord
//! before it is saved, and explains a permission failure the syncer met. One readable
//! problem per failure, each with a stable code.

use super::client::{DiscordClient, Role};
use super::error::{DiscordError, HumanCode};
use super::permissions;
use crate::domain::Snowflake;

/// One thing a merchant must fix.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Problem {
    pub code: &'static str,
    pub message: String,
}

impl Problem {
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    /// Discord could not be asked; not a configuration problem (retry later).
    pub fn is_transient(&self) -> bool {
        matches!(self.code, "discord_unavailable" | "discord_busy")
    }

    /// The grant error code this problem corresponds to.
    pub fn human_code(&self) -> HumanCode {
        match self.code {
            "discord_role_hierarchy" => HumanCode::RoleHierarchy,
            "discord_unknown_role" | "discord_role_is_everyone" | "discord_role_managed" => {
                HumanCode::UnknownRole
            }
            "discord_unknown_guild" | "discord_bot_not_in_guild" => HumanCode::UnknownGuild,
            _ => HumanCode::MissingPermissions,
        }
    }
}

/// What the checks need to know about the guild.
#[derive(Clone, Debug)]
pub struct GuildFacts<'a> {
    pub guild_id: Snowflake,
    pub guild_name: &'a str,
    pub roles: &'a [Role],
    /// The bot's role ids, `None` if the bot is not in the guild.
    pub bot_roles: Option<&'a [Snowflake]>,
}

const NEEDED: [(u64, &str); 3] = [
    (permissions::MANAGE_ROLES, "Manage Roles"),
    (permissions::KICK_MEMBERS, "Kick Members"),
    (permissions::CREATE_INSTANT_INVITE, "Create Instant Invite"),
];

/// The pure checks.
pub fn check(f: &GuildFacts<'_>, role_id: Option<Snowflake>) -> Vec<Problem> {
    let name = f.guild_name;
    let Some(bot_roles) = f.bot_roles else {
        return vec![Problem::new(
            "discord_bot_not_in_guild",
            format!(
                "guildgate's bot is not in the server \"{name}\". Add it with the install link (permissions Manage Roles, Kick Members, Create Instant Invite)."
            ),
        )];
    };
    let mut problems = Vec::new();
    let by_id = |id: Snowflake| f.roles.iter().find(|r| r.id == id);
    // @everyone's id is the guild's id; its permissions apply to every member.
    let mut perms = by_id(f.guild_id).map_or(0, |r| r.permissions);
    let mut bot_top = 0;
    for r in bot_roles.iter().filter_map(|id| by_id(*id)) {
        perms |= r.permissions;
        bot_top = bot_top.max(r.position);
    }
    if perms & permissions::ADMINISTRATOR == 0 {
        for (bit, label) in NEEDED {
            if perms & bit == 0 {
                problems.push(Problem::new(
                    "discord_missing_permissions",
                    format!("guildgate's bot lacks the {label} permission in \"{name}\". Give the bot's role {label} in Server Settings → Roles."),
                ));
            }
        }
    }
    if let Some(role_id) = role_id {
        match by_id(role_id) {
            None => problems.push(Problem::new(
                "discord_unknown_role",
                format!("The role {role_id} does not exist in \"{name}\". Pick one of the server's roles."),
            )),
            Some(_) if role_id == f.guild_id => problems.push(Problem::new(
                "discord_role_is_everyone",
                "@everyone cannot be granted: every member has it. Pick another role, or leave the role empty for membership only.",
            )),
            Some(r) if r.managed => problems.push(Problem::new(
                "discord_role_managed",
                format!("The role \"{}\" is managed by an integration (a bot or a subscription) and cannot be given by hand. Pick another role.", r.name),
            )),
            Some(r) if r.position >= bot_top => problems.push(Problem::new(
                "discord_role_hierarchy",
                format!("The role \"{}\" is not below guildgate's bot's highest role in \"{name}\". In Server Settings → Roles, drag the bot's role above \"{}\".", r.name, r.name),
            )),
            Some(_) => {}
        }
    }
    problems
}

/// Validates `guild_id` and `role_id` (`None`: membership only) against Discord; on
/// success, the role's name (`None` for membership only).
pub async fn validate_discord_config(
    client: &DiscordClient,
    guild_id: &str,
    role_id: Option<&str>,
) -> Result<Option<String>, Vec<Problem>> {
    let Some(guild) = Snowflake::parse(guild_id) else {
        return Err(vec![Problem::new(
            "discord_unknown_guild",
            format!("\"{guild_id}\" is not a Discord server id (a number)."),
        )]);
    };
    let role = match role_id {
        None => None,
        Some(r) => match Snowflake::parse(r) {
            Some(r) => Some(r),
            None => {
                return Err(vec![Problem::new(
                    "discord_unknown_role",
                    format!("\"{r}\" is not a Discord role id (a number)."),
                )]);
            }
        },
    };
    let (problems, role_name) = match gather(client, guild, role).await {
        Ok(p) => p,
        Err(DiscordError::NeedsHuman { code, message }) => {
            let code = match code {
                HumanCode::UnknownGuild if message.contains("not in") => "discord_bot_not_in_guild",
                HumanCode::UnknownGuild => "discord_unknown_guild",
                _ => "discord_missing_permissions",
            };
            (vec![Problem::new(code, message)], None)
        }
        Err(e @ DiscordError::Busy { .. }) => (
            vec![Problem::new(
                "discord_busy",
                format!("Discord could not be asked: {e}. Try again in a few seconds."),
            )],
            None,
        ),
        Err(e) => (
            vec![Problem::new(
                "discord_unavailable",
                format!("Discord could not be asked ({e}); try again shortly."),
            )],
            None,
        ),
    };
    if problems.is_empty() {
        Ok(role_name)
    } else {
        Err(problems)
    }
}

/// The problems of a configuration, and the role's name when it exists.
async fn gather(
    client: &DiscordClient,
    guild: Snowflake,
    role: Option<Snowflake>,
) -> Result<(Vec<Problem>, Option<String>), DiscordError> {
    let g = client.guild(guild).await?;
    let roles = if g.roles.is_empty() {
        client.roles(guild).await?
    } else {
        g.roles.clone()
    };
    let bot = client.bot_member(guild).await?;
    let bot_roles = bot.map(|m| m.roles);
    let name = role.and_then(|r| roles.iter().find(|x| x.id == r).map(|x| x.name.clone()));
    let problems = check(
        &GuildFacts {
            guild_id: guild,
            guild_name: &g.name,
            roles: &roles,
            bot_roles: bot_roles.as_deref(),
        },
        role,
    );
    Ok((problems, name))
}

/// Turns a "Missing Permissions" answer met while syncing into the precise problem
/// (missing permission or role hierarchy), asking Discord what changed.
pub async fn explain_missing_permissions(
    client: &DiscordClient,
    guild: Snowflake,
    role: Option<Snowflake>,
    original: DiscordError,
) -> DiscordError {
    match gather(client, guild, role).await {
        Ok((problems, _)) => match problems.into_iter().find(|p| !p.is_transient()) {
            Some(p) => DiscordError::human(p.human_code(), p.message),
            None => original,
        },
        Err(e @ DiscordError::NeedsHuman { .. }) => e,
        Err(_) => original,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn role(id: u64, position: i64, permissions: u64, managed: bool) -> Role {
        Role {
            id: Snowflake::new(id),
            name: format!("r{id}"),
            position,
            permissions,
            managed,
        }
    }

    #[test]
    fn table() {
        let g = 10;
        let ok_perms = permissions::REQUIRED;
        let roles = vec![
            role(g, 0, 0, false),        // @everyone
            role(20, 5, ok_perms, true), // the bot's managed role
            role(30, 2, 0, false),       // a normal role below the bot
            role(40, 9, 0, false),       // above the bot
            role(50, 1, 0, true),        // managed by another integration
            role(60, 5, permissions::ADMINISTRATOR, false),
            role(70, 5, permissions::MANAGE_ROLES, false),
        ];
        let s = Snowflake::new;
        let facts = |bot: Option<&'static [u64]>| {
            let bot_roles: Option<Vec<Snowflake>> = bot.map(|b| b.iter().copied().map(s).collect());
            bot_roles
        };
        // (name, the bot's roles, the role to check, the expected problem codes)
        type Case = (
            &'static str,
            Option<&'static [u64]>,
            Option<u64>,
            Vec<&'static str>,
        );
        let cases: Vec<Case> = vec![
            ("fine", Some(&[20]), Some(30), vec![]),
            ("membership only", Some(&[20]), None, vec![]),
            (
                "bot not in guild",
                None,
                Some(30),
                vec!["discord_bot_not_in_guild"],
            ),
            (
                "no permissions at all",
                Some(&[]),
                None,
                vec!["discord_missing_permissions"; 3],
            ),
            (
                "only manage roles",
                Some(&[70]),
                Some(30),
                vec!["discord_missing_permissions"; 2],
            ),
            ("administrator implies all", Some(&[60]), Some(30), vec![]),
            (
                "unknown role",
                Some(&[20]),
                Some(99),
                vec!["discord_unknown_role"],
            ),
            (
                "@everyone",
                Some(&[20]),
                Some(g),
                vec!["discord_role_is_everyone"],
            ),
            (
                "managed role",
                Some(&[20]),
                Some(50),
                vec!["discord_role_managed"],
            ),
            (
                "role above the bot",
                Some(&[20]),
                Some(40),
                vec!["discord_role_hierarchy"],
            ),
            (
                "role level with the bot",
                Some(&[20]),
                Some(60),
                vec!["discord_role_hierarchy"],
            ),
        ];
        for (name, bot, role_id, codes) in cases {
            let bot_roles = facts(bot);
            let problems = check(
                &GuildFacts {
                    guild_id: s(g),
                    guild_name: "Acme",
                    roles: &roles,
                    bot_roles: bot_roles.as_deref(),
                },
                role_id.map(s),
            );
            let got: Vec<&str> = problems.iter().map(|p| p.code).collect();
            assert_eq!(got, codes, "{name}: {problems:?}");
            assert!(problems.iter().all(|p| !p.message.is_empty()));
        }
    }
}
