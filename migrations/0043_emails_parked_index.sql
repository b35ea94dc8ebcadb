-- no-transaction
-- A business's parked emails, oldest first: the email upkeep releases them in that
-- order, and the worker parks a new email behind older ones that are due. Only parked
-- rows are in it. Built CONCURRENTLY, so the email worker and ingest keep writing while
-- it builds (hence no transaction, and a single statement).
CREATE INDEX CONCURRENTLY IF NOT EXISTS emails_parked ON emails (business_id, created_at, id) INCLUDE (parked_until) WHERE status = 'queued' AND parked_until IS NOT NULL;
