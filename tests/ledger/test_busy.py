"""A ledger too busy to commit still leaves a record (I2): a `busy` drop, and a usable key.

Serialization failures are forced deterministically: a hook raises SerializationFailure
while the row locks are held, as many times as the test says, so the handler's retry
budget (`max_retries`) is spent exactly or not.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from psycopg import errors as pg_errors

from executor.commands.models import Command, CreateRun, StartRun, StartStep, StepSpec
from executor.errors import LedgerBusy
from executor.ledger.handler import Ledger, LedgerHooks
from executor.ledger.verify import verify
from executor.storage.db import Pool


def failing(times: int) -> tuple[Callable[[Command], None], list[str]]:
    """A hook raising SerializationFailure on its first `times` calls; records every call."""
    calls: list[str] = []

    def hook(command: Command) -> None:
        calls.append(command.idempotency_key)
        if len(calls) <= times:
            raise pg_errors.SerializationFailure("forced by the test")

    return hook, calls


def rows(pool: Pool, sql: str, *params: Any) -> list[dict[str, Any]]:
    with pool.connection() as conn:
        return conn.execute(sql, params).fetchall()


def launch(pool: Pool) -> None:
    ledger = Ledger(pool)
    assert ledger.apply(CreateRun(run_id="r1", workflow="wf", idempotency_key="c1")).applied
    assert ledger.apply(
        StartRun(run_id="r1", workflow="wf", steps=(StepSpec(step_key="a"),))
    ).applied


def test_a_ledger_busy_past_its_budget_records_a_busy_drop_and_keeps_the_key(pool: Pool) -> None:
    launch(pool)
    hook, calls = failing(times=3)
    busy = Ledger(pool, max_retries=2, hooks=LedgerHooks(after_lock=hook))
    start = StartStep(run_id="r1", step_key="a", attempt=1, fence="f1")
    with pytest.raises(LedgerBusy, match="not applied after 3 tries"):
        busy.apply(start)
    assert calls == [start.idempotency_key] * 3  # the first try and two retries
    drops = rows(pool, "SELECT idempotency_key, reason, detail FROM executor.drops")
    assert [(d["idempotency_key"], d["reason"]) for d in drops] == [(start.idempotency_key, "busy")]
    assert "forced by the test" in drops[0]["detail"]
    assert (
        rows(
            pool,
            "SELECT 1 FROM executor.receipts WHERE idempotency_key = %s",
            start.idempotency_key,
        )
        == []
    )
    assert rows(pool, "SELECT status FROM executor.steps WHERE step_key = 'a'") == [
        {"status": "queued"}
    ]

    # Transient: the same delivery, once the ledger can commit, applies.
    again = busy.apply(start)  # the hook has spent its three failures
    assert again.applied, again.summary()
    assert rows(pool, "SELECT status FROM executor.steps WHERE step_key = 'a'") == [
        {"status": "running"}
    ]
    with pool.connection() as conn:
        report = verify(conn)
    assert report.ok, [str(v) for v in report.violations]


def test_a_failure_within_the_budget_is_retried_and_leaves_no_drop(pool: Pool) -> None:
    launch(pool)
    hook, calls = failing(times=2)
    ledger = Ledger(pool, max_retries=2, hooks=LedgerHooks(after_lock=hook))
    outcome = ledger.apply(StartStep(run_id="r1", step_key="a", attempt=1, fence="f1"))
    assert outcome.applied, outcome.summary()
    assert len(calls) == 3
    assert ledger.retries == 2
    assert rows(pool, "SELECT reason FROM executor.drops") == []


def test_with_no_retries_one_failure_is_busy(pool: Pool) -> None:
    launch(pool)
    hook, _ = failing(times=1)
    ledger = Ledger(pool, max_retries=0, hooks=LedgerHooks(after_lock=hook))
    with pytest.raises(LedgerBusy, match="not applied after 1 tries"):
        ledger.apply(StartStep(run_id="r1", step_key="a", attempt=1, fence="f1"))
    assert [r["reason"] for r in rows(pool, "SELECT reason FROM executor.drops")] == ["busy"]
