-- 401/403/429 answers counted per business too, in the same 10-second buckets as
-- `discord_invalid_answers`. Discord bans the address at 10,000 invalid answers in 10
-- minutes whoever caused them, so the whole count stays the ceiling every call obeys;
-- a business's own count keeps one business (its bot's token revoked, its customers
-- banned from its own server) from spending that ceiling for every other business.
CREATE TABLE discord_invalid_answers_by_business (
    business_id text NOT NULL,
    bucket      timestamptz NOT NULL,
    answers     integer NOT NULL,
    PRIMARY KEY (business_id, bucket)
);
CREATE INDEX discord_invalid_answers_by_business_bucket
    ON discord_invalid_answers_by_business (bucket);
