"""A fan-out split into chains: each worker runs its share of the starts one after another,
every step after the first of a chain started by the completion before it."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from executor.commands.models import CreateRun, StartRun, StartStep
from executor.ledger.handler import Ledger
from executor.ledger.outcome import OutboxItem
from executor.ledger.verify import verify
from executor.workflows import runner as runner_module
from executor.workflows.definition import StepContext, Workflow
from executor.workflows.runner import StepRunner

Pool = ConnectionPool[psycopg.Connection[dict[str, Any]]]

fan = Workflow("t_fan_chains", max_attempts=1, register=True)
KEYS = [f"p{i}" for i in range(9)]


@fan.step
def root(ctx: StepContext) -> int:
    return 0


for _key in KEYS:
    fan.step(key=_key, depends_on=[root])(lambda ctx: ctx.step_key)


@fan.step(depends_on=KEYS)
def join(ctx: StepContext) -> int:
    return len(ctx.upstream)


def launch(ledger: Ledger, run_id: str) -> None:
    ledger.apply(CreateRun(run_id=run_id, workflow=fan.name, idempotency_key=f"c-{run_id}"))
    ledger.apply(StartRun(run_id=run_id, workflow=fan.name, steps=fan.specs()))


def run_root(ledger: Ledger, run_id: str, workers: int) -> tuple[list[OutboxItem], Any]:
    pushed: list[OutboxItem] = []
    runner = StepRunner(ledger, pushed.extend, workers=lambda queue: workers)
    last = runner.run(
        fence="sender",
        command=StartStep(run_id=run_id, step_key="root", attempt=1),
        continue_for=60,
    )
    return pushed, last


def statuses(pool: Pool, run_id: str) -> dict[str, str]:
    with pool.connection() as conn:
        rows = conn.execute(
            "SELECT step_key, status FROM executor.steps WHERE run_id = %s", (run_id,)
        ).fetchall()
    return {r["step_key"]: r["status"] for r in rows}


def applied_starts(pool: Pool, run_id: str) -> int:
    with pool.connection() as conn:
        row = conn.execute(
            "SELECT count(*) AS n FROM executor.receipts WHERE run_id = %s "
            "AND command_type = 'start_step' AND outcome = 'applied'",
            (run_id,),
        ).fetchone()
    assert row is not None
    return int(row["n"])


def assert_verified(db_url: str) -> None:
    with psycopg.connect(db_url, row_factory=dict_row, autocommit=True) as conn:
        report = verify(conn)
    assert report.ok, report.violations


def test_a_fan_out_is_split_into_a_chain_for_each_worker(pool: Pool, db_url: str) -> None:
    """root starts p0 in place; p1..p8 go 4 to this worker and 4 in one job for the other."""
    ledger = Ledger(pool)
    launch(ledger, "c1")
    pushed, _ = run_root(ledger, "c1", workers=2)
    assert len(pushed) == 1
    chain = pushed[0]
    assert [chain.command["step_key"], *(t.command["step_key"] for t in chain.then)] == KEYS[5:]
    done = {k for k, s in statuses(pool, "c1").items() if s == "completed"}
    assert done == {"root", *KEYS[:5]}  # this worker's chain ran without a job of its own

    other = StepRunner(ledger, lambda items: None)
    last = other.run(
        fence="receiver",
        command=StartStep.model_validate(chain.command),
        continue_for=60,
        then=chain.then,
    )
    assert last.run_status == "completed"  # the last of the chain started the join in place
    assert applied_starts(pool, "c1") == 2  # root's and the chain's first: one job each
    assert_verified(db_url)


def test_one_worker_on_the_queue_keeps_the_whole_fan_out(pool: Pool, db_url: str) -> None:
    ledger = Ledger(pool)
    launch(ledger, "c2")
    pushed, last = run_root(ledger, "c2", workers=1)
    assert pushed == []
    assert last.run_status == "completed"
    assert applied_starts(pool, "c2") == 1
    assert_verified(db_url)


def test_chains_are_no_longer_than_chain_length(
    pool: Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runner_module, "CHAIN_LENGTH", 3)
    ledger = Ledger(pool)
    launch(ledger, "c3")
    pushed, _ = run_root(ledger, "c3", workers=2)
    assert [1 + len(p.then) for p in pushed] == [3, 2]  # and 3 kept: 8 starts, 3 chains


def test_a_chain_passes_over_a_start_another_delivery_made(pool: Pool, db_url: str) -> None:
    """The relay pushed the chain's first start on its own and another worker took it: the
    chain goes on with the next start, and the step stays with the delivery that owns it."""
    ledger = Ledger(pool)
    launch(ledger, "c4")
    pushed, _ = run_root(ledger, "c4", workers=2)
    chain = pushed[0]
    first = StartStep.model_validate(chain.command)
    assert ledger.apply(first.model_copy(update={"fence": "elsewhere"})).applied
    last = StepRunner(ledger, lambda items: None).run(
        fence="receiver", command=first, continue_for=60, then=chain.then
    )
    assert last.applied
    after = statuses(pool, "c4")
    assert after[first.step_key] == "running"
    assert all(after[t.command["step_key"]] == "completed" for t in chain.then)
    assert_verified(db_url)


def test_what_a_chain_does_not_get_to_is_pushed_on_its_own(pool: Pool) -> None:
    """Without a budget to continue, the job runs its first start and pushes the rest."""
    ledger = Ledger(pool)
    launch(ledger, "c5")
    pushed, _ = run_root(ledger, "c5", workers=2)
    chain = pushed[0]
    left: list[OutboxItem] = []
    StepRunner(ledger, left.extend).run(
        fence="receiver", command=StartStep.model_validate(chain.command), then=chain.then
    )
    assert [i.command["step_key"] for i in left] == [t.command["step_key"] for t in chain.then]
