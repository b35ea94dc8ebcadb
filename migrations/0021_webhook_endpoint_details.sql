-- What the platform's SDKs read and write on a webhook endpoint besides its URL:
-- `metadata` (strings by string, returned as given), `rate_limit` (deliveries per
-- second, NULL: no limit), `headers` (custom headers sent with every delivery) and the
-- `idempotency_key` of the create that made it, so a create repeated with the same key
-- returns this endpoint instead of adding another.
-- Constant defaults and nullable columns: catalog changes, no rewrite.
ALTER TABLE webhook_endpoints
    ADD COLUMN metadata        jsonb NOT NULL DEFAULT '{}',
    ADD COLUMN rate_limit      integer CHECK (rate_limit > 0),
    ADD COLUMN headers         jsonb NOT NULL DEFAULT '{}',
    ADD COLUMN idempotency_key text;

CREATE UNIQUE INDEX webhook_endpoints_idempotency_key
    ON webhook_endpoints (business_id, idempotency_key) WHERE idempotency_key IS NOT NULL;
