-- The customer's access page: the names of the Discord account a customer connected
-- (shown on the page; NULL for links made before, which show the account's id), and
-- switches to another account waiting for the customer's confirmation.
-- `entitlements.role_name`: the role's name as Discord gave it when the merchant's
-- configuration was last checked (NULL for entitlements saved before: the page leaves
-- the role out).
ALTER TABLE entitlements ADD COLUMN role_name text;
ALTER TABLE discord_links
    ADD COLUMN username text,
    ADD COLUMN global_name text;

-- An account the customer authorized on Discord to switch to, until they confirm (or
-- `expires_at` passes). Its tokens are sealed for the customer's `discord_links` row,
-- which they move to as they are.
CREATE TABLE account_switches (
    id                 text COLLATE "C" PRIMARY KEY,
    business_id        text NOT NULL REFERENCES businesses (id),
    customer_id        text COLLATE "C" NOT NULL,
    discord_user_id    text NOT NULL,
    username           text NOT NULL,
    global_name        text,
    access_token_enc   bytea NOT NULL,
    refresh_token_enc  bytea,
    token_key_id       text NOT NULL,
    token_expires_at   timestamptz NOT NULL,
    scopes             text NOT NULL,
    expires_at         timestamptz NOT NULL,
    created_at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX account_switches_expiry ON account_switches (expires_at);
