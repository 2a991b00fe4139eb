"""The published late-start race, forced step by step: first against a naive store, then the ledger.

The bug: the step-state `UPDATE` that refuses terminal steps and the event `INSERT` ran as
two statements with nothing spanning them. Worker B's late `step_started` passed the check
while the step was still running, worker A then committed `step_completed`, and B's event
landed after it, so replaying the log failed.

Both halves force the same interleaving with Events, never with sleeps:

    B: check passes (step is running)
    A: complete the step (update + event), commit
    B: append step_started

Against the naive store the log is corrupted and `verify` says where. Through
`Ledger.apply`, B cannot interleave at all: it waits on A's row lock (proved by asking
Postgres who is waiting on whom), then sees the completed step and is dropped as `terminal`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import psycopg
import pytest
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from executor.commands.models import Command, CompleteStep, CreateRun, StartRun, StartStep, StepSpec
from executor.ledger.handler import Ledger, LedgerHooks
from executor.ledger.verify import verify

Pool = ConnectionPool[psycopg.Connection[dict[str, Any]]]
T = TypeVar("T")

WAIT = 30.0  # generous upper bound for any one forced step; never reached when things work
TERMINAL = "('completed', 'failed', 'cancelled')"


def launch_and_start(ledger: Ledger, run_id: str) -> None:
    """A one-step run whose attempt 1 is running (worker A holds it)."""
    ledger.apply(CreateRun(run_id=run_id, workflow="wf", idempotency_key=f"create:{run_id}"))
    ledger.apply(StartRun(run_id=run_id, workflow="wf", steps=(StepSpec(step_key="work"),)))
    started = ledger.apply(StartStep(run_id=run_id, step_key="work", attempt=1))
    assert started.applied, started.summary()


def poll(what: str, probe: Callable[[], T | None], timeout: float = WAIT) -> T:
    """Ask `probe` until it answers; fail naming `what` once the deadline passes."""
    deadline = time.monotonic() + timeout
    while True:
        answer = probe()
        if answer:
            return answer
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.002)


@pytest.fixture
def threads() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=4) as ex:
        yield ex


# --- (a) the naive foil --------------------------------------------------------------------


def naive_set_status(conn: psycopg.Connection[dict[str, Any]], run_id: str, status: str) -> bool:
    """Statement 1 of the naive write: a conditional UPDATE that refuses terminal steps."""
    cur = conn.execute(
        f"UPDATE executor.steps SET status = %s, updated_at = now() "
        f"WHERE run_id = %s AND step_key = 'work' AND status NOT IN {TERMINAL}",
        (status, run_id),
    )
    return cur.rowcount == 1


def naive_append(
    conn: psycopg.Connection[dict[str, Any]], run_id: str, type_: str, key: str
) -> int:
    """Statement 2: append the event at max(seq) + 1 (and keep runs.last_seq in step)."""
    row = conn.execute(
        """
        WITH ev AS (
            INSERT INTO executor.events (run_id, seq, type, step_key, attempt, idempotency_key)
            SELECT %(run)s, COALESCE(max(seq), 0) + 1, %(type)s, 'work', 1, %(key)s
            FROM executor.events WHERE run_id = %(run)s
            RETURNING run_id, seq
        )
        UPDATE executor.runs AS r SET last_seq = ev.seq FROM ev
        WHERE r.run_id = ev.run_id
        RETURNING ev.seq
        """,
        {"run": run_id, "type": type_, "key": key},
    ).fetchone()
    assert row is not None
    return int(row["seq"])


def test_naive_two_statement_write_corrupts_the_log(
    pool: Pool, db_url: str, threads: ThreadPoolExecutor
) -> None:
    run_id = "naive-race"
    launch_and_start(Ledger(pool), run_id)

    b_checked = threading.Event()
    a_committed = threading.Event()

    def connect() -> psycopg.Connection[dict[str, Any]]:
        return psycopg.connect(db_url, autocommit=True, row_factory=dict_row)

    def worker_b() -> int:
        """A redelivered start for attempt 1: its check passes while the step is running."""
        with connect() as conn:
            assert naive_set_status(conn, run_id, "running"), "B's check should pass"
            b_checked.set()
            assert a_committed.wait(WAIT)
            return naive_append(conn, run_id, "step_started", "start_step:naive-race:work:1")

    def worker_a() -> int:
        """The worker that ran attempt 1 reports it completed, between B's two statements."""
        with connect() as conn:
            assert b_checked.wait(WAIT)
            assert naive_set_status(conn, run_id, "completed")
            seq = naive_append(conn, run_id, "step_completed", "complete_step:naive-race:work:1")
            a_committed.set()
            return seq

    b = threads.submit(worker_b)
    a = threads.submit(worker_a)
    a_seq, b_seq = a.result(WAIT), b.result(WAIT)
    assert b_seq == a_seq + 1  # B's start landed right after the completion

    with pool.connection() as conn:
        types = [
            r["type"]
            for r in conn.execute(
                "SELECT type FROM executor.events WHERE run_id = %s AND step_key = 'work' "
                "ORDER BY seq",
                (run_id,),
            )
        ]
        report = verify(conn)
    assert types == [
        "step_created",
        "step_queued",
        "step_started",
        "step_completed",
        "step_started",
    ]
    assert not report.ok
    i1 = [v for v in report.violations if v.invariant == "I1"]
    assert len(i1) == 1, report.violations
    assert (i1[0].run_id, i1[0].step_key, i1[0].seq) == (run_id, "work", b_seq)
    assert "step_started after completed" in i1[0].message


