-- Identifiers compare byte by byte. Every index on these columns compared its keys with
-- the database's collation (strcoll, even under C.UTF-8 before PostgreSQL 17), which was
-- PostgreSQL's largest cost per index insert on the ingest path. The ids are ASCII, whose
-- order is the same under any collation that sorts by code point; no query sorts them for
-- people to read.
ALTER TABLE entitlements
    ALTER COLUMN id TYPE text COLLATE "C",
    ALTER COLUMN business_id TYPE text COLLATE "C";
ALTER TABLE product_entitlements
    ALTER COLUMN business_id TYPE text COLLATE "C",
    ALTER COLUMN product_id TYPE text COLLATE "C",
    ALTER COLUMN entitlement_id TYPE text COLLATE "C";
ALTER TABLE grants
    ALTER COLUMN id TYPE text COLLATE "C",
    ALTER COLUMN business_id TYPE text COLLATE "C",
    ALTER COLUMN entitlement_id TYPE text COLLATE "C",
    ALTER COLUMN customer_id TYPE text COLLATE "C",
    ALTER COLUMN payment_id TYPE text COLLATE "C",
    ALTER COLUMN subscription_id TYPE text COLLATE "C";
ALTER TABLE processed_events ALTER COLUMN event_id TYPE text COLLATE "C";
ALTER TABLE subscriptions ALTER COLUMN subscription_id TYPE text COLLATE "C";
ALTER TABLE payments
    ALTER COLUMN payment_id TYPE text COLLATE "C",
    ALTER COLUMN business_id TYPE text COLLATE "C";
ALTER TABLE payment_reversals
    ALTER COLUMN payment_id TYPE text COLLATE "C",
    ALTER COLUMN business_id TYPE text COLLATE "C";
ALTER TABLE discord_links
    ALTER COLUMN business_id TYPE text COLLATE "C",
    ALTER COLUMN customer_id TYPE text COLLATE "C";
