"""Concurrency keys with N slots and a queue: at most N holders, admitted oldest first in the
transaction that frees a slot, by the database's unique index on (key, slot)."""

from __future__ import annotations

import contextlib
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg
import pytest

from executor.cli.main import main
from executor.commands.models import (
    CancelRun,
    CompleteStep,
    CreateRun,
    StartRun,
    StartStep,
    StepSpec,
)
from executor.errors import ConcurrencyKeyTaken, ConcurrencyLimitConflict
from executor.ledger.handler import Ledger
from executor.ledger.verify import verify
from executor.storage.db import Pool

KEY = "tenant:42"
LIMIT = 3


def launch(ledger: Ledger, run_id: str, *, limit: int = LIMIT, mode: str = "queue") -> str:
    outcome = ledger.apply(
        CreateRun(
            run_id=run_id,
            workflow="wf",
            concurrency_key=KEY,
            concurrency_limit=limit,
            on_conflict=mode,  # type: ignore[arg-type]
            idempotency_key=f"create:{run_id}",
        )
    )
    assert outcome.applied, outcome.summary()
    assert outcome.run_status is not None
    return outcome.run_status


def finish(ledger: Ledger, run_id: str) -> None:
    """Plan, start and complete a one-step run, as a worker would."""
    assert ledger.apply(
        StartRun(run_id=run_id, workflow="wf", steps=(StepSpec(step_key="s"),))
    ).applied
    assert ledger.apply(StartStep(run_id=run_id, step_key="s", attempt=1, fence="w")).applied
    done = ledger.apply(CompleteStep(run_id=run_id, step_key="s", attempt=1, fence="w"))
    assert done.run_status == "completed", done.summary()


def holders(pool: Pool) -> list[str]:
    with pool.connection() as conn:
        rows = conn.execute(
            "SELECT run_id FROM executor.runs WHERE concurrency_key = %s"
            " AND status IN ('pending', 'running', 'paused') ORDER BY concurrency_slot",
            (KEY,),
        ).fetchall()
    return [r["run_id"] for r in rows]


def statuses(pool: Pool) -> dict[str, str]:
    with pool.connection() as conn:
        rows = conn.execute("SELECT run_id, status FROM executor.runs").fetchall()
    return {r["run_id"]: r["status"] for r in rows}


def assert_verified(pool: Pool) -> None:

    with pool.connection() as conn:
        report = verify(conn)
    assert report.ok, [str(v) for v in report.violations]


