"""How big a run's graph may be, decided where a worker plans it (in process, no worker
processes): a root, 10,000 parallel steps and a join (10,002 steps) plan and start; a graph
over `MAX_STEPS` is refused with a recorded reason, and the run waits, its key unburned."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis as redis_lib

from executor.commands.models import MAX_STEPS, CreateRun, unplanned_start, wire
from executor.ledger.verify import verify
from executor.storage.db import Pool
from executor.transport.jobs import handle
from executor.transport.runtime import Runtime, build_runtime
from executor.workflows.definition import StepContext, Workflow
from executor.workflows.registry import all_workflows
from queue_config import load_settings


def _branch(ctx: StepContext) -> None:
    return None


def wide_workflow(name: str, width: int) -> Workflow:
    """root -> `width` parallel steps -> join, registered in this process (once)."""
    known = all_workflows().get(name)
    if known is not None:
        return known
    wf = Workflow(name, max_attempts=1)
    wf.step(key="root")(_branch)
    for i in range(width):
        wf.step(key=f"p{i}", depends_on=["root"])(_branch)
    wf.step(key="join", depends_on=[f"p{i}" for i in range(width)])(_branch)
    return wf


@pytest.fixture
def runtime(db_url: str, redis: redis_lib.Redis) -> Iterator[Runtime]:
    built = build_runtime(load_settings(), database_url=db_url, redis_client=redis)
    try:
        yield built
    finally:
        built.close()


def rows(pool: Pool, sql: str, *params: Any) -> list[dict[str, Any]]:
    with pool.connection() as conn:
        return conn.execute(sql, params).fetchall()


def create(runtime: Runtime, run_id: str, workflow: str) -> None:
    created = runtime.ledger.apply(
        CreateRun(run_id=run_id, workflow=workflow, idempotency_key=run_id)
    )
    assert created.applied, created.summary()


def test_a_graph_of_ten_thousand_and_two_steps_plans_and_starts(runtime: Runtime) -> None:
    wide_workflow("t_plan_wide", 10_000)
    create(runtime, "w1", "t_plan_wide")
    summary = handle(runtime, wire(unplanned_start("w1", "t_plan_wide")))
    assert summary.startswith("applied start_run"), summary
    found = rows(
        runtime.pool,
        "SELECT count(*) AS n, count(*) FILTER (WHERE status = 'queued') AS queued"
        " FROM executor.steps WHERE run_id = 'w1'",
    )
    assert found == [{"n": 10_002, "queued": 1}]
    [join] = rows(
        runtime.pool,
        "SELECT cardinality(depends_on) AS deps, waiting_on FROM executor.steps"
        " WHERE run_id = 'w1' AND step_key = 'join'",
    )
    assert join == {"deps": 10_000, "waiting_on": 10_000}


def test_a_graph_over_the_limit_is_refused_with_a_recorded_reason_and_the_run_waits(
    runtime: Runtime,
) -> None:
    wide_workflow("t_plan_too_wide", MAX_STEPS - 1)  # root + MAX_STEPS - 1 + join
    create(runtime, "w2", "t_plan_too_wide")
    summary = handle(runtime, wire(unplanned_start("w2", "t_plan_too_wide")))
    assert summary.startswith("dropped start_run: invalid_payload"), summary
    [drop] = rows(
        runtime.pool,
        "SELECT idempotency_key, reason, detail FROM executor.drops WHERE run_id = 'w2'",
    )
    assert (drop["idempotency_key"], drop["reason"]) == ("start_run:w2", "invalid_payload")
    assert f"{MAX_STEPS + 1} steps" in drop["detail"]
    assert f"at most {MAX_STEPS}" in drop["detail"]
    assert rows(runtime.pool, "SELECT status FROM executor.runs WHERE run_id = 'w2'") == [
        {"status": "pending"}
    ]
    # The key is not burned (a smaller graph, deployed later, can start the run) and the
    # outbox row, if the command came from one, stays for the relay.
    assert (
        rows(runtime.pool, "SELECT 1 FROM executor.receipts WHERE idempotency_key = 'start_run:w2'")
        == []
    )
    assert rows(runtime.pool, "SELECT 1 FROM executor.steps WHERE run_id = 'w2'") == []
    with runtime.pool.connection() as conn:
        report = verify(conn)
    assert report.ok, [str(v) for v in report.violations]
