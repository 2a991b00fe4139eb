"""I6 fencing: a worker that lost its lease cannot commit for a superseded attempt.

Leases are made to expire without waiting: a `Ledger` with a negative lease length starts
attempts (or extends leases) whose deadline is already in the past.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import psycopg
import pytest
from psycopg_pool import ConnectionPool

from executor.commands.models import (
    BackoffPolicy,
    CancelRun,
    CompleteStep,
    CreateRun,
    DispatchStep,
    ExpireLease,
    FailStep,
    StartRun,
    StartStep,
    StepSpec,
)
from executor.ledger.handler import Ledger
from executor.ledger.verify import verify

Pool = ConnectionPool[psycopg.Connection[dict[str, Any]]]

RUN = "fenced"
STEP = "work"


def launch(ledger: Ledger, max_attempts: int = 3) -> None:
    ledger.apply(CreateRun(run_id=RUN, workflow="wf", idempotency_key=f"create:{RUN}"))
    started = ledger.apply(
        StartRun(
            run_id=RUN,
            workflow="wf",
            steps=(
                StepSpec(
                    step_key=STEP, max_attempts=max_attempts, backoff=BackoffPolicy(initial=0)
                ),
            ),
        )
    )
    assert started.applied, started.summary()


def step_row(pool: Pool) -> dict[str, Any]:
    with pool.connection() as conn:
        row = conn.execute(
            "SELECT status, attempt, max_attempts, output, lease_expires_at FROM executor.steps "
            "WHERE run_id = %s AND step_key = %s",
            (RUN, STEP),
        ).fetchone()
    assert row is not None
    return dict(row)


def started_attempts(pool: Pool) -> list[int]:
    with pool.connection() as conn:
        rows = conn.execute(
            "SELECT attempt FROM executor.events WHERE run_id = %s AND type = 'step_started' "
            "ORDER BY seq",
            (RUN,),
        ).fetchall()
    return [int(r["attempt"]) for r in rows]


def assert_verified(pool: Pool) -> None:
    with pool.connection() as conn:
        report = verify(conn)
    assert report.ok, [str(v) for v in report.violations]


def lease_of(pool: Pool) -> datetime:
    lease = step_row(pool)["lease_expires_at"]
    assert isinstance(lease, datetime)
    return lease


def expire_attempt(pool: Pool, attempt: int) -> None:
    """The reaper's verdict on an attempt whose lease has run out."""
    lost = Ledger(pool, lease_seconds=-1)
    assert lost.extend_lease(RUN, STEP, attempt) is not None  # deadline now in the past
    verdict = lost.apply(
        ExpireLease(
            run_id=RUN, step_key=STEP, attempt=attempt, observed_lease=lease_of(pool).isoformat()
        )
    )
    assert verdict.applied, verdict.summary()
    assert [e.type for e in verdict.events] == ["step_retrying"]


@pytest.mark.parametrize("next_attempt_is", ["queued", "running"])
def test_completion_of_a_superseded_attempt_is_stale(pool: Pool, next_attempt_is: str) -> None:
    ledger = Ledger(pool)
    launch(ledger)
    assert ledger.apply(StartStep(run_id=RUN, step_key=STEP, attempt=1)).applied
    expire_attempt(pool, 1)  # worker 1 was partitioned away; its lease ran out
    assert ledger.apply(DispatchStep(run_id=RUN, step_key=STEP, attempt=2)).applied
    if next_attempt_is == "running":
        assert ledger.apply(StartStep(run_id=RUN, step_key=STEP, attempt=2)).applied

    # Worker 1 comes back and reports its (superseded) attempt.
    late = ledger.apply(
        CompleteStep(fence="f", run_id=RUN, step_key=STEP, attempt=1, output="zombie")
    )
    assert late.reason == "stale_attempt"
    assert "attempt 1 superseded by attempt 2" in (late.detail or "")
    late_fail = ledger.apply(
        FailStep(fence="f", run_id=RUN, step_key=STEP, attempt=1, error="zombie")
    )
    assert late_fail.reason == "stale_attempt"
    assert step_row(pool)["status"] == next_attempt_is
    assert step_row(pool)["attempt"] == 2

    if next_attempt_is == "queued":
        assert ledger.apply(StartStep(run_id=RUN, step_key=STEP, attempt=2)).applied
    done = ledger.apply(
        CompleteStep(fence="f", run_id=RUN, step_key=STEP, attempt=2, output="real")
    )
    assert done.run_status == "completed"
    assert step_row(pool)["output"] == "real"

    # After the step is done the zombie is late rather than stale: the terminal check wins.
    again = ledger.apply(
        CompleteStep(
            fence="f",
            run_id=RUN,
            step_key=STEP,
            attempt=1,
            output="zombie",
            idempotency_key="zombie-2",
        )
    )
    assert again.reason == "terminal"
    assert_verified(pool)


