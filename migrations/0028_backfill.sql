-- Backfill: attaching an entitlement to a product that already has live subscriptions
-- or paid one-time purchases gives those customers grants. Every event of a business
-- with at least one entitlement now records its subscription's snapshot or its
-- payment, with the payment's products (`product_ids`, space-separated; product ids
-- hold no space), whether or not the product has entitlements yet: backfill reaches
-- back to when the business got its first entitlement.
--
-- `backfills`: one row per entitlement attached to a product, worked through by the
-- backfill task until no customer is left to give it to (`done_at`).
ALTER TABLE payments ADD COLUMN product_ids text;
CREATE INDEX subscriptions_product ON subscriptions (business_id, product_id) WHERE status = 'active';
CREATE INDEX payments_business ON payments (business_id) WHERE subscription_id IS NULL;

CREATE TABLE backfills (
    id              bigserial PRIMARY KEY,
    business_id     text NOT NULL,
    product_id      text NOT NULL,
    entitlement_id  text NOT NULL REFERENCES entitlements (id),
    created_at      timestamptz NOT NULL DEFAULT now(),
    done_at         timestamptz
);
CREATE INDEX backfills_open ON backfills (created_at) WHERE done_at IS NULL;
CREATE INDEX backfills_product ON backfills (business_id, product_id) WHERE done_at IS NULL;
