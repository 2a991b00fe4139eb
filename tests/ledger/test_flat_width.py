"""The cost of a command does not grow with the width of its run (issue 8, goal 2).

Counted, not timed: the statements the handler sends and the rows of executor.steps it
reads, locks or writes inside its transaction (pg_stat_xact_user_tables, which counts the
reads of the locking function too, once earlier transactions' counters are flushed), for
the same commands in a run of root -> W parallel
steps -> join, at W = 10 and W = 1000.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from executor.commands.models import (
    Command,
    CompleteStep,
    CreateRun,
    StartRun,
    StartStep,
    StepSpec,
)
from executor.ledger.handler import Ledger, LedgerHooks
from executor.storage.db import configure_connection


class CountingConnection(psycopg.Connection[dict[str, Any]]):
    statements = 0

    def execute(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        CountingConnection.statements += 1
        return super().execute(*args, **kwargs)


@dataclass
class Cost:
    statements: int = 0
    steps_touched: dict[str, int] = field(default_factory=dict)


STEP_STATS = """
SELECT seq_tup_read, idx_tup_fetch, n_tup_ins, n_tup_upd
FROM pg_stat_xact_user_tables WHERE schemaname = 'executor' AND relname = 'steps'
"""


def measure(db_url: str, width: int) -> dict[str, Cost]:
    """Apply a whole run; the cost of the named commands, keyed by what they are."""
    seen: dict[str, Cost] = {}
    probing: list[str] = []

    def inside(command: Command, conn: psycopg.Connection[dict[str, Any]]) -> None:
        if probing:
            row = conn.execute(STEP_STATS).fetchone()
            assert row is not None
            seen[probing[0]] = Cost(steps_touched=dict(row))

    pool: ConnectionPool[Any] = ConnectionPool(
        db_url,
        connection_class=CountingConnection,
        configure=configure_connection,
        kwargs={"row_factory": dict_row, "autocommit": True},
        min_size=1,
        max_size=1,
        open=True,
    )

    def apply(command: Command, name: str | None = None) -> Any:
        if name is None:
            return ledger.apply(command)
        with pool.connection() as conn:  # the same connection: the pool has one
            # Counters of earlier transactions not yet flushed would show up in the xact view.
            conn.execute("SELECT pg_stat_force_next_flush()")
        probing.append(name)
        before = CountingConnection.statements
        try:
            return ledger.apply(command)
        finally:
            probing.clear()
            seen[name].statements = CountingConnection.statements - before - 1  # the probe

    try:
        ledger = Ledger(pool, hooks=LedgerHooks(inside=inside))
        run = f"w{width}"
        specs = (
            StepSpec(step_key="root"),
            *(StepSpec(step_key=f"p{i:04d}", depends_on=("root",)) for i in range(width)),
            StepSpec(step_key="join", depends_on=tuple(f"p{i:04d}" for i in range(width))),
        )
        apply(CreateRun(run_id=run, workflow="wf", idempotency_key=run))
        apply(StartRun(run_id=run, workflow="wf", steps=specs))
        apply(StartStep(run_id=run, step_key="root", attempt=1, fence="f"))
        apply(CompleteStep(run_id=run, step_key="root", attempt=1, fence="f"))
        for i in range(width):
            key = f"p{i:04d}"
            where = {width // 2: "middle", width - 1: "last"}.get(i)
            start = StartStep(run_id=run, step_key=key, attempt=1, fence="f")
            done = CompleteStep(run_id=run, step_key=key, attempt=1, fence="f")
            assert apply(start, where and f"start_step:{where}").applied
            assert apply(done, where and f"complete_step:{where}").applied
        apply(StartStep(run_id=run, step_key="join", attempt=1, fence="f"))
        last = apply(
            CompleteStep(run_id=run, step_key="join", attempt=1, fence="f"), "complete_step:join"
        )
        assert last.run_status == "completed"
    finally:
        pool.close()
    return seen


def many_small_runs(db_url: str, runs: int = 3000) -> None:
    """The planner's statistics of a real ledger: many runs of a few steps each, so it
    believes any run_id matches a handful of rows (and a wide run is the surprise)."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO executor.runs (run_id, workflow, status, last_seq)"
            " SELECT 'small-' || g, 'wf', 'completed', 1 FROM generate_series(1, %s) g",
            (runs,),
        )
        conn.execute(
            "INSERT INTO executor.steps (run_id, step_key, status, attempt)"
            " SELECT 'small-' || g, 's' || k, 'completed', 1"
            " FROM generate_series(1, %s) g, generate_series(1, 4) k",
            (runs,),
        )
        conn.execute("ANALYZE executor.runs")
        conn.execute("ANALYZE executor.steps")


@pytest.mark.slow
def test_a_command_costs_the_same_in_a_run_of_ten_and_of_a_thousand(db_url: str) -> None:
    many_small_runs(db_url)
    narrow, wide = measure(db_url, 10), measure(db_url, 1000)
    assert (
        set(narrow)
        == set(wide)
        == {
            "start_step:middle",
            "complete_step:middle",
            "start_step:last",
            "complete_step:last",  # this one queues the join
            "complete_step:join",  # the run's last: it reads the outputs of its one sink
        }
    )
    for name, small in narrow.items():
        big = wide[name]
        assert big.statements == small.statements, name
        # BEGIN, planner settings and lock, write, [a read], [the run ended: a NOTIFY], COMMIT
        assert big.statements <= 6, name
        # A small run may be read whole by the planner; a wide one must be reached by key.
        assert big.steps_touched["idx_tup_fetch"] <= small.steps_touched["idx_tup_fetch"], name
        assert big.steps_touched["idx_tup_fetch"] <= 10, name
        assert big.steps_touched["seq_tup_read"] == 0, name
        assert big.steps_touched["n_tup_upd"] == small.steps_touched["n_tup_upd"], name
