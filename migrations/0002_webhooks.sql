-- Webhooks to merchants: endpoints, one message per (grant event, endpoint), and every
-- delivery attempt. Delivery jobs travel through the outbox (kind 'webhook').

CREATE TABLE webhook_endpoints (
    id                          text PRIMARY KEY,          -- ep_…
    business_id                 text NOT NULL REFERENCES businesses (id),
    url                         text NOT NULL,
    description                 text,
    filter_types                text[],                    -- NULL: every event type
    disabled                    boolean NOT NULL DEFAULT false,
    disabled_reason             text,
    -- whsec_ + base64 of 32 random bytes. The previous secret keeps signing (a second
    -- signature) until previous_secret_expires_at, so merchants can rotate without a gap.
    secret                      text NOT NULL,
    previous_secret             text,
    previous_secret_expires_at  timestamptz,
    created_at                  timestamptz NOT NULL DEFAULT now(),
    updated_at                  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX webhook_endpoints_business ON webhook_endpoints (business_id);

-- One message per (grant, event type, endpoint). Its id is the stable `webhook-id`,
-- derived from those three, so a redelivered grant event inserts nothing new.
CREATE TABLE webhook_messages (
    id               text PRIMARY KEY,                     -- msg_…
    endpoint_id      text NOT NULL REFERENCES webhook_endpoints (id) ON DELETE CASCADE,
    business_id      text NOT NULL,
    grant_id         text NOT NULL,
    event_type       text NOT NULL,
    body             text NOT NULL,                        -- exactly the bytes sent
    status           text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts         int  NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz,
    last_error       text,
    delivered_at     timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    UNIQUE (grant_id, event_type, endpoint_id)
);
CREATE INDEX webhook_messages_endpoint_status ON webhook_messages (endpoint_id, status);

-- Every attempt, including those that never reached the endpoint (short-circuited,
-- refused address): status_code is NULL then and error says why.
CREATE TABLE webhook_attempts (
    id            bigserial PRIMARY KEY,
    message_id    text NOT NULL REFERENCES webhook_messages (id) ON DELETE CASCADE,
    attempted_at  timestamptz NOT NULL DEFAULT now(),
    status_code   int,
    latency_ms    int  NOT NULL,
    error         text,
    response      text                                      -- first 1 KiB of the answer
);
CREATE INDEX webhook_attempts_message ON webhook_attempts (message_id, id);

-- A third outbox kind: a webhook delivery job for <prefix>.webhooks.
ALTER TABLE outbox DROP CONSTRAINT outbox_kind_check;
ALTER TABLE outbox ADD CONSTRAINT outbox_kind_check CHECK (kind IN ('grant_event', 'sync', 'webhook'));
