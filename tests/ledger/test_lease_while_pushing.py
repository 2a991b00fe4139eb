"""A step started in place keeps its lease while its worker pushes what the same commit queued.

A completion that fans out to ten thousand steps starts one of them in place and queues the
rest; pushing those jobs to Redis takes seconds. The started step's lease runs from that
commit, so if its heartbeat only began once the push was done, the lease could run out first
and the reaper fail a step nobody had lost (with max_attempts=1, the whole run).

The bad interleaving is forced: the push blocks until the started step's first lease
deadline has passed, and only then returns.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool
from support.waiting import wait_for

from executor.commands.models import CreateRun, StartRun, StartStep
from executor.ledger.handler import Ledger
from executor.ledger.outcome import OutboxItem
from executor.workflows.definition import StepContext, Workflow
from executor.workflows.runner import StepRunner

Pool = ConnectionPool[psycopg.Connection[dict[str, Any]]]

LEASE = 1.0
pushing = threading.Event()
pushed = threading.Event()

fan = Workflow("t_slow_push", max_attempts=1, register=True)


@fan.step
def first(ctx: StepContext) -> int:
    return 1


@fan.step(depends_on=["first"])
def second(ctx: StepContext) -> int:
    return 2


@fan.step(depends_on=["first"])
def third(ctx: StepContext) -> int:
    return 3


def test_a_step_started_in_place_keeps_its_lease_during_a_slow_push(
    pool: Pool, db_url: str
) -> None:
    ledger = Ledger(pool, lease_seconds=LEASE)
    ledger.apply(CreateRun(run_id="push", workflow="t_slow_push", idempotency_key="c-push"))
    ledger.apply(StartRun(run_id="push", workflow="t_slow_push", steps=fan.specs()))
    queued: list[OutboxItem] = []

    def slow_push(items: Sequence[OutboxItem]) -> None:
        if items:
            queued.extend(items)
            pushing.set()
            assert pushed.wait(15)

    runner = StepRunner(ledger, slow_push, heartbeat_interval=0.1)
    worker = threading.Thread(
        target=lambda: runner.run(
            StartStep(run_id="push", step_key="first", attempt=1), fence="f", continue_for=30
        )
    )
    worker.start()
    with psycopg.connect(db_url, row_factory=dict_row, autocommit=True) as observer:
        assert pushing.wait(10)

        def started() -> dict[str, Any] | None:
            return observer.execute(
                "SELECT step_key, lease_expires_at FROM executor.steps"
                " WHERE run_id = 'push' AND status = 'running'"
            ).fetchone()

        in_place = started()
        assert in_place is not None, "the completion started no step in place"
        first_deadline: datetime = in_place["lease_expires_at"]

        def now() -> datetime:
            row = observer.execute("SELECT clock_timestamp() AS now").fetchone()
            assert row is not None
            return row["now"]  # type: ignore[no-any-return]

        wait_for(
            timeout=15,
            interval=0.02,
            what="the first lease deadline to pass",
            check=lambda: now() > first_deadline,
        )
        row = started()
        assert row is not None, "the step started in place lost its lease while pushing"
        assert row["step_key"] == in_place["step_key"]
        assert row["lease_expires_at"] > now()
        pushed.set()
        worker.join(15)
        assert not worker.is_alive()
        [item] = queued
        assert item.command["step_key"] in {"second", "third"} - {in_place["step_key"]}
        status = {
            r["step_key"]: r["status"]
            for r in observer.execute(
                "SELECT step_key, status FROM executor.steps WHERE run_id = 'push'"
            ).fetchall()
        }
    assert status[in_place["step_key"]] == "completed"
    assert status["first"] == "completed"
