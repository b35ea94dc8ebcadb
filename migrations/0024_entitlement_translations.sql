-- An entitlement's name and description in another locale, shown instead of the base
-- text when a merchant reads it with `?locale=`. Each field is NULL where that locale
-- has no translation for it (the base text shows). A new table: no existing row is
-- touched. Rows go with their entitlement only when it is really removed; a soft
-- delete hides them with it (every read goes through the undeleted entitlement).
CREATE TABLE entitlement_translations (
    entitlement_id text NOT NULL REFERENCES entitlements (id) ON DELETE CASCADE,
    locale         text NOT NULL,
    name           text,
    description    text,
    updated_at     timestamptz NOT NULL,
    PRIMARY KEY (entitlement_id, locale)
);
