-- Every write of a customer's tokens bumps `token_version`. A token refresh stores its
-- new tokens only if the link is still the one it read (same Discord user, same
-- version): a customer who linked another account meanwhile keeps that account.
ALTER TABLE discord_links ADD COLUMN token_version bigint NOT NULL DEFAULT 0;

-- The id of the key that encrypted a link's tokens (both are written together). Tokens
-- written from now on are also bound to their row and column by associated data. NULL
-- marks tokens stored before: encrypted without associated data by whichever key was
-- configured. They stay readable while that key is configured (current or previous)
-- and are re-encrypted by the next refresh or re-link, or by
-- `guildgate keys rotate-tokens`.
ALTER TABLE discord_links ADD COLUMN token_key_id text;
