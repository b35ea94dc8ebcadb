-- A business's own Discord application: its bot serves the business's servers, its
-- OAuth client links the business's customers, and its traffic counts against its own
-- global limit. Without a row the business uses the shared bot of the configuration.
-- The secrets are sealed like customers' tokens (associated data naming the row and the
-- column, the key's id beside them). An application serves one business: two businesses
-- on one bot would share its limits and its stops.
CREATE TABLE discord_applications (
    business_id       text PRIMARY KEY REFERENCES businesses (id),
    client_id         text NOT NULL UNIQUE,
    client_secret_enc bytea NOT NULL,
    bot_token_enc     bytea NOT NULL,
    key_id            text NOT NULL,
    bot_username      text NOT NULL,
    created_at        timestamptz NOT NULL,
    updated_at        timestamptz NOT NULL
);

-- The application a customer's tokens were issued to (NULL: the shared one): a token is
-- refreshed and revoked with its own application's credentials, and only that
-- application's bot may add the customer to a server with it.
ALTER TABLE discord_links ADD COLUMN client_id text;

-- Sync jobs of a bot whose jobs already fill its share of the syncer wait here instead
-- of in the broker's prefetch, where they would hold up every other bot's jobs: the
-- job is acked once its row is written, and a drainer per bot (the holder of the bot's
-- `discord_sync_draining` lease, renewed as it takes rows) runs them as the bot's jobs
-- finish. Jobs name a grant, not a change: one row per grant is enough, and a job that
-- arrives while its grant's row is being run sets `again` so it runs once more. A new
-- holder of a bot's lease gives back the rows a previous holder took and never finished.
CREATE TABLE discord_sync_parked (
    grant_id   text PRIMARY KEY,
    bot        text NOT NULL,
    attempt    integer NOT NULL,
    parked_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- The process running it (the drainer's lease holder); NULL: waiting.
    taken_by   text,
    again      boolean NOT NULL DEFAULT false
);
CREATE INDEX discord_sync_parked_bot ON discord_sync_parked (bot, parked_at) WHERE taken_by IS NULL;
CREATE TABLE discord_sync_draining (
    bot          text PRIMARY KEY,
    holder       text NOT NULL,
    lease_until  timestamptz NOT NULL
);

-- A pending account switch keeps the application its tokens were issued to as well.
ALTER TABLE account_switches ADD COLUMN client_id text;
