"""Commands on the wire (`parse`) and the pure state machine (`decide`), with no database."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from executor.commands.machine import Drop, Transition, decide
from executor.commands.models import (
    COMMAND_TYPES,
    AwaitChild,
    AwaitEvent,
    CancelRun,
    ChildFinished,
    Command,
    CompleteStep,
    CreateRun,
    DispatchStep,
    ExpireLease,
    FailStep,
    PauseRun,
    ResumeRun,
    RetryStep,
    SendEvent,
    Sleep,
    StartRun,
    StartStep,
    StepSpec,
    SuspendStep,
    WakeStep,
    dump,
    parse,
    parse_obj,
)
from executor.commands.state import DROP_REASONS, RunRow, StepRow
from executor.commands.transition import KeyState
from executor.errors import InvalidCommand

from .memsource import MemorySource, prepare

NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
F = "fence-1"  # the delivery that owns every running attempt in these tests
LEASE = 30.0
NO_WAIT = {"initial": 0.0, "multiplier": 2.0, "cap": 0.0, "jitter": False}


# --- parse ---------------------------------------------------------------------------------


def _rejects(raw: str | bytes) -> str:
    with pytest.raises(InvalidCommand) as info:
        parse(raw)
    return str(info.value)


SYSTEM_COMMANDS: list[Command] = [
    SuspendStep(fence="f", run_id="r1", step_key="s", attempt=1, until=Sleep(seconds=5)),
    SuspendStep(
        fence="f", run_id="r1", step_key="s", attempt=1, until=AwaitEvent(event="approved")
    ),
    SuspendStep(
        fence="f", run_id="r1", step_key="s", attempt=1, until=AwaitChild(workflow="w", input=1)
    ),
    WakeStep(run_id="r1", step_key="s[3]", attempt=1),
    ChildFinished(run_id="r1", step_key="s", attempt=1, child_run_id="c", status="completed"),
    DispatchStep(run_id="r1", step_key="s", attempt=2),
    StartStep(run_id="r1", step_key="s", attempt=1),
    CompleteStep(fence=F, run_id="r1", step_key="s", attempt=1, output={"n": [1, 2]}),
    FailStep(fence=F, run_id="r1", step_key="s", attempt=1, error="boom", retryable=False),
    ExpireLease(run_id="r1", step_key="s", attempt=1, observed_lease="2030-01-01T12:00:00+00:00"),
]
EXTERNAL_COMMANDS: list[Command] = [
    CreateRun(run_id="r1", workflow="wf", input={"a": 1}, concurrency_key="k", idempotency_key="c"),
    RetryStep(run_id="r1", step_key="s", requested_by="ops", idempotency_key="retry-1"),
    CancelRun(run_id="r1", reason="no longer needed", idempotency_key="cancel-1"),
    PauseRun(run_id="r1", idempotency_key="pause-1"),
    ResumeRun(run_id="r1", idempotency_key="resume-1"),
    SendEvent(run_id="r1", event="approved", payload={"by": "ann"}, idempotency_key="e-1"),
]


@pytest.mark.parametrize("command", SYSTEM_COMMANDS + EXTERNAL_COMMANDS, ids=lambda c: c.type)
def test_parse_round_trips(command: Command) -> None:
    assert parse(dump(command)) == command
    assert parse(dump(command).encode()) == command
    assert parse_obj(json.loads(dump(command))) == command


def test_parse_accepts_a_start_run_it_dumped() -> None:
    command = StartRun(
        run_id="r1",
        workflow="wf",
        steps=(StepSpec(step_key="a"), StepSpec(step_key="b", depends_on=("a",))),
    )
    assert parse(dump(command)) == command


def test_every_command_type_is_covered() -> None:
    covered = {c.type for c in SYSTEM_COMMANDS + EXTERNAL_COMMANDS} | {"start_run"}
    assert covered == set(COMMAND_TYPES)


def test_parse_rejects_an_unknown_type() -> None:
    message = _rejects('{"type": "launch_missiles", "run_id": "r1", "idempotency_key": "k"}')
    assert "'launch_missiles'" in message
    assert "start_step" in message  # names what it expected


def test_parse_rejects_a_missing_type() -> None:
    assert "discriminator 'type'" in _rejects('{"run_id": "r1", "idempotency_key": "k"}')


def test_parse_rejects_an_extra_field() -> None:
    raw = '{"type": "start_step", "run_id": "r1", "step_key": "s", "attempt": 1, "colour": "red"}'
    assert _rejects(raw) == "invalid command: start_step.colour: Extra inputs are not permitted"


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("attempt", "1", "start_step.attempt: Input should be a valid integer"),
        ("attempt", 1.5, "start_step.attempt: Input should be a valid integer"),
        ("attempt", True, "start_step.attempt: Input should be a valid integer"),
        ("attempt", 0, "start_step.attempt: Input should be greater than or equal to 1"),
        ("step_key", 7, "start_step.step_key: Input should be a valid string"),
        ("step_key", "a step", "start_step.step_key: String should match pattern"),
        ("run_id", "", "start_step.run_id: String should have at least 1 character"),
        ("run_id", None, "start_step.run_id: Input should be a valid string"),
    ],
)
def test_parse_rejects_wrong_types(field: str, value: Any, expected: str) -> None:
    obj: dict[str, Any] = {"type": "start_step", "run_id": "r1", "step_key": "s", "attempt": 1}
    obj[field] = value
    assert expected in _rejects(json.dumps(obj))


def test_parse_rejects_a_non_boolean_flag() -> None:
    raw = json.dumps(
        {
            "type": "fail_step",
            "run_id": "r",
            "step_key": "s",
            "attempt": 1,
            "error": "x",
            "retryable": "yes",
        }
    )
    assert "fail_step.retryable: Input should be a valid boolean" in _rejects(raw)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("{bad json", "invalid command: <root>: Invalid JSON"),
        ("", "invalid command: <root>: Invalid JSON"),
        ('{"type": "start_step", "run_id": "r1"', "invalid command: <root>: Invalid JSON"),
        ("[1, 2]", "invalid command: <root>: Input should be an object"),
        ('"start_step"', "invalid command: <root>: Input should be an object"),
        (b"\x80\x04\x95pickle", "command is not UTF-8 text"),
    ],
)
def test_parse_rejects_bad_json(raw: str | bytes, expected: str) -> None:
    assert _rejects(raw).startswith(expected)


def test_parse_obj_rejects_non_json_values() -> None:
    with pytest.raises(InvalidCommand, match="not JSON-serialisable"):
        parse_obj({"type": "start_step", "run_id": "r1", "step_key": "s", "attempt": float("nan")})
    with pytest.raises(InvalidCommand, match="not JSON-serialisable"):
        parse_obj({"type": "start_step", "run_id": object()})


def _start_run_json(steps: list[dict[str, Any]]) -> str:
    return json.dumps({"type": "start_run", "run_id": "r1", "workflow": "wf", "steps": steps})


def test_parse_rejects_a_cyclic_graph_with_a_clear_message() -> None:
    raw = _start_run_json(
        [
            {"step_key": "a", "depends_on": ["c"]},
            {"step_key": "b", "depends_on": ["a"]},
            {"step_key": "c", "depends_on": ["b"]},
            {"step_key": "d"},
        ]
    )
    assert "dependency cycle among ['a', 'b', 'c']" in _rejects(raw)


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        (
            (StepSpec(step_key="a", depends_on=("b",)), StepSpec(step_key="b", depends_on=("a",))),
            "dependency cycle among ['a', 'b']",
        ),
        ((StepSpec(step_key="a", depends_on=("a",)),), "dependency cycle among ['a']"),
        ((StepSpec(step_key="a", depends_on=("z",)),), "step 'a' depends on unknown ['z']"),
        ((StepSpec(step_key="a"), StepSpec(step_key="a")), "step keys must be unique"),
        ((), "at least 1 item"),
    ],
)
def test_start_run_rejects_a_bad_graph(steps: tuple[StepSpec, ...], expected: str) -> None:
    with pytest.raises(ValidationError) as info:
        StartRun(run_id="r1", workflow="wf", steps=steps)
    assert expected in str(info.value)


def test_system_commands_get_deterministic_keys() -> None:
    assert StartRun(run_id="r1", workflow="w", steps=(StepSpec(step_key="a"),)).idempotency_key == (
        "start_run:r1"
    )
    assert DispatchStep(run_id="r1", step_key="s", attempt=2).idempotency_key == (
        "dispatch_step:r1:s:2"
    )
    assert StartStep(run_id="r1", step_key="s", attempt=1).idempotency_key == "start_step:r1:s:1"
    assert CompleteStep(fence=F, run_id="r1", step_key="s", attempt=3).idempotency_key == (
        f"complete_step:r1:s:3:{F}"
    )
    fail = FailStep(fence=F, run_id="r1", step_key="s", attempt=1, error="x")
    assert fail.idempotency_key == f"fail_step:r1:s:1:{F}"
    expire = ExpireLease(run_id="r1", step_key="s", attempt=1, observed_lease="T1")
    assert expire.idempotency_key == "expire_lease:r1:s:1:T1"
    later = ExpireLease(run_id="r1", step_key="s", attempt=1, observed_lease="T2")
    assert later.idempotency_key != expire.idempotency_key


def test_redelivered_system_commands_carry_the_same_key() -> None:
    raw = '{"type": "complete_step", "run_id": "r1", "step_key": "s", "attempt": 1, "fence": "f"}'
    first, second = parse(raw), parse(raw)
    assert first.idempotency_key == second.idempotency_key == "complete_step:r1:s:1:f"
    # A different output is still the same delivery of the same attempt's outcome.
    other = parse(raw[:-1] + ', "output": 5}')
    assert other.idempotency_key == first.idempotency_key


def test_an_explicit_key_on_a_system_command_is_kept() -> None:
    raw = '{"type": "start_step", "run_id": "r1", "step_key": "s", "attempt": 1, '
    assert parse(raw + '"idempotency_key": "mine"}').idempotency_key == "mine"


@pytest.mark.parametrize(
    "obj",
    [
        {"type": "create_run", "run_id": "r1", "workflow": "wf"},
        {"type": "retry_step", "run_id": "r1", "step_key": "s"},
        {"type": "cancel_run", "run_id": "r1"},
        {"type": "pause_run", "run_id": "r1"},
        {"type": "resume_run", "run_id": "r1"},
    ],
    ids=lambda o: o["type"],
)
def test_external_commands_without_a_key_are_rejected(obj: dict[str, Any]) -> None:
    assert f"{obj['type']}.idempotency_key: Field required" in _rejects(json.dumps(obj))
    empty = json.dumps({**obj, "idempotency_key": ""})
    assert "idempotency_key: String should have at least 1 character" in _rejects(empty)


def test_commands_are_frozen() -> None:
    command = StartStep(run_id="r1", step_key="s", attempt=1)
    with pytest.raises(ValidationError, match="frozen"):
        command.attempt = 2  # type: ignore[misc]


# --- decide --------------------------------------------------------------------------------


def run_row(status: str = "running", *, run_id: str = "r1", last_seq: int = 5) -> RunRow:
    return RunRow(
        run_id=run_id,
        workflow="wf",
        status=status,
        concurrency_key=None,
        input={"x": 1},
        output=None,
        error=None,
        last_seq=last_seq,
    )


def step_row(
    key: str,
    status: str = "pending",
    attempt: int = 0,
    *,
    max_attempts: int = 3,
    depends_on: tuple[str, ...] = (),
    lease: datetime | None = None,
    next_at: datetime | None = None,
    output: Any = None,
    fence: str | None = F,
) -> StepRow:
    return StepRow(
        step_key=key,
        status=status,
        attempt=attempt,
        max_attempts=max_attempts,
        depends_on=depends_on,
        queue="default",
        timeout_seconds=None,
        backoff=dict(NO_WAIT),
        output=output,
        lease_expires_at=lease,
        next_attempt_at=next_at,
        fence=fence,
    )


def steps_of(*rows: StepRow) -> dict[str, StepRow]:
    return {r.step_key: r for r in rows}


HELD = {"held": KeyState("held", 1, {0: "r0"}, 0)}  # a concurrency key run r0 holds


def go(command: Command, run: RunRow | None, steps: dict[str, StepRow]) -> Transition:
    prepare(run, steps)
    return decide(command, run, steps, NOW, LEASE, MemorySource(steps, keys=dict(HELD)))


def kinds(t: Transition) -> list[tuple[str, str | None, int | None]]:
    return [(e.type, e.step_key, e.attempt) for e in t.events]


def followup_keys(t: Transition) -> list[str]:
    return [f.command.idempotency_key for f in t.followups]


def test_create_run() -> None:
    t = go(CreateRun(run_id="r1", workflow="wf", input=[1], idempotency_key="c1"), None, {})
    assert t.run_created
    assert t.run.status == "pending"
    assert t.run.input == [1]
    assert t.run.last_seq == 0
    assert kinds(t) == [("run_created", None, None)]
    assert followup_keys(t) == ["start_run:r1"]


def test_start_run_creates_the_graph_and_queues_roots() -> None:
    command = StartRun(
        run_id="r1",
        workflow="wf",
        steps=(
            StepSpec(step_key="fetch"),
            StepSpec(step_key="left", depends_on=("fetch",)),
            StepSpec(step_key="right", depends_on=("fetch",), max_attempts=1),
            StepSpec(step_key="join", depends_on=("left", "right")),
            StepSpec(step_key="side"),
        ),
    )
    t = go(command, run_row("pending", last_seq=1), {})
    assert t.run.status == "running"
    assert kinds(t)[0] == ("run_started", None, None)
    assert [k for k in kinds(t) if k[0] == "step_created"] == [
        ("step_created", key, 0) for key in ("fetch", "left", "right", "join", "side")
    ]
    assert kinds(t)[-2:] == [("step_queued", "fetch", 1), ("step_queued", "side", 1)]
    assert {k: s.status for k, s in t.steps.items()} == {
        "fetch": "queued",
        "left": "pending",
        "right": "pending",
        "join": "pending",
        "side": "queued",
    }
    assert all(s.new for s in t.steps.values())
    assert t.steps["right"].max_attempts == 1
    assert followup_keys(t) == ["start_step:r1:fetch:1", "start_step:r1:side:1"]


def test_start_step() -> None:
    steps = steps_of(step_row("a", "queued", 1))
    t = go(StartStep(run_id="r1", step_key="a", attempt=1), run_row(), steps)
    assert kinds(t) == [("step_started", "a", 1)]
    assert t.steps["a"].status == "running"
    assert t.steps["a"].attempt == 1
    assert t.steps["a"].lease_expires_at == NOW + timedelta(seconds=LEASE)
    assert t.events[0].payload["lease_expires_at"] == (NOW + timedelta(seconds=LEASE)).isoformat()
    assert not t.followups


def test_start_step_is_allowed_while_the_run_is_paused() -> None:
    steps = steps_of(step_row("a", "queued", 1))
    t = go(StartStep(run_id="r1", step_key="a", attempt=1), run_row("paused"), steps)
    assert kinds(t) == [("step_started", "a", 1)]
    assert t.run.status == "paused"


def test_complete_step_dispatches_a_join_only_when_all_upstream_completed() -> None:
    steps = steps_of(
        step_row("a", "running", 1),
        step_row("b", "running", 1),
        step_row("j", depends_on=("a", "b")),
    )
    t = go(CompleteStep(fence=F, run_id="r1", step_key="a", attempt=1, output=1), run_row(), steps)
    assert kinds(t) == [("step_completed", "a", 1)]
    assert t.steps["j"].status == "pending"
    t = go(CompleteStep(fence=F, run_id="r1", step_key="b", attempt=1, output=2), t.run, t.steps)
    assert kinds(t) == [("step_completed", "b", 1), ("step_queued", "j", 1)]
    assert followup_keys(t) == ["start_step:r1:j:1"]


def test_completing_the_last_step_completes_the_run_with_the_sinks_outputs() -> None:
    steps = steps_of(
        step_row("a", "completed", 1, output="A"),
        step_row("b", "completed", 2, depends_on=("a",), output="B"),
        step_row("c", "running", 1, depends_on=("a",)),
    )
    command = CompleteStep(fence=F, run_id="r1", step_key="c", attempt=1, output="C")
    t = go(command, run_row(), steps)
    assert kinds(t) == [("step_completed", "c", 1), ("run_completed", None, None)]
    assert t.run.status == "completed"
    assert t.run.output == {"b": "B", "c": "C"}
    assert t.steps["c"].lease_expires_at is None


def test_completion_while_paused_dispatches_nothing_until_resume() -> None:
    steps = steps_of(step_row("a", "running", 1), step_row("b", depends_on=("a",)))
    t = go(CompleteStep(fence=F, run_id="r1", step_key="a", attempt=1), run_row("paused"), steps)
    assert kinds(t) == [("step_completed", "a", 1)]
    assert t.steps["b"].status == "pending"
    t = go(ResumeRun(run_id="r1", idempotency_key="res"), t.run, t.steps)
    assert kinds(t) == [("run_resumed", None, None), ("step_queued", "b", 1)]


def test_retryable_failure_with_budget_left_retries() -> None:
    steps = steps_of(step_row("a", "running", 1, max_attempts=2, lease=NOW))
    t = go(FailStep(fence=F, run_id="r1", step_key="a", attempt=1, error="flaky"), run_row(), steps)
    assert kinds(t) == [("step_retrying", "a", 1)]
    step = t.steps["a"]
    assert step.status == "retrying"
    assert step.attempt == 1
    assert step.lease_expires_at is None
    assert step.next_attempt_at == NOW  # initial backoff 0
    assert step.error == {"message": "flaky", "type": "Exception", "traceback": None}
    assert followup_keys(t) == ["dispatch_step:r1:a:2"]
    assert t.followups[0].not_before == NOW
    assert t.run.status == "running"


def test_failure_at_the_last_attempt_fails_the_step_and_the_run() -> None:
    steps = steps_of(step_row("a", "running", 2, max_attempts=2), step_row("b", depends_on=("a",)))
    t = go(FailStep(fence=F, run_id="r1", step_key="a", attempt=2, error="still"), run_row(), steps)
    assert kinds(t) == [("step_failed", "a", 2), ("run_failed", None, None)]
    assert t.run.status == "failed"
    assert t.run.error == {"message": "step a failed", "step_key": "a"}
    assert t.steps["b"].status == "pending"
    assert not t.followups


def test_non_retryable_failure_fails_at_once() -> None:
    steps = steps_of(step_row("a", "running", 1, max_attempts=3))
    command = FailStep(fence=F, run_id="r1", step_key="a", attempt=1, error="bad", retryable=False)
    t = go(command, run_row(), steps)
    assert kinds(t) == [("step_failed", "a", 1), ("run_failed", None, None)]


def test_run_fails_only_once_nothing_is_in_flight() -> None:
    steps = steps_of(step_row("a", "running", 1, max_attempts=1), step_row("b", "running", 1))
    t = go(FailStep(fence=F, run_id="r1", step_key="a", attempt=1, error="x"), run_row(), steps)
    assert kinds(t) == [("step_failed", "a", 1)]
    assert t.run.status == "running"
    t = go(CompleteStep(fence=F, run_id="r1", step_key="b", attempt=1), t.run, t.steps)
    assert kinds(t) == [("step_completed", "b", 1), ("run_failed", None, None)]


def test_expired_lease_counts_as_a_retryable_failure() -> None:
    steps = steps_of(step_row("a", "running", 1, max_attempts=2, lease=NOW - timedelta(seconds=1)))
    command = ExpireLease(run_id="r1", step_key="a", attempt=1, observed_lease="x")
    t = go(command, run_row(), steps)
    assert kinds(t) == [("step_retrying", "a", 1)]
    assert t.steps["a"].error["type"] == "LeaseExpired"
    assert followup_keys(t) == ["dispatch_step:r1:a:2"]


def test_expired_lease_at_the_last_attempt_fails() -> None:
    steps = steps_of(step_row("a", "running", 2, max_attempts=2, lease=NOW))
    command = ExpireLease(run_id="r1", step_key="a", attempt=2, observed_lease="x")
    assert kinds(go(command, run_row(), steps)) == [
        ("step_failed", "a", 2),
        ("run_failed", None, None),
    ]


def test_dispatch_queues_the_next_attempt() -> None:
    steps = steps_of(step_row("a", "retrying", 1, next_at=NOW))
    t = go(DispatchStep(run_id="r1", step_key="a", attempt=2), run_row(), steps)
    assert kinds(t) == [("step_queued", "a", 2)]
    assert t.steps["a"].status == "queued"
    assert t.steps["a"].next_attempt_at is None
    assert followup_keys(t) == ["start_step:r1:a:2"]


def test_pause_and_resume() -> None:
    steps = steps_of(step_row("a", "running", 1))
    t = go(PauseRun(run_id="r1", reason="maintenance", idempotency_key="p"), run_row(), steps)
    assert kinds(t) == [("run_paused", None, None)]
    assert t.run.status == "paused"
    assert t.events[0].payload == {"reason": "maintenance"}
    t = go(ResumeRun(run_id="r1", idempotency_key="r"), t.run, t.steps)
    assert kinds(t) == [("run_resumed", None, None)]
    assert t.run.status == "running"


def test_resume_dispatches_retries_that_came_due_while_paused() -> None:
    steps = steps_of(
        step_row("a", "retrying", 1, next_at=NOW - timedelta(seconds=1)),
        step_row("b", "retrying", 1, next_at=NOW + timedelta(seconds=60)),
    )
    t = go(ResumeRun(run_id="r1", idempotency_key="r"), run_row("paused"), steps)
    assert kinds(t) == [("run_resumed", None, None), ("step_queued", "a", 2)]
    assert t.steps["b"].status == "retrying"


@pytest.mark.parametrize("status", ["pending", "running", "paused"])
def test_cancel_cancels_every_non_terminal_step(status: str) -> None:
    steps = steps_of(
        step_row("a", "completed", 1),
        step_row("b", "running", 1, lease=NOW),
        step_row("c", "retrying", 1),
        step_row("d", "failed", 3),
        step_row("e", "pending"),
        step_row("f", "queued", 1),
    )
    t = go(CancelRun(run_id="r1", reason="stop", idempotency_key="x"), run_row(status), steps)
    assert kinds(t) == [
        ("step_cancelled", "b", 1),
        ("step_cancelled", "c", 1),
        ("step_cancelled", "e", 0),
        ("step_cancelled", "f", 1),
        ("run_cancelled", None, None),
    ]
    assert t.run.status == "cancelled"
    assert {k: s.status for k, s in t.steps.items()} == {
        "a": "completed",
        "b": "cancelled",
        "c": "cancelled",
        "d": "failed",
        "e": "cancelled",
        "f": "cancelled",
    }
    assert t.steps["b"].lease_expires_at is None


def test_manual_retry_reopens_a_failed_run() -> None:
    steps = steps_of(
        step_row("a", "completed", 1),
        step_row("b", "failed", 3, depends_on=("a",)),
        step_row("c", depends_on=("b",)),
    )
    command = RetryStep(run_id="r1", step_key="b", requested_by="ops", idempotency_key="k")
    t = go(command, run_row("failed"), steps)
    assert kinds(t) == [("run_resumed", None, None), ("step_queued", "b", 4)]
    assert t.events[0].payload == {"reason": "manual_retry", "step_key": "b"}
    assert t.events[1].payload == {"manual": True, "requested_by": "ops"}
    assert t.run.status == "running"
    assert t.run.error is None
    assert followup_keys(t) == ["start_step:r1:b:4"]


def test_manual_retry_in_a_running_run_does_not_reopen() -> None:
    steps = steps_of(step_row("a", "failed", 1), step_row("b", "running", 1))
    t = go(RetryStep(run_id="r1", step_key="a", idempotency_key="k"), run_row(), steps)
    assert kinds(t) == [("step_queued", "a", 2)]


def test_decide_is_pure_and_deterministic() -> None:
    steps = steps_of(step_row("a", "running", 1), step_row("b", depends_on=("a",)))
    command = CompleteStep(fence=F, run_id="r1", step_key="a", attempt=1, output={"v": 1})
    run = run_row()
    first = go(command, copy.deepcopy(run), copy.deepcopy(steps))
    second = go(command, copy.deepcopy(run), copy.deepcopy(steps))
    assert first.events == second.events
    assert first.steps == second.steps
    assert first.run == second.run
    assert [f.command for f in first.followups] == [f.command for f in second.followups]


# Every drop reason `decide` can give, each from a minimal situation.
# (`duplicate` is decided by the handler from receipts, before `decide` runs.)
Case = tuple[str, Command, Callable[[], RunRow | None], Callable[[], dict[str, StepRow]], str, str]

DROP_CASES: list[Case] = [
    (
        "create-existing",
        CreateRun(run_id="r1", workflow="wf", idempotency_key="c"),
        lambda: run_row(),
        dict,
        "invalid_transition",
        "already exists",
    ),
    *[
        (
            f"unknown-run-{c.type}",
            c,
            lambda: None,
            dict,
            "unknown_entity",
            "no run r1",
        )
        for c in [
            StartRun(run_id="r1", workflow="wf", steps=(StepSpec(step_key="a"),)),
            *SYSTEM_COMMANDS,
            *EXTERNAL_COMMANDS[1:],
        ]
    ],
    (
        "unknown-step",
        StartStep(run_id="r1", step_key="nope", attempt=1),
        run_row,
        lambda: steps_of(step_row("a", "queued", 1)),
        "unknown_entity",
        "has no step 'nope'",
    ),
    (
        "retry-unknown-step",
        RetryStep(run_id="r1", step_key="nope", idempotency_key="k"),
        lambda: run_row("failed"),
        lambda: steps_of(step_row("a", "failed", 1)),
        "unknown_entity",
        "has no step 'nope'",
    ),
    (
        "start-run-twice",
        StartRun(run_id="r1", workflow="wf", steps=(StepSpec(step_key="a"),)),
        run_row,
        dict,
        "invalid_transition",
        "cannot start a run that is running",
    ),
    (
        "start-run-cancelled",
        StartRun(run_id="r1", workflow="wf", steps=(StepSpec(step_key="a"),)),
        lambda: run_row("cancelled"),
        dict,
        "terminal",
        "run is cancelled",
    ),
    (
        "start-run-other-workflow",
        StartRun(run_id="r1", workflow="other", steps=(StepSpec(step_key="a"),)),
        lambda: run_row("pending"),
        dict,
        "invalid_payload",
        "names workflow 'other'",
    ),
    (
        "start-run-no-steps",
        StartRun.model_construct(
            run_id="r1", workflow="wf", steps=(), idempotency_key="start_run:r1"
        ),
        lambda: run_row("pending"),
        dict,
        "invalid_payload",
        "carries no steps",
    ),
    (
        "start-stale-attempt",
        StartStep(run_id="r1", step_key="a", attempt=1),
        run_row,
        lambda: steps_of(step_row("a", "queued", 2)),
        "stale_attempt",
        "attempt 1 superseded by attempt 2",
    ),
    (
        "start-future-attempt",
        StartStep(run_id="r1", step_key="a", attempt=3),
        run_row,
        lambda: steps_of(step_row("a", "queued", 2)),
        "invalid_transition",
        "attempt 3 was never dispatched",
    ),
    (
        "start-already-running",
        StartStep(run_id="r1", step_key="a", attempt=1, idempotency_key="other-key"),
        run_row,
        lambda: steps_of(step_row("a", "running", 1)),
        "invalid_transition",
        "attempt 1 is running, not queued",
    ),
    (
        "start-completed-step",
        StartStep(run_id="r1", step_key="a", attempt=1),
        run_row,
        lambda: steps_of(step_row("a", "completed", 1)),
        "terminal",
        "step a is completed",
    ),
    (
        "start-step-of-cancelled-run",
        StartStep(run_id="r1", step_key="a", attempt=1),
        lambda: run_row("cancelled"),
        lambda: steps_of(step_row("a", "cancelled", 1)),
        "terminal",
        "step a is cancelled",
    ),
    (
        "start-step-of-failed-run",
        StartStep(run_id="r1", step_key="a", attempt=2),
        lambda: run_row("failed"),
        lambda: steps_of(step_row("a", "retrying", 2), step_row("b", "failed", 1)),
        "terminal",
        "run is failed",
    ),
    (
        "complete-stale-attempt",
        CompleteStep(fence=F, run_id="r1", step_key="a", attempt=1),
        run_row,
        lambda: steps_of(step_row("a", "running", 2)),
        "stale_attempt",
        "attempt 1 superseded by attempt 2",
    ),
    (
        "complete-after-terminal",
        CompleteStep(fence=F, run_id="r1", step_key="a", attempt=1),
        run_row,
        lambda: steps_of(step_row("a", "failed", 1)),
        "terminal",
        "step a is failed",
    ),
    (
        "complete-queued",
        CompleteStep(fence=F, run_id="r1", step_key="a", attempt=1),
        run_row,
        lambda: steps_of(step_row("a", "queued", 1)),
        "invalid_transition",
        "is queued, not running",
    ),
    (
        "fail-retrying",
        FailStep(fence=F, run_id="r1", step_key="a", attempt=1, error="x"),
        run_row,
        lambda: steps_of(step_row("a", "retrying", 1)),
        "stale_attempt",
        "already ended; a retry is scheduled",
    ),
    (
        "expire-held-lease",
        ExpireLease(run_id="r1", step_key="a", attempt=1, observed_lease="old"),
        run_row,
        lambda: steps_of(step_row("a", "running", 1, lease=NOW + timedelta(seconds=1))),
        "invalid_transition",
        "lease of attempt 1 is held until",
    ),
    (
        "expire-stale",
        ExpireLease(run_id="r1", step_key="a", attempt=1, observed_lease="old"),
        run_row,
        lambda: steps_of(step_row("a", "running", 2, lease=NOW - timedelta(seconds=1))),
        "stale_attempt",
        "superseded",
    ),
    (
        "dispatch-stale",
        DispatchStep(run_id="r1", step_key="a", attempt=2),
        run_row,
        lambda: steps_of(step_row("a", "queued", 3)),
        "stale_attempt",
        "attempt 2 superseded by 3",
    ),
    (
        "dispatch-twice",
        DispatchStep(run_id="r1", step_key="a", attempt=2, idempotency_key="again"),
        run_row,
        lambda: steps_of(step_row("a", "queued", 2)),
        "invalid_transition",
        "attempt 2 was already dispatched",
    ),
    (
        "dispatch-skipping-an-attempt",
        DispatchStep(run_id="r1", step_key="a", attempt=3),
        run_row,
        lambda: steps_of(step_row("a", "retrying", 1)),
        "invalid_transition",
        "cannot dispatch attempt 3",
    ),
    (
        "dispatch-while-paused",
        DispatchStep(run_id="r1", step_key="a", attempt=2),
        lambda: run_row("paused"),
        lambda: steps_of(step_row("a", "retrying", 1)),
        "paused",
        "run is paused",
    ),
    (
        "dispatch-before-its-backoff-ends",
        DispatchStep(run_id="r1", step_key="a", attempt=2),
        run_row,
        lambda: steps_of(step_row("a", "retrying", 1, next_at=NOW + timedelta(seconds=5))),
        "not_due",
        "(database clock)",
    ),
    (
        "launch-on-a-held-key",
        CreateRun(run_id="r2", workflow="wf", concurrency_key="held", idempotency_key="c2"),
        lambda: None,
        dict,
        "key_taken",
        "is held by run r0",
    ),
    (
        "dispatch-after-a-failure",
        DispatchStep(run_id="r1", step_key="a", attempt=2),
        run_row,
        lambda: steps_of(step_row("a", "retrying", 1), step_row("b", "failed", 1)),
        "invalid_transition",
        "a step of this run failed",
    ),
    (
        "dispatch-completed",
        DispatchStep(run_id="r1", step_key="a", attempt=2),
        run_row,
        lambda: steps_of(step_row("a", "completed", 1)),
        "terminal",
        "step a is completed",
    ),
    (
        "pause-paused",
        PauseRun(run_id="r1", idempotency_key="p"),
        lambda: run_row("paused"),
        dict,
        "invalid_transition",
        "cannot pause a run that is paused",
    ),
    (
        "pause-pending",
        PauseRun(run_id="r1", idempotency_key="p"),
        lambda: run_row("pending"),
        dict,
        "invalid_transition",
        "cannot pause a run that is pending",
    ),
    (
        "pause-completed",
        PauseRun(run_id="r1", idempotency_key="p"),
        lambda: run_row("completed"),
        dict,
        "terminal",
        "run is completed",
    ),
    (
        "resume-running",
        ResumeRun(run_id="r1", idempotency_key="r"),
        run_row,
        dict,
        "invalid_transition",
        "cannot resume a run that is running",
    ),
    (
        "resume-failed",
        ResumeRun(run_id="r1", idempotency_key="r"),
        lambda: run_row("failed"),
        dict,
        "terminal",
        "run is failed",
    ),
    (
        "cancel-cancelled",
        CancelRun(run_id="r1", idempotency_key="c"),
        lambda: run_row("cancelled"),
        dict,
        "terminal",
        "run is cancelled",
    ),
    (
        "cancel-completed",
        CancelRun(run_id="r1", idempotency_key="c"),
        lambda: run_row("completed"),
        dict,
        "terminal",
        "run is completed",
    ),
    (
        "retry-not-failed",
        RetryStep(run_id="r1", step_key="a", idempotency_key="k"),
        run_row,
        lambda: steps_of(step_row("a", "running", 1)),
        "invalid_transition",
        "step a is running; only failed steps retry",
    ),
    (
        "retry-in-cancelled-run",
        RetryStep(run_id="r1", step_key="a", idempotency_key="k"),
        lambda: run_row("cancelled"),
        lambda: steps_of(step_row("a", "failed", 1)),
        "terminal",
        "run is cancelled",
    ),
    (
        "retry-in-paused-run",
        RetryStep(run_id="r1", step_key="a", idempotency_key="k"),
        lambda: run_row("paused"),
        lambda: steps_of(step_row("a", "failed", 1)),
        "invalid_transition",
        "run is paused; resume it before retrying",
    ),
]


@pytest.mark.parametrize(
    ("command", "run", "steps", "reason", "detail"),
    [pytest.param(*case[1:], id=case[0]) for case in DROP_CASES],
)
def test_drops(
    command: Command,
    run: Callable[[], RunRow | None],
    steps: Callable[[], dict[str, StepRow]],
    reason: str,
    detail: str,
) -> None:
    with pytest.raises(Drop) as info:
        go(command, run(), steps())
    assert info.value.reason == reason
    assert detail in info.value.detail


def test_every_drop_reason_decide_can_give_is_exercised() -> None:
    # duplicate and busy are the handler's, not the state machine's
    assert {case[4] for case in DROP_CASES} == set(DROP_REASONS) - {"duplicate", "busy"}


def test_a_completion_starts_a_held_step_when_no_dependant_continues() -> None:
    steps = steps_of(
        step_row("a", "running", 1),
        step_row("b", "queued", 1),  # its job was kept back by the worker running `a`
        step_row("j", depends_on=("a", "b")),
    )
    done = CompleteStep(
        fence=F, run_id="r1", step_key="a", attempt=1, continue_on="default", continue_with="b"
    )
    t = go(done, run_row(), steps)
    assert kinds(t) == [("step_completed", "a", 1), ("step_started", "b", 1)]
    assert t.continued is t.steps["b"]
    assert t.steps["b"].fence == F
    assert t.spent_keys == ["start_step:r1:b:1"]  # its kept-back job's outbox row goes too


def test_a_held_step_someone_else_started_is_left_alone() -> None:
    steps = steps_of(step_row("a", "running", 1), step_row("b", "running", 1, fence="other"))
    done = CompleteStep(
        fence=F, run_id="r1", step_key="a", attempt=1, continue_on="default", continue_with="b"
    )
    t = go(done, run_row(), steps)
    assert kinds(t) == [("step_completed", "a", 1)]
    assert t.continued is None
