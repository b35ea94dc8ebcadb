-- Where the bot has lost access, the syncer stops calling Discord instead of earning an
-- invalid answer per queued job (Discord bans an address at 10,000 in 10 minutes).
-- A row with no entitlement stops a whole server (the bot was removed: 50001, 10004);
-- a row with one stops that entitlement (a permission or the role hierarchy: 50013).
-- A save of the entitlement that validates against Discord removes the stop.
CREATE TABLE discord_stops (
    guild_id text NOT NULL,
    entitlement_id text COLLATE "C" REFERENCES entitlements (id) ON DELETE CASCADE,
    code text NOT NULL,
    message text NOT NULL,
    since timestamptz NOT NULL
);
CREATE UNIQUE INDEX discord_stops_scope ON discord_stops (guild_id, coalesce(entitlement_id, ''));

-- Grants whose sync jobs were acknowledged while their server or entitlement was
-- stopped: the resume queues them again from here, so the queue never holds them.
CREATE TABLE discord_sync_waiting (
    grant_id text COLLATE "C" PRIMARY KEY REFERENCES grants (id) ON DELETE CASCADE,
    guild_id text NOT NULL,
    entitlement_id text COLLATE "C" NOT NULL,
    since timestamptz NOT NULL
);
CREATE INDEX discord_sync_waiting_guild ON discord_sync_waiting (guild_id);
