-- Every write of a customer's tokens bumps `token_version`. A token refresh stores its
-- new tokens only if the link is still the one it read (same Discord user, same
-- version): a customer who linked another account meanwhile keeps that account.
ALTER TABLE discord_links ADD COLUMN token_version bigint NOT NULL DEFAULT 0;
