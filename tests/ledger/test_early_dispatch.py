"""An early dispatch (a worker whose clock runs ahead, a job pushed before its time) is
refused as `not_due` whatever else the run is doing, so its key is never burned by a state
that a later command undoes.

The case: step b waits out its backoff while step a fails terminally and the run fails. b's
dispatch arrives early. Refused as `terminal` (final), it would burn b's dispatch key; a
manual retry reopening the run before b is due leaves b to its dispatch, which can never
apply again: the run waits forever with b `retrying`.
"""

from __future__ import annotations

from typing import Any

from executor.commands.models import (
    BackoffPolicy,
    CompleteStep,
    CreateRun,
    DispatchStep,
    FailStep,
    RetryStep,
    StartRun,
    StartStep,
    StepSpec,
)
from executor.ledger.handler import Ledger
from executor.ledger.outcome import Outcome
from executor.ledger.verify import verify
from executor.storage.db import Pool

HOUR = BackoffPolicy(initial=3600, cap=3600, jitter=False)


def ok(ledger: Ledger, command: Any) -> Outcome:
    outcome = ledger.apply(command)
    assert outcome.applied, outcome.summary()
    return outcome


def pass_the_backoff(pool: Pool) -> None:
    """The test's clock: the retry's time comes (database clock)."""
    with pool.connection() as conn:
        conn.execute(
            "UPDATE executor.steps SET next_attempt_at = now() - interval '1 second'"
            " WHERE status = 'retrying'"
        )


def test_an_early_dispatch_in_a_failed_run_is_not_due_and_applies_after_the_run_reopens(
    pool: Pool,
) -> None:
    ledger = Ledger(pool)
    ok(ledger, CreateRun(run_id="r1", workflow="wf", idempotency_key="create:r1"))
    steps = (
        StepSpec(step_key="a", max_attempts=1),
        StepSpec(step_key="b", max_attempts=2, backoff=HOUR),
    )
    ok(ledger, StartRun(run_id="r1", workflow="wf", steps=steps))
    for key in ("a", "b"):
        ok(ledger, StartStep(run_id="r1", step_key=key, attempt=1, fence=f"f-{key}"))
    ok(ledger, FailStep(run_id="r1", step_key="b", attempt=1, fence="f-b", error="flaky"))
    failed = ok(
        ledger,
        FailStep(run_id="r1", step_key="a", attempt=1, fence="f-a", error="x", retryable=False),
    )
    assert failed.run_status == "failed"

    early = DispatchStep(run_id="r1", step_key="b", attempt=2)
    refused = ledger.apply(early)
    assert (refused.reason, refused.transient) == ("not_due", True), refused.summary()

    ok(ledger, RetryStep(run_id="r1", step_key="a", idempotency_key="retry-a"))  # reopens
    ok(ledger, StartStep(run_id="r1", step_key="a", attempt=2, fence="f-a2"))
    ok(ledger, CompleteStep(run_id="r1", step_key="a", attempt=2, fence="f-a2"))
    pass_the_backoff(pool)
    ok(ledger, early)  # the same delivery, once due (the relay would bring it)
    ok(ledger, StartStep(run_id="r1", step_key="b", attempt=2, fence="f-b2"))
    done = ok(ledger, CompleteStep(run_id="r1", step_key="b", attempt=2, fence="f-b2"))
    assert done.run_status == "completed"
    with pool.connection() as conn:
        report = verify(conn)
    assert report.ok, [str(v) for v in report.violations]
    assert not report.stuck, [str(s) for s in report.stuck]


def test_an_early_dispatch_after_a_terminal_failure_in_a_running_run_is_not_due(
    pool: Pool,
) -> None:
    """The same with the run still running (another step in flight): the refusal that says
    "a step of this run failed" is final, so it must not be given to a dispatch not yet due."""
    ledger = Ledger(pool)
    ok(ledger, CreateRun(run_id="r1", workflow="wf", idempotency_key="create:r1"))
    steps = (
        StepSpec(step_key="a", max_attempts=1),
        StepSpec(step_key="b", max_attempts=2, backoff=HOUR),
        StepSpec(step_key="c"),
    )
    ok(ledger, StartRun(run_id="r1", workflow="wf", steps=steps))
    for key in ("a", "b", "c"):
        ok(ledger, StartStep(run_id="r1", step_key=key, attempt=1, fence=f"f-{key}"))
    ok(ledger, FailStep(run_id="r1", step_key="b", attempt=1, fence="f-b", error="flaky"))
    ok(
        ledger,
        FailStep(run_id="r1", step_key="a", attempt=1, fence="f-a", error="x", retryable=False),
    )
    refused = ledger.apply(DispatchStep(run_id="r1", step_key="b", attempt=2))
    assert (refused.reason, refused.transient) == ("not_due", True), refused.summary()
