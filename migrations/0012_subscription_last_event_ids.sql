-- The ids of a subscription's events applied at its last_event_at. An event stamped
-- at that time whose id is listed was applied already, which keeps a duplicate from
-- being decided again once its id has been pruned from processed_events. NULL on
-- snapshots written before this migration: their ids were not recorded.
ALTER TABLE subscriptions ADD COLUMN last_event_ids text[];