def test_the_fourth_launch_queues_and_is_admitted_when_a_holder_ends(
    pool: Pool,
    db_url: str,
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ledger = Ledger(pool)
    assert [launch(ledger, f"r{i}") for i in range(5)] == [
        "pending",
        "pending",
        "pending",
        "queued",
        "queued",
    ]
    assert holders(pool) == ["r0", "r1", "r2"]
    # `executor runs` shows the queue and each key's holders.
    monkeypatch.setenv("EXECUTOR_DATABASE_URL", db_url)
    monkeypatch.setenv("EXECUTOR_REDIS_URL", redis_url)
    capsys.readouterr()
    assert main(["runs", "--keys", "--json"]) == 0
    [key] = json.loads(capsys.readouterr().out)
    assert (key["concurrency_key"], key["concurrency_limit"]) == (KEY, LIMIT)
    assert (key["holders"], key["queued"]) == (["r0", "r1", "r2"], ["r3", "r4"])
    assert main(["runs", "--status", "queued", "--json"]) == 0
    assert {r["run_id"] for r in json.loads(capsys.readouterr().out)} == {"r3", "r4"}
    finish(ledger, "r1")
    assert holders(pool) == ["r0", "r3", "r2"]  # r3 took the slot r1 freed
    assert statuses(pool)["r4"] == "queued"
    with pool.connection() as conn:
        outbox = [
            r["idempotency_key"]
            for r in conn.execute("SELECT idempotency_key FROM executor.outbox ORDER BY 1")
        ]
    assert "start_run:r3" in outbox  # admitted in the same transaction, start job written
    assert ledger.apply(CancelRun(run_id="r4", idempotency_key="cancel-r4")).applied
    assert statuses(pool)["r4"] == "cancelled"  # a queued run can be cancelled
    finish(ledger, "r0")
    assert holders(pool) == ["r3", "r2"]
    assert_verified(pool)


def test_reject_and_queue_launches_mix_and_limits_must_agree(pool: Pool) -> None:
    ledger = Ledger(pool)
    launch(ledger, "a", limit=2)
    launch(ledger, "b", limit=2, mode="reject")
    with pytest.raises(ConcurrencyKeyTaken) as taken:
        ledger.apply(
            CreateRun(
                run_id="c",
                workflow="wf",
                concurrency_key=KEY,
                concurrency_limit=2,
                idempotency_key="create:c",
            )
        )
    assert taken.value.holder_run_id == "a"
    assert launch(ledger, "d", limit=2) == "queued"
    with pytest.raises(ConcurrencyLimitConflict, match="in use with concurrency_limit=2"):
        launch(ledger, "e", limit=5)
    for run in ("a", "b", "d"):
        finish(ledger, run)
    assert launch(ledger, "e", limit=5) == "pending"  # unused now: the new limit holds
    assert_verified(pool)


def test_thirty_two_threads_never_exceed_the_limit_and_admit_in_launch_order(
    pool: Pool,
) -> None:
    """32 threads x 50 rounds launch on one key with limit 3 in queue mode, while a watcher
    counts holders after every commit it can see and finishers complete holders."""
    ledger = Ledger(pool)
    threads, rounds = 32, 50
    stop = threading.Event()
    worst: list[int] = [0]
    launched_order: list[str] = []
    lock = threading.Lock()

    out_of_order: list[dict[str, Any]] = []

    def watch() -> None:
        """Each read is one snapshot: its holders, and whether a run was admitted while an
        older one still waits."""
        with pool.connection() as conn:
            while not stop.is_set():
                row = conn.execute(
                    "SELECT count(*) FILTER (WHERE status IN ('pending', 'running', 'paused'))"
                    "   AS holders,"
                    " min(queue_position) FILTER (WHERE status = 'queued') AS oldest_waiting,"
                    " max(queue_position) FILTER (WHERE status <> 'queued') AS newest_admitted"
                    " FROM executor.runs WHERE concurrency_key = %s",
                    (KEY,),
                ).fetchone()
                assert row is not None
                worst[0] = max(worst[0], int(row["holders"]))
                waiting, admitted = row["oldest_waiting"], row["newest_admitted"]
                if waiting is not None and admitted is not None and admitted > waiting:
                    out_of_order.append(dict(row))

    def finisher() -> None:
        """Runs holders to completion, as workers would (cancelling is tested above)."""
        while not stop.is_set():
            for run in holders(pool):
                with contextlib.suppress(AssertionError):  # another finisher got there first
                    finish(ledger, run)
            stop.wait(0.002)

    def producer(t: int) -> None:
        for r in range(rounds):
            run = f"t{t:02d}-{r:02d}"
            status = launch(ledger, run)
            if status == "queued":
                with lock:
                    launched_order.append(run)

    watcher = threading.Thread(target=watch)
    finishers = [threading.Thread(target=finisher) for _ in range(2)]
    watcher.start()
    for f in finishers:
        f.start()
    try:
        with ThreadPoolExecutor(threads) as ex:
            list(ex.map(producer, range(threads)))
        deadline_rounds = 0
        while any(s in ("queued", "pending") for s in statuses(pool).values()):
            deadline_rounds += 1
            assert deadline_rounds < 6000, "runs still queued"
            stop.wait(0.01)
    finally:
        stop.set()
        watcher.join()
        for f in finishers:
            f.join()
    assert worst[0] <= LIMIT
    assert worst[0] == LIMIT  # the limit was actually reached
    assert out_of_order == []  # never admitted past an older queued run
    assert set(statuses(pool).values()) == {"completed"}  # every run eventually completes
    assert len(statuses(pool)) == threads * rounds
    with pool.connection() as conn:
        queued_in = [
            r["run_id"]
            for r in conn.execute(
                "SELECT run_id FROM executor.runs WHERE queue_position IS NOT NULL"
            )
        ]
    assert sorted(queued_in) == sorted(launched_order)
    assert_verified(pool)


def test_the_index_not_the_handler_refuses_a_second_holder_of_a_slot(pool: Pool) -> None:
    """A writer that bypasses the handler still cannot put two runs in one slot of a key."""
    ledger = Ledger(pool)
    assert launch(ledger, "holder") == "pending"
    with pool.connection() as conn, pytest.raises(psycopg.errors.UniqueViolation) as refused:
        conn.execute(
            "INSERT INTO executor.runs (run_id, workflow, status, concurrency_key,"
            " concurrency_slot, last_seq)"
            " SELECT 'intruder', 'wf', 'pending', concurrency_key, concurrency_slot, 0"
            " FROM executor.runs WHERE run_id = 'holder'"
        )
    assert refused.value.diag.constraint_name == "runs_concurrency_slot"
