-- no-transaction
-- The email worker keeps each business to email.per_business_per_hour: this index finds
-- a business's emails sent in the last hour without reading its older ones. Built
-- CONCURRENTLY, so the email worker and ingest keep writing while it builds (hence no
-- transaction, and a single statement).
CREATE INDEX CONCURRENTLY IF NOT EXISTS emails_business_sent ON emails (business_id, sent_at) WHERE sent_at IS NOT NULL;
