"""Child runs through the real handler: a parent run does not fail while a child it waits on
still runs, so the child's report always lands and a retry that reopens the parent finds
nothing left waiting.

Found by the property test (tests/ledger/test_properties.py): a task failed terminally while
a sibling waited on its child run; the run failed at once (a waiting step is not in flight),
the child's `child_finished` was then refused as `terminal`, for good, and a manual retry
reopening the run left the child step waiting forever (verify: stuck).
"""

from __future__ import annotations

from typing import Any

from executor.commands.models import (
    AwaitChild,
    CompleteStep,
    CreateRun,
    FailStep,
    RetryStep,
    StartRun,
    StartStep,
    StepSpec,
    SuspendStep,
    parse_obj,
)
from executor.ledger.handler import Ledger
from executor.ledger.outcome import Outcome
from executor.ledger.verify import verify
from executor.storage.db import Pool


def ok(ledger: Ledger, command: Any) -> Outcome:
    outcome = ledger.apply(command)
    assert outcome.applied, outcome.summary()
    return outcome


def status(pool: Pool, run_id: str) -> str:
    with pool.connection() as conn:
        row = conn.execute(
            "SELECT status FROM executor.runs WHERE run_id = %s", (run_id,)
        ).fetchone()
    assert row is not None
    return str(row["status"])


def test_a_parent_fails_only_after_its_child_reports_and_a_retry_then_completes_it(
    pool: Pool,
) -> None:
    ledger = Ledger(pool)
    ok(ledger, CreateRun(run_id="p", workflow="parent", idempotency_key="create:p"))
    steps = (
        StepSpec(step_key="a", max_attempts=1),
        StepSpec(step_key="kid", max_attempts=1, kind="child"),
    )
    ok(ledger, StartRun(run_id="p", workflow="parent", steps=steps))
    for key in ("a", "kid"):
        ok(ledger, StartStep(run_id="p", step_key=key, attempt=1, fence=f"f-{key}"))
    until = AwaitChild(workflow="child", input={"n": 1})
    waits = ok(
        ledger, SuspendStep(run_id="p", step_key="kid", attempt=1, fence="f-kid", until=until)
    )
    child = "p.kid.1"
    assert [f.run_id for f in waits.followups] == [child]

    failed = ok(
        ledger,
        FailStep(run_id="p", step_key="a", attempt=1, fence="f-a", error="x", retryable=False),
    )
    assert [e.type for e in failed.events] == ["step_failed"]
    assert status(pool, "p") == "running"  # held open by the child it waits on

    ok(ledger, StartRun(run_id=child, workflow="child", steps=(StepSpec(step_key="c"),)))
    ok(ledger, StartStep(run_id=child, step_key="c", attempt=1, fence="f-c"))
    ended = ok(ledger, CompleteStep(run_id=child, step_key="c", attempt=1, fence="f-c", output=7))
    [report] = [parse_obj(f.command) for f in ended.followups]
    assert report.type == "child_finished"
    landed = ok(ledger, report)
    assert [e.type for e in landed.events] == ["step_completed", "run_failed"]

    ok(ledger, RetryStep(run_id="p", step_key="a", idempotency_key="retry-a"))
    ok(ledger, StartStep(run_id="p", step_key="a", attempt=2, fence="f-a2"))
    done = ok(ledger, CompleteStep(run_id="p", step_key="a", attempt=2, fence="f-a2", output=1))
    assert done.run_status == "completed"
    with pool.connection() as conn:
        checked = verify(conn)
    assert checked.ok, [str(v) for v in checked.violations]
    assert not checked.stuck, [str(s) for s in checked.stuck]
