-- Parked messages get narrow rows of their own. Parking a message, taking it to be sent
-- and recording its attempt each rewrote its whole `webhook_messages` row (the body
-- included) with new entries in every index of the table, three rewrites where a message
-- sent at once has one. Now parking inserts a row here, taking it sets `taken_until`,
-- and the attempt's record deletes it: the message's own row is rewritten once, by the
-- record, whatever waited before.
--
-- A row without `taken_until` is parked: the endpoint's puller takes it in
-- `(parked_at, message_id)` order. A row with `taken_until` was taken to be sent and is
-- given a job again by the hold releaser at that time should its attempt never be
-- recorded (the process stopped). `attempt` and `hold_count` are those of the job that
-- parked it, carried by the job it gets back.
CREATE TABLE webhook_parked (
    message_id   text PRIMARY KEY REFERENCES webhook_messages (id) ON DELETE CASCADE,
    endpoint_id  text NOT NULL,
    parked_at    timestamptz NOT NULL,
    taken_until  timestamptz,
    attempt      int NOT NULL DEFAULT 0,
    hold_count   int NOT NULL DEFAULT 0
);
CREATE INDEX webhook_parked_waiting
    ON webhook_parked (endpoint_id, parked_at, message_id) WHERE taken_until IS NULL;
CREATE INDEX webhook_parked_taken ON webhook_parked (taken_until) WHERE taken_until IS NOT NULL;

-- What is parked or taken now moves over, in the same state.
INSERT INTO webhook_parked (message_id, endpoint_id, parked_at, taken_until, attempt, hold_count)
SELECT id, endpoint_id, parked_at, held_until, held_attempt, hold_count
FROM webhook_messages WHERE parked_at IS NOT NULL AND status = 'pending';
UPDATE webhook_messages SET held_until = NULL WHERE parked_at IS NOT NULL AND held_until IS NOT NULL;

DROP INDEX webhook_messages_parked;
ALTER TABLE webhook_messages DROP COLUMN parked_at;
