-- Incremental runs: what decides readiness and completion is kept on the rows a command
-- already locks, so no command reads or locks its whole run. Also: fencing tokens, durable
-- waits (sleeping/waiting steps, buffered external events, child runs), maps, and
-- concurrency keys with N slots and a queue.

-- Runs ---------------------------------------------------------------------------------
ALTER TABLE executor.runs DROP CONSTRAINT runs_status_check;
ALTER TABLE executor.runs ADD CONSTRAINT runs_status_check CHECK (status IN (
    'queued', 'pending', 'running', 'paused', 'completed', 'failed', 'cancelled'));

ALTER TABLE executor.runs
    ADD COLUMN concurrency_limit integer NOT NULL DEFAULT 1
        CHECK (concurrency_limit BETWEEN 1 AND 10000),
    ADD COLUMN concurrency_slot  integer,
    ADD COLUMN steps_total       integer NOT NULL DEFAULT 0,
    ADD COLUMN steps_completed   integer NOT NULL DEFAULT 0,
    ADD COLUMN steps_active      integer NOT NULL DEFAULT 0,
    ADD COLUMN steps_failed      integer NOT NULL DEFAULT 0,
    ADD COLUMN parent_run_id     text,
    ADD COLUMN parent_step_key   text,
    ADD COLUMN parent_attempt    integer,
    ADD COLUMN queue_position    bigint;

-- I5 with N holders: an active run with a key holds one of the key's slots 0..limit-1, and a
-- slot has one holder. The unique index is the guarantee; the handler only picks the slot.
UPDATE executor.runs SET concurrency_slot = 0
WHERE concurrency_key IS NOT NULL AND status IN ('pending', 'running', 'paused');
ALTER TABLE executor.runs
    ADD CONSTRAINT runs_slot_below_limit CHECK (
        concurrency_slot IS NULL
        OR (concurrency_slot >= 0 AND concurrency_slot < concurrency_limit)),
    ADD CONSTRAINT runs_active_holds_slot CHECK (
        concurrency_key IS NULL
        OR (status IN ('pending', 'running', 'paused')) = (concurrency_slot IS NOT NULL));
DROP INDEX executor.runs_one_active_per_concurrency_key;
CREATE UNIQUE INDEX runs_concurrency_slot
    ON executor.runs (concurrency_key, concurrency_slot) WHERE concurrency_slot IS NOT NULL;
-- Queued runs are admitted in the order their launches took the key's lock.
CREATE SEQUENCE executor.run_queue_position;
CREATE INDEX runs_queued_by_key
    ON executor.runs (concurrency_key, queue_position) WHERE status = 'queued';
CREATE INDEX runs_children ON executor.runs (parent_run_id) WHERE parent_run_id IS NOT NULL;

-- Every command rewrites its run's row (last_seq, counters). Room on the page and no indexed
-- column changing (updated_at moves only with the status, see the handler) make those
-- rewrites HOT: no index touched.
ALTER TABLE executor.runs SET (fillfactor = 70);

-- One row per key ever used: the lock that orders launches, admissions and releases of the
-- key, and the limit its current holders agreed on.
CREATE TABLE executor.concurrency_keys (
    concurrency_key   text PRIMARY KEY,
    concurrency_limit integer NOT NULL CHECK (concurrency_limit BETWEEN 1 AND 10000),
    updated_at        timestamptz NOT NULL DEFAULT now()
);
INSERT INTO executor.concurrency_keys (concurrency_key, concurrency_limit)
SELECT DISTINCT concurrency_key, 1 FROM executor.runs WHERE concurrency_key IS NOT NULL;

-- Steps --------------------------------------------------------------------------------
ALTER TABLE executor.steps DROP CONSTRAINT steps_status_check;
ALTER TABLE executor.steps ADD CONSTRAINT steps_status_check CHECK (status IN (
    'pending', 'queued', 'running', 'sleeping', 'waiting', 'retrying', 'completed', 'failed',
    'cancelled'));

ALTER TABLE executor.steps
    ADD COLUMN kind         text NOT NULL DEFAULT 'task'
        CHECK (kind IN ('task', 'sleep', 'wait', 'child', 'map', 'item')),
    ADD COLUMN dependants   text[] NOT NULL DEFAULT '{}',
    ADD COLUMN waiting_on   integer NOT NULL DEFAULT 0 CHECK (waiting_on >= 0),
    ADD COLUMN map_over     text,
    ADD COLUMN parent_step  text,
    ADD COLUMN item_index   integer,
    ADD COLUMN item         jsonb,
    ADD COLUMN items_total  integer,
    ADD COLUMN items_done   integer NOT NULL DEFAULT 0,
    ADD COLUMN fence        text,
    ADD COLUMN wake_at      timestamptz,
    ADD COLUMN event_name   text,
    ADD COLUMN child_run_id text;

UPDATE executor.steps AS s SET dependants = d.keys
FROM (
    SELECT x.run_id, dep AS step_key, array_agg(x.step_key ORDER BY x.step_key) AS keys
    FROM executor.steps AS x, unnest(x.depends_on) AS dep
    GROUP BY x.run_id, dep
) AS d
WHERE s.run_id = d.run_id AND s.step_key = d.step_key;

