-- grants_entitlement (entitlement_id, status) serves no query that
-- grants_entitlement_created (entitlement_id, created_at DESC, id DESC) does not serve as
-- well (both lead with entitlement_id); every grant insert and status change paid for
-- keeping it, on the ingest path.
DROP INDEX IF EXISTS grants_entitlement;
