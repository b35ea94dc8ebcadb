-- A message whose endpoint is at its in-flight cap (busy, still answering) waits here
-- in order instead of cycling through the broker: its job is acked once `parked_at` is
-- written, and the process that parked it pulls the endpoint's parked messages, oldest
-- first, as the endpoint's requests finish. A row of `webhook_parking` says that some
-- process pulls an endpoint's parked messages, renewed with every pull; once its lease
-- has run out (that process stopped), the hold releaser gives them jobs again.
ALTER TABLE webhook_messages ADD COLUMN parked_at timestamptz;
-- Parked and not taken: a message taken to be sent keeps `parked_at` and is held
-- (`held_until`) until its attempt is recorded.
CREATE INDEX webhook_messages_parked
    ON webhook_messages (endpoint_id, parked_at, id) WHERE parked_at IS NOT NULL AND held_until IS NULL;
CREATE TABLE webhook_parking (
    endpoint_id text PRIMARY KEY REFERENCES webhook_endpoints (id) ON DELETE CASCADE,
    lease_until timestamptz NOT NULL
);
CREATE INDEX webhook_parking_lease ON webhook_parking (lease_until);
