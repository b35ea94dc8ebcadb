-- no-transaction
-- Applied event ids are pruned once older than ingest.processed_retention; this index
-- finds them oldest first without reading the whole table. Built CONCURRENTLY, so ingest
-- keeps writing while it builds (hence no transaction, and a single statement). Keys
-- arrive in increasing order, so an insert lands on the rightmost leaf.
CREATE INDEX CONCURRENTLY IF NOT EXISTS processed_events_processed_at ON processed_events (processed_at);
