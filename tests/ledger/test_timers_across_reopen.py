"""A timer woken while its run has failed is not lost when a manual retry reopens the run.

The reaper fires due timers of running runs only, but its pass races the transactions it
does not lock: it reads a due sleep, another step fails terminally and fails the run, and
the wake arrives at a failed run. Refused as `terminal` (final), its key is spent; after a
retry reopens the run, the reaper's next wake for the same timer is a `duplicate`, and the
sleep would never end. So reopening fires the timers already due itself, and a wake that is
not due yet is refused for now whatever the run's state.
"""

from __future__ import annotations

from typing import Any

from executor.commands.models import (
    AwaitEvent,
    CompleteStep,
    CreateRun,
    FailStep,
    RetryStep,
    Sleep,
    StartRun,
    StartStep,
    StepSpec,
    SuspendStep,
    WakeStep,
)
from executor.ledger.handler import Ledger
from executor.ledger.outcome import Outcome
from executor.ledger.verify import verify
from executor.storage.db import Pool


def ok(ledger: Ledger, command: Any) -> Outcome:
    outcome = ledger.apply(command)
    assert outcome.applied, outcome.summary()
    return outcome


def timers_pass(pool: Pool) -> None:
    with pool.connection() as conn:
        conn.execute(
            "UPDATE executor.steps SET wake_at = now() - interval '1 second'"
            " WHERE wake_at IS NOT NULL"
        )


def statuses(pool: Pool) -> dict[str, str]:
    with pool.connection() as conn:
        rows = conn.execute("SELECT step_key, status FROM executor.steps").fetchall()
    return {r["step_key"]: r["status"] for r in rows}


def failed_run_with(ledger: Ledger, kind: str) -> None:
    """Run r1: `a` fails terminally while `t` (a sleep or a wait with a timeout) waits."""
    ok(ledger, CreateRun(run_id="r1", workflow="wf", idempotency_key="create:r1"))
    steps = (
        StepSpec(step_key="a", max_attempts=1),
        StepSpec(step_key="t", kind=kind, max_attempts=2),
    )
    ok(ledger, StartRun(run_id="r1", workflow="wf", steps=steps))
    for key in ("a", "t"):
        ok(ledger, StartStep(run_id="r1", step_key=key, attempt=1, fence=f"f-{key}"))
    until = Sleep(seconds=3600) if kind == "sleep" else AwaitEvent(event="go", timeout_seconds=3600)
    ok(ledger, SuspendStep(run_id="r1", step_key="t", attempt=1, fence="f-t", until=until))


def fail_a(ledger: Ledger) -> None:
    failed = ok(
        ledger,
        FailStep(run_id="r1", step_key="a", attempt=1, fence="f-a", error="x", retryable=False),
    )
    assert failed.run_status == "failed"


def test_a_due_sleep_woken_while_its_run_failed_completes_when_the_run_reopens(pool: Pool) -> None:
    ledger = Ledger(pool)
    failed_run_with(ledger, "sleep")
    timers_pass(pool)  # the reaper reads the due timer ...
    fail_a(ledger)  # ... a fails the run ...
    wake = WakeStep(run_id="r1", step_key="t", attempt=1)
    assert ledger.apply(wake).reason == "terminal"  # ... and the wake lands on a failed run
    reopened = ok(ledger, RetryStep(run_id="r1", step_key="a", idempotency_key="retry-a"))
    assert ("step_completed", "t") in [(e.type, e.step_key) for e in reopened.events]
    ok(ledger, StartStep(run_id="r1", step_key="a", attempt=2, fence="f-a2"))
    done = ok(ledger, CompleteStep(run_id="r1", step_key="a", attempt=2, fence="f-a2"))
    assert done.run_status == "completed"
    with pool.connection() as conn:
        report = verify(conn)
    assert report.ok, [str(v) for v in report.violations]


def test_a_due_wait_timeout_fires_when_the_run_reopens(pool: Pool) -> None:
    ledger = Ledger(pool)
    failed_run_with(ledger, "wait")
    timers_pass(pool)
    fail_a(ledger)
    assert ledger.apply(WakeStep(run_id="r1", step_key="t", attempt=1)).reason == "terminal"
    reopened = ok(ledger, RetryStep(run_id="r1", step_key="a", idempotency_key="retry-a"))
    assert ("step_retrying", "t") in [(e.type, e.step_key) for e in reopened.events]
    assert statuses(pool) == {"a": "queued", "t": "retrying"}


def test_a_wake_before_its_time_in_a_failed_run_is_refused_for_now(pool: Pool) -> None:
    ledger = Ledger(pool)
    failed_run_with(ledger, "sleep")
    fail_a(ledger)
    early = ledger.apply(WakeStep(run_id="r1", step_key="t", attempt=1))
    assert (early.reason, early.transient) == ("not_due", True), early.summary()
    ok(ledger, RetryStep(run_id="r1", step_key="a", idempotency_key="retry-a"))
    assert statuses(pool)["t"] == "sleeping"  # not due: the reaper fires it in time
    timers_pass(pool)
    ok(ledger, WakeStep(run_id="r1", step_key="t", attempt=1))
    assert statuses(pool)["t"] == "completed"
