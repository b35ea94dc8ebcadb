//! What a failed Discord call means for the caller. The syncer matches on these
//! variants: wait and retry, move to a delay tier, or fail the grant for a human.

use std::time::Duration;

use super::stops::StopKey;

/// Failures only a person can fix; the stable `error_code` of a failed grant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HumanCode {
    MissingPermissions,
    RoleHierarchy,
    UnknownGuild,
    UnknownRole,
    UserBanned,
    TooManyGuilds,
    ReauthorizationRequired,
    /// The server is connected to another business now: this grant's business gives no
    /// access there.
    GuildHeldByAnother,
}

impl HumanCode {
    pub fn as_str(self) -> &'static str {
        match self {
            HumanCode::MissingPermissions => "discord_missing_permissions",
            HumanCode::RoleHierarchy => "discord_role_hierarchy",
            HumanCode::UnknownGuild => "discord_unknown_guild",
            HumanCode::UnknownRole => "discord_unknown_role",
            HumanCode::UserBanned => "discord_user_banned",
            HumanCode::TooManyGuilds => "discord_too_many_guilds",
            HumanCode::ReauthorizationRequired => "discord_reauthorization_required",
            HumanCode::GuildHeldByAnother => "discord_guild_held_by_another",
        }
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum DiscordError {
    /// Discord (or our own budget) says wait this long. Short waits are absorbed by the
    /// client; what reaches a caller is long enough for a delay tier.
    #[error("rate limited by Discord for {retry_after:?}")]
    RateLimited { retry_after: Duration },
    /// Too many calls are waiting for this process's side budget: this one got no slot
    /// within `discord.side_queue_timeout` and was not sent. Try again shortly.
    #[error("too many requests are waiting for Discord; none could be sent within {waited:?}")]
    Busy { waited: Duration },
    /// 5xx, timeouts, connection failures: try again later.
    #[error("Discord is unavailable: {0}")]
    Retriable(String),
    /// guildgate stopped calling because too many 401/403/429 answers arrived in the
    /// last 10 minutes (Discord bans the IP at 10,000).
    #[error("paused: too many invalid Discord requests in the last 10 minutes")]
    CeilingReached { retry_after: Duration },
    /// Not sent: Discord refused the bot's token (401) within the last
    /// [`crate::discord::client::TOKEN_REFUSED_FOR`]: its token was reset or the bot
    /// deleted. A business registers its application again with the new token; for the
    /// shared bot, `discord.bot_token` is fixed.
    #[error(
        "not sent: Discord refused the bot's token lately (it was reset or the bot deleted); calls resume shortly, or once the token is replaced"
    )]
    TokenRefused { retry_after: Duration },
    /// Not sent: the bot just lost access to the server (or may not manage the role)
    /// and the request would only earn an invalid answer. See [`crate::discord::stops`].
    #[error("not sent: the bot lately had no access there ({key:?})")]
    Stopped { key: StopKey },
    /// A merchant (or the customer) must change something first.
    #[error("{message}")]
    NeedsHuman { code: HumanCode, message: String },
    /// The customer's token is revoked, expired beyond refresh, or not theirs.
    #[error("the customer's Discord authorization is no longer valid")]
    BadUserToken,
    /// Discord refused an application's credentials (a bot token or a client secret
    /// being checked before they are stored).
    #[error("Discord refused the application's credentials")]
    BadCredentials,
    /// An answer guildgate does not expect (a bug on one side): retried like an outage.
    #[error("unexpected Discord answer {status} (code {code:?}): {message}")]
    Unexpected {
        status: u16,
        code: Option<u64>,
        message: String,
    },
}

impl DiscordError {
    pub fn human(code: HumanCode, message: impl Into<String>) -> Self {
        DiscordError::NeedsHuman {
            code,
            message: message.into(),
        }
    }

    /// The `error_code` a grant gets for this error, if a human is needed.
    pub fn human_code(&self) -> Option<HumanCode> {
        match self {
            DiscordError::NeedsHuman { code, .. } => Some(*code),
            DiscordError::BadUserToken => Some(HumanCode::ReauthorizationRequired),
            _ => None,
        }
    }

    /// How long to wait at least before trying again, for transient errors.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            DiscordError::RateLimited { retry_after }
            | DiscordError::CeilingReached { retry_after }
            | DiscordError::TokenRefused { retry_after } => Some(*retry_after),
            DiscordError::Retriable(_)
            | DiscordError::Busy { .. }
            | DiscordError::Stopped { .. }
            | DiscordError::Unexpected { .. } => Some(Duration::ZERO),
            DiscordError::NeedsHuman { .. }
            | DiscordError::BadUserToken
            | DiscordError::BadCredentials => None,
        }
    }
}
