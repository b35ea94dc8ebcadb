-- no-transaction
-- A business's emails on their way (queued, not parked), by when they were last
-- touched: the email upkeep counts them against the business's hour before it releases
-- parked ones. Built CONCURRENTLY, as 0043.
CREATE INDEX CONCURRENTLY IF NOT EXISTS emails_on_the_way ON emails (business_id, updated_at) WHERE status = 'queued' AND parked_until IS NULL;
