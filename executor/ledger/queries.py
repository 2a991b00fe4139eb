"""Every statement the handler runs, by name. Only the ledger package writes these tables."""

from __future__ import annotations

# See sql/005: the run lock, the key, and the rows the command names, in one call.
# The handler's planner settings for the rest of its transaction (see handler.py), applied
# first: the subquery is a scan of its own (OFFSET 0), evaluated before the locking call.
LOCK_FOR_COMMAND = """
SELECT executor.lock_for_command(%s, %s, %s, %s, %s, %s, %s, %s) AS locked
FROM (SELECT set_config('plan_cache_mode', 'force_generic_plan', true),
             set_config('enable_seqscan', 'off', true) OFFSET 0) AS settings
"""

INSERT_RECEIPT = """
INSERT INTO executor.receipts
    (idempotency_key, run_id, step_key, attempt, command_type, command, outcome, detail,
     first_seq, last_seq)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
"""

INSERT_DROP = """
INSERT INTO executor.drops
    (idempotency_key, run_id, step_key, attempt, command_type, reason, detail, command, raw)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)
"""

INSERT_OUTBOX = """
INSERT INTO executor.outbox
    (run_id, queue, idempotency_key, command, not_before, timeout_seconds, push_after)
VALUES (%(run_id)s, %(queue)s, %(key)s, %(command)s, COALESCE(%(not_before)s, now()),
        %(timeout)s, COALESCE(%(not_before)s, now()) + make_interval(secs => %(grace)s))
RETURNING outbox_id, run_id, queue, idempotency_key, command, not_before, timeout_seconds
"""

# A command refused as not due goes back to the outbox for when it is: its own row moves
# (or, if it arrived another way, a row is written).
RESEND_LATER = """
WITH moved AS (
    UPDATE executor.outbox
    SET not_before = %(not_before)s,
        push_after = %(not_before)s + make_interval(secs => %(grace)s)
    WHERE run_id = %(run_id)s AND idempotency_key = %(key)s
    RETURNING outbox_id, run_id, queue, idempotency_key, command, not_before, timeout_seconds
), added AS (
    INSERT INTO executor.outbox
        (run_id, queue, idempotency_key, command, not_before, timeout_seconds, push_after)
    SELECT %(run_id)s, %(queue)s, %(key)s, %(command)s, %(not_before)s, %(timeout)s,
           %(not_before)s + make_interval(secs => %(grace)s)
    WHERE NOT EXISTS (SELECT 1 FROM moved)
    RETURNING outbox_id, run_id, queue, idempotency_key, command, not_before, timeout_seconds
)
SELECT * FROM moved UNION ALL SELECT * FROM added
"""

# The row that carried a command goes with the transaction that decides it.
SPEND_OUTBOX = "DELETE FROM executor.outbox WHERE run_id = %s AND idempotency_key = %s"

# --- reads a decision may pull in (RowSource); each locks what it returns -----------------

# Every column a decision reads, but depends_on only when short (a join's may be thousands
# of keys; a started step's upstream is then read by UPSTREAM), as in lock_for_command.
STEP_COLUMNS = """step_key, status, attempt, max_attempts, queue, timeout_seconds, backoff, output,
    error, lease_expires_at, next_attempt_at, kind, dependants, waiting_on, map_over,
    parent_step, item_index, item, items_total, items_done, fence, wake_at, event_name,
    child_run_id, CASE WHEN cardinality(depends_on) <= 64 THEN depends_on END AS depends_on,
    cardinality(depends_on) AS upstreams, ctid::text AS ctid"""
_STEP = f"SELECT {STEP_COLUMNS} FROM executor.steps WHERE run_id = %s"

