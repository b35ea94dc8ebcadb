-- Discord limits the bot, not a process: its global limit (50 requests/s) counts the
-- requests of every replica and every CLI run together, and its invalid-request ban
-- counts 401/403/429 answers per address. These tables hold both, shared by all.

-- The bot's request budget as rings of slots, one ring per kind (`syncer`, `side`):
-- a ring of N slots allows N requests in any window, because a slot is free again only
-- a window after it was last taken. The rings' sizes add up to the global limit.
CREATE TABLE discord_budget_slots (
    bot text NOT NULL,
    kind text NOT NULL,
    slot integer NOT NULL,
    taken_at timestamptz NOT NULL DEFAULT '-infinity',
    PRIMARY KEY (bot, kind, slot)
);

-- A global 429 stops every process until `blocked_until`.
CREATE TABLE discord_budget_blocks (
    bot text PRIMARY KEY,
    blocked_until timestamptz NOT NULL
);

-- 401/403/429 answers counted in 10-second buckets; the sum over the last 10 minutes is
-- what Discord holds against us.
CREATE TABLE discord_invalid_answers (
    bucket timestamptz PRIMARY KEY,
    answers integer NOT NULL
);

-- Takes a slot of `kind`'s ring if one is free, in one round trip. Returns 0 when a slot
-- was taken; otherwise the seconds until one frees (or the global block ends), 0.0001
-- when the free slots were all being taken by others at that instant (ask again), and
-- NULL when the ring does not exist yet (the caller creates it and asks again). The database's
-- clock is the only clock, so processes on machines whose clocks differ still agree.
CREATE FUNCTION guildgate_discord_take(p_bot text, p_kind text, p_window interval)
RETURNS double precision
LANGUAGE plpgsql AS $$
DECLARE
    t timestamptz := clock_timestamp();
    blocked timestamptz;
    taken integer;
    oldest timestamptz;
BEGIN
    SELECT blocked_until INTO blocked FROM discord_budget_blocks WHERE bot = p_bot;
    IF blocked > t THEN
        RETURN extract(epoch FROM blocked - t);
    END IF;
    -- SKIP LOCKED: concurrent takers take different slots instead of queueing on one;
    -- a slot another taker just took fails the re-checked condition and is skipped.
    UPDATE discord_budget_slots s SET taken_at = t
     WHERE (s.bot, s.kind, s.slot) = (
        SELECT f.bot, f.kind, f.slot FROM discord_budget_slots f
         WHERE f.bot = p_bot AND f.kind = p_kind AND f.taken_at <= t - p_window
         ORDER BY f.taken_at
         LIMIT 1
         FOR UPDATE SKIP LOCKED)
    RETURNING s.slot INTO taken;
    IF taken IS NOT NULL THEN
        RETURN 0;
    END IF;
    SELECT min(taken_at) INTO oldest FROM discord_budget_slots
     WHERE bot = p_bot AND kind = p_kind;
    IF oldest IS NULL THEN
        RETURN NULL;
    END IF;
    -- A free slot that concurrent takers held locked: ask again at once.
    IF oldest <= t - p_window THEN
        RETURN 0.0001;
    END IF;
    RETURN greatest(extract(epoch FROM oldest + p_window - t), 0.001);
END
$$;