# --- (b) the same interleaving through the ledger --------------------------------------------


def lock_waiters(conn: psycopg.Connection[dict[str, Any]]) -> list[dict[str, Any]]:
    """Backends of this database waiting on a heavyweight lock, with who blocks them."""
    return conn.execute(
        """
        SELECT a.pid, a.wait_event, a.query, pg_blocking_pids(a.pid) AS blockers
        FROM pg_stat_activity AS a
        WHERE a.datname = current_database() AND a.wait_event_type = 'Lock'
        """
    ).fetchall()


def holds_run_lock(conn: psycopg.Connection[dict[str, Any]], pid: int) -> bool:
    row = conn.execute(
        "SELECT count(*) AS n FROM pg_locks WHERE pid = %s AND granted "
        "AND relation = 'executor.runs'::regclass AND mode = 'RowShareLock'",
        (pid,),
    ).fetchone()
    return row is not None and row["n"] == 1


def test_ledger_serialises_the_late_start_behind_the_completion(
    pool: Pool, threads: ThreadPoolExecutor
) -> None:
    run_id = "ledger-race"
    a_holds_locks = threading.Event()
    release_a = threading.Event()

    def after_lock(command: Command) -> None:
        if isinstance(command, CompleteStep):
            a_holds_locks.set()

    def before_commit(command: Command) -> None:
        if isinstance(command, CompleteStep):
            assert release_a.wait(WAIT), "A was never released"

    ledger = Ledger(pool, hooks=LedgerHooks(after_lock=after_lock, before_commit=before_commit))
    launch_and_start(ledger, run_id)

    # A: the worker that ran attempt 1 completes it; it stops inside its transaction, after
    # every write and before COMMIT, holding the run and step row locks.
    a: Future[Any] = threads.submit(
        ledger.apply,
        CompleteStep(fence="f", run_id=run_id, step_key="work", attempt=1, output="done"),
    )
    assert a_holds_locks.wait(WAIT)

    # B: a late start for the same attempt under another key (an external caller's), so the
    # receipt check cannot be what stops it.
    late = StartStep(
        run_id=run_id, step_key="work", attempt=1, idempotency_key="external:late-start"
    )
    b: Future[Any] = threads.submit(ledger.apply, late)

    with pool.connection() as conn:
        waiting = poll(
            "B to wait on A's row lock",
            lambda: [w for w in lock_waiters(conn) if "lock_for_command" in w["query"]],
        )
        assert len(waiting) == 1, waiting
        (blocker,) = waiting[0]["blockers"]
        assert "lock_for_command" in waiting[0]["query"]  # the run row lock, sql/004
        assert waiting[0]["wait_event"] in ("transactionid", "tuple")
        assert holds_run_lock(conn, blocker), "B's blocker should be A, holding the run row"
        assert not b.done()
        assert not a.done()

    release_a.set()
    completed = a.result(WAIT)
    dropped = b.result(WAIT)

    assert completed.applied
    assert [e.type for e in completed.events] == ["step_completed", "run_completed"]
    assert dropped.dropped
    assert dropped.reason == "terminal"
    assert "step work is completed" in (dropped.detail or "")
    assert not dropped.events

    with pool.connection() as conn:
        types = [
            r["type"]
            for r in conn.execute(
                "SELECT type FROM executor.events WHERE run_id = %s ORDER BY seq", (run_id,)
            )
        ]
        receipt = conn.execute(
            "SELECT outcome FROM executor.receipts WHERE idempotency_key = 'external:late-start'"
        ).fetchone()
        drops = conn.execute(
            "SELECT reason FROM executor.drops WHERE idempotency_key = 'external:late-start'"
        ).fetchall()
        report = verify(conn)
    assert types == [
        "run_created",
        "run_started",
        "step_created",
        "step_queued",
        "step_started",
        "step_completed",
        "run_completed",
    ]
    assert receipt == {"outcome": "terminal"}
    assert drops == [{"reason": "terminal"}]
    assert report.ok, [str(v) for v in report.violations]