# One lookup by the whole primary key per step, in key order: asked for with step_key =
# ANY(...), or as a join the planner may flatten (OFFSET 0 keeps it from that), a planner
# that believes a run has few steps reads every step of the run. The same holds for every
# statement below that names rows of one run by key.
STEPS_BY_KEY = f"""
SELECT s.* FROM unnest(%s::text[]) WITH ORDINALITY AS k(step_key, n)
CROSS JOIN LATERAL (
    SELECT {STEP_COLUMNS} FROM executor.steps
    WHERE run_id = %s AND step_key = k.step_key
    FOR UPDATE
    OFFSET 0
) AS s
ORDER BY k.n
"""
STEPS_RESUMABLE = (
    f"{_STEP} AND ((status = 'pending' AND waiting_on = 0) OR status = 'retrying') "
    "ORDER BY step_key FOR UPDATE"
)
STEPS_UNFINISHED = (
    f"{_STEP} AND status NOT IN ('completed', 'failed', 'cancelled') ORDER BY step_key FOR UPDATE"
)
STEPS_WAITING_FOR = (
    f"{_STEP} AND status = 'waiting' AND event_name = %s ORDER BY step_key FOR UPDATE"
)
FAILED_STEP = (
    "SELECT step_key FROM executor.steps WHERE run_id = %s AND status = 'failed' "
    "ORDER BY step_key LIMIT 1"
)
SINK_OUTPUTS = (
    "SELECT step_key, output FROM executor.steps "
    "WHERE run_id = %s AND dependants = '{}' AND parent_step IS NULL"
)
ITEM_OUTPUTS = (
    "SELECT item_index, output FROM executor.steps "
    "WHERE run_id = %s AND parent_step = %s ORDER BY item_index"
)
BUFFERED_EVENT = """
SELECT received_seq, payload FROM executor.run_events
WHERE run_id = %s AND event = %s AND consumed_by IS NULL
ORDER BY received_seq LIMIT 1 FOR UPDATE
"""

ENSURE_KEY = """
INSERT INTO executor.concurrency_keys (concurrency_key, concurrency_limit)
VALUES (%(key)s, %(limit)s) ON CONFLICT DO NOTHING
"""
KEY_STATE = """
SELECT k.concurrency_limit AS limit,
       (SELECT coalesce(jsonb_object_agg(r.concurrency_slot::text, r.run_id), '{}')
        FROM executor.runs AS r
        WHERE r.concurrency_key = k.concurrency_key AND r.concurrency_slot IS NOT NULL
          AND r.run_id <> %(run_id)s) AS holders,
       (SELECT count(*) FROM executor.runs AS r
        WHERE r.concurrency_key = k.concurrency_key AND r.status = 'queued') AS queued
FROM executor.concurrency_keys AS k WHERE k.concurrency_key = %(key)s
FOR UPDATE OF k
"""
OLDEST_QUEUED = """
SELECT * FROM executor.runs
WHERE concurrency_key = %s AND status = 'queued'
ORDER BY queue_position LIMIT 1
FOR UPDATE
"""
ANY_QUEUED = (
    "SELECT EXISTS (SELECT 1 FROM executor.runs WHERE concurrency_key = %s AND status = 'queued')"
    " AS any"
)

# --- writes ---------------------------------------------------------------------------------

INSERT_RUN = """
INSERT INTO executor.runs
    (run_id, workflow, status, concurrency_key, concurrency_limit, concurrency_slot, input,
     last_seq, parent_run_id, parent_step_key, parent_attempt, traceparent, queue_position)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s,
        CASE WHEN %s THEN nextval('executor.run_queue_position') END)
"""

SET_KEY_LIMIT = """
UPDATE executor.concurrency_keys SET concurrency_limit = %s, updated_at = now()
WHERE concurrency_key = %s AND concurrency_limit <> %s
"""

