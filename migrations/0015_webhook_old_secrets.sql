-- Every secret an endpoint was rotated away from keeps signing until its own overlap
-- window ends. With one previous_secret column a second rotation within the window
-- dropped the first secret at once, and receivers still on it refused every message.
-- webhook_endpoints.previous_secret and previous_secret_expires_at are still written
-- (the latest one) for releases before this migration during a rolling upgrade; this
-- release reads only this table.
CREATE TABLE webhook_endpoint_old_secrets (
    endpoint_id  text NOT NULL REFERENCES webhook_endpoints (id) ON DELETE CASCADE,
    secret       text NOT NULL,
    expires_at   timestamptz NOT NULL,
    PRIMARY KEY (endpoint_id, secret)
);

INSERT INTO webhook_endpoint_old_secrets (endpoint_id, secret, expires_at)
SELECT id, previous_secret, previous_secret_expires_at
FROM webhook_endpoints
WHERE previous_secret IS NOT NULL AND previous_secret_expires_at > now();
