-- A grant always names a brand, as the platform's grant object does (`brand_id` is a
-- required string in its SDKs). Grants made from events that named none get their
-- business's most recent brand (that of its newest grant naming one) or, for a business
-- none of whose grants names one, the business's own id: on the platform, the id of a
-- business's default brand. `updated_at` is left alone: the grant itself did not change.
--
-- The index finds a business's newest grant, which is where the brand of a product, and
-- of a grant made from an event without one, comes from.
CREATE INDEX grants_business_newest ON grants (business_id, created_at DESC, id DESC);

UPDATE grants g
SET brand_id = COALESCE(
    (SELECT b.brand_id FROM grants b
     WHERE b.business_id = g.business_id AND b.brand_id IS NOT NULL
     ORDER BY b.created_at DESC, b.id DESC LIMIT 1),
    g.business_id)
WHERE g.brand_id IS NULL;

ALTER TABLE grants ALTER COLUMN brand_id SET NOT NULL;
