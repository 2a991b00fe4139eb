"""Regressions for faults a review found: each once left a step stuck or a delivery unrecorded."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from psycopg_pool import ConnectionPool

from executor.commands.models import (
    CompleteStep,
    CreateRun,
    ExpireLease,
    FailStep,
    RetryStep,
    StartRun,
    StartStep,
    StepSpec,
    parse,
)
from executor.errors import InvalidCommand
from executor.ledger.handler import Ledger
from executor.workflows.definition import StepContext, Workflow
from executor.workflows.runner import StepRunner

Pool = ConnectionPool[psycopg.Connection[dict[str, Any]]]

odd = Workflow("t_odd_outputs", max_attempts=3, register=True)


@odd.step
def tuple_output(ctx: StepContext) -> tuple[int, int]:
    return (1, 2)


@odd.step
def nul_error(ctx: StepContext) -> None:
    raise RuntimeError("bad byte \x00 in upstream data")


def started(ledger: Ledger, run_id: str) -> None:
    ledger.apply(CreateRun(run_id=run_id, workflow="t_odd_outputs", idempotency_key=f"c-{run_id}"))
    ledger.apply(StartRun(run_id=run_id, workflow="t_odd_outputs", steps=odd.specs(max_attempts=3)))


def step_row(pool: Pool, run_id: str, step: str) -> dict[str, Any]:
    with pool.connection() as conn:
        row = conn.execute(
            "SELECT status, attempt, error FROM executor.steps WHERE run_id = %s AND step_key = %s",
            (run_id, step),
        ).fetchone()
    assert row is not None
    return row


def test_an_output_json_cannot_hold_fails_the_step_once_not_every_attempt(pool: Pool) -> None:
    ledger = Ledger(pool)
    started(ledger, "r-tuple")
    outcome = StepRunner(ledger, lambda items: None).run(
        fence="f", command=StartStep(run_id="r-tuple", step_key="tuple_output", attempt=1)
    )
    assert outcome.applied
    row = step_row(pool, "r-tuple", "tuple_output")
    assert row["status"] == "failed"  # not running until its lease expires
    assert row["attempt"] == 1


def test_an_error_with_a_nul_character_is_recorded(pool: Pool) -> None:
    ledger = Ledger(pool)
    started(ledger, "r-nul")
    outcome = StepRunner(ledger, lambda items: None).run(
        fence="f", command=StartStep(run_id="r-nul", step_key="nul_error", attempt=1)
    )
    assert outcome.applied
    row = step_row(pool, "r-nul", "nul_error")
    assert row["status"] == "retrying"
    assert "\\x00" in row["error"]["message"]


def test_a_nul_character_on_the_wire_is_an_invalid_command() -> None:
    raw = '{"type":"cancel_run","run_id":"r9","idempotency_key":"k1","reason":"x\\u0000"}'
    with pytest.raises(InvalidCommand, match="NUL"):
        parse(raw)
    with pytest.raises(ValueError, match="NUL"):
        CompleteStep(fence="f", run_id="r", step_key="s", attempt=1, output={"k": "a\x00b"})


def test_a_late_result_during_the_backoff_window_is_stale(pool: Pool) -> None:
    ledger = Ledger(pool, lease_seconds=-1)  # every lease is already expired
    ledger.apply(CreateRun(run_id="r-late", workflow="w", idempotency_key="c-late"))
    ledger.apply(StartRun(run_id="r-late", workflow="w", steps=(StepSpec(step_key="a"),)))
    start = ledger.apply(StartStep(run_id="r-late", step_key="a", attempt=1))
    assert start.step_context is not None
    assert start.step_context.lease_expires_at is not None
    lease = start.step_context.lease_expires_at.isoformat()
    expired = ledger.apply(
        ExpireLease(run_id="r-late", step_key="a", attempt=1, observed_lease=lease)
    )
    assert expired.applied
    late = ledger.apply(CompleteStep(fence="f", run_id="r-late", step_key="a", attempt=1, output=1))
    assert (late.reason, late.applied) == ("stale_attempt", False)


def test_retrying_a_completed_step_is_dropped_as_terminal(pool: Pool) -> None:
    ledger = Ledger(pool)
    ledger.apply(CreateRun(run_id="r-done", workflow="w", idempotency_key="c-done"))
    ledger.apply(StartRun(run_id="r-done", workflow="w", steps=(StepSpec(step_key="a"),)))
    ledger.apply(StartStep(run_id="r-done", step_key="a", attempt=1))
    ledger.apply(CompleteStep(fence="f", run_id="r-done", step_key="a", attempt=1, output=None))
    retry = ledger.apply(RetryStep(run_id="r-done", step_key="a", idempotency_key="op-1"))
    assert retry.reason == "terminal"


def test_an_unexpected_unique_violation_is_not_retried_as_busy(pool: Pool) -> None:
    ledger = Ledger(pool)
    ledger.apply(CreateRun(run_id="r-drift", workflow="w", idempotency_key="c-drift"))
    ledger.apply(StartRun(run_id="r-drift", workflow="w", steps=(StepSpec(step_key="a"),)))
    with pool.connection() as conn:  # corrupt the ledger by hand: last_seq behind the log
        conn.execute("UPDATE executor.runs SET last_seq = last_seq - 1 WHERE run_id = 'r-drift'")
    before = ledger.retries
    with pytest.raises(psycopg.errors.UniqueViolation, match="events_pkey"):
        ledger.apply(StartStep(run_id="r-drift", step_key="a", attempt=1))
    assert ledger.retries == before


def test_fail_step_with_a_nul_is_refused_before_the_database(pool: Pool) -> None:
    with pytest.raises(ValueError, match="NUL"):
        FailStep(fence="f", run_id="r", step_key="a", attempt=1, error="x\x00")
