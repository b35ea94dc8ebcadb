-- guildgate core schema: merchants' configuration, grants, ingest bookkeeping, outbox.

CREATE TABLE businesses (
    id          text PRIMARY KEY,
    name        text,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- Shape of the platform's entitlement object (fixtures/api/entitlement.json).
CREATE TABLE entitlements (
    id                text PRIMARY KEY,
    business_id       text NOT NULL REFERENCES businesses (id),
    name              text NOT NULL,
    description       text,
    integration_type  text NOT NULL DEFAULT 'discord' CHECK (integration_type = 'discord'),
    guild_id          text NOT NULL,
    role_id           text,            -- NULL: membership only
    is_active         boolean NOT NULL DEFAULT true,
    metadata          jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    deleted_at        timestamptz      -- soft delete: grants are kept
);
CREATE INDEX entitlements_business ON entitlements (business_id) WHERE deleted_at IS NULL;

-- Which entitlements a product grants.
CREATE TABLE product_entitlements (
    business_id     text NOT NULL REFERENCES businesses (id),
    product_id      text NOT NULL,
    entitlement_id  text NOT NULL REFERENCES entitlements (id),
    position        int  NOT NULL DEFAULT 0,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (business_id, product_id, entitlement_id)
);

-- Shape of the platform's grant object (fixtures/api/grant.json), plus what the grant
-- applied in Discord so a later change or revoke undoes exactly that.
CREATE TABLE grants (
    id                 text PRIMARY KEY,
    business_id        text NOT NULL REFERENCES businesses (id),
    brand_id           text,
    entitlement_id     text NOT NULL REFERENCES entitlements (id),
    customer_id        text NOT NULL,
    payment_id         text,
    subscription_id    text,
    status             text NOT NULL CHECK (status IN ('Pending', 'Delivered', 'Failed', 'Revoked')),
    delivered_at       timestamptz,
    revoked_at         timestamptz,
    revocation_reason  text,
    error_code         text,
    error_message      text,
    oauth_nonce        text NOT NULL,
    oauth_expires_at   timestamptz NOT NULL,
    metadata           jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now(),
    applied_user_id    text,
    applied_guild_id   text,
    applied_role_id    text,
    CHECK ((payment_id IS NULL) <> (subscription_id IS NULL)),
    CHECK ((status = 'Revoked') = (revoked_at IS NOT NULL))
);
-- At most one live grant per (entitlement, customer, subscription) and per
-- (entitlement, customer, payment).
CREATE UNIQUE INDEX grants_live_per_subscription ON grants (entitlement_id, customer_id, subscription_id)
    WHERE status <> 'Revoked' AND subscription_id IS NOT NULL;
CREATE UNIQUE INDEX grants_live_per_payment ON grants (entitlement_id, customer_id, payment_id)
    WHERE status <> 'Revoked' AND payment_id IS NOT NULL;
CREATE INDEX grants_subscription ON grants (business_id, subscription_id) WHERE subscription_id IS NOT NULL;
CREATE INDEX grants_payment ON grants (business_id, payment_id) WHERE payment_id IS NOT NULL;
CREATE INDEX grants_entitlement ON grants (entitlement_id, status);
CREATE INDEX grants_customer ON grants (business_id, customer_id);

-- Every applied payment event id: a redelivery or duplicate finds its id here.
CREATE TABLE processed_events (
    event_id      text PRIMARY KEY,
    event_type    text NOT NULL,
    business_id   text NOT NULL,
    outcome       text NOT NULL,
    processed_at  timestamptz NOT NULL DEFAULT clock_timestamp()  -- when applied, not when the tx began
);

-- The last applied snapshot per subscription: older events change nothing.
CREATE TABLE subscriptions (
    subscription_id  text PRIMARY KEY,
    business_id      text NOT NULL,
    customer_id      text NOT NULL,
    product_id       text NOT NULL,
    status           text NOT NULL,
    last_event_at    timestamptz NOT NULL,
    updated_at       timestamptz NOT NULL DEFAULT now()
);

-- Payments seen, so a refund can tell one-time from subscription payments.
CREATE TABLE payments (
    payment_id       text PRIMARY KEY,
    business_id      text NOT NULL,
    customer_id      text NOT NULL,
    subscription_id  text,
    seen_at          timestamptz NOT NULL DEFAULT now()
);

-- Full refunds and lost disputes per payment, remembered even before the payment.
CREATE TABLE payment_reversals (
    payment_id   text NOT NULL,
    reason       text NOT NULL CHECK (reason IN ('refund', 'dispute_lost')),
    business_id  text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (payment_id, reason)
);

-- What must be published to RabbitMQ, written in the transaction that changed grants and
-- relayed after commit. kind 'grant_event' → <prefix>.grant-events, 'sync' → <prefix>.discord-sync.
CREATE TABLE outbox (
    id          bigserial PRIMARY KEY,
    kind        text NOT NULL CHECK (kind IN ('grant_event', 'sync')),
    message_id  text NOT NULL,
    payload     jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- Wake the relay on commit (NOTIFY is delivered only if the transaction commits).
CREATE FUNCTION outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('guildgate_outbox', '');
    RETURN NULL;
END $$;
CREATE TRIGGER outbox_notify AFTER INSERT ON outbox
    FOR EACH STATEMENT EXECUTE FUNCTION outbox_notify();

-- A customer's linked Discord account (tokens encrypted at rest with XChaCha20-Poly1305).
-- Keyed per business: the platform's customer ids are per merchant.
CREATE TABLE discord_links (
    business_id        text NOT NULL REFERENCES businesses (id),
    customer_id        text NOT NULL,
    discord_user_id    text NOT NULL,
    access_token_enc   bytea NOT NULL,
    refresh_token_enc  bytea,
    expires_at         timestamptz NOT NULL,
    scopes             text NOT NULL,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (business_id, customer_id)
);