# New steps go in with their state after this transaction (a root already queued, or
# started in place), so the UPDATE below only ever touches rows locked before.
INSERT_STEPS = """
INSERT INTO executor.steps
    (run_id, step_key, status, attempt, max_attempts, depends_on, queue, timeout_seconds,
     backoff, kind, dependants, waiting_on, map_over, parent_step, item_index, item,
     output, fence, lease_expires_at, items_total)
SELECT %s, u.step_key, u.status, u.attempt, u.max_attempts,
       ARRAY(SELECT jsonb_array_elements_text(u.depends_on)), u.queue, u.timeout_seconds,
       u.backoff, u.kind, ARRAY(SELECT jsonb_array_elements_text(u.dependants)), u.waiting_on,
       u.map_over, u.parent_step, u.item_index, u.item, u.output, u.fence, u.lease_expires_at,
       u.items_total
FROM jsonb_to_recordset(%s::jsonb) AS u(
    step_key text, status text, attempt int, max_attempts int, depends_on jsonb, queue text,
    timeout_seconds float8, backoff jsonb, kind text, dependants jsonb, waiting_on int,
    map_over text, parent_step text, item_index int, item jsonb, output jsonb, fence text,
    lease_expires_at timestamptz, items_total int)
"""

# Every write of an applied command in one statement: data-modifying CTEs share the
# transaction (and its locks), and one statement is one parse/bind/dump instead of five.
# Rows inserted earlier in the same transaction (a start_run's steps) are visible to it.
# `write_changes` assembles one by what the command spends and queues, and by how many steps
# and events it writes: the parts a command does not need are left out, not run on empty
# lists (an INSERT of no rows still opens its table and every index of it; a list of keys
# costs a join where one key is a lookup), and one row is passed as parameters, not as a
# document to unpack.
_RECEIPT = """
WITH receipt AS (
    INSERT INTO executor.receipts
        (idempotency_key, run_id, step_key, attempt, command_type, command, outcome,
         first_seq, last_seq)
    VALUES (%(key)s, %(run_id)s, %(step_key)s::text, %(attempt)s::int, %(command_type)s,
            %(command)s::jsonb, 'applied', %(first_seq)s, %(last_seq)s)
)"""
# The row that carried the command, by both columns of outbox_run.
_SPEND_OWN = """, spent AS (
    DELETE FROM executor.outbox WHERE run_id = %(run_id)s AND idempotency_key = %(key)s
)"""
# ... and the rows of other keys the command settles, one lookup for each: asked for with
# idempotency_key = ANY(...), a generic plan bounds only run_id and reads every outbox row
# of the run (a wide run's thousands) for each command.
_SPEND_LISTED = """, spent AS (
    DELETE FROM executor.outbox WHERE outbox_id IN (
        SELECT o.outbox_id FROM unnest(%(spent)s::text[]) AS k(key)
        CROSS JOIN LATERAL (
            SELECT outbox_id FROM executor.outbox
            WHERE run_id = %(run_id)s AND idempotency_key = k.key
            OFFSET 0
        ) AS o)
)"""
_STEPS_MANY = """, changed_steps AS (
    UPDATE executor.steps AS s
    SET status = u.status, attempt = u.attempt, output = u.output, error = u.error,
        lease_expires_at = u.lease_expires_at, next_attempt_at = u.next_attempt_at,
        waiting_on = u.waiting_on, items_total = u.items_total, items_done = u.items_done,
        fence = u.fence, wake_at = u.wake_at, event_name = u.event_name,
        child_run_id = u.child_run_id, updated_at = now()
    FROM jsonb_to_recordset(%(steps)s::jsonb) AS u(
        ctid tid, step_key text, status text, attempt int, output jsonb, error jsonb,
        lease_expires_at timestamptz, next_attempt_at timestamptz, waiting_on int,
        items_total int, items_done int, fence text, wake_at timestamptz, event_name text,
        child_run_id text)
    -- By the row versions this transaction locked (a TID scan, the only path left): a
    -- join on the key may be planned as a read of every step of the run.
    -- Matched to its new values by key: a nested loop on ctid would be quadratic in the
    -- number of steps changed (a root making ten thousand steps ready).
    WHERE s.ctid = ANY(%(s_ctid)s::tid[]) AND s.step_key = u.step_key
"""
# One changed step (every start, a completion that readies nothing): its new values as
# parameters. A document would cost the server a parse of it, a function scan to read it
# and a join to match it, more than the update itself.
_STEP_ONE = """, changed_steps AS (
    UPDATE executor.steps
    SET status = %(s_status)s::text, attempt = %(s_attempt)s::int, output = %(s_output)s::jsonb,
        error = %(s_error)s::jsonb, lease_expires_at = %(s_lease_expires_at)s::timestamptz,
        next_attempt_at = %(s_next_attempt_at)s::timestamptz, waiting_on = %(s_waiting_on)s::int,
        items_total = %(s_items_total)s::int, items_done = %(s_items_done)s::int,
        fence = %(s_fence)s::text, wake_at = %(s_wake_at)s::timestamptz,
        event_name = %(s_event_name)s::text, child_run_id = %(s_child_run_id)s::text,
        updated_at = now()
    WHERE ctid = %(s_ctid)s::tid AND step_key = %(s_step_key)s::text
"""
_RUN = """), changed_run AS (
    UPDATE executor.runs
    SET status = %(r_status)s::text, output = %(r_output)s::jsonb, error = %(r_error)s::jsonb,
        last_seq = %(last_seq)s, concurrency_slot = %(r_slot)s,
        steps_total = %(r_total)s, steps_completed = %(r_completed)s,
        steps_active = %(r_active)s, steps_failed = %(r_failed)s,
        updated_at = CASE WHEN status = %(r_status)s::text THEN updated_at ELSE now() END
    WHERE run_id = %(run_id)s
)"""
_APPEND_EVENTS = """
INSERT INTO executor.events (run_id, seq, type, step_key, attempt, idempotency_key, payload)
SELECT %(run_id)s, %(first_seq)s::bigint + u.n - 1, u.type, u.step_key, u.attempt, %(key)s,
       coalesce(u.payload, '{}')
FROM ROWS FROM (
    jsonb_to_recordset(%(events)s::jsonb)
        AS (type text, step_key text, attempt int, payload jsonb)
) WITH ORDINALITY AS u(type, step_key, attempt, payload, n)
"""


