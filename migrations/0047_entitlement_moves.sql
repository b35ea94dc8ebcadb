-- An entitlement's grants still to be handed to the syncer after a save that moved it to
-- another server or role, or that retries its grants failed for a configuration cause.
-- The save queues the first page itself; every process's mover queues the rest a page at
-- a time, newest grant first (the order of `grants_entitlement_created`), after
-- (`after_created`, `after_grant`), paced by `grants.moves_per_second`. A save that moves
-- the entitlement again starts its row over; any other save during a move asks for one
-- more pass over the failed grants once the move is done (`retry_failed`).
CREATE TABLE entitlement_moves (
    entitlement_id text COLLATE "C" PRIMARY KEY REFERENCES entitlements (id) ON DELETE CASCADE,
    business_id    text COLLATE "C" NOT NULL,
    after_created  timestamptz NOT NULL DEFAULT 'infinity',
    after_grant    text COLLATE "C" NOT NULL DEFAULT '',
    moved          boolean NOT NULL,
    retry_failed   boolean NOT NULL DEFAULT false,
    updated_at     timestamptz NOT NULL DEFAULT now()
);
