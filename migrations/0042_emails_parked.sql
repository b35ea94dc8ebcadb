-- An email over its business's hourly limit (or its recipient's) waits in PostgreSQL
-- until that hour has room, instead of going round the email queue every business
-- shares: `parked_until` is when it may be tried again (NULL: not parked), and the
-- email upkeep releases, oldest first, what each business's hour has room for. A
-- nullable column without a default: a catalog change, no rewrite.
ALTER TABLE emails ADD COLUMN parked_until timestamptz;