UPDATE executor.steps AS s SET waiting_on = (
    SELECT count(*) FROM executor.steps AS u
    WHERE u.run_id = s.run_id AND u.step_key = ANY (s.depends_on) AND u.status <> 'completed');

UPDATE executor.runs AS r SET
    steps_total = c.total, steps_completed = c.completed, steps_active = c.active,
    steps_failed = c.failed
FROM (
    SELECT run_id, count(*) AS total,
           count(*) FILTER (WHERE status = 'completed') AS completed,
           count(*) FILTER (WHERE status IN ('queued', 'running')) AS active,
           count(*) FILTER (WHERE status = 'failed') AS failed
    FROM executor.steps GROUP BY run_id
) AS c
WHERE r.run_id = c.run_id;

-- The few rows a command may need besides the ones it names, each reached by an index.
CREATE INDEX steps_resumable ON executor.steps (run_id)
    WHERE (status = 'pending' AND waiting_on = 0) OR status = 'retrying';
CREATE INDEX steps_unfinished ON executor.steps (run_id)
    WHERE status NOT IN ('completed', 'failed', 'cancelled');
CREATE INDEX steps_failed_by_run ON executor.steps (run_id) WHERE status = 'failed';
CREATE INDEX steps_sinks ON executor.steps (run_id)
    WHERE dependants = '{}' AND parent_step IS NULL;
CREATE INDEX steps_items ON executor.steps (run_id, parent_step, item_index)
    WHERE parent_step IS NOT NULL;
CREATE INDEX steps_owned ON executor.steps (run_id, fence) WHERE status = 'running';
CREATE INDEX steps_waiting_for_event ON executor.steps (run_id, event_name)
    WHERE status = 'waiting' AND event_name IS NOT NULL;
CREATE INDEX steps_timers ON executor.steps (wake_at)
    WHERE status IN ('sleeping', 'waiting') AND wake_at IS NOT NULL;

-- Events, receipts, drops ----------------------------------------------------------------
-- Nothing reads events by key (receipts say which seqs a key produced): one index less
-- for every event written.
DROP INDEX executor.events_idempotency_key;

ALTER TABLE executor.events DROP CONSTRAINT events_type_check;
ALTER TABLE executor.events ADD CONSTRAINT events_type_check CHECK (type IN (
    'run_created', 'run_queued', 'run_admitted', 'run_started', 'run_paused', 'run_resumed',
    'run_completed', 'run_failed', 'run_cancelled', 'step_created', 'step_queued',
    'step_started', 'step_completed', 'step_failed', 'step_retrying', 'step_cancelled',
    'step_sleeping', 'step_waiting', 'event_received'));

-- Transient refusals (the key stays usable) are drops without a receipt.
ALTER TABLE executor.drops DROP CONSTRAINT drops_reason_check;
ALTER TABLE executor.drops ADD CONSTRAINT drops_reason_check CHECK (reason IN (
    'duplicate', 'stale_attempt', 'terminal', 'invalid_transition', 'unknown_entity',
    'invalid_payload', 'key_taken', 'paused', 'not_due', 'busy'));

-- An outbox row lives until its command is applied or finally refused: the transaction
-- that decides the command deletes it. Until then the relay pushes it again whenever
-- `push_after` passes (backing off), so a job lost in Redis, a delivery that failed, or a
-- transient refusal all end in another delivery.
ALTER TABLE executor.outbox ADD COLUMN push_after timestamptz NOT NULL DEFAULT now();
UPDATE executor.outbox SET push_after = not_before;
DROP INDEX executor.outbox_due;
CREATE INDEX outbox_push_after ON executor.outbox (push_after, outbox_id);
CREATE INDEX outbox_run ON executor.outbox (run_id, idempotency_key);

-- External events ------------------------------------------------------------------------
-- An event sent to a run, keyed by the seq of its event_received event; consumed by the
-- first step that waits for it (or at once, when one already waits).
CREATE TABLE executor.run_events (
    run_id          text NOT NULL REFERENCES executor.runs (run_id) ON DELETE CASCADE,
    received_seq    bigint NOT NULL,
    event           text NOT NULL,
    idempotency_key text NOT NULL,
    payload         jsonb,
    consumed_by     text,
    consumed_seq    bigint,
    received_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, received_seq)
);
CREATE INDEX run_events_unconsumed ON executor.run_events (run_id, event, received_seq)
    WHERE consumed_by IS NULL;

-- Hook URLs: a third party may send one event to one run. Only a digest of the token is
-- kept; the run id leads the key so the table distributes with its run.
CREATE TABLE executor.hooks (
    run_id       text NOT NULL REFERENCES executor.runs (run_id) ON DELETE CASCADE,
    token_sha256 text NOT NULL,
    event        text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, token_sha256)
);

