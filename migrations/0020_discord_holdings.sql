-- guildgate takes away only what it gave, and never what another purchase still pays
-- for. Two records make that possible:
--
-- `discord_holdings`: per Discord account, every access guildgate has given in a server
-- (the membership, `role_id` ''; or a role), whether it was already there when guildgate
-- first gave it (`found`: a member who joined before buying, a role a moderator gave),
-- and since when. Which grants hold an access is read from the grants themselves (what
-- each applied, or is about to apply), across customers and businesses.
--
-- `grants.intent_*`: what a grant is about to apply when it already holds something
-- else (an account switch, a role change), recorded before the call to Discord, so a
-- crash between the call and its record leaves both accesses held and the next run
-- releases the one that is no longer wanted.
ALTER TABLE grants
    ADD COLUMN intent_user_id text,
    ADD COLUMN intent_guild_id text,
    ADD COLUMN intent_role_id text;

CREATE TABLE discord_holdings (
    guild_id text NOT NULL,
    user_id text NOT NULL,
    role_id text NOT NULL DEFAULT '',
    found boolean NOT NULL,
    since timestamptz NOT NULL,
    PRIMARY KEY (guild_id, user_id, role_id)
);

-- What grants recorded as applied until now is what guildgate added: the code added
-- (and would have removed) all of it.
INSERT INTO discord_holdings (guild_id, user_id, role_id, found, since)
SELECT applied_guild_id, applied_user_id, coalesce(applied_role_id, ''), false, min(updated_at)
FROM grants
WHERE applied_user_id IS NOT NULL AND applied_guild_id IS NOT NULL
GROUP BY 1, 2, 3
UNION
SELECT applied_guild_id, applied_user_id, '', false, min(updated_at)
FROM grants
WHERE applied_user_id IS NOT NULL AND applied_guild_id IS NOT NULL
GROUP BY 1, 2
ON CONFLICT DO NOTHING;

-- Who else holds an access in a server: looked up per Discord account.
CREATE INDEX grants_applied_account ON grants (applied_guild_id, applied_user_id)
    WHERE applied_user_id IS NOT NULL;
CREATE INDEX grants_intent_account ON grants (intent_guild_id, intent_user_id)
    WHERE intent_user_id IS NOT NULL;

-- The customer's page says when the account they link is linked to another customer of
-- the business too (two checkouts under two emails).
CREATE INDEX discord_links_account ON discord_links (business_id, discord_user_id);
