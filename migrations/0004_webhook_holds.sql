-- A message whose endpoint hangs (every request slot taken, none finishing) or whose
-- circuit is open waits here instead of cycling through the broker: its job is acked
-- once `held_until` is written, and the hold releaser gives it a new job (carrying
-- `held_attempt` and `hold_count`) when that time has come. `hold_count` counts the
-- holds since the last attempt; each doubles the wait.
ALTER TABLE webhook_messages
    ADD COLUMN held_until   timestamptz,
    ADD COLUMN held_attempt int NOT NULL DEFAULT 0,
    ADD COLUMN hold_count   int NOT NULL DEFAULT 0;
CREATE INDEX webhook_messages_held ON webhook_messages (held_until) WHERE held_until IS NOT NULL;
CREATE INDEX webhook_messages_held_endpoint ON webhook_messages (endpoint_id) WHERE held_until IS NOT NULL;