def test_duplicate_and_stale_starts_do_not_consume_retry_budget(pool: Pool) -> None:
    ledger = Ledger(pool)
    launch(ledger, max_attempts=2)
    start1 = StartStep(run_id=RUN, step_key=STEP, attempt=1)
    assert ledger.apply(start1).applied
    for _ in range(3):
        assert ledger.apply(start1).reason == "duplicate"
    # Another copy of the job under another key (e.g. re-enqueued by hand) is refused too.
    copy = StartStep(run_id=RUN, step_key=STEP, attempt=1, idempotency_key="copy-of-start-1")
    assert ledger.apply(copy).reason == "invalid_transition"
    assert step_row(pool)["attempt"] == 1
    assert started_attempts(pool) == [1]

    fail1 = FailStep(fence="f", run_id=RUN, step_key=STEP, attempt=1, error="flaky")
    assert [e.type for e in ledger.apply(fail1).events] == ["step_retrying"]
    assert ledger.apply(DispatchStep(run_id=RUN, step_key=STEP, attempt=2)).applied
    stale = StartStep(run_id=RUN, step_key=STEP, attempt=1, idempotency_key="late-start-1")
    assert ledger.apply(stale).reason == "stale_attempt"
    assert ledger.apply(start1).reason == "duplicate"
    assert step_row(pool)["attempt"] == 2

    start2 = StartStep(run_id=RUN, step_key=STEP, attempt=2)
    assert ledger.apply(start2).applied
    assert ledger.apply(start2).reason == "duplicate"
    assert started_attempts(pool) == [1, 2]

    # Attempt 2 of 2: a retryable failure now fails the step; the budget was not eaten by
    # the duplicate and stale starts above.
    failed = ledger.apply(FailStep(fence="f", run_id=RUN, step_key=STEP, attempt=2, error="flaky"))
    assert [e.type for e in failed.events] == ["step_failed", "run_failed"]
    row = step_row(pool)
    assert (row["status"], row["attempt"], row["max_attempts"]) == ("failed", 2, 2)
    assert ledger.apply(DispatchStep(run_id=RUN, step_key=STEP, attempt=3)).reason == "terminal"
    assert_verified(pool)


def test_expire_lease_while_the_lease_is_held_does_not_burn_the_next_verdict(pool: Pool) -> None:
    ledger = Ledger(pool, lease_seconds=3600)
    launch(ledger)
    assert ledger.apply(StartStep(run_id=RUN, step_key=STEP, attempt=1)).applied
    held = lease_of(pool)

    early = ExpireLease(run_id=RUN, step_key=STEP, attempt=1, observed_lease=held.isoformat())
    dropped = ledger.apply(early)
    assert dropped.reason == "invalid_transition"
    assert "is held until" in (dropped.detail or "")
    assert step_row(pool)["status"] == "running"

    # The worker then really stops heartbeating and its lease runs out.
    lapsed = Ledger(pool, lease_seconds=-1).extend_lease(RUN, STEP, 1)
    assert lapsed is not None
    assert lapsed != held
    real = ExpireLease(run_id=RUN, step_key=STEP, attempt=1, observed_lease=lapsed.isoformat())
    assert real.idempotency_key != early.idempotency_key
    verdict = ledger.apply(real)
    assert verdict.applied, verdict.summary()
    assert [e.type for e in verdict.events] == ["step_retrying"]
    assert ledger.apply(early).reason == "duplicate"
    assert ledger.apply(real).reason == "duplicate"
    assert step_row(pool)["attempt"] == 1
    assert_verified(pool)


def test_extend_lease_is_fenced_by_attempt(pool: Pool) -> None:
    ledger = Ledger(pool, lease_seconds=60)
    launch(ledger)
    assert ledger.extend_lease(RUN, STEP, 1) is None  # queued, not started
    assert ledger.apply(StartStep(run_id=RUN, step_key=STEP, attempt=1)).applied
    first = lease_of(pool)
    extended = ledger.extend_lease(RUN, STEP, 1)
    assert extended is not None
    assert extended >= first
    assert ledger.extend_lease(RUN, STEP, 2) is None  # never dispatched

    expire_attempt(pool, 1)
    assert ledger.extend_lease(RUN, STEP, 1) is None  # retrying: attempt 1 lost its lease
    assert ledger.apply(DispatchStep(run_id=RUN, step_key=STEP, attempt=2)).applied
    assert ledger.extend_lease(RUN, STEP, 1) is None
    assert ledger.extend_lease(RUN, STEP, 2) is None  # queued, not started yet
    assert ledger.apply(StartStep(run_id=RUN, step_key=STEP, attempt=2)).applied
    assert ledger.extend_lease(RUN, STEP, 1) is None  # superseded for good
    assert ledger.extend_lease(RUN, STEP, 2) is not None
    lease_before = lease_of(pool)
    assert ledger.extend_lease(RUN, STEP, 1) is None
    assert lease_of(pool) == lease_before  # the superseded heartbeat changed nothing

    assert ledger.apply(CancelRun(run_id=RUN, idempotency_key="cancel")).applied
    assert ledger.extend_lease(RUN, STEP, 2) is None  # cancelled: the worker must stop
    late = ledger.apply(CompleteStep(fence="f", run_id=RUN, step_key=STEP, attempt=2))
    assert late.reason == "terminal"
    assert_verified(pool)


def test_another_delivery_cannot_report_on_an_attempt_it_does_not_own(pool: Pool) -> None:
    """Two deliveries of one start_step job: the second is told the first owns the attempt,
    and an outcome it sends anyway (its own fence, the live attempt) is refused by name."""
    ledger = Ledger(pool)
    launch(ledger)
    assert ledger.apply(StartStep(run_id=RUN, step_key=STEP, attempt=1, fence="owner")).applied
    again = ledger.apply(StartStep(run_id=RUN, step_key=STEP, attempt=1, fence="intruder"))
    assert (again.applied, again.owner) == (False, False)
    forged = ledger.apply(
        CompleteStep(run_id=RUN, step_key=STEP, attempt=1, fence="intruder", output="forged")
    )
    assert (forged.applied, forged.reason) == (False, "stale_attempt")
    assert forged.detail == "delivery intruder does not own attempt 1 (its owner is owner)"
    assert ledger.extend_lease(RUN, STEP, 1, "intruder") is None
    assert step_row(pool)["status"] == "running"
    done = ledger.apply(
        CompleteStep(run_id=RUN, step_key=STEP, attempt=1, fence="owner", output="real")
    )
    assert done.run_status == "completed"
    assert step_row(pool)["output"] == "real"
    with pool.connection() as conn:
        assert verify(conn).ok
