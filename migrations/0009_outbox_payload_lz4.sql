-- An ingest batch's grant webhooks make an outbox payload of 100-200 kB, stored out of line
-- and compressed (TOAST). pglz, the default, was PostgreSQL's largest CPU cost per batch
-- after the inserts themselves; lz4 compresses such JSON about as small at a fifth of the
-- CPU (and decompresses faster when the relay reads it). A server built without lz4, or
-- older than PostgreSQL 14, keeps pglz.
DO $$
BEGIN
    ALTER TABLE outbox ALTER COLUMN payload SET COMPRESSION lz4;
EXCEPTION WHEN feature_not_supported OR syntax_error THEN
    RAISE NOTICE 'outbox.payload keeps pglz: %', SQLERRM;
END $$;