# One or two events (a start; a completion, and its run's end): as parameters, for the reason
# the one changed step is.
def _append_listed(count: int) -> str:
    rows = ",\n       ".join(
        f"(%(run_id)s, %(first_seq)s::bigint + {i}, %(e{i}_type)s, %(e{i}_step_key)s::text, "
        f"%(e{i}_attempt)s::int, %(key)s, coalesce(%(e{i}_payload)s::jsonb, '{{}}'))"
        for i in range(count)
    )
    return (
        "\nINSERT INTO executor.events "
        "(run_id, seq, type, step_key, attempt, idempotency_key, payload)\n"
        f"VALUES {rows}\n"
    )


_QUEUE_FOLLOWUPS = """
INSERT INTO executor.outbox
    (run_id, queue, idempotency_key, command, not_before, timeout_seconds, push_after)
SELECT u.run_id, u.queue, u.idempotency_key, u.command, COALESCE(u.not_before, now()),
       u.timeout_seconds,
       COALESCE(u.not_before, now()) + make_interval(secs => %(grace)s::float8)
FROM jsonb_to_recordset(%(outbox)s::jsonb) AS u(
    run_id text, queue text, idempotency_key text, command jsonb, not_before timestamptz,
    timeout_seconds float8)
RETURNING outbox_id, run_id, queue, idempotency_key, command, not_before, timeout_seconds
"""


def write_changes(*, spends_others: bool, queues: bool, one_step: bool, events: int) -> str:
    """The write of an applied command; `queues`: it adds outbox rows, and returns them.
    `one_step`: exactly one step changes; `events`: 1 or 2 passed as parameters, 0 for a
    document of any number."""
    head = (
        _RECEIPT
        + (_SPEND_LISTED if spends_others else _SPEND_OWN)
        + (_STEP_ONE if one_step else _STEPS_MANY)
        + _RUN
    )
    append = _append_listed(events) if events else _APPEND_EVENTS
    if not queues:
        return head + append
    return head + ", appended AS (" + append + ")" + _QUEUE_FOLLOWUPS


