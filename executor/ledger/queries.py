"""Every statement the handler runs, by name. Only the ledger package writes these tables."""

from __future__ import annotations

ACTIVE = "('pending', 'running', 'paused')"

LOCK_RUN = """
SELECT run_id, workflow, status, concurrency_key, input, output, error, last_seq
FROM executor.runs WHERE run_id = %s FOR UPDATE
"""

# Locks every step of the run in key order: the fixed order (run, then steps by key) means two
# handlers can never wait on each other in a cycle.
LOCK_STEPS = """
SELECT step_key, status, attempt, max_attempts, depends_on, queue, timeout_seconds, backoff,
       output, error, lease_expires_at, next_attempt_at
FROM executor.steps WHERE run_id = %s ORDER BY step_key FOR UPDATE
"""

# clock_timestamp(), not now(): this runs after the run lock was granted, and a command that
# waited on the lock must judge leases and backoffs by the time it actually decides.
RECEIPT_AND_NOW = """
SELECT clock_timestamp() AS now, r.outcome, r.received_at, r.run_id
FROM (SELECT 1) AS one
LEFT JOIN executor.receipts AS r ON r.idempotency_key = %s
"""

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
INSERT INTO executor.runs (run_id, workflow, status, concurrency_key, input, last_seq)
VALUES (%s, %s, %s, %s, %s, %s)
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

UPDATE_RUN = """
UPDATE executor.runs
SET status = %s, output = %s, error = %s, last_seq = %s, updated_at = now()
WHERE run_id = %s
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

UPDATE_STEPS = """
UPDATE executor.steps AS s
SET status = u.status, attempt = u.attempt, output = u.output, error = u.error,
    lease_expires_at = u.lease_expires_at, next_attempt_at = u.next_attempt_at,
    updated_at = now()
FROM unnest(%s::text[], %s::text[], %s::int[], %s::jsonb[], %s::jsonb[], %s::timestamptz[],
            %s::timestamptz[])
    AS u(step_key, status, attempt, output, error, lease_expires_at, next_attempt_at)
WHERE s.run_id = %s AND s.step_key = u.step_key
"""

INSERT_EVENTS = """
INSERT INTO executor.events (run_id, seq, type, step_key, attempt, idempotency_key, payload)
SELECT %s, u.seq, u.type, u.step_key, u.attempt, %s, u.payload
FROM unnest(%s::bigint[], %s::text[], %s::text[], %s::int[], %s::jsonb[])
    AS u(seq, type, step_key, attempt, payload)
"""

INSERT_OUTBOX = """
INSERT INTO executor.outbox
    (run_id, queue, idempotency_key, command, not_before, timeout_seconds)
SELECT %s, u.queue, u.idempotency_key, u.command, COALESCE(u.not_before, now()),
       u.timeout_seconds
FROM unnest(%s::text[], %s::text[], %s::jsonb[], %s::timestamptz[], %s::float8[])
    AS u(queue, idempotency_key, command, not_before, timeout_seconds)
RETURNING outbox_id, run_id, queue, idempotency_key, command, not_before, timeout_seconds
"""

# Heartbeats extend a lease without an event; the attempt and status in the WHERE clause are
# the fence: a superseded attempt updates nothing and learns it lost the lease.
EXTEND_LEASE = """
UPDATE executor.steps
SET lease_expires_at = now() + make_interval(secs => %s)
WHERE run_id = %s AND step_key = %s AND attempt = %s AND status = 'running'
RETURNING lease_expires_at
"""
