"""The reaper: finds work whose job was lost and sends it again.

Postgres knows every step's state; Redis may have lost the job that should move it (a
killed worker, a flushed or restarted Redis, a delivery that failed while Postgres was
down). Four cases, each decided from the ledger and, where it matters, RQ's job hash:

1. A `running` step whose lease expired: its worker stopped heartbeating. The reaper applies
   `ExpireLease` with the deadline it saw, which fails the attempt (retrying or failed)
   through the handler like any other command; a late result of that attempt is `stale`.
2. A `queued` step with no live job: the same `start_step` command (same key, same job id)
   is pushed again. A job RQ marks failed, or holds as started for longer than the grace
   while the step is still queued, counts as lost.
3. A `retrying` step whose backoff ended more than a grace ago, in a running run, with no
   outbox row and no live job for its `dispatch_step`: the reaper applies a `DispatchStep`
   under a key of its own (`…:sweep:<n>`, n counting the reaper's earlier tries), since the
   natural key may already have been spent on a delivery that was dropped.
4. A `pending` run older than the grace with no outbox row and no live `start_run` job:
   the start_run job is pushed again.

Every state change goes through `Ledger.apply`; the reaper never writes runs or steps.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool

from executor.commands.models import (
    DispatchStep,
    ExpireLease,
    StartStep,
    unplanned_start,
    wire,
)
from executor.errors import LedgerBusy
from executor.ledger.handler import Ledger
from executor.transport.dispatch import Dispatcher
from queue_config import ExecutorSettings

log = logging.getLogger("executor.reaper")

Pool = ConnectionPool[psycopg.Connection[dict[str, Any]]]

EXPIRED_LEASES = """
SELECT run_id, step_key, attempt, lease_expires_at
FROM executor.steps
WHERE status = 'running' AND lease_expires_at < now()
ORDER BY lease_expires_at
LIMIT %s
"""

QUEUED_WITHOUT_OUTBOX = """
SELECT s.run_id, s.step_key, s.attempt, s.queue, s.timeout_seconds
FROM executor.steps AS s
JOIN executor.runs AS r ON r.run_id = s.run_id
WHERE s.status = 'queued'
  AND s.updated_at < now() - make_interval(secs => %s)
  AND r.status IN ('running', 'paused')
  AND NOT EXISTS (
      SELECT 1 FROM executor.outbox AS o
      WHERE o.run_id = s.run_id
        AND o.idempotency_key = 'start_step:' || s.run_id || ':' || s.step_key || ':' || s.attempt)
ORDER BY s.updated_at
LIMIT %s
"""

OVERDUE_RETRIES = """
SELECT s.run_id, s.step_key, s.attempt, s.queue
FROM executor.steps AS s
JOIN executor.runs AS r ON r.run_id = s.run_id
WHERE s.status = 'retrying'
  AND r.status = 'running'
  AND s.next_attempt_at < now() - make_interval(secs => %s)
  -- After a terminal failure nothing more is dispatched; a manual retry re-dispatches these.
  AND NOT EXISTS (
      SELECT 1 FROM executor.steps AS f WHERE f.run_id = s.run_id AND f.status = 'failed')
  AND NOT EXISTS (
      SELECT 1 FROM executor.outbox AS o
      WHERE o.run_id = s.run_id
        AND o.idempotency_key
            = 'dispatch_step:' || s.run_id || ':' || s.step_key || ':' || (s.attempt + 1))
ORDER BY s.next_attempt_at
LIMIT %s
"""

SWEEP_DISPATCHES = """
SELECT count(*) AS n FROM executor.receipts
WHERE run_id = %s AND step_key = %s AND attempt = %s AND command_type = 'dispatch_step'
  AND starts_with(idempotency_key, %s)
"""

STALE_PENDING_RUNS = """
SELECT r.run_id, r.workflow
FROM executor.runs AS r
WHERE r.status = 'pending'
  AND r.created_at < now() - make_interval(secs => %s)
  AND NOT EXISTS (
      SELECT 1 FROM executor.outbox AS o
      WHERE o.run_id = r.run_id AND o.idempotency_key = 'start_run:' || r.run_id)
ORDER BY r.created_at
LIMIT %s
"""


@dataclass
class ReapReport:
    expired: int = 0
    requeued: int = 0
    redispatched: int = 0
    restarted: int = 0
    busy: int = 0


def reap(
    pool: Pool,
    ledger: Ledger,
    dispatcher: Dispatcher,
    settings: ExecutorSettings,
    *,
    limit: int = 1000,
) -> ReapReport:
    """Run the four checks once; returns what was done. Postgres errors propagate."""
    report = ReapReport()
    grace = settings.recovery_grace_seconds
    with pool.connection() as conn:
        expired = conn.execute(EXPIRED_LEASES, (limit,)).fetchall()
        queued = conn.execute(QUEUED_WITHOUT_OUTBOX, (grace, limit)).fetchall()
        retrying = conn.execute(OVERDUE_RETRIES, (grace, limit)).fetchall()
        pending = conn.execute(STALE_PENDING_RUNS, (grace, limit)).fetchall()

    for row in expired:
        command = ExpireLease(
            run_id=row["run_id"],
            step_key=row["step_key"],
            attempt=row["attempt"],
            observed_lease=row["lease_expires_at"].isoformat(),
        )
        if _apply(ledger, dispatcher, command, report):
            report.expired += 1

    for row in queued:
        start = StartStep(run_id=row["run_id"], step_key=row["step_key"], attempt=row["attempt"])
        result = dispatcher.ensure_job(
            wire(start),
            row["queue"],
            step_timeout=row["timeout_seconds"],
            replace_started_after=grace,
        )
        if result != "present":
            log.info("re-pushed %s (%s)", start.idempotency_key, result)
            report.requeued += 1

    for row in retrying:
        attempt = row["attempt"] + 1
        natural = f"dispatch_step:{row['run_id']}:{row['step_key']}:{attempt}"
        if dispatcher.job_is_live(natural, started_within=grace):
            continue
        prefix = f"{natural}:sweep:"
        with pool.connection() as conn:
            found = conn.execute(
                SWEEP_DISPATCHES, (row["run_id"], row["step_key"], attempt, prefix)
            ).fetchone()
        tries = int(found["n"]) if found else 0
        dispatch = DispatchStep(
            run_id=row["run_id"],
            step_key=row["step_key"],
            attempt=attempt,
            idempotency_key=f"{prefix}{tries + 1}",
        )
        if _apply(ledger, dispatcher, dispatch, report):
            report.redispatched += 1

    for row in pending:
        key = f"start_run:{row['run_id']}"
        command_json = wire(unplanned_start(row["run_id"], row["workflow"]))
        result = dispatcher.ensure_job(
            command_json, settings.default_queue, replace_started_after=grace
        )
        if result != "present":
            log.info("re-pushed %s (%s)", key, result)
            report.restarted += 1
    return report


def _apply(
    ledger: Ledger, dispatcher: Dispatcher, command: ExpireLease | DispatchStep, report: ReapReport
) -> bool:
    try:
        outcome = ledger.apply(command)
    except LedgerBusy as exc:
        log.warning("reaper: %s", exc)
        report.busy += 1
        return False
    dispatcher.push(outcome.followups)
    if outcome.applied:
        log.info("reaper: %s", outcome.summary())
    return outcome.applied
