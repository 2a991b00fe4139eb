-- Cron schedules. The sweep leader starts each due tick as a run whose idempotency key is
-- `schedule:<name>:<tick in UTC>`, then advances last_tick/next_tick; the key, not this row,
-- is what makes a tick start at most once (a leader that dies between the two steps leaves
-- the row behind, and the next leader's retry of that tick is a duplicate).
-- Not keyed by run_id: a small table of its own, as DESIGN.md "Scale" allows.
CREATE TABLE executor.schedules (
    name        text PRIMARY KEY CHECK (name ~ '^[A-Za-z0-9_.:\-]{1,200}$'),
    cron        text NOT NULL,
    workflow    text NOT NULL,
    input       jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(input) = 'object'),
    timezone    text NOT NULL DEFAULT 'UTC',
    catchup     text NOT NULL DEFAULT 'latest' CHECK (catchup IN ('none', 'latest', 'all')),
    paused      boolean NOT NULL DEFAULT false,
    last_tick   timestamptz,
    next_tick   timestamptz NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX schedules_due ON executor.schedules (next_tick) WHERE NOT paused;
