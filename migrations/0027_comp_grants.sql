-- Comp access: a grant a merchant gives without a payment (`POST /entitlements/{id}/grants`).
-- It has neither a payment nor a subscription, at most one is live per (entitlement,
-- customer), and it may end at a due time (`ends_at`, reason `expired`).
DO $$
DECLARE c text;
BEGIN
    SELECT conname INTO c FROM pg_constraint
    WHERE conrelid = 'grants'::regclass AND contype = 'c'
      AND pg_get_constraintdef(oid) LIKE '%payment_id IS NULL%<>%subscription_id IS NULL%';
    EXECUTE format('ALTER TABLE grants DROP CONSTRAINT %I', c);
END $$;
ALTER TABLE grants
    ADD COLUMN comp boolean NOT NULL DEFAULT false,
    ADD CONSTRAINT grants_one_source
        CHECK (num_nonnulls(payment_id, subscription_id) = CASE WHEN comp THEN 0 ELSE 1 END);
CREATE UNIQUE INDEX grants_live_comp ON grants (entitlement_id, customer_id)
    WHERE status <> 'Revoked' AND comp;
