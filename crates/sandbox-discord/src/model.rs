//! The simulated Discord world: users, guilds, roles, members, plus the
//! builder ("spec") and inspection ("view") types of the public API.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

/// Permission bits (a subset of Discord's bitfield) and helpers.
pub mod permissions {
    /// Create Instant Invite (required to add members with `guilds.join`).
    pub const CREATE_INSTANT_INVITE: u64 = 1 << 0;
    /// Kick Members.
    pub const KICK_MEMBERS: u64 = 1 << 1;
    /// Ban Members.
    pub const BAN_MEMBERS: u64 = 1 << 2;
    /// Administrator: implies every permission.
    pub const ADMINISTRATOR: u64 = 1 << 3;
    /// Manage Guild.
    pub const MANAGE_GUILD: u64 = 1 << 5;
    /// View Channel.
    pub const VIEW_CHANNEL: u64 = 1 << 10;
    /// Send Messages.
    pub const SEND_MESSAGES: u64 = 1 << 11;
    /// Manage Nicknames (required for `nick` when adding a member).
    pub const MANAGE_NICKNAMES: u64 = 1 << 27;
    /// Manage Roles.
    pub const MANAGE_ROLES: u64 = 1 << 28;
    /// Every permission bit Discord currently defines (bits 0..=50).
    pub const ALL: u64 = (1 << 51) - 1;
}

use permissions::{ADMINISTRATOR, ALL};

/// Milliseconds of the Discord epoch (2015-01-01T00:00:00Z).
pub const DISCORD_EPOCH_MS: u64 = 1_420_070_400_000;

/// Generates realistic, strictly increasing snowflakes.
#[derive(Debug, Default)]
pub(crate) struct Snowflakes {
    last: u64,
}

impl Snowflakes {
    pub(crate) fn next(&mut self) -> u64 {
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(DISCORD_EPOCH_MS)
            .saturating_sub(DISCORD_EPOCH_MS);
        let id = (ms << 22) | (1 << 17);
        self.last = id.max(self.last + 1);
        self.last
    }

    /// Makes sure generated ids never collide with an explicitly chosen one.
    pub(crate) fn observe(&mut self, id: u64) {
        self.last = self.last.max(id);
    }
}

#[derive(Clone, Debug)]
pub(crate) struct User {
    pub id: u64,
    pub username: String,
    pub global_name: Option<String>,
    pub bot: bool,
    pub at_guild_limit: bool,
}

impl User {
    pub(crate) fn json(&self) -> Value {
        let mut v = json!({
            "id": self.id.to_string(),
            "username": self.username,
            "global_name": self.global_name,
            "avatar": null,
            "discriminator": "0",
            "public_flags": 0,
            "flags": 0,
            "banner": null,
            "accent_color": null,
            "avatar_decoration_data": null,
        });
        if self.bot {
            v["bot"] = Value::Bool(true);
        }
        v
    }
}

#[derive(Clone, Debug)]
pub(crate) struct Role {
    pub id: u64,
    pub name: String,
    pub position: i64,
    pub permissions: u64,
    pub managed: bool,
    /// Set for the integration role of a bot.
    pub bot_id: Option<u64>,
}

impl Role {
    pub(crate) fn json(&self) -> Value {
        let mut v = json!({
            "id": self.id.to_string(),
            "name": self.name,
            "color": 0,
            "hoist": false,
            "icon": null,
            "unicode_emoji": null,
            "position": self.position,
            "permissions": self.permissions.to_string(),
            "managed": self.managed,
            "mentionable": false,
            "flags": 0,
        });
        if let Some(bot) = self.bot_id {
            v["tags"] = json!({ "bot_id": bot.to_string() });
        }
        v
    }

    fn view(&self) -> RoleView {
        RoleView {
            id: self.id,
            name: self.name.clone(),
            position: self.position,
            permissions: self.permissions,
            managed: self.managed,
        }
    }
}

#[derive(Clone, Debug)]
pub(crate) struct Member {
    pub user_id: u64,
    pub roles: BTreeSet<u64>,
    pub nick: Option<String>,
    pub joined_at: SystemTime,
}

#[derive(Clone, Debug)]
pub(crate) struct Guild {
    pub id: u64,
    pub name: String,
    pub owner_id: u64,
    pub roles: BTreeMap<u64, Role>,
    pub members: BTreeMap<u64, Member>,
    pub bans: BTreeSet<u64>,
}

impl Guild {
    /// Base permissions of a member: owner → all; otherwise @everyone plus
    /// every role, and ADMINISTRATOR expands to all. Non-members have none.
    pub(crate) fn permissions_of(&self, user_id: u64) -> u64 {
        if user_id == self.owner_id {
            return ALL;
        }
        let Some(member) = self.members.get(&user_id) else {
            return 0;
        };
        let mut perms = self.roles.get(&self.id).map_or(0, |r| r.permissions);
        for role in member.roles.iter().filter_map(|r| self.roles.get(r)) {
            perms |= role.permissions;
        }
        if perms & ADMINISTRATOR != 0 {
            ALL
        } else {
            perms
        }
    }

