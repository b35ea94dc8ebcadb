-- A Discord server is connected to the business that proved, through Discord's own
-- code exchange, that it installed the bot there; and to one business at a time.
--
-- Rows written before this migration came from the callback's query string, which any
-- merchant could set to any server the bot was in. Where one business alone holds a
-- server the connection is kept (the bot really is there, and no one else claims it);
-- where several businesses hold the same server, none of them can be believed, so every
-- one of those rows needs a fresh install, and their entitlements are refused on save
-- until then.
ALTER TABLE discord_guilds
    ADD COLUMN installed_by    text,                  -- Discord user id of the installer
    ADD COLUMN needs_reinstall boolean NOT NULL DEFAULT false;

UPDATE discord_guilds SET needs_reinstall = true
WHERE guild_id IN (SELECT guild_id FROM discord_guilds GROUP BY guild_id HAVING count(*) > 1);

-- One business per server among the connections that count.
CREATE UNIQUE INDEX discord_guilds_one_business ON discord_guilds (guild_id)
    WHERE NOT needs_reinstall;

-- Bot-install links: each `state` names one row, consumed by its first use.
CREATE TABLE bot_install_states (
    nonce        text PRIMARY KEY,
    business_id  text NOT NULL REFERENCES businesses (id),
    created_at   timestamptz NOT NULL,
    expires_at   timestamptz NOT NULL
);
CREATE INDEX bot_install_states_expiry ON bot_install_states (expires_at);