# Events passed as parameters, at most: a command appending more sends them as a document.
LISTED_EVENTS = 2

WRITE_CHANGES = {
    (others, queues, one, events): write_changes(
        spends_others=others, queues=queues, one_step=one, events=events
    )
    for others in (False, True)
    for queues in (False, True)
    for one in (False, True)
    for events in range(LISTED_EVENTS + 1)
}

# A second run the same transaction changes (a run admitted to a freed slot, or a child run
# created by its parent's step): its row, its events and its own receipt.
WRITE_OTHER_RUN = """
WITH receipt AS (
    INSERT INTO executor.receipts
        (idempotency_key, run_id, command_type, command, outcome, first_seq, last_seq)
    VALUES (%(key)s, %(run_id)s, %(command_type)s, %(command)s, 'applied', %(first_seq)s,
            %(last_seq)s)
), spent AS (
    DELETE FROM executor.outbox WHERE run_id = %(run_id)s AND idempotency_key = %(key)s
), changed_run AS (
    UPDATE executor.runs
    SET status = %(status)s, concurrency_slot = %(slot)s, last_seq = %(last_seq)s,
        updated_at = now()
    WHERE run_id = %(run_id)s
)
INSERT INTO executor.events (run_id, seq, type, idempotency_key, payload)
SELECT %(run_id)s, %(first_seq)s::bigint + u.n - 1, u.type, %(key)s, u.payload
FROM unnest(%(e_type)s::text[], %(e_payload)s::jsonb[]) WITH ORDINALITY AS u(type, payload, n)
"""

INSERT_RUN_EVENTS = """
INSERT INTO executor.run_events
    (run_id, received_seq, event, idempotency_key, payload, consumed_by, consumed_seq)
SELECT %s, u.received_seq, u.event, %s, u.payload, u.consumed_by,
       CASE WHEN u.consumed_by IS NOT NULL THEN u.received_seq END
FROM unnest(%s::bigint[], %s::text[], %s::jsonb[], %s::text[])
    AS u(received_seq, event, payload, consumed_by)
"""

CONSUME_RUN_EVENT = """
UPDATE executor.run_events SET consumed_by = %s, consumed_seq = %s
WHERE run_id = %s AND received_seq = %s
"""

NOTIFY_ENDED = "SELECT pg_notify('executor_run_ended', %s)"

# The outputs of given steps (the upstream of a step created in this transaction).
OUTPUTS = """
SELECT s.step_key, s.output FROM jsonb_array_elements_text(%s::jsonb) AS k(step_key)
CROSS JOIN LATERAL (
    SELECT step_key, output FROM executor.steps WHERE run_id = %s AND step_key = k.step_key
    OFFSET 0
) AS s
"""

# The outputs of a started step's upstream steps, in the commit's round trip; `known` are
# the keys whose outputs the sender has in hand (a completion that made the step ready).
UPSTREAM = """
SELECT d.k AS step_key, %(known)s::jsonb ? d.k AS known,
       CASE WHEN %(known)s::jsonb ? d.k THEN NULL ELSE (
           SELECT o.output FROM executor.steps AS o
           WHERE o.run_id = %(run_id)s AND o.step_key = d.k) END AS output
FROM executor.steps AS t, unnest(t.depends_on) AS d(k)
WHERE t.run_id = %(run_id)s AND t.step_key = %(step_key)s
"""

# Heartbeats extend a lease without an event; attempt, fence and status in the WHERE clause
# are the fence: a superseded attempt or another delivery updates nothing and learns it.
EXTEND_LEASE = """
UPDATE executor.steps
SET lease_expires_at = now() + make_interval(secs => %s)
WHERE run_id = %s AND step_key = %s AND attempt = %s AND status = 'running'
  AND fence IS NOT DISTINCT FROM %s
RETURNING lease_expires_at
"""