    /// Position of the member's highest role (0 = only @everyone).
    pub(crate) fn highest_position(&self, user_id: u64) -> i64 {
        self.members.get(&user_id).map_or(0, |m| {
            m.roles
                .iter()
                .filter_map(|r| self.roles.get(r))
                .map(|r| r.position)
                .max()
                .unwrap_or(0)
                .max(0)
        })
    }

    /// Whether `actor` may assign/remove `role` by hierarchy: the role must be
    /// strictly below the actor's highest role (the owner may manage all).
    pub(crate) fn outranks_role(&self, actor: u64, role: &Role) -> bool {
        actor == self.owner_id || role.position < self.highest_position(actor)
    }

    /// Whether `actor` may act on member `target` (kick) by hierarchy.
    pub(crate) fn outranks_member(&self, actor: u64, target: u64) -> bool {
        if target == self.owner_id {
            return false;
        }
        actor == self.owner_id || self.highest_position(target) < self.highest_position(actor)
    }

    pub(crate) fn top_position(&self) -> i64 {
        self.roles.values().map(|r| r.position).max().unwrap_or(0)
    }

    pub(crate) fn sorted_roles(&self) -> Vec<&Role> {
        let mut roles: Vec<&Role> = self.roles.values().collect();
        roles.sort_by_key(|r| (r.position, r.id));
        roles
    }

    pub(crate) fn json(&self) -> Value {
        json!({
            "id": self.id.to_string(),
            "name": self.name,
            "icon": null,
            "icon_hash": null,
            "splash": null,
            "discovery_splash": null,
            "owner_id": self.owner_id.to_string(),
            "afk_channel_id": null,
            "afk_timeout": 300,
            "widget_enabled": false,
            "verification_level": 0,
            "default_message_notifications": 0,
            "explicit_content_filter": 0,
            "roles": self.sorted_roles().iter().map(|r| r.json()).collect::<Vec<_>>(),
            "emojis": [],
            "features": [],
            "mfa_level": 0,
            "application_id": null,
            "system_channel_id": null,
            "system_channel_flags": 0,
            "rules_channel_id": null,
            "max_members": 500000,
            "vanity_url_code": null,
            "description": null,
            "banner": null,
            "premium_tier": 0,
            "premium_subscription_count": 0,
            "preferred_locale": "en-US",
            "public_updates_channel_id": null,
            "nsfw_level": 0,
            "premium_progress_bar_enabled": false,
            "stickers": [],
        })
    }

    pub(crate) fn member_json(&self, member: &Member, user: Option<&User>) -> Value {
        let user = user.map_or_else(
            || json!({ "id": member.user_id.to_string(), "username": "unknown", "discriminator": "0", "global_name": null, "avatar": null }),
            User::json,
        );
        json!({
            "user": user,
            "nick": member.nick,
            "avatar": null,
            "banner": null,
            "roles": member.roles.iter().map(|r| r.to_string()).collect::<Vec<_>>(),
            "joined_at": crate::util::iso8601(member.joined_at),
            "premium_since": null,
            "deaf": false,
            "mute": false,
            "flags": 0,
            "pending": false,
            "communication_disabled_until": null,
        })
    }

    pub(crate) fn member_view(&self, member: &Member) -> MemberView {
        MemberView {
            guild_id: self.id,
            user_id: member.user_id,
            roles: member.roles.iter().copied().collect(),
            nick: member.nick.clone(),
            joined_at: member.joined_at,
        }
    }

    pub(crate) fn role_views(&self) -> Vec<RoleView> {
        self.sorted_roles().into_iter().map(Role::view).collect()
    }
}

#[derive(Debug, Default)]
pub(crate) struct World {
    pub users: BTreeMap<u64, User>,
    pub guilds: BTreeMap<u64, Guild>,
}

// ---------------------------------------------------------------------------
// Public builder and view types
// ---------------------------------------------------------------------------

/// A role to create (see [`GuildSpec::with_role_spec`] and
/// [`Sandbox::add_role`](crate::Sandbox::add_role)).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoleSpec {
    /// Role id; generated when `None`.
    pub id: Option<u64>,
    /// Role name.
    pub name: String,
    /// Position in the hierarchy (higher = more powerful; @everyone is 0).
    pub position: i64,
    /// Permission bitfield.
    pub permissions: u64,
    /// Managed by an integration (cannot be assigned or removed by anyone).
    pub managed: bool,
}

impl RoleSpec {
    /// A plain role without permissions.
    pub fn new(name: impl Into<String>, position: i64) -> Self {
        Self {
            id: None,
            name: name.into(),
            position,
            permissions: 0,
            managed: false,
        }
    }

    /// Sets the permission bitfield.
    pub fn permissions(mut self, permissions: u64) -> Self {
        self.permissions = permissions;
        self
    }

    /// Marks the role as managed by an integration.
    pub fn managed(mut self) -> Self {
        self.managed = true;
        self
    }

    /// Uses a fixed id.
    pub fn with_id(mut self, id: u64) -> Self {
        self.id = Some(id);
        self
    }
}