-- The first round trip of every command -------------------------------------------------
-- Lock the run (for a launch, its concurrency key); read the idempotency key; lock the step
-- the command names with its dependants and its map, and `p_also` (a step a completion may
-- start in place); for a launch, read the key's holders. Each query in a VOLATILE
-- PL/pgSQL function takes a new snapshot, so everything after the run lock is read as
-- committed by whoever held that lock before us.
DROP FUNCTION executor.lock_for_command(text, text, boolean);
CREATE FUNCTION executor.lock_for_command(
    p_run_id text, p_key text, p_step_key text, p_fence text, p_launch_key text,
    p_launch_limit integer, p_also text, p_dependants boolean)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    v_run jsonb;
    v_steps jsonb := '[]';
    v_outcome text;
    v_received timestamptz;
    v_owned jsonb;
    v_key jsonb;
    v_limit integer;
    v_keys text[];
    v_one text;
    v_row jsonb;
    v_rows jsonb[] := '{}';
BEGIN
    SELECT to_jsonb(r) INTO v_run FROM executor.runs AS r WHERE run_id = p_run_id FOR UPDATE;
    IF v_run IS NULL AND p_launch_key IS NOT NULL THEN
        -- A launch has no run row to lock; the key's row orders it, and is taken before the
        -- receipt is read so a concurrent copy of the same launch is seen as a duplicate.
        INSERT INTO executor.concurrency_keys (concurrency_key, concurrency_limit)
        VALUES (p_launch_key, p_launch_limit) ON CONFLICT DO NOTHING;
        SELECT concurrency_limit INTO v_limit FROM executor.concurrency_keys
        WHERE concurrency_key = p_launch_key FOR UPDATE;
    END IF;
    SELECT outcome, received_at INTO v_outcome, v_received
    FROM executor.receipts WHERE idempotency_key = p_key;
    IF v_outcome IS NOT NULL THEN
        IF p_fence IS NOT NULL AND v_run IS NOT NULL THEN
            SELECT to_jsonb(s) - 'depends_on' || jsonb_build_object(
                'ctid', s.ctid::text, 'upstreams', cardinality(s.depends_on))
            INTO v_owned FROM executor.steps AS s
            WHERE s.run_id = p_run_id AND s.status = 'running' AND s.fence = p_fence
            LIMIT 1;
        END IF;
    ELSIF v_run IS NOT NULL AND p_step_key IS NOT NULL THEN
        -- The keys first, then each row by its whole primary key, in key order. Asked for
        -- all at once (a join, or step_key = ANY), a planner that believes a run has few
        -- steps reads every step of the run to find them.
        -- Only an outcome needs the dependants and the map: a start changes its step alone.
        IF p_dependants THEN
            SELECT t.dependants || p_step_key || t.parent_step || p_also INTO v_keys
            FROM executor.steps AS t WHERE t.run_id = p_run_id AND t.step_key = p_step_key;
        ELSE
            v_keys := ARRAY[p_step_key, p_also];
        END IF;
        FOR v_one IN SELECT DISTINCT k FROM unnest(v_keys) AS k WHERE k IS NOT NULL ORDER BY k
        LOOP
            -- Every column, but depends_on only when short: a join's may be thousands of
            -- keys, locked by each of its upstream steps' completions. Its length always.
            SELECT to_jsonb(r) INTO v_row FROM (
                SELECT x.step_key, x.status, x.attempt, x.max_attempts, x.queue,
                       x.timeout_seconds, x.backoff, x.output, x.error, x.lease_expires_at,
                       x.next_attempt_at, x.kind, x.dependants, x.waiting_on, x.map_over,
                       x.parent_step, x.item_index, x.item, x.items_total, x.items_done,
                       x.fence, x.wake_at, x.event_name, x.child_run_id,
                       CASE WHEN cardinality(x.depends_on) <= 64 THEN x.depends_on END
                           AS depends_on,
                       cardinality(x.depends_on) AS upstreams, x.ctid::text AS ctid
                FROM executor.steps AS x
                WHERE x.run_id = p_run_id AND x.step_key = v_one
                FOR UPDATE OF x
            ) AS r;
            -- Gathered in an array, which plpgsql appends to in place; appending to the
            -- jsonb itself copies it each time, quadratic in a fan-out of thousands.
            IF v_row IS NOT NULL THEN
                v_rows := array_append(v_rows, v_row);
            END IF;
        END LOOP;
        v_steps := to_jsonb(v_rows);
    ELSIF v_run IS NULL AND p_launch_key IS NOT NULL THEN
        SELECT jsonb_build_object(
            'limit', v_limit,
            'holders', (
                SELECT coalesce(jsonb_object_agg(concurrency_slot::text, run_id), '{}')
                FROM executor.runs
                WHERE concurrency_key = p_launch_key AND concurrency_slot IS NOT NULL),
            'queued', (
                SELECT count(*) FROM executor.runs
                WHERE concurrency_key = p_launch_key AND status = 'queued'))
        INTO v_key;
    END IF;
    RETURN jsonb_build_object(
        'run', v_run,
        'steps', v_steps,
        'outcome', v_outcome,
        'received_at', v_received,
        'owned', v_owned,
        'key', v_key,
        'now', clock_timestamp()
    );
END
$$;
