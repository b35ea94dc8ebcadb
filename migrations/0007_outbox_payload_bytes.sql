-- The outbox keeps the exact bytes the relay publishes. As jsonb, every body was parsed on
-- insert and printed again when claimed, and the relay parsed and re-serialised it: for
-- the grant webhooks of every ingest batch, a cost on the hot path for a value nothing
-- queries inside. (jsonb also re-sorted each body's keys.)
ALTER TABLE outbox ALTER COLUMN payload TYPE bytea USING convert_to(payload::text, 'UTF8');