/// A guild to create with [`Sandbox::add_guild`](crate::Sandbox::add_guild).
///
/// By default the guild has a freshly created owner user, an `@everyone`
/// role with **no** permissions (real Discord grants a few basic ones; the
/// sandbox starts from zero so the bot's permissions are exactly what a test
/// grants), and the bot as a member holding its managed integration role
/// (named after the bot, no permissions, placed above every other role).
#[derive(Clone, Debug)]
pub struct GuildSpec {
    pub(crate) id: Option<u64>,
    pub(crate) name: String,
    pub(crate) owner: Option<u64>,
    pub(crate) everyone_permissions: u64,
    pub(crate) bot: bool,
    pub(crate) bot_permissions: u64,
    pub(crate) bot_role_position: Option<i64>,
    pub(crate) roles: Vec<RoleSpec>,
}

impl GuildSpec {
    /// A guild named `name`.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            id: None,
            name: name.into(),
            owner: None,
            everyone_permissions: 0,
            bot: true,
            bot_permissions: 0,
            bot_role_position: None,
            roles: Vec::new(),
        }
    }

    /// Uses a fixed guild id (also the id of its `@everyone` role).
    pub fn with_id(mut self, id: u64) -> Self {
        self.id = Some(id);
        self
    }

    /// Makes an existing user the owner (instead of creating one).
    pub fn with_owner(mut self, user_id: u64) -> Self {
        self.owner = Some(user_id);
        self
    }

    /// Permissions of the `@everyone` role.
    pub fn with_everyone_permissions(mut self, permissions: u64) -> Self {
        self.everyone_permissions = permissions;
        self
    }

    /// Permissions of the bot's managed role.
    pub fn with_bot_permissions(mut self, permissions: u64) -> Self {
        self.bot = true;
        self.bot_permissions = permissions;
        self
    }

    /// Position of the bot's managed role (default: above all other roles).
    pub fn with_bot_role_position(mut self, position: i64) -> Self {
        self.bot_role_position = Some(position);
        self
    }

    /// The bot is not a member of this guild.
    pub fn without_bot(mut self) -> Self {
        self.bot = false;
        self
    }

    /// Adds a role without permissions at `position` (use positions >= 1).
    pub fn with_role(mut self, name: impl Into<String>, position: i64) -> Self {
        self.roles.push(RoleSpec::new(name, position));
        self
    }

    /// Adds a fully specified role.
    pub fn with_role_spec(mut self, role: RoleSpec) -> Self {
        self.roles.push(role);
        self
    }
}

/// Ids generated by [`Sandbox::add_guild`](crate::Sandbox::add_guild).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuildIds {
    /// The guild.
    pub guild_id: u64,
    /// The `@everyone` role (same as `guild_id`).
    pub everyone_role_id: u64,
    /// The owner user.
    pub owner_id: u64,
    /// The bot's managed role, if the bot is in the guild.
    pub bot_role_id: Option<u64>,
    /// The roles from [`GuildSpec::with_role`], in spec order.
    pub roles: Vec<(String, u64)>,
}

impl GuildIds {
    /// Id of the spec role called `name`.
    ///
    /// # Panics
    /// If no such role was in the spec.
    pub fn role(&self, name: &str) -> u64 {
        self.roles
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, id)| *id)
            .unwrap_or_else(|| panic!("no role named {name:?} in this guild spec"))
    }
}

/// A user to create with [`Sandbox::add_user`](crate::Sandbox::add_user).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserSpec {
    pub(crate) id: Option<u64>,
    pub(crate) username: String,
    pub(crate) global_name: Option<String>,
    pub(crate) banned_from: Vec<u64>,
    pub(crate) at_guild_limit: bool,
}

impl UserSpec {
    /// A user called `username`.
    pub fn new(username: impl Into<String>) -> Self {
        Self {
            id: None,
            username: username.into(),
            global_name: None,
            banned_from: Vec::new(),
            at_guild_limit: false,
        }
    }

    /// Uses a fixed id.
    pub fn with_id(mut self, id: u64) -> Self {
        self.id = Some(id);
        self
    }

    /// Sets the display name.
    pub fn global_name(mut self, name: impl Into<String>) -> Self {
        self.global_name = Some(name.into());
        self
    }

    /// The user is banned from `guild_id` (adding them fails with 40007).
    pub fn banned_from(mut self, guild_id: u64) -> Self {
        self.banned_from.push(guild_id);
        self
    }

    /// The user is already in the maximum number of guilds (adding them
    /// fails with 30001).
    pub fn at_guild_limit(mut self) -> Self {
        self.at_guild_limit = true;
        self
    }
}

/// A snapshot of a guild member.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberView {
    /// The guild.
    pub guild_id: u64,
    /// The user.
    pub user_id: u64,
    /// Role ids, without `@everyone`, ascending.
    pub roles: Vec<u64>,
    /// Nickname.
    pub nick: Option<String>,
    /// When the member joined.
    pub joined_at: SystemTime,
}

/// A snapshot of a role.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoleView {
    /// Role id.
    pub id: u64,
    /// Name.
    pub name: String,
    /// Position.
    pub position: i64,
    /// Permission bitfield.
    pub permissions: u64,
    /// Managed by an integration.
    pub managed: bool,
}
