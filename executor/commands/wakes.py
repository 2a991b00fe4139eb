"""What ends a wait: a due timer (a sleep completes, a wait times out), a child run's report,
an event sent to the run. Decided like every command, inside `machine.decide`."""

from __future__ import annotations

from executor.commands import progress as p
from executor.commands.guards import get_step
from executor.commands.models import ChildFinished, SendEvent, WakeStep
from executor.commands.state import RUN_TERMINAL, STEP_TERMINAL, StepRow
from executor.commands.transition import Buffered, Drop, FollowUp, Transition


def child_run_id(run_id: str, step_key: str, attempt: int) -> str:
    """The child a step's attempt starts: derived, so a redelivery can never start two."""
    return f"{run_id}.{step_key.replace('[', '.').replace(']', '')}.{attempt}"


def fire_due_timers(t: Transition) -> None:
    """A reopened run's timers that came due while it was failed fire now: a wake that
    reached the failed run was refused as `terminal` and spent its key for good."""
    for row in sorted(t.source.unfinished(), key=lambda s: s.step_key):
        step = t.steps.setdefault(row.step_key, row)
        if step.status in ("sleeping", "waiting") and step.wake_at and step.wake_at <= t.now:
            _fire(t, step)


def wake(t: Transition, command: WakeStep) -> None:
    step = get_step(t, command.step_key)
    if step.status in STEP_TERMINAL:
        raise Drop("terminal", f"step {step.step_key} is {step.status}")
    if command.attempt != step.attempt or step.status not in ("sleeping", "waiting"):
        raise Drop(
            "stale_attempt" if command.attempt < step.attempt else "invalid_transition",
            f"step {step.step_key} is {step.status} at attempt {step.attempt}; no timer of "
            f"attempt {command.attempt} is set",
        )
    if step.wake_at is None:
        raise Drop("invalid_transition", f"step {step.step_key} waits without a timeout")
    # Before the run's state, as for a dispatch: a failed run may reopen before the timer.
    if step.wake_at > t.now:
        raise Drop(
            "not_due",
            f"timer of attempt {step.attempt} is due at {step.wake_at.isoformat()}",
            resend=FollowUp("default", command, not_before=step.wake_at),
        )
    if t.run.status in RUN_TERMINAL:
        raise Drop("terminal", f"run is {t.run.status}")
    if t.run.status == "paused":
        raise Drop("paused", "run is paused; its timers fire once it is resumed")
    _fire(t, step)


def _fire(t: Transition, step: StepRow) -> None:
    """A due timer: a sleep completes, a wait times out (retrying while attempts are left)."""
    if step.status == "sleeping":
        p.complete(t, step, None)
    else:
        error = {
            "message": f"timed out waiting for event {step.event_name!r}",
            "type": "WaitTimeout",
        }
        p.fail_attempt(t, step, error, retryable=True)


def child_finished(t: Transition, command: ChildFinished) -> None:
    step = get_step(t, command.step_key)
    if step.status in STEP_TERMINAL:
        raise Drop("terminal", f"step {step.step_key} is {step.status}")
    if t.run.status in RUN_TERMINAL:
        raise Drop("terminal", f"run is {t.run.status}")
    if (
        command.attempt != step.attempt
        or step.status != "waiting"
        or step.child_run_id != command.child_run_id
    ):
        raise Drop(
            "stale_attempt" if command.attempt < step.attempt else "invalid_transition",
            f"step {step.step_key} attempt {step.attempt} is {step.status}, not waiting for "
            f"child {command.child_run_id}",
        )
    if command.status == "completed":
        p.complete(t, step, command.output, child_run_id=command.child_run_id)
        return
    error = {
        "message": f"child run {command.child_run_id} {command.status}",
        "type": "ChildRunFailed" if command.status == "failed" else "ChildRunCancelled",
        "child_error": command.error,
    }
    p.fail_attempt(
        t, step, error, retryable=command.status == "failed", child_run_id=command.child_run_id
    )


def send_event(t: Transition, command: SendEvent) -> None:
    if t.run.status in RUN_TERMINAL:
        raise Drop("terminal", f"run is {t.run.status}")
    waiting = sorted(t.source.waiting_for(command.event), key=lambda s: s.step_key)
    if not waiting:
        index = t.emit(
            "event_received", event=command.event, payload=command.payload, buffered=True
        )
        t.buffered.append(Buffered(command.event, command.payload, index))
        return
    step = t.steps.setdefault(waiting[0].step_key, waiting[0])
    index = t.emit(
        "event_received", event=command.event, payload=command.payload, consumed_by=step.step_key
    )
    t.buffered.append(Buffered(command.event, command.payload, index, consumed_by=step.step_key))
    p.complete(t, step, command.payload, event=command.event)
