-- Whether Discord's answer about a holding is on record. A holding is written before
-- the call that gives it (unsettled), and settled once an answer says whether the
-- access was added by guildgate or found already there. A holding still unsettled on
-- the next run means a run died between Discord's answer and its record: the member's
-- `joined_at` against `since` (when guildgate was about to give it) then tells whether
-- guildgate added the member, and a role's found-ness is recorded before the call that
-- adds it, so found-ness stays exact across a crash.
--
-- Existing holdings were recorded by a release that settled them as it wrote them.
ALTER TABLE discord_holdings ADD COLUMN settled boolean NOT NULL DEFAULT true;
