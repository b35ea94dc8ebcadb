-- The syncer's parked jobs are found through `discord_sync_parked_turns` (bot, business,
-- age) since they take turns by business: the index by bot and age alone serves no
-- query and only costs every park, take and release an entry. The table holds only
-- the parked sync jobs, so the drop's lock is brief.
DROP INDEX IF EXISTS discord_sync_parked_bot;
