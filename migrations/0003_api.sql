-- The merchant REST API: API keys and the Discord servers merchants connected.

-- A merchant's API keys. Only a SHA-256 of the secret part is stored: keys are 240-bit
-- random strings, so a fast hash is enough (nothing to brute-force) and a leaked table
-- reveals no usable key. The key text names its row (`gg_<id>_<secret>`), so lookup is
-- by primary key and the hash is compared in constant time.
CREATE TABLE api_keys (
    id           text PRIMARY KEY,                 -- key_…
    business_id  text NOT NULL REFERENCES businesses (id),
    name         text,
    key_hash     bytea NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    revoked_at   timestamptz
);
CREATE INDEX api_keys_business ON api_keys (business_id);

-- Discord servers a merchant installed guildgate's bot into (bot install callback).
CREATE TABLE discord_guilds (
    business_id   text NOT NULL REFERENCES businesses (id),
    guild_id      text NOT NULL,
    name          text,
    permissions   bigint,                          -- as granted at install time
    installed_at  timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (business_id, guild_id)
);

-- Listing a business's entitlements newest first, and its grants per customer.
CREATE INDEX entitlements_business_created ON entitlements (business_id, created_at DESC, id DESC)
    WHERE deleted_at IS NULL;
CREATE INDEX grants_entitlement_created ON grants (entitlement_id, created_at DESC, id DESC);
