-- A reconcile's listing of a guild's members that began and has not finished: how far
-- it got and the members it kept (those holding a gated role or named by a grant; the
-- rest of a large guild is never stored). The next run of the same scope carries on
-- from `after_user` while the listing is recent, instead of listing the guild again
-- from the start; a finished listing deletes its rows.
CREATE TABLE reconcile_listings (
    guild_id   text COLLATE "C" NOT NULL,
    -- The run's scope (`business=…;guild=…`): the members kept depend on its grants.
    scope      text NOT NULL,
    after_user text COLLATE "C" NOT NULL,
    listed     bigint NOT NULL,
    started_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (guild_id, scope)
);

CREATE TABLE reconcile_listed_members (
    guild_id text COLLATE "C" NOT NULL,
    scope    text NOT NULL,
    user_id  text COLLATE "C" NOT NULL,
    roles    text[] NOT NULL,
    PRIMARY KEY (guild_id, scope, user_id),
    FOREIGN KEY (guild_id, scope) REFERENCES reconcile_listings ON DELETE CASCADE
);
