-- no-transaction
-- The newest grant of a business (whose brand an event naming none gets) is found
-- through its entitlements' newest grants, by grants_entitlement_created; this index
-- served only that lookup and cost every grant written an entry. Dropped CONCURRENTLY,
-- so ingest keeps writing meanwhile (hence no transaction, and a single statement).
DROP INDEX CONCURRENTLY IF EXISTS grants_business_newest;
