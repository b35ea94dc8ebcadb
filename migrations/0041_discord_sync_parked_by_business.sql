-- The syncer's parked jobs take turns by business: a bot's drainer takes the oldest
-- waiting job of the next business in turn, so a deep backlog of one business on the
-- shared bot holds up another business's job for one turn, not for the whole backlog.
-- Rows parked before this migration (and by replicas of an earlier release) take their
-- turns as one business, ''.
ALTER TABLE discord_sync_parked ADD COLUMN business_id text NOT NULL DEFAULT '';
CREATE INDEX discord_sync_parked_turns ON discord_sync_parked (bot, business_id, parked_at)
    WHERE taken_by IS NULL;
