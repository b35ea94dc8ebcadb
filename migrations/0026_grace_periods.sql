-- Grace periods: an entitlement may keep a subscription's access for some days after
-- the subscription goes on hold or fails, and a grant may have a due time at which it
-- ends unless something changes first.
--
-- `entitlements.grace_period_days`: the merchant's setting (1 to 365; NULL: none).
-- `grants.ends_at`, `grants.ends_reason`: when the grant is revoked, and with which
-- reason, unless the subscription is active again first. The timer reads due grants
-- through `grants_due`; a revoked grant is never due.
ALTER TABLE entitlements
    ADD COLUMN grace_period_days integer CHECK (grace_period_days BETWEEN 1 AND 365);
ALTER TABLE grants
    ADD COLUMN ends_at timestamptz,
    ADD COLUMN ends_reason text,
    ADD CHECK ((ends_at IS NULL) = (ends_reason IS NULL));
CREATE INDEX grants_due ON grants (ends_at) WHERE ends_at IS NOT NULL AND status <> 'Revoked';
