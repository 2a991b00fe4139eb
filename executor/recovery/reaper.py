"""The reaper: what the ledger knows must happen, and no message will trigger.

Lost jobs need no reaper: every undecided command keeps its outbox row and the relay pushes
it again. Two things have no message at all, only a time:

1. A `running` step whose lease expired: its worker stopped heartbeating. The reaper applies
   `ExpireLease` with the deadline it saw, which fails the attempt (retrying or failed)
   through the handler like any other command; a late result of that attempt is `stale`.
2. A `sleeping` or `waiting` step whose `wake_at` passed in a running run: the reaper applies
   `WakeStep`, which completes a sleep or times out a wait. A paused run's timers are not
   fired (resuming does not need them: the next pass after the resume fires them).

Every state change goes through `Ledger.apply`; the reaper never writes runs or steps.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from executor.commands.models import ExpireLease, WakeStep
from executor.errors import LedgerBusy
from executor.ledger.handler import Ledger
from executor.storage.db import Pool
from executor.transport.dispatch import Dispatcher

log = logging.getLogger("executor.reaper")

EXPIRED_LEASES = """
SELECT run_id, step_key, attempt, lease_expires_at
FROM executor.steps
WHERE status = 'running' AND lease_expires_at < now()
ORDER BY lease_expires_at
LIMIT %s
"""

DUE_TIMERS = """
SELECT s.run_id, s.step_key, s.attempt
FROM executor.steps AS s
JOIN executor.runs AS r ON r.run_id = s.run_id AND r.status = 'running'
WHERE s.status IN ('sleeping', 'waiting') AND s.wake_at <= now()
ORDER BY s.wake_at
LIMIT %s
"""


@dataclass
class ReapReport:
    expired: int = 0
    woken: int = 0
    busy: int = 0


def reap(pool: Pool, ledger: Ledger, dispatcher: Dispatcher, *, limit: int = 1000) -> ReapReport:
    """Expire dead leases and fire due timers once; returns what was done."""
    report = ReapReport()
    with pool.connection() as conn:
        expired = conn.execute(EXPIRED_LEASES, (limit,)).fetchall()
    for row in expired:
        command = ExpireLease(
            run_id=row["run_id"],
            step_key=row["step_key"],
            attempt=row["attempt"],
            observed_lease=row["lease_expires_at"].isoformat(),
        )
        if _apply(ledger, dispatcher, command, report):
            report.expired += 1
    report.woken += fire_timers(pool, ledger, dispatcher, limit=limit, report=report)
    return report


def fire_timers(
    pool: Pool,
    ledger: Ledger,
    dispatcher: Dispatcher,
    *,
    limit: int = 1000,
    report: ReapReport | None = None,
) -> int:
    """Apply a `WakeStep` for every due timer; cheap enough to run several times a second."""
    with pool.connection() as conn:
        due = conn.execute(DUE_TIMERS, (limit,)).fetchall()
    woken = 0
    for row in due:
        wake = WakeStep(run_id=row["run_id"], step_key=row["step_key"], attempt=row["attempt"])
        if _apply(ledger, dispatcher, wake, report or ReapReport()):
            woken += 1
    return woken


def _apply(
    ledger: Ledger, dispatcher: Dispatcher, command: ExpireLease | WakeStep, report: ReapReport
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
