-- Ingest writes the grant events of one batch as one outbox row (kind 'grant_events': a
-- JSON array of webhook bodies, in order), relayed as one message to
-- <prefix>.grant-events, where the fan-out handles each element as it would a single
-- grant event. One row and one message per batch instead of one per grant event: each row
-- costs an insert, a claim and a delete, and each message a durable quorum-queue write and
-- a publisher confirm. Single grant events (kind 'grant_event') stay for the syncer and
-- the API.
ALTER TABLE outbox DROP CONSTRAINT outbox_kind_check;
ALTER TABLE outbox ADD CONSTRAINT outbox_kind_check
    CHECK (kind IN ('grant_event', 'grant_events', 'sync', 'webhook'));
