-- Delivery email: guildgate emails a customer whose grant needs their Discord
-- authorization, reminds them while it stays pending, and resends on request.
--
-- `entitlements.send_email`: the merchant's switch (NULL: on, the default; false: the
-- merchant sends their own from the webhook).
ALTER TABLE entitlements ADD COLUMN send_email boolean;

-- Per-business settings of the extension route `/business/settings`.
CREATE TABLE business_settings (
    business_id    text PRIMARY KEY REFERENCES businesses (id),
    -- The locale of the business's emails (one of the supported ones).
    default_locale text NOT NULL DEFAULT 'en',
    -- `Reply-To` of the business's emails.
    support_email  text,
    -- Days after a grant was made on which a still-pending grant's customer is
    -- reminded (each at most once), ascending.
    reminder_days  integer[] NOT NULL DEFAULT '{}',
    updated_at     timestamptz NOT NULL DEFAULT now()
);

-- A customer's email address, kept only while the customer has a live grant with the
-- business: the grant timer deletes the rows of customers without one.
CREATE TABLE customer_contacts (
    business_id  text NOT NULL REFERENCES businesses (id),
    customer_id  text COLLATE "C" NOT NULL,
    email        text NOT NULL,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (business_id, customer_id)
);

-- Every email guildgate was asked to send, one row per grant and kind (`join`,
-- `reminder:<days>`, `resend:<n>`: the id), so a redelivered job sends nothing twice.
-- No address is kept here: `recipient_key` is a keyed hash of it, which bounds what
-- one recipient is sent per hour.
CREATE TABLE emails (
    id             text COLLATE "C" PRIMARY KEY,
    business_id    text NOT NULL REFERENCES businesses (id),
    grant_id       text NOT NULL REFERENCES grants (id),
    kind           text NOT NULL CHECK (kind IN ('join', 'reminder', 'resend')),
    status         text NOT NULL DEFAULT 'queued'
                   CHECK (status IN ('queued', 'sent', 'skipped', 'failed')),
    attempts       integer NOT NULL DEFAULT 0,
    recipient_key  bytea,
    -- Why it was skipped or failed (the last SMTP answer).
    detail         text,
    created_at     timestamptz NOT NULL DEFAULT now(),
    sent_at        timestamptz,
    updated_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX emails_grant ON emails (grant_id);
CREATE INDEX emails_recipient_sent ON emails (recipient_key, sent_at) WHERE sent_at IS NOT NULL;
-- Reminders look for pending grants by age.
CREATE INDEX grants_pending_created ON grants (business_id, created_at) WHERE status = 'Pending';

-- Email jobs go through the outbox like every other job.
ALTER TABLE outbox DROP CONSTRAINT outbox_kind_check;
ALTER TABLE outbox ADD CONSTRAINT outbox_kind_check
    CHECK (kind IN ('grant_event', 'grant_events', 'sync', 'webhook', 'email'));
