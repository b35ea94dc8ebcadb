-- no-transaction
-- A save of an entitlement lifts its stops and takes back the sync jobs that waited on
-- them, found by server or by entitlement: without this index the second half read the
-- whole table, every business's waiting jobs, inside the save's bounded statement. Built
-- CONCURRENTLY, so the syncer keeps writing while it builds (hence no transaction, and a
-- single statement).
CREATE INDEX CONCURRENTLY IF NOT EXISTS discord_sync_waiting_entitlement ON discord_sync_waiting (entitlement_id);
