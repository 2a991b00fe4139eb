"""What a failed run keeps for the manual retry that may reopen it (DESIGN: `failed ->
running` only through a manual step retry).

A failed run is terminal, yet not final: a retry can reopen it. Whatever reaches it
meanwhile and is refused for good spends a key nothing re-issues, so each of these was a
way for a reopened run to wait forever:

* a child's report: a task failed terminally while a sibling waited on its child run, the
  run failed at once (a waiting step is not in flight) and the child's `child_finished` was
  refused as `terminal` (found by the property test). A step waiting on a child now holds
  the run open until the child reports.
* an early dispatch (a worker whose clock runs ahead): refused as `terminal`, or as "a step
  of this run failed", before its `not_due` check, so a retry reopening the run before the
  backoff ended left the step `retrying` with no dispatch left. `not_due` now comes first.
* a timer's wake: the reaper reads due timers of running runs, a step may fail the run
  before the wake lands, and the reaper's next wake after the reopening is a `duplicate`.
  Reopening fires the timers already due, and an early wake is `not_due` whatever the run.
"""

from __future__ import annotations

from typing import Any

from executor.commands.models import (
    AwaitChild,
    AwaitEvent,
    BackoffPolicy,
    CompleteStep,
    CreateRun,
    DispatchStep,
    FailStep,
    RetryStep,
    Sleep,
    StartRun,
    StartStep,
    StepSpec,
    SuspendStep,
    WakeStep,
    parse_obj,
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


def assert_verified(pool: Pool) -> None:
    with pool.connection() as conn:
        report = verify(conn)
    assert report.ok, [str(v) for v in report.violations]
    assert not report.stuck, [str(s) for s in report.stuck]


def launch(ledger: Ledger, *steps: StepSpec) -> None:
    """Run r1 with these steps, each started under fence f-<key>."""
    ok(ledger, CreateRun(run_id="r1", workflow="wf", idempotency_key="create:r1"))
    ok(ledger, StartRun(run_id="r1", workflow="wf", steps=steps))
    for s in steps:
        ok(ledger, StartStep(run_id="r1", step_key=s.step_key, attempt=1, fence=f"f-{s.step_key}"))


def fail_for_good(ledger: Ledger, key: str = "a") -> Outcome:
    return ok(
        ledger,
        FailStep(
            run_id="r1", step_key=key, attempt=1, fence=f"f-{key}", error="x", retryable=False
        ),
    )


def status(pool: Pool, run_id: str) -> str:
    with pool.connection() as conn:
        row = conn.execute(
            "SELECT status FROM executor.runs WHERE run_id = %s", (run_id,)
        ).fetchone()
    assert row is not None
    return str(row["status"])


def statuses(pool: Pool) -> dict[str, str]:
    with pool.connection() as conn:
        rows = conn.execute("SELECT step_key, status FROM executor.steps").fetchall()
    return {r["step_key"]: r["status"] for r in rows}


def clock_passes(pool: Pool) -> None:
    """The test's clock: every backoff and timer is due (database clock)."""
    with pool.connection() as conn:
        conn.execute(
            "UPDATE executor.steps SET next_attempt_at = now() - interval '1 second'"
            " WHERE status = 'retrying'"
        )
        conn.execute(
            "UPDATE executor.steps SET wake_at = now() - interval '1 second'"
            " WHERE wake_at IS NOT NULL"
        )


# --- a child's report ------------------------------------------------------------------------


def test_a_parent_fails_only_after_its_child_reports_and_a_retry_then_completes_it(
    pool: Pool,
) -> None:
    ledger = Ledger(pool)
    launch(
        ledger,
        StepSpec(step_key="a", max_attempts=1),
        StepSpec(step_key="kid", max_attempts=1, kind="child"),
    )
    until = AwaitChild(workflow="child", input={"n": 1})
    waits = ok(
        ledger, SuspendStep(run_id="r1", step_key="kid", attempt=1, fence="f-kid", until=until)
    )
    child = "r1.kid.1"
    assert [f.run_id for f in waits.followups] == [child]

    failed = fail_for_good(ledger)
    assert [e.type for e in failed.events] == ["step_failed"]
    assert status(pool, "r1") == "running"  # held open by the child it waits on

    ok(ledger, StartRun(run_id=child, workflow="child", steps=(StepSpec(step_key="c"),)))
    ok(ledger, StartStep(run_id=child, step_key="c", attempt=1, fence="f-c"))
    ended = ok(ledger, CompleteStep(run_id=child, step_key="c", attempt=1, fence="f-c", output=7))
    [report] = [parse_obj(f.command) for f in ended.followups]
    assert report.type == "child_finished"
    landed = ok(ledger, report)
    assert [e.type for e in landed.events] == ["step_completed", "run_failed"]

    ok(ledger, RetryStep(run_id="r1", step_key="a", idempotency_key="retry-a"))
    ok(ledger, StartStep(run_id="r1", step_key="a", attempt=2, fence="f-a2"))
    done = ok(ledger, CompleteStep(run_id="r1", step_key="a", attempt=2, fence="f-a2", output=1))
    assert done.run_status == "completed"
    assert_verified(pool)


def test_a_retried_child_step_forgets_the_failed_child_of_its_earlier_attempt(pool: Pool) -> None:
    """Found by the property test: attempt 1 of a child step ends with its failed child; the
    operator's retry runs attempt 2, whose worker completes the step without a child. The
    step must not stay linked to attempt 1's child, or it reads as completed by a failed
    run (verify: child_link)."""
    ledger = Ledger(pool)
    launch(ledger, StepSpec(step_key="kid", max_attempts=1, kind="child"))
    until = AwaitChild(workflow="child", input={"n": 1})
    ok(ledger, SuspendStep(run_id="r1", step_key="kid", attempt=1, fence="f-kid", until=until))
    child = "r1.kid.1"
    ok(ledger, StartRun(run_id=child, workflow="child", steps=(StepSpec(step_key="c"),)))
    ok(ledger, StartStep(run_id=child, step_key="c", attempt=1, fence="f-c"))
    ended = ok(
        ledger,
        FailStep(run_id=child, step_key="c", attempt=1, fence="f-c", error="x", retryable=False),
    )
    [report] = [parse_obj(f.command) for f in ended.followups]
    assert [e.type for e in ok(ledger, report).events] == ["step_failed", "run_failed"]

    ok(ledger, RetryStep(run_id="r1", step_key="kid", idempotency_key="retry-kid"))
    ok(ledger, StartStep(run_id="r1", step_key="kid", attempt=2, fence="f-kid2"))
    done = ok(
        ledger, CompleteStep(run_id="r1", step_key="kid", attempt=2, fence="f-kid2", output=1)
    )
    assert done.run_status == "completed"
    with pool.connection() as conn:
        row = conn.execute(
            "SELECT child_run_id FROM executor.steps WHERE run_id = 'r1' AND step_key = 'kid'"
        ).fetchone()
    assert row == {"child_run_id": None}
    assert status(pool, child) == "failed"
    assert_verified(pool)


# --- an early dispatch -----------------------------------------------------------------------


def test_an_early_dispatch_in_a_failed_run_is_not_due_and_applies_after_the_run_reopens(
    pool: Pool,
) -> None:
    ledger = Ledger(pool)
    launch(
        ledger,
        StepSpec(step_key="a", max_attempts=1),
        StepSpec(step_key="b", max_attempts=2, backoff=HOUR),
    )
    ok(ledger, FailStep(run_id="r1", step_key="b", attempt=1, fence="f-b", error="flaky"))
    assert fail_for_good(ledger).run_status == "failed"

    early = DispatchStep(run_id="r1", step_key="b", attempt=2)
    refused = ledger.apply(early)
    assert (refused.reason, refused.transient) == ("not_due", True), refused.summary()

    ok(ledger, RetryStep(run_id="r1", step_key="a", idempotency_key="retry-a"))  # reopens
    ok(ledger, StartStep(run_id="r1", step_key="a", attempt=2, fence="f-a2"))
    ok(ledger, CompleteStep(run_id="r1", step_key="a", attempt=2, fence="f-a2"))
    clock_passes(pool)
    ok(ledger, early)  # the same delivery, once due (the relay would bring it)
    ok(ledger, StartStep(run_id="r1", step_key="b", attempt=2, fence="f-b2"))
    done = ok(ledger, CompleteStep(run_id="r1", step_key="b", attempt=2, fence="f-b2"))
    assert done.run_status == "completed"
    assert_verified(pool)


def test_an_early_dispatch_after_a_terminal_failure_in_a_running_run_is_not_due(
    pool: Pool,
) -> None:
    """The same with the run still running (another step in flight): the refusal that says
    "a step of this run failed" is final, so it must not be given to a dispatch not yet due."""
    ledger = Ledger(pool)
    launch(
        ledger,
        StepSpec(step_key="a", max_attempts=1),
        StepSpec(step_key="b", max_attempts=2, backoff=HOUR),
        StepSpec(step_key="c"),
    )
    ok(ledger, FailStep(run_id="r1", step_key="b", attempt=1, fence="f-b", error="flaky"))
    fail_for_good(ledger)
    refused = ledger.apply(DispatchStep(run_id="r1", step_key="b", attempt=2))
    assert (refused.reason, refused.transient) == ("not_due", True), refused.summary()


# --- a timer's wake --------------------------------------------------------------------------


def waiting_on_a_timer(ledger: Ledger, kind: str) -> None:
    """`a` about to fail while `t` (a sleep, or a wait with a timeout) waits an hour."""
    launch(
        ledger,
        StepSpec(step_key="a", max_attempts=1),
        StepSpec(step_key="t", kind=kind, max_attempts=2),
    )
    until = Sleep(seconds=3600) if kind == "sleep" else AwaitEvent(event="go", timeout_seconds=3600)
    ok(ledger, SuspendStep(run_id="r1", step_key="t", attempt=1, fence="f-t", until=until))


def test_a_due_sleep_woken_while_its_run_failed_completes_when_the_run_reopens(pool: Pool) -> None:
    ledger = Ledger(pool)
    waiting_on_a_timer(ledger, "sleep")
    clock_passes(pool)  # the reaper reads the due timer ...
    assert fail_for_good(ledger).run_status == "failed"  # ... a fails the run ...
    wake = WakeStep(run_id="r1", step_key="t", attempt=1)
    assert ledger.apply(wake).reason == "terminal"  # ... and the wake lands on a failed run
    reopened = ok(ledger, RetryStep(run_id="r1", step_key="a", idempotency_key="retry-a"))
    assert ("step_completed", "t") in [(e.type, e.step_key) for e in reopened.events]
    ok(ledger, StartStep(run_id="r1", step_key="a", attempt=2, fence="f-a2"))
    done = ok(ledger, CompleteStep(run_id="r1", step_key="a", attempt=2, fence="f-a2"))
    assert done.run_status == "completed"
    assert_verified(pool)


def test_a_due_wait_timeout_fires_when_the_run_reopens(pool: Pool) -> None:
    ledger = Ledger(pool)
    waiting_on_a_timer(ledger, "wait")
    clock_passes(pool)
    fail_for_good(ledger)
    assert ledger.apply(WakeStep(run_id="r1", step_key="t", attempt=1)).reason == "terminal"
    reopened = ok(ledger, RetryStep(run_id="r1", step_key="a", idempotency_key="retry-a"))
    assert ("step_retrying", "t") in [(e.type, e.step_key) for e in reopened.events]
    assert statuses(pool) == {"a": "queued", "t": "retrying"}


def test_a_wake_before_its_time_in_a_failed_run_is_refused_for_now(pool: Pool) -> None:
    ledger = Ledger(pool)
    waiting_on_a_timer(ledger, "sleep")
    fail_for_good(ledger)
    early = ledger.apply(WakeStep(run_id="r1", step_key="t", attempt=1))
    assert (early.reason, early.transient) == ("not_due", True), early.summary()
    ok(ledger, RetryStep(run_id="r1", step_key="a", idempotency_key="retry-a"))
    assert statuses(pool)["t"] == "sleeping"  # not due: the reaper fires it in time
    clock_passes(pool)
    ok(ledger, WakeStep(run_id="r1", step_key="t", attempt=1))
    assert statuses(pool)["t"] == "completed"
