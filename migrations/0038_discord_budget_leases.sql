-- A slot of the bot's budget is held until its request is answered, and free again a
-- window after that answer. Stamped when it was taken, a slot could be taken again a
-- window later while its first request had not reached Discord yet (a busy machine
-- delays a request between its slot and the wire by more than any fixed margin), and
-- both would arrive in one of Discord's windows. An answer comes after its request
-- arrived, so a window counted from the answer holds at most one arrival per slot.

-- Takes a slot of `kind`'s ring as `guildgate_discord_take` does, but stamps it with
-- the end of a lease (`now + p_lease`, longer than any request may take) instead of
-- now; the taker stamps it again with the time of the answer
-- (`guildgate_discord_release`). A taker that dies leaves the slot leased until the
-- lease ends. Returns `wait` as `guildgate_discord_take` does (a slot is no sooner free
-- than a window from now when every slot is leased), and the slot and its lease's end
-- when one was taken.
-- `guildgate_discord_take` stays for processes of the previous release during a rolling
-- upgrade: a leased slot is a slot taken in the future for it.
CREATE FUNCTION guildgate_discord_lease(
    p_bot text,
    p_kind text,
    p_window interval,
    p_lease interval,
    OUT wait double precision,
    OUT slot integer,
    OUT leased_until timestamptz
)
LANGUAGE plpgsql AS $$
DECLARE
    t timestamptz := clock_timestamp();
    blocked timestamptz;
    oldest timestamptz;
BEGIN
    SELECT blocked_until INTO blocked FROM discord_budget_blocks WHERE bot = p_bot;
    IF blocked > t THEN
        wait := extract(epoch FROM blocked - t);
        RETURN;
    END IF;
    -- SKIP LOCKED: concurrent takers take different slots instead of queueing on one;
    -- a slot another taker just took fails the re-checked condition and is skipped.
    UPDATE discord_budget_slots s SET taken_at = t + p_lease
     WHERE (s.bot, s.kind, s.slot) = (
        SELECT f.bot, f.kind, f.slot FROM discord_budget_slots f
         WHERE f.bot = p_bot AND f.kind = p_kind AND f.taken_at <= t - p_window
         ORDER BY f.taken_at
         LIMIT 1
         FOR UPDATE SKIP LOCKED)
    RETURNING s.slot, s.taken_at INTO slot, leased_until;
    IF slot IS NOT NULL THEN
        wait := 0;
        RETURN;
    END IF;
    SELECT min(taken_at) INTO oldest FROM discord_budget_slots
     WHERE bot = p_bot AND kind = p_kind;
    IF oldest IS NULL THEN
        RETURN;
    END IF;
    -- A free slot that concurrent takers held locked: ask again at once.
    IF oldest <= t - p_window THEN
        wait := 0.0001;
        RETURN;
    END IF;
    wait := greatest(least(extract(epoch FROM oldest + p_window - t),
                           extract(epoch FROM p_window)), 0.001);
END
$$;
