"""Runs in durable-wait states, made through the handler as a worker would make them: a step
waiting for an event, a sleeping step, a child run, a map of N items, a queued run."""

from __future__ import annotations

import uuid
from typing import Any

from executor.commands.models import (
    AwaitChild,
    AwaitEvent,
    CompleteStep,
    CreateRun,
    FailStep,
    Sleep,
    StartRun,
    StartStep,
    StepSpec,
    SuspendStep,
)

from .conftest import Seeder

FENCE = "f"


def _id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def start(seed: Seeder, run_id: str, steps: tuple[StepSpec, ...], workflow: str) -> str:
    assert seed.ledger.apply(
        CreateRun(run_id=run_id, workflow=workflow, idempotency_key=f"create:{run_id}")
    ).applied
    assert seed.ledger.apply(StartRun(run_id=run_id, workflow=workflow, steps=steps)).applied
    return run_id


def _started_then(seed: Seeder, run_id: str, step: str, attempt: int, outcome: Any) -> None:
    """Start the attempt as its owner, then apply `outcome` (the owner's next command)."""
    for command in (
        StartStep(run_id=run_id, step_key=step, attempt=attempt, fence=FENCE),
        outcome,
    ):
        out = seed.ledger.apply(command)
        assert out.applied, out


def run_step(seed: Seeder, run_id: str, step: str, attempt: int = 1, output: Any = None) -> None:
    done = CompleteStep(fence=FENCE, run_id=run_id, step_key=step, attempt=attempt, output=output)
    _started_then(seed, run_id, step, attempt, done)


def suspend(seed: Seeder, run_id: str, step: str, until: Any, attempt: int = 1) -> None:
    wait = SuspendStep(fence=FENCE, run_id=run_id, step_key=step, attempt=attempt, until=until)
    _started_then(seed, run_id, step, attempt, wait)


def approval_run(
    seed: Seeder, *, event: str = "approved", timeout: float | None = 3600, run_id: str = ""
) -> str:
    """`prepare` done, `approval` waiting for `event`, `finish` pending behind it."""
    run_id = run_id or _id("appr")
    start(
        seed,
        run_id,
        (
            StepSpec(step_key="prepare", max_attempts=1),
            StepSpec(step_key="approval", depends_on=("prepare",), kind="wait", max_attempts=1),
            StepSpec(step_key="finish", depends_on=("approval",), max_attempts=1),
        ),
        "approvals",
    )
    run_step(seed, run_id, "prepare", output={"ready": True})
    suspend(seed, run_id, "approval", AwaitEvent(event=event, timeout_seconds=timeout))
    return run_id


def sleeping_run(seed: Seeder, seconds: float = 3600) -> str:
    run_id = _id("nap")
    start(seed, run_id, (StepSpec(step_key="cool_off", kind="sleep", max_attempts=1),), "naps")
    suspend(seed, run_id, "cool_off", Sleep(seconds=seconds))
    return run_id


def parent_with_child(seed: Seeder) -> tuple[str, str]:
    """A run whose `invoice` step waits for the child run it started; returns both ids."""
    run_id = _id("parent")
    start(seed, run_id, (StepSpec(step_key="invoice", kind="child", max_attempts=1),), "parents")
    suspend(seed, run_id, "invoice", AwaitChild(workflow="billing", input={"who": "ada"}))
    with seed.ledger.pool.connection() as conn:
        row = conn.execute(
            "SELECT run_id FROM executor.runs WHERE parent_run_id = %s", (run_id,)
        ).fetchone()
    assert row is not None
    return run_id, str(row["run_id"])


def map_run(seed: Seeder, n: int, *, fail: tuple[int, ...] = (), done: int = 0) -> str:
    """`accounts` returned n items; `provision` maps over them; the first `done` items have
    completed and the items in `fail` failed."""
    run_id = _id("map")
    start(
        seed,
        run_id,
        (
            StepSpec(step_key="accounts", max_attempts=1),
            StepSpec(
                step_key="provision",
                depends_on=("accounts",),
                kind="map",
                map_over="accounts",
                max_attempts=1,
            ),
            StepSpec(step_key="report", depends_on=("provision",), max_attempts=1),
        ),
        "maps",
    )
    run_step(seed, run_id, "accounts", output=[{"id": i} for i in range(n)])
    for i in range(done):
        run_step(seed, run_id, f"provision[{i}]", output={"id": i})
    for i in fail:
        key = f"provision[{i}]"
        error = f"account {i} is locked"
        failed = FailStep(
            fence=FENCE, run_id=run_id, step_key=key, attempt=1, error=error, retryable=False
        )
        _started_then(seed, run_id, key, 1, failed)
    return run_id


def queued_runs(seed: Seeder, key: str, limit: int, n: int) -> list[str]:
    """`n` launches on `key` with `limit` slots, in order: the first `limit` hold it."""
    ids = []
    for i in range(n):
        run_id = _id(f"q{i}")
        out = seed.ledger.apply(
            CreateRun(
                run_id=run_id,
                workflow="limited",
                concurrency_key=key,
                concurrency_limit=limit,
                on_conflict="queue",
                idempotency_key=f"create:{run_id}",
            )
        )
        assert out.applied, out
        ids.append(run_id)
    return ids
