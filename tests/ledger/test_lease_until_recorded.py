"""An attempt keeps its lease until its outcome is recorded, not just until its function returns.

A report can queue behind the run's lock (ten thousand items of one map share it). If the
heartbeat stopped when the function returned, the lease would run out in that queue and the
reaper could fail an attempt that had succeeded (with max_attempts=1, the whole run).

The bad interleaving is forced: the test holds the run's row lock from the moment the
function returns, waits until the report is blocked on it and until the original lease
deadline has passed, and only then lets the report through.
"""

from __future__ import annotations

import threading
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool
from support.waiting import wait_for

from executor.commands.models import CreateRun, StartRun, StartStep
from executor.ledger.handler import Ledger
from executor.ledger.outcome import Outcome
from executor.workflows.definition import StepContext, Workflow
from executor.workflows.runner import StepRunner

Pool = ConnectionPool[psycopg.Connection[dict[str, Any]]]

LEASE = 1.0
returned = threading.Event()
lock_held = threading.Event()

slow_report = Workflow("t_slow_report", max_attempts=1, register=True)


@slow_report.step
def only(ctx: StepContext) -> str:
    returned.set()
    assert lock_held.wait(10)
    return "done"


def test_a_report_blocked_behind_the_run_lock_keeps_its_lease(pool: Pool, db_url: str) -> None:
    ledger = Ledger(pool, lease_seconds=LEASE)
    ledger.apply(CreateRun(run_id="slow", workflow="t_slow_report", idempotency_key="c-slow"))
    ledger.apply(StartRun(run_id="slow", workflow="t_slow_report", steps=slow_report.specs()))
    runner = StepRunner(ledger, lambda items: None, heartbeat_interval=0.1)
    ended: list[Outcome] = []
    worker = threading.Thread(
        target=lambda: ended.append(
            runner.run(fence="f", command=StartStep(run_id="slow", step_key="only", attempt=1))
        )
    )
    worker.start()
    # The holder only holds the lock; the observer reads in autocommit, since a transaction
    # sees pg_stat_activity as it was at its first read.
    with (
        psycopg.connect(db_url, row_factory=dict_row) as holder,
        psycopg.connect(db_url, row_factory=dict_row, autocommit=True) as observer,
    ):
        assert returned.wait(10)
        holder.execute("SELECT 1 FROM executor.runs WHERE run_id = 'slow' FOR UPDATE")
        lock_held.set()

        def blocked() -> bool:
            row = observer.execute(
                "SELECT count(*) AS n FROM pg_stat_activity"
                " WHERE %s = ANY(pg_blocking_pids(pid)) AND query LIKE '%%lock_for_command%%'",
                (holder.info.backend_pid,),
            ).fetchone()
            return row is not None and row["n"] > 0

        wait_for(
            timeout=15, interval=0.02, what="the report to block on the run lock", check=blocked
        )

        def lease() -> datetime:
            row = observer.execute(
                "SELECT lease_expires_at FROM executor.steps"
                " WHERE run_id = 'slow' AND step_key = 'only'"
            ).fetchone()
            assert row is not None
            assert row["lease_expires_at"] is not None
            return row["lease_expires_at"]  # type: ignore[no-any-return]

        first = lease()

        def outlived() -> bool:
            row = observer.execute("SELECT clock_timestamp() AS now").fetchone()
            assert row is not None
            return bool(row["now"] > first)

        # Past the deadline the lease had when the report blocked: without a heartbeat it
        # would now be expired, and the reaper's verdict free to fail the attempt.
        wait_for(timeout=15, interval=0.02, what="the first lease deadline to pass", check=outlived)
        wait_for(
            timeout=15,
            interval=0.02,
            what="a heartbeat to extend the lease",
            check=lambda: lease() > first,
        )
        row = observer.execute(
            "SELECT lease_expires_at > clock_timestamp() AS held FROM executor.steps"
            " WHERE run_id = 'slow' AND step_key = 'only'"
        ).fetchone()
        assert row is not None
        assert row["held"]
        assert blocked()  # the report was held back all along
        holder.rollback()
    worker.join(10)
    assert not worker.is_alive()
    [outcome] = ended
    assert outcome.applied
    assert outcome.run_status == "completed"
