-- What happened to each grant, for the merchant's support: linked, account switched,
-- what the syncer did in Discord (with Discord's answer) and what it left in place,
-- delivered, failed, waiting on a stopped server. Creation and revocation are read
-- from the grant itself.
CREATE TABLE grant_history (
    id bigserial PRIMARY KEY,
    grant_id text COLLATE "C" NOT NULL REFERENCES grants (id) ON DELETE CASCADE,
    at timestamptz NOT NULL,
    event text NOT NULL,
    detail jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX grant_history_grant ON grant_history (grant_id, id);
