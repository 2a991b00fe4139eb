-- The ledger: runs, steps, their event log, receipts for every delivery, and the outbox.
-- Every table is keyed by run_id first so the ledger can be distributed by run.

CREATE TABLE executor.runs (
    run_id          text PRIMARY KEY,
    workflow        text NOT NULL,
    status          text NOT NULL
        CHECK (status IN ('pending', 'running', 'paused', 'completed', 'failed', 'cancelled')),
    concurrency_key text,
    input           jsonb NOT NULL DEFAULT 'null',
    output          jsonb,
    error           jsonb,
    last_seq        bigint NOT NULL DEFAULT 0,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);

-- I5: the database, not application code, guarantees one active run per concurrency key.
CREATE UNIQUE INDEX runs_one_active_per_concurrency_key
    ON executor.runs (concurrency_key)
    WHERE concurrency_key IS NOT NULL AND status IN ('pending', 'running', 'paused');

CREATE INDEX runs_status_created ON executor.runs (status, created_at DESC, run_id DESC);
CREATE INDEX runs_created ON executor.runs (created_at DESC, run_id DESC);
CREATE INDEX runs_workflow_created ON executor.runs (workflow, created_at DESC, run_id DESC);

CREATE TABLE executor.steps (
    run_id           text NOT NULL REFERENCES executor.runs (run_id) ON DELETE CASCADE,
    step_key         text NOT NULL,
    status           text NOT NULL
        CHECK (status IN ('pending', 'queued', 'running', 'completed', 'failed', 'retrying',
                          'cancelled')),
    attempt          integer NOT NULL DEFAULT 0,
    max_attempts     integer NOT NULL DEFAULT 1 CHECK (max_attempts >= 1),
    depends_on       text[] NOT NULL DEFAULT '{}',
    queue            text NOT NULL DEFAULT 'default',
    timeout_seconds  double precision,
    backoff          jsonb NOT NULL DEFAULT '{}',
    output           jsonb,
    error            jsonb,
    lease_expires_at timestamptz,
    next_attempt_at  timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, step_key)
);

CREATE INDEX steps_running_lease ON executor.steps (lease_expires_at) WHERE status = 'running';
CREATE INDEX steps_failed ON executor.steps (updated_at DESC) WHERE status = 'failed';
CREATE INDEX steps_waiting ON executor.steps (status, updated_at)
    WHERE status IN ('queued', 'retrying');

CREATE TABLE executor.events (
    run_id          text NOT NULL REFERENCES executor.runs (run_id) ON DELETE CASCADE,
    seq             bigint NOT NULL CHECK (seq >= 1),
    type            text NOT NULL CHECK (type IN (
        'run_created', 'run_started', 'run_paused', 'run_resumed', 'run_completed',
        'run_failed', 'run_cancelled', 'step_created', 'step_queued', 'step_started',
        'step_completed', 'step_failed', 'step_retrying', 'step_cancelled')),
    step_key        text,
    attempt         integer,
    idempotency_key text NOT NULL,
    payload         jsonb NOT NULL DEFAULT '{}',
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, seq)
);

CREATE INDEX events_idempotency_key ON executor.events (idempotency_key);

-- One row per idempotency key: the outcome of the first delivery of that key.
CREATE TABLE executor.receipts (
    idempotency_key text PRIMARY KEY,
    run_id          text,
    step_key        text,
    attempt         integer,
    command_type    text NOT NULL,
    command         jsonb NOT NULL,
    outcome         text NOT NULL CHECK (outcome IN (
        'applied', 'duplicate', 'stale_attempt', 'terminal', 'invalid_transition',
        'unknown_entity', 'invalid_payload')),
    detail          text,
    first_seq       bigint,
    last_seq        bigint,
    received_at     timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX receipts_run ON executor.receipts (run_id, received_at);

-- One row per dropped delivery, duplicates included: applied receipts plus drops account
-- for every delivery (I2).
CREATE TABLE executor.drops (
    drop_id         bigserial PRIMARY KEY,
    idempotency_key text,
    run_id          text,
    step_key        text,
    attempt         integer,
    command_type    text,
    reason          text NOT NULL CHECK (reason IN (
        'duplicate', 'stale_attempt', 'terminal', 'invalid_transition', 'unknown_entity',
        'invalid_payload')),
    detail          text NOT NULL,
    command         jsonb,
    raw             text,
    received_at     timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX drops_run ON executor.drops (run_id, drop_id);
CREATE INDEX drops_reason ON executor.drops (reason, drop_id DESC);
CREATE INDEX drops_received ON executor.drops (drop_id DESC);

-- Follow-up commands committed with the state change that caused them; deleted once pushed
-- to Redis. Rows still here after a grace period are pushed again by the relay.
CREATE TABLE executor.outbox (
    outbox_id       bigserial PRIMARY KEY,
    run_id          text NOT NULL,
    queue           text NOT NULL,
    idempotency_key text NOT NULL,
    command         jsonb NOT NULL,
    not_before      timestamptz NOT NULL DEFAULT now(),
    created_at      timestamptz NOT NULL DEFAULT now(),
    attempts        integer NOT NULL DEFAULT 0
);

CREATE INDEX outbox_due ON executor.outbox (not_before, outbox_id);
