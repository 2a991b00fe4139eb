"""The state machine: given locked rows and one command, what changes and which events follow.

Pure: no I/O, no clock of its own (the handler passes the database's `now()`), so the same
function decides for the handler and can be exercised in unit tests. A delivery that must
not change anything raises `Drop` with one of the contract's reasons; nothing it wrote to the
in-memory rows is kept.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from executor.commands.models import (
    CancelRun,
    Command,
    CompleteStep,
    CreateRun,
    DispatchStep,
    ExpireLease,
    FailStep,
    PauseRun,
    ResumeRun,
    RetryStep,
    StartRun,
    StartStep,
    unplanned_start,
)
from executor.commands.state import (
    RUN_TERMINAL,
    STEP_IN_FLIGHT,
    STEP_TERMINAL,
    RunRow,
    StepRow,
)


class Drop(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class NewEvent:
    type: str
    step_key: str | None = None
    attempt: int | None = None
    payload: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class FollowUp:
    """A command to deliver after commit, no earlier than `not_before`."""

    queue: str
    command: Command
    not_before: datetime | None = None
    timeout_seconds: float | None = None


@dataclass
class Transition:
    """The in-memory result of deciding one command against locked rows."""

    run: RunRow
    steps: dict[str, StepRow]
    now: datetime
    lease_seconds: float
    events: list[NewEvent] = field(default_factory=list)
    followups: list[FollowUp] = field(default_factory=list)
    run_created: bool = False
    reopened: bool = False
    continued: StepRow | None = None

    def emit(self, type_: str, step: StepRow | None = None, **payload: Any) -> None:
        self.events.append(
            NewEvent(
                type_,
                step.step_key if step else None,
                step.attempt if step else None,
                payload,
            )
        )

    def set_run(self, status: str, **fields: Any) -> None:
        self.run.status = status
        for name, value in fields.items():
            setattr(self.run, name, value)


def decide(
    command: Command,
    run: RunRow | None,
    steps: dict[str, StepRow],
    now: datetime,
    lease_seconds: float,
) -> Transition:
    """Apply `command` to copies of the locked rows; raise Drop to refuse it."""
    if isinstance(command, CreateRun):
        if run is not None:
            raise Drop("invalid_transition", f"run {command.run_id} already exists")
        new_run = RunRow(
            run_id=command.run_id,
            workflow=command.workflow,
            status="pending",
            concurrency_key=command.concurrency_key,
            input=command.input,
            output=None,
            error=None,
            last_seq=0,
        )
        t = Transition(new_run, {}, now, lease_seconds, run_created=True)
        t.emit(
            "run_created",
            workflow=command.workflow,
            input=command.input,
            concurrency_key=command.concurrency_key,
        )
        t.followups.append(FollowUp("default", unplanned_start(command.run_id, command.workflow)))
        return t

    if run is None:
        raise Drop("unknown_entity", f"no run {command.run_id}")
    t = Transition(run, steps, now, lease_seconds)

    if isinstance(command, StartRun):
        _start_run(t, command)
    elif isinstance(command, CancelRun):
        _cancel_run(t, command)
    elif isinstance(command, PauseRun):
        _require_run(t, "running", "pause")
        t.set_run("paused")
        t.emit("run_paused", reason=command.reason)
    elif isinstance(command, ResumeRun):
        _require_run(t, "paused", "resume")
        t.set_run("running")
        t.emit("run_resumed", reason="resumed")
        advance(t, dispatch_due_retries=True)
    elif isinstance(command, RetryStep):
        _manual_retry(t, command)
    elif isinstance(command, DispatchStep):
        _dispatch(t, command)
    elif isinstance(command, StartStep):
        step = _attempt_step(t, command.step_key, command.attempt, "queued")
        step.status = "running"
        step.lease_expires_at = now + timedelta(seconds=lease_seconds)
        step.dirty = True
        t.emit("step_started", step, lease_expires_at=step.lease_expires_at.isoformat())
    elif isinstance(command, CompleteStep):
        step = _attempt_step(t, command.step_key, command.attempt, "running")
        step.status = "completed"
        step.output = command.output
        step.error = None
        step.lease_expires_at = None
        step.dirty = True
        t.emit("step_completed", step, output=command.output)
        advance(t)
        if command.continue_on is not None:
            _continue_inline(t, command.continue_on)
    elif isinstance(command, FailStep):
        step = _attempt_step(t, command.step_key, command.attempt, "running")
        error = {
            "message": command.error,
            "type": command.error_type,
            "traceback": command.traceback,
        }
        _fail_attempt(t, step, error, retryable=command.retryable)
    elif isinstance(command, ExpireLease):
        step = _attempt_step(t, command.step_key, command.attempt, "running")
        if step.lease_expires_at is not None and step.lease_expires_at > now:
            raise Drop(
                "invalid_transition",
                f"lease of attempt {command.attempt} is held until "
                f"{step.lease_expires_at.isoformat()}",
            )
        error = {
            "message": "lease expired: the worker stopped heartbeating",
            "type": "LeaseExpired",
        }
        _fail_attempt(t, step, error, retryable=True)
    else:  # pragma: no cover - the union is closed
        raise Drop("invalid_payload", f"unhandled command type {type(command).__name__}")
    return t


def _require_run(t: Transition, status: str, verb: str) -> None:
    if t.run.status in RUN_TERMINAL:
        raise Drop("terminal", f"run is {t.run.status}")
    if t.run.status != status:
        raise Drop("invalid_transition", f"cannot {verb} a run that is {t.run.status}")


def _start_run(t: Transition, command: StartRun) -> None:
    _require_run(t, "pending", "start")
    if not command.steps:
        raise Drop("invalid_payload", "start_run carries no steps")
    if command.workflow != t.run.workflow:
        raise Drop(
            "invalid_payload",
            f"start_run names workflow {command.workflow!r}, run is {t.run.workflow!r}",
        )
    t.set_run("running")
    t.emit("run_started", workflow=command.workflow)
    for spec in command.steps:
        step = StepRow(
            step_key=spec.step_key,
            status="pending",
            attempt=0,
            max_attempts=spec.max_attempts,
            depends_on=tuple(spec.depends_on),
            queue=spec.queue,
            timeout_seconds=spec.timeout_seconds,
            backoff=spec.backoff.model_dump(),
            dirty=True,
            new=True,
        )
        t.steps[spec.step_key] = step
        t.emit(
            "step_created",
            step,
            depends_on=list(spec.depends_on),
            max_attempts=spec.max_attempts,
            queue=spec.queue,
            timeout_seconds=spec.timeout_seconds,
            backoff=step.backoff,
        )
    advance(t)
    if command.continue_on is not None:
        _continue_inline(t, command.continue_on)


def _cancel_run(t: Transition, command: CancelRun) -> None:
    if t.run.status in RUN_TERMINAL:
        raise Drop("terminal", f"run is {t.run.status}")
    for step in sorted(t.steps.values(), key=lambda s: s.step_key):
        if step.status not in STEP_TERMINAL:
            step.status = "cancelled"
            step.lease_expires_at = None
            step.dirty = True
            t.emit("step_cancelled", step, reason=command.reason)
    t.set_run("cancelled", error={"message": command.reason or "cancelled"})
    t.emit("run_cancelled", reason=command.reason)


def _get_step(t: Transition, step_key: str) -> StepRow:
    step = t.steps.get(step_key)
    if step is None:
        raise Drop("unknown_entity", f"run {t.run.run_id} has no step {step_key!r}")
    return step


def _attempt_step(t: Transition, step_key: str, attempt: int, expected: str) -> StepRow:
    """Fence a step command by attempt; terminal and stale checks come before state checks."""
    step = _get_step(t, step_key)
    if step.status in STEP_TERMINAL:
        raise Drop("terminal", f"step {step_key} is {step.status} (attempt {step.attempt})")
    if t.run.status in RUN_TERMINAL:
        raise Drop("terminal", f"run is {t.run.status}")
    if attempt < step.attempt:
        raise Drop("stale_attempt", f"attempt {attempt} superseded by attempt {step.attempt}")
    if attempt > step.attempt:
        raise Drop(
            "invalid_transition",
            f"attempt {attempt} was never dispatched (current attempt {step.attempt})",
        )
    if step.status == "retrying":
        # The attempt already ended (failed, or its lease expired); the next one is only
        # waiting out its backoff, so this is a superseded attempt's late command (I6).
        raise Drop("stale_attempt", f"attempt {attempt} already ended; a retry is scheduled")
    if step.status != expected:
        raise Drop(
            "invalid_transition",
            f"step {step_key} attempt {attempt} is {step.status}, not {expected}",
        )
    return step


def backoff_delay(policy: dict[str, Any], attempt: int) -> float:
    """Exponential backoff after `attempt` failed, capped, with full jitter when enabled."""
    initial = float(policy.get("initial", 1.0))
    multiplier = float(policy.get("multiplier", 2.0))
    cap = float(policy.get("cap", 60.0))
    delay = min(cap, initial * multiplier ** max(0, attempt - 1))
    if policy.get("jitter", True):
        delay = random.uniform(delay / 2, delay)
    return delay


def _fail_attempt(t: Transition, step: StepRow, error: dict[str, Any], *, retryable: bool) -> None:
    step.lease_expires_at = None
    step.error = error
    step.dirty = True
    if retryable and step.attempt < step.max_attempts:
        step.status = "retrying"
        step.next_attempt_at = t.now + timedelta(seconds=backoff_delay(step.backoff, step.attempt))
        t.emit("step_retrying", step, error=error, next_attempt_at=step.next_attempt_at.isoformat())
        t.followups.append(
            FollowUp(
                step.queue,
                DispatchStep(run_id=t.run.run_id, step_key=step.step_key, attempt=step.attempt + 1),
                not_before=step.next_attempt_at,
            )
        )
    else:
        step.status = "failed"
        step.next_attempt_at = None
        t.emit("step_failed", step, error=error)
    advance(t)


def _dispatch(t: Transition, command: DispatchStep) -> None:
    step = _get_step(t, command.step_key)
    if step.status in STEP_TERMINAL:
        raise Drop("terminal", f"step {step.step_key} is {step.status}")
    if t.run.status in RUN_TERMINAL:
        raise Drop("terminal", f"run is {t.run.status}")
    if command.attempt <= step.attempt and step.status != "retrying":
        if command.attempt < step.attempt:
            raise Drop("stale_attempt", f"attempt {command.attempt} superseded by {step.attempt}")
        raise Drop("invalid_transition", f"attempt {command.attempt} was already dispatched")
    if step.status != "retrying" or command.attempt != step.attempt + 1:
        raise Drop(
            "invalid_transition",
            f"step {step.step_key} is {step.status} at attempt {step.attempt}; "
            f"cannot dispatch attempt {command.attempt}",
        )
    if t.run.status != "running":
        raise Drop("invalid_transition", f"run is {t.run.status}; nothing is dispatched")
    if _has_failed(t):
        raise Drop("invalid_transition", "a step of this run failed; nothing more is dispatched")
    _queue(t, step)
    advance(t)


def _manual_retry(t: Transition, command: RetryStep) -> None:
    step = _get_step(t, command.step_key)
    if t.run.status == "cancelled":
        raise Drop("terminal", "run is cancelled")
    if step.status in ("completed", "cancelled"):
        raise Drop("terminal", f"step {step.step_key} is {step.status}; only failed steps retry")
    if step.status != "failed":
        raise Drop(
            "invalid_transition", f"step {step.step_key} is {step.status}; only failed steps retry"
        )
    if t.run.status == "paused":
        raise Drop("invalid_transition", "run is paused; resume it before retrying")
    if t.run.status == "failed":
        t.set_run("running", error=None)
        t.reopened = True
        t.emit("run_resumed", reason="manual_retry", step_key=step.step_key)
    _queue(t, step, manual=True, requested_by=command.requested_by)
    advance(t, dispatch_due_retries=True)


def _continue_inline(t: Transition, queue: str) -> None:
    """Start one just-queued dependant here, for the completing worker to run in place.

    Only a step routed to the worker's own queue and with no timeout of its own qualifies:
    the job already running was armed with its queue's timeout, and routing must hold.
    """
    for followup in t.followups:
        command = followup.command
        if not isinstance(command, StartStep):
            continue
        step = t.steps[command.step_key]
        if step.queue == queue and step.timeout_seconds is None and step.status == "queued":
            t.followups.remove(followup)
            step.status = "running"
            step.lease_expires_at = t.now + timedelta(seconds=t.lease_seconds)
            t.emit("step_started", step, lease_expires_at=step.lease_expires_at.isoformat())
            t.continued = step
            return


def _has_failed(t: Transition) -> bool:
    return any(s.status == "failed" for s in t.steps.values())


def _queue(t: Transition, step: StepRow, **payload: Any) -> None:
    step.attempt += 1
    step.status = "queued"
    step.next_attempt_at = None
    step.error = None
    step.dirty = True
    t.emit("step_queued", step, **payload)
    t.followups.append(
        FollowUp(
            step.queue,
            StartStep(run_id=t.run.run_id, step_key=step.step_key, attempt=step.attempt),
            timeout_seconds=step.timeout_seconds,
        )
    )


def advance(t: Transition, *, dispatch_due_retries: bool = False) -> None:
    """Dispatch what is ready and settle the run; only a running run moves forward.

    A retry's own `dispatch_step` may have been dropped while the run was paused or failed,
    so resuming and reopening dispatch the retries that are already due.
    """
    if t.run.status != "running":
        return
    steps = [t.steps[k] for k in sorted(t.steps)]
    if _has_failed(t):
        if not any(s.status in STEP_IN_FLIGHT for s in steps):
            failed = [s for s in steps if s.status == "failed"]
            error = {"message": f"step {failed[0].step_key} failed", "step_key": failed[0].step_key}
            t.set_run("failed", error=error)
            t.emit("run_failed", error=error)
        return
    for step in steps:
        if (
            step.status == "pending"
            and all(t.steps[d].status == "completed" for d in step.depends_on)
        ) or (
            step.status == "retrying"
            and step.next_attempt_at is not None
            and step.next_attempt_at <= t.now
            and dispatch_due_retries
        ):
            _queue(t, step)
    if all(s.status == "completed" for s in steps):
        dependants = {d for s in steps for d in s.depends_on}
        output = {s.step_key: s.output for s in steps if s.step_key not in dependants}
        t.set_run("completed", output=output)
        t.emit("run_completed", output=output)
