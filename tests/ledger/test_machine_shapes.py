"""The pure state machine (`decide`) for durable waits and dynamic shape, with no database.

Maps (expansion, items, outputs in index order), sleeps and their timers, waits for an
external event (buffered, timed out), child runs (created, finished three ways, cancelled with
their parent), and concurrency keys with a queue (queued launch, admission when a holder
ends, a failed run reopened by a manual retry with and without a free slot).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, Literal

import pytest

from executor.commands.machine import Drop, Transition, child_run_id, decide
from executor.commands.models import (
    AwaitChild,
    AwaitEvent,
    CancelRun,
    ChildFinished,
    Command,
    CompleteStep,
    CreateRun,
    DispatchStep,
    FailStep,
    RetryStep,
    SendEvent,
    Sleep,
    StartStep,
    SuspendStep,
    WakeStep,
)
from executor.commands.state import RunEvent, RunRow, StepRow
from executor.commands.transition import KeyState
from executor.errors import ConcurrencyKeyTaken

from .memsource import MemorySource, prepare
from .test_commands import LEASE, NOW, F, followup_keys, kinds, run_row, step_row, steps_of


def shaped(key: str, status: str = "pending", attempt: int = 0, **fields: Any) -> StepRow:
    """`step_row` with the fields of the new kinds (kind, map_over, wake_at, ...)."""
    depends_on = fields.pop("depends_on", ())
    max_attempts = fields.pop("max_attempts", 3)
    row = step_row(key, status, attempt, depends_on=depends_on, max_attempts=max_attempts)
    for name, value in fields.items():
        assert hasattr(row, name), name
        setattr(row, name, value)
    return row


def decide_in(
    command: Command,
    run: RunRow | None,
    steps: dict[str, StepRow],
    *,
    now: datetime = NOW,
    **source: Any,
) -> Transition:
    prepare(run, steps)
    return decide(command, run, steps, now, LEASE, MemorySource(steps, **source))


def refused(command: Command, run: RunRow | None, steps: dict[str, StepRow], **kw: Any) -> Drop:
    with pytest.raises(Drop) as info:
        decide_in(command, run, steps, **kw)
    return info.value


def complete(key: str, attempt: int = 1, output: Any = None, **kw: Any) -> CompleteStep:
    return CompleteStep(fence=F, run_id="r1", step_key=key, attempt=attempt, output=output, **kw)


def suspend(key: str, until: Sleep | AwaitEvent | AwaitChild, attempt: int = 1) -> SuspendStep:
    return SuspendStep(fence=F, run_id="r1", step_key=key, attempt=attempt, until=until)


# --- map -------------------------------------------------------------------------------------


def _map_run(**map_fields: Any) -> dict[str, StepRow]:
    return steps_of(
        shaped("up", "running", 1),
        shaped("m", depends_on=("up",), kind="map", map_over="up", **map_fields),
        shaped("after", depends_on=("m",)),
    )


def test_a_map_over_n_items_creates_and_queues_one_item_step_each() -> None:
    t = decide_in(complete("up", output=["a", "b", "c"]), run_row(), _map_run())
    assert kinds(t) == [
        ("step_completed", "up", 1),
        ("step_waiting", "m", 1),
        ("step_created", "m[0]", 0),
        ("step_queued", "m[0]", 1),
        ("step_created", "m[1]", 0),
        ("step_queued", "m[1]", 1),
        ("step_created", "m[2]", 0),
        ("step_queued", "m[2]", 1),
    ]
    assert t.events[1].payload == {"items": 3}
    m = t.steps["m"]
    assert (m.status, m.attempt, m.items_total, m.items_done) == ("waiting", 1, 3, 0)
    items = [t.steps[f"m[{i}]"] for i in range(3)]
    assert [(s.kind, s.parent_step, s.item_index, s.item) for s in items] == [
        ("item", "m", 0, "a"),
        ("item", "m", 1, "b"),
        ("item", "m", 2, "c"),
    ]
    assert all(s.new and s.status == "queued" and s.max_attempts == m.max_attempts for s in items)
    assert followup_keys(t) == [f"start_step:r1:m[{i}]:1" for i in range(3)]
    assert t.run.steps_total == 6  # the three declared steps and the three items
    assert t.run.steps_active == 3
    assert t.steps["after"].status == "pending"


def test_a_map_over_an_empty_list_completes_at_once_and_readies_its_dependants() -> None:
    t = decide_in(complete("up", output=[]), run_row(), _map_run())
    assert kinds(t) == [
        ("step_completed", "up", 1),
        ("step_waiting", "m", 1),
        ("step_completed", "m", 1),
        ("step_queued", "after", 1),
    ]
    assert t.steps["m"].output == []
    assert t.steps["m"].items_total == 0
    assert followup_keys(t) == ["start_step:r1:after:1"]


def test_a_map_over_an_empty_list_as_the_last_step_completes_the_run() -> None:
    steps = steps_of(
        shaped("up", "running", 1),
        shaped("m", depends_on=("up",), kind="map", map_over="up"),
    )
    t = decide_in(complete("up", output=[]), run_row(), steps)
    assert kinds(t)[-1] == ("run_completed", None, None)
    assert t.run.output == {"m": []}


@pytest.mark.parametrize("output", [{"a": 1}, "abc", 3, None])
def test_a_map_over_something_not_a_list_fails_the_map_and_the_run(output: Any) -> None:
    t = decide_in(complete("up", output=output), run_row(), _map_run())
    assert kinds(t) == [
        ("step_completed", "up", 1),
        ("step_failed", "m", 1),
        ("run_failed", None, None),
    ]
    assert t.steps["m"].error["type"] == "MapOverNotAList"
    assert type(output).__name__ in t.steps["m"].error["message"]
    assert not any(k.startswith("m[") for k in t.steps)
    assert t.run.error == {"message": "step m failed", "step_key": "m"}


def test_a_failed_map_cannot_be_retried() -> None:
    steps = steps_of(
        shaped("up", "completed", 1, output={"a": 1}),
        shaped("m", "failed", 1, depends_on=("up",), kind="map", map_over="up"),
    )
    drop = refused(
        RetryStep(run_id="r1", step_key="m", idempotency_key="k"), run_row("failed"), steps
    )
    assert drop.reason == "invalid_transition"
    assert "not a list" in drop.detail


def _expanded(n: int) -> dict[str, StepRow]:
    t = decide_in(complete("up", output=[f"v{i}" for i in range(n)]), run_row(), _map_run())
    return t.steps


def test_items_complete_in_any_order_and_the_map_gets_their_outputs_in_index_order() -> None:
    steps = _expanded(3)
    run = run_row()
    for i in range(3):
        steps[f"m[{i}]"].status = "running"
    outputs: list[Any] = []
    for i in (2, 0, 1):
        t = decide_in(complete(f"m[{i}]", output={"i": i}), run, steps)
        steps, run = t.steps, t.run
        outputs.append(kinds(t))
        for s in steps.values():
            s.dirty = s.new = False  # committed
    assert outputs[0] == [("step_completed", "m[2]", 1)]
    assert outputs[1] == [("step_completed", "m[0]", 1)]
    assert outputs[2] == [
        ("step_completed", "m[1]", 1),
        ("step_completed", "m", 1),
        ("step_queued", "after", 1),
    ]
    assert steps["m"].items_done == 3
    assert steps["m"].output == [{"i": 0}, {"i": 1}, {"i": 2}]


def test_the_map_waits_while_an_item_retries() -> None:
    steps = _expanded(2)
    steps["m[0]"].status = steps["m[1]"].status = "running"
    t = decide_in(complete("m[0]", output=0), run_row(), steps)
    fail = FailStep(fence=F, run_id="r1", step_key="m[1]", attempt=1, error="flaky")
    t = decide_in(fail, t.run, t.steps)
    assert kinds(t) == [("step_retrying", "m[1]", 1)]
    assert t.steps["m"].status == "waiting"
    assert t.steps["m"].items_done == 1
    assert followup_keys(t) == ["dispatch_step:r1:m[1]:2"]


# --- sleep -----------------------------------------------------------------------------------


def test_a_sleep_suspends_until_its_time_by_the_database_clock() -> None:
    steps = steps_of(shaped("nap", "running", 1, kind="sleep", lease_expires_at=NOW))
    t = decide_in(suspend("nap", Sleep(seconds=90)), run_row(), steps)
    assert kinds(t) == [("step_sleeping", "nap", 1)]
    nap = t.steps["nap"]
    assert (nap.status, nap.wake_at, nap.lease_expires_at) == (
        "sleeping",
        NOW + timedelta(seconds=90),
        None,
    )
    wake_at = (NOW + timedelta(seconds=90)).isoformat()
    assert t.events[0].payload == {"wake_at": wake_at, "fence": F}
    assert not t.followups  # the timer lives in the row; the leader's reaper fires it
    assert t.run.steps_active == 0


def test_a_sleep_until_a_time() -> None:
    steps = steps_of(shaped("nap", "running", 1, kind="sleep"))
    at = NOW + timedelta(days=2)
    t = decide_in(suspend("nap", Sleep(wake_at=at)), run_row(), steps)
    assert t.steps["nap"].wake_at == at


def _sleeping(wake_at: datetime = NOW + timedelta(seconds=60)) -> dict[str, StepRow]:
    return steps_of(
        shaped("nap", "sleeping", 1, kind="sleep", wake_at=wake_at),
        shaped("next", depends_on=("nap",)),
    )


def test_a_wake_before_the_timer_is_due_is_refused_for_now_and_sent_again_when_due() -> None:
    due = NOW + timedelta(seconds=60)
    wake = WakeStep(run_id="r1", step_key="nap", attempt=1)
    drop = refused(wake, run_row(), _sleeping(due))
    assert drop.reason == "not_due"
    assert due.isoformat() in drop.detail
    assert drop.resend is not None
    assert drop.resend.command == wake
    assert drop.resend.not_before == due


def test_a_wake_in_a_paused_run_is_refused_for_now() -> None:
    wake = WakeStep(run_id="r1", step_key="nap", attempt=1)
    drop = refused(wake, run_row("paused"), _sleeping(NOW - timedelta(seconds=1)))
    assert drop.reason == "paused"
    assert drop.resend is None  # the reaper fires it once the run runs again


def test_a_due_wake_completes_the_sleep_and_readies_its_dependants() -> None:
    wake = WakeStep(run_id="r1", step_key="nap", attempt=1)
    t = decide_in(wake, run_row(), _sleeping(NOW))
    assert kinds(t) == [("step_completed", "nap", 1), ("step_queued", "next", 1)]
    assert t.steps["nap"].output is None
    assert t.steps["nap"].wake_at is None


@pytest.mark.parametrize(
    ("attempt", "status", "reason"),
    [
        (1, "completed", "terminal"),
        (1, "running", "invalid_transition"),
        (2, "sleeping", "stale_attempt"),
    ],
)
def test_a_wake_that_finds_no_timer_of_its_attempt_is_dropped(
    attempt: int, status: str, reason: str
) -> None:
    steps = steps_of(shaped("nap", status, attempt, kind="sleep", wake_at=NOW))
    drop = refused(WakeStep(run_id="r1", step_key="nap", attempt=1), run_row(), steps)
    assert drop.reason == reason


# --- wait for an event -----------------------------------------------------------------------


def _waiting(timeout_at: datetime | None = None, **fields: Any) -> dict[str, StepRow]:
    return steps_of(
        shaped(
            "ok", "waiting", 1, kind="wait", event_name="approved", wake_at=timeout_at, **fields
        ),
        shaped("next", depends_on=("ok",)),
    )


def test_a_wait_consumes_an_event_sent_before_it_and_completes_with_its_payload() -> None:
    steps = steps_of(shaped("ok", "running", 1, kind="wait"))
    kept = RunEvent(event="approved", received_seq=4, payload={"by": "ann"})
    until = AwaitEvent(event="approved", timeout_seconds=30)
    t = decide_in(suspend("ok", until), run_row(), steps, events=[kept])
    assert kinds(t) == [
        ("step_waiting", "ok", 1),
        ("step_completed", "ok", 1),
        ("run_completed", None, None),
    ]
    assert t.events[1].payload == {"output": {"by": "ann"}, "event": "approved", "received_seq": 4}
    assert t.consumed == [(4, "ok", 1)]  # run_events seq 4 is consumed by the second event
    assert t.steps["ok"].output == {"by": "ann"}
    assert t.steps["ok"].wake_at is None  # its timeout is moot


def test_a_wait_with_no_event_yet_waits_with_its_timeout() -> None:
    steps = steps_of(shaped("ok", "running", 1, kind="wait"))
    t = decide_in(suspend("ok", AwaitEvent(event="approved", timeout_seconds=30)), run_row(), steps)
    assert kinds(t) == [("step_waiting", "ok", 1)]
    assert t.steps["ok"].event_name == "approved"
    assert t.steps["ok"].wake_at == NOW + timedelta(seconds=30)
    assert not t.consumed


def test_an_event_nobody_waits_for_is_kept() -> None:
    steps = steps_of(shaped("ok", "running", 1, kind="wait"))
    send = SendEvent(run_id="r1", event="approved", payload=[1], idempotency_key="e1")
    t = decide_in(send, run_row(), steps)
    assert kinds(t) == [("event_received", None, None)]
    assert t.events[0].payload == {"event": "approved", "payload": [1], "buffered": True}
    assert [(b.event, b.payload, b.event_index, b.consumed_by) for b in t.buffered] == [
        ("approved", [1], 0, None)
    ]


def test_an_event_completes_the_step_waiting_for_it() -> None:
    send = SendEvent(run_id="r1", event="approved", payload="yes", idempotency_key="e1")
    t = decide_in(send, run_row(), _waiting(NOW + timedelta(seconds=5)))
    assert kinds(t) == [
        ("event_received", None, None),
        ("step_completed", "ok", 1),
        ("step_queued", "next", 1),
    ]
    assert t.buffered[0].consumed_by == "ok"
    assert t.steps["ok"].output == "yes"


def test_an_event_for_another_name_does_not_wake_the_wait() -> None:
    send = SendEvent(run_id="r1", event="rejected", idempotency_key="e1")
    t = decide_in(send, run_row(), _waiting())
    assert kinds(t) == [("event_received", None, None)]
    assert t.steps["ok"].status == "waiting"


@pytest.mark.parametrize("status", ["completed", "failed", "cancelled"])
def test_an_event_to_a_finished_run_is_terminal(status: str) -> None:
    send = SendEvent(run_id="r1", event="approved", idempotency_key="e1")
    assert refused(send, run_row(status), _waiting()).reason == "terminal"


def test_a_wait_that_times_out_with_attempts_left_retries() -> None:
    wake = WakeStep(run_id="r1", step_key="ok", attempt=1)
    t = decide_in(wake, run_row(), _waiting(NOW - timedelta(seconds=1)))
    assert kinds(t) == [("step_retrying", "ok", 1)]
    ok = t.steps["ok"]
    assert ok.error == {"message": "timed out waiting for event 'approved'", "type": "WaitTimeout"}
    assert ok.wake_at is None
    assert followup_keys(t) == ["dispatch_step:r1:ok:2"]


def test_a_wait_that_times_out_at_its_last_attempt_fails_the_run() -> None:
    wake = WakeStep(run_id="r1", step_key="ok", attempt=1)
    t = decide_in(wake, run_row(), _waiting(NOW, max_attempts=1))
    assert kinds(t) == [("step_failed", "ok", 1), ("run_failed", None, None)]


def test_a_wait_before_its_timeout_is_not_due_and_one_without_a_timeout_has_no_timer() -> None:
    wake = WakeStep(run_id="r1", step_key="ok", attempt=1)
    assert refused(wake, run_row(), _waiting(NOW + timedelta(seconds=1))).reason == "not_due"
    drop = refused(wake, run_row(), _waiting(None))
    assert (drop.reason, drop.detail) == (
        "invalid_transition",
        "step ok waits without a timeout",
    )


# --- child runs ------------------------------------------------------------------------------


def test_a_child_step_creates_its_child_run_in_the_same_transaction() -> None:
    steps = steps_of(shaped("bill", "running", 2, kind="child"))
    run = run_row()
    run.traceparent = "00-" + "a" * 32 + "-" + "b" * 16 + "-01"
    t = decide_in(suspend("bill", AwaitChild(workflow="invoice", input={"n": 1}), 2), run, steps)
    child = child_run_id("r1", "bill", 2)
    assert child == "r1.bill.2"
    assert kinds(t) == [("step_waiting", "bill", 2)]
    assert t.events[0].payload == {"child_run_id": child, "workflow": "invoice", "fence": F}
    assert t.steps["bill"].child_run_id == child
    [other] = t.others
    assert other.created
    assert other.receipt_key == f"create_run:{child}"
    assert (other.run.run_id, other.run.status, other.run.workflow, other.run.input) == (
        child,
        "pending",
        "invoice",
        {"n": 1},
    )
    parent = (other.run.parent_run_id, other.run.parent_step_key, other.run.parent_attempt)
    assert parent == ("r1", "bill", 2)
    assert other.run.traceparent == run.traceparent
    assert [e.type for e in other.events] == ["run_created"]
    assert other.events[0].payload["parent_run_id"] == "r1"
    assert followup_keys(t) == [f"start_run:{child}"]
    assert t.followups[0].command.run_id == child


def test_child_run_ids_of_map_items_hold_no_brackets() -> None:
    assert child_run_id("r1", "m[12]", 1) == "r1.m.12.1"


def _waiting_on_child(**fields: Any) -> dict[str, StepRow]:
    return steps_of(
        shaped("bill", "waiting", 1, kind="child", child_run_id="r1.bill.1", **fields),
        shaped("next", depends_on=("bill",)),
    )


def finished(status: Literal["completed", "failed", "cancelled"], **kw: Any) -> ChildFinished:
    return ChildFinished(
        run_id="r1", step_key="bill", attempt=1, child_run_id="r1.bill.1", status=status, **kw
    )


def test_a_completed_child_completes_its_parent_step_with_its_output() -> None:
    t = decide_in(finished("completed", output={"billed": 3}), run_row(), _waiting_on_child())
    assert kinds(t) == [("step_completed", "bill", 1), ("step_queued", "next", 1)]
    assert t.steps["bill"].output == {"billed": 3}
    assert t.events[0].payload["child_run_id"] == "r1.bill.1"


def test_a_failed_child_fails_the_attempt_which_retries() -> None:
    error = {"message": "step x failed"}
    t = decide_in(finished("failed", error=error), run_row(), _waiting_on_child())
    assert kinds(t) == [("step_retrying", "bill", 1)]
    assert t.steps["bill"].error == {
        "message": "child run r1.bill.1 failed",
        "type": "ChildRunFailed",
        "child_error": error,
    }
    assert followup_keys(t) == ["dispatch_step:r1:bill:2"]


def test_a_failed_child_at_the_last_attempt_fails_the_parent_run() -> None:
    t = decide_in(finished("failed"), run_row(), _waiting_on_child(max_attempts=1))
    assert kinds(t) == [("step_failed", "bill", 1), ("run_failed", None, None)]


def test_a_cancelled_child_fails_the_parent_step_without_a_retry() -> None:
    t = decide_in(finished("cancelled"), run_row(), _waiting_on_child())
    assert kinds(t) == [("step_failed", "bill", 1), ("run_failed", None, None)]
    assert t.steps["bill"].error["type"] == "ChildRunCancelled"


def test_a_child_ending_tells_its_parent() -> None:
    steps = steps_of(shaped("work", "running", 1))
    run = run_row(run_id="r1.bill.1")
    run.parent_run_id, run.parent_step_key, run.parent_attempt = "r1", "bill", 1
    command = CompleteStep(fence=F, run_id="r1.bill.1", step_key="work", attempt=1, output=7)
    t = decide_in(command, run, steps)
    assert kinds(t)[-1] == ("run_completed", None, None)
    [told] = [f.command for f in t.followups]
    assert told == ChildFinished(
        run_id="r1",
        step_key="bill",
        attempt=1,
        child_run_id="r1.bill.1",
        status="completed",
        output={"work": 7},
    )


@pytest.mark.parametrize(
    ("command", "reason"),
    [
        (
            finished("completed").model_copy(update={"child_run_id": "r1.bill.0"}),
            "invalid_transition",
        ),
        (finished("completed").model_copy(update={"attempt": 2}), "invalid_transition"),
    ],
    ids=["another-child", "a-future-attempt"],
)
def test_child_finished_for_another_child_or_attempt_is_dropped(
    command: Command, reason: str
) -> None:
    assert refused(command, run_row(), _waiting_on_child()).reason == reason


def test_child_finished_of_a_superseded_attempt_is_stale() -> None:
    steps = steps_of(shaped("bill", "waiting", 2, kind="child", child_run_id="r1.bill.2"))
    assert refused(finished("completed"), run_row(), steps).reason == "stale_attempt"


def test_cancelling_a_parent_cancels_its_children_and_their_late_report_is_terminal() -> None:
    steps = _waiting_on_child()
    t = decide_in(CancelRun(run_id="r1", reason="stop", idempotency_key="c"), run_row(), steps)
    assert kinds(t) == [
        ("step_cancelled", "bill", 1),
        ("step_cancelled", "next", 0),
        ("run_cancelled", None, None),
    ]
    [cancel] = [f.command for f in t.followups]
    assert cancel == CancelRun(
        run_id="r1.bill.1", reason="stop", idempotency_key="cancel_run:r1.bill.1:parent_cancelled"
    )
    late = refused(finished("cancelled"), t.run, t.steps)
    assert late.reason == "terminal"


def test_a_run_with_a_failed_step_waits_for_its_running_child_before_it_fails() -> None:
    """A failed step does not fail the run while a child it started still runs: the child's
    report must land first, or a retry reopening the run would wait on it forever."""
    steps = steps_of(
        shaped("a", "running", 1, max_attempts=1),
        shaped("bill", "waiting", 1, kind="child", child_run_id="r1.bill.1"),
    )
    fail = FailStep(fence=F, run_id="r1", step_key="a", attempt=1, error="x", retryable=False)
    t = decide_in(fail, run_row(), steps)
    assert kinds(t) == [("step_failed", "a", 1)]
    assert t.run.status == "running"
    t = decide_in(finished("completed", output=1), t.run, t.steps)
    assert kinds(t) == [("step_completed", "bill", 1), ("run_failed", None, None)]
    retry = RetryStep(run_id="r1", step_key="a", idempotency_key="again")
    t = decide_in(retry, t.run, t.steps)
    assert kinds(t) == [("run_resumed", None, None), ("step_queued", "a", 2)]
    t = decide_in(StartStep(run_id="r1", step_key="a", attempt=2, fence=F), t.run, t.steps)
    t = decide_in(complete("a", 2, output=2), t.run, t.steps)
    assert kinds(t) == [("step_completed", "a", 2), ("run_completed", None, None)]


# --- concurrency keys with a queue -----------------------------------------------------------


def _launch(run_id: str = "r2", **kw: Any) -> CreateRun:
    return CreateRun(
        run_id=run_id, workflow="wf", concurrency_key="k", idempotency_key=f"create:{run_id}", **kw
    )


def test_a_launch_finding_every_slot_taken_waits_queued() -> None:
    keys = {"k": KeyState("k", 2, {0: "a", 1: "b"}, 0)}
    t = decide_in(_launch(concurrency_limit=2, on_conflict="queue"), None, {}, keys=keys)
    assert t.run.status == "queued"
    assert t.run.concurrency_slot is None
    assert kinds(t) == [("run_created", None, None), ("run_queued", None, None)]
    assert not t.followups  # planned only once admitted


def test_a_launch_behind_queued_runs_queues_even_if_a_slot_is_free() -> None:
    keys = {"k": KeyState("k", 2, {0: "a"}, 1)}
    t = decide_in(_launch(concurrency_limit=2, on_conflict="queue"), None, {}, keys=keys)
    assert t.run.status == "queued"


def test_a_launch_takes_the_lowest_free_slot() -> None:
    keys = {"k": KeyState("k", 3, {0: "a", 2: "c"}, 0)}
    t = decide_in(_launch(concurrency_limit=3), None, {}, keys=keys)
    assert (t.run.status, t.run.concurrency_slot) == ("pending", 1)
    assert followup_keys(t) == ["start_run:r2"]


def _holder(status: str = "running") -> RunRow:
    run = run_row(status)
    run.concurrency_key, run.concurrency_slot = "k", 0
    return run


def test_a_run_ending_admits_the_oldest_queued_run_into_its_slot() -> None:
    waiting = [_queued("q1"), _queued("q2")]
    steps = steps_of(shaped("a", "running", 1))
    t = decide_in(complete("a"), _holder(), steps, queued={"k": waiting})
    assert kinds(t)[-1] == ("run_completed", None, None)
    assert t.run.concurrency_slot is None
    [admitted] = t.others
    assert (admitted.run.run_id, admitted.run.status, admitted.run.concurrency_slot) == (
        "q1",
        "pending",
        0,
    )
    assert admitted.receipt_key == "admit_run:q1"
    assert [(e.type, e.payload) for e in admitted.events] == [
        ("run_admitted", {"slot": 0, "released_by": "r1"})
    ]
    assert followup_keys(t) == ["start_run:q1"]


def _queued(run_id: str) -> RunRow:
    run = run_row("queued", run_id=run_id, last_seq=2)
    run.concurrency_key = "k"
    return run


def test_a_cancelled_holder_admits_the_next_run_too() -> None:
    t = decide_in(
        CancelRun(run_id="r1", idempotency_key="c"),
        _holder(),
        steps_of(shaped("a", "running", 1)),
        queued={"k": [_queued("q1")]},
    )
    assert [o.run.run_id for o in t.others] == ["q1"]


def test_a_run_ending_with_nobody_queued_just_frees_its_slot() -> None:
    t = decide_in(complete("a"), _holder(), steps_of(shaped("a", "running", 1)))
    assert t.run.concurrency_slot is None
    assert not t.others
    assert not t.followups


def test_a_queued_run_takes_no_command_but_cancel_and_events() -> None:
    start = StartStep(run_id="r2", step_key="a", attempt=1)
    assert refused(start, _queued("r2"), {}).reason == "invalid_transition"
    t = decide_in(CancelRun(run_id="r2", idempotency_key="c"), _queued("r2"), {})
    assert t.run.status == "cancelled"
    send = SendEvent(run_id="r2", event="e", idempotency_key="e")
    assert kinds(decide_in(send, _queued("r2"), {})) == [("event_received", None, None)]


def _failed_holder() -> tuple[RunRow, dict[str, StepRow]]:
    run = run_row("failed")
    run.concurrency_key, run.concurrency_slot = "k", None  # a failed run frees its slot
    return run, steps_of(shaped("a", "failed", 1))


def test_a_manual_retry_reopens_a_failed_run_into_a_free_slot() -> None:
    run, steps = _failed_holder()
    keys = {"k": KeyState("k", 2, {0: "other"}, 0)}
    t = decide_in(RetryStep(run_id="r1", step_key="a", idempotency_key="k1"), run, steps, keys=keys)
    assert kinds(t) == [("run_resumed", None, None), ("step_queued", "a", 2)]
    assert (t.run.status, t.run.concurrency_slot) == ("running", 1)


@pytest.mark.parametrize(
    ("key", "holder"),
    [
        (KeyState("k", 1, {0: "r9"}, 0), "r9"),
        (KeyState("k", 2, {0: "r9"}, 1), "r9"),
        (KeyState("k", 1, {}, 1), "a queued run"),
    ],
    ids=["slot-taken", "others-queued-first", "only-queued"],
)
def test_a_manual_retry_without_a_free_slot_is_refused_for_now_naming_the_holder(
    key: KeyState, holder: str
) -> None:
    run, steps = _failed_holder()
    drop = refused(
        RetryStep(run_id="r1", step_key="a", idempotency_key="k1"), run, steps, keys={"k": key}
    )
    assert drop.reason == "key_taken"  # transient: the same retry applies once the key frees
    assert isinstance(drop.error, ConcurrencyKeyTaken)
    assert holder in drop.detail


def test_reopening_a_failed_run_queues_its_due_retries_itself() -> None:
    """Reopening queues due retries itself and spends their dispatch rows."""
    run, steps = _failed_holder()
    run.concurrency_key = None
    steps["b"] = shaped("b", "retrying", 1, next_attempt_at=NOW - timedelta(seconds=1))
    t = decide_in(RetryStep(run_id="r1", step_key="a", idempotency_key="k1"), run, steps)
    assert kinds(t) == [
        ("run_resumed", None, None),
        ("step_queued", "a", 2),
        ("step_queued", "b", 2),
    ]
    assert t.spent_keys == ["dispatch_step:r1:b:2"]
    late = refused(DispatchStep(run_id="r1", step_key="b", attempt=2), t.run, t.steps)
    assert late.reason == "invalid_transition"
