-- A grant's entitlement must belong to the grant's business. One composite foreign key
-- says that, where two single-column keys (business, entitlement) did not; a grant's
-- business still exists because its entitlement's does (entitlements.business_id
-- references businesses). Every grant insert checked both keys, each a row lock on the
-- referenced row; it now checks one.
ALTER TABLE entitlements ADD CONSTRAINT entitlements_business_id_id_key UNIQUE (business_id, id);
ALTER TABLE grants ADD CONSTRAINT grants_business_entitlement_fkey
    FOREIGN KEY (business_id, entitlement_id) REFERENCES entitlements (business_id, id);
ALTER TABLE grants DROP CONSTRAINT grants_entitlement_id_fkey;
ALTER TABLE grants DROP CONSTRAINT grants_business_id_fkey;
