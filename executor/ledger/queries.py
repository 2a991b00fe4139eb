"""Every statement the handler runs, by name. Only the ledger package writes these tables."""

from __future__ import annotations

ACTIVE = "('pending', 'running', 'paused')"

# See sql/004_lock_for_command.sql: the run lock, the step locks and the key, in one call.
LOCK_FOR_COMMAND = "SELECT executor.lock_for_command(%s, %s, %s) AS locked"

INSERT_RECEIPT = """
INSERT INTO executor.receipts
    (idempotency_key, run_id, step_key, attempt, command_type, command, outcome, detail,
     first_seq, last_seq)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
"""

UPDATE_RECEIPT_OUTCOME = """
UPDATE executor.receipts SET outcome = %s, detail = %s, first_seq = NULL, last_seq = NULL
WHERE idempotency_key = %s
"""

INSERT_DROP = """
INSERT INTO executor.drops
    (idempotency_key, run_id, step_key, attempt, command_type, reason, detail, command, raw)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)
"""

# ON CONFLICT on the partial unique index (I5): a competing launch waits for the holder's
# transaction, then inserts nothing; the caller names the holder in its error.
INSERT_RUN = f"""
INSERT INTO executor.runs (run_id, workflow, status, concurrency_key, input, last_seq, traceparent)
VALUES (%s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (concurrency_key)
    WHERE concurrency_key IS NOT NULL AND status IN {ACTIVE}
DO NOTHING
RETURNING run_id
"""

KEY_HOLDER = f"""
SELECT run_id FROM executor.runs
WHERE concurrency_key = %s AND status IN {ACTIVE} AND run_id <> %s
LIMIT 1
"""

INSERT_STEPS = """
INSERT INTO executor.steps
    (run_id, step_key, status, attempt, max_attempts, depends_on, queue, timeout_seconds,
     backoff)
SELECT %s, u.step_key, u.status, u.attempt, u.max_attempts,
       ARRAY(SELECT jsonb_array_elements_text(u.depends_on)), u.queue, u.timeout_seconds,
       u.backoff
FROM unnest(%s::text[], %s::text[], %s::int[], %s::int[], %s::jsonb[], %s::text[],
            %s::float8[], %s::jsonb[])
    AS u(step_key, status, attempt, max_attempts, depends_on, queue, timeout_seconds, backoff)
"""

# Every write of an applied command in one statement: data-modifying CTEs share the
# transaction (and its locks), and one statement is one parse/bind/dump instead of five.
# Rows inserted earlier in the same transaction (a start_run's steps) are visible to it.
WRITE_CHANGES = """
WITH receipt AS (
    INSERT INTO executor.receipts
        (idempotency_key, run_id, step_key, attempt, command_type, command, outcome,
         first_seq, last_seq)
    SELECT %(key)s, %(run_id)s, %(step_key)s::text, %(attempt)s::int, %(command_type)s,
           %(command)s, 'applied', %(first_seq)s, %(last_seq)s
    WHERE %(with_receipt)s
), changed_steps AS (
    UPDATE executor.steps AS s
    SET status = u.status, attempt = u.attempt, output = u.output, error = u.error,
        lease_expires_at = u.lease_expires_at, next_attempt_at = u.next_attempt_at,
        updated_at = now()
    FROM unnest(%(s_key)s::text[], %(s_status)s::text[], %(s_attempt)s::int[],
                %(s_output)s::jsonb[], %(s_error)s::jsonb[], %(s_lease)s::timestamptz[],
                %(s_next)s::timestamptz[])
        AS u(step_key, status, attempt, output, error, lease_expires_at, next_attempt_at)
    WHERE s.run_id = %(run_id)s AND s.step_key = u.step_key
), changed_run AS (
    UPDATE executor.runs
    SET status = %(r_status)s, output = %(r_output)s, error = %(r_error)s,
        last_seq = %(last_seq)s, updated_at = now()
    WHERE run_id = %(run_id)s
), appended AS (
    INSERT INTO executor.events (run_id, seq, type, step_key, attempt, idempotency_key, payload)
    SELECT %(run_id)s, u.seq, u.type, u.step_key, u.attempt, %(key)s, u.payload
    FROM unnest(%(e_seq)s::bigint[], %(e_type)s::text[], %(e_step)s::text[],
                %(e_attempt)s::int[], %(e_payload)s::jsonb[])
        AS u(seq, type, step_key, attempt, payload)
)
INSERT INTO executor.outbox
    (run_id, queue, idempotency_key, command, not_before, timeout_seconds)
SELECT %(run_id)s, u.queue, u.idempotency_key, u.command, COALESCE(u.not_before, now()),
       u.timeout_seconds
FROM unnest(%(o_queue)s::text[], %(o_key)s::text[], %(o_command)s::jsonb[],
            %(o_not_before)s::timestamptz[], %(o_timeout)s::float8[])
    AS u(queue, idempotency_key, command, not_before, timeout_seconds)
RETURNING outbox_id, run_id, queue, idempotency_key, command, not_before, timeout_seconds
"""

STARTED_BY = """
SELECT s.step_key, s.attempt, s.queue, s.timeout_seconds, s.lease_expires_at, s.max_attempts,
       s.depends_on, r.workflow, r.input
FROM executor.events AS e
JOIN executor.steps AS s
  ON s.run_id = e.run_id AND s.step_key = e.step_key AND s.attempt = e.attempt
 AND s.status = 'running'
JOIN executor.runs AS r ON r.run_id = e.run_id AND r.status = 'running'
WHERE e.run_id = %s AND e.idempotency_key = %s AND e.type = 'step_started'
"""

OUTPUTS = """
SELECT step_key, output FROM executor.steps WHERE run_id = %s AND step_key = ANY(%s)
"""

# Heartbeats extend a lease without an event; the attempt and status in the WHERE clause are
# the fence: a superseded attempt updates nothing and learns it lost the lease.
EXTEND_LEASE = """
UPDATE executor.steps
SET lease_expires_at = now() + make_interval(secs => %s)
WHERE run_id = %s AND step_key = %s AND attempt = %s AND status = 'running'
RETURNING lease_expires_at
"""
