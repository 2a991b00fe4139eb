"""The state machine: given locked rows and one command, what changes and which events follow.

Pure: no I/O of its own and no clock of its own (the handler passes the database's `now()`
and a `RowSource` for the few rows a decision may pull in), so the same function decides for
the handler and runs in unit tests against dicts. A delivery that must not change anything
raises `Drop` with one of the contract's reasons; nothing it wrote in memory is kept.
What ends a wait is decided in `wakes`, the attempt and owner checks are in `guards`, and
what a step's progress changes in `progress`; `decide` is the one entry point to all of it.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from executor.commands import progress as p
from executor.commands.guards import attempt_step, get_step
from executor.commands.models import (
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
    StartRun,
    StartStep,
    SuspendStep,
    WakeStep,
    field_of,
    unplanned_start,
)
from executor.commands.state import RUN_TERMINAL, STEP_TERMINAL, RunRow, StepRow
from executor.commands.transition import Drop, FollowUp, OtherRun, RowSource, Transition
from executor.commands.wakes import (
    child_finished,
    child_run_id,
    fire_due_timers,
    send_event,
    wake,
)
from executor.errors import ConcurrencyKeyTaken, ConcurrencyLimitConflict

__all__ = ["Drop", "Transition", "child_run_id", "decide"]


def decide(
    command: Command,
    run: RunRow | None,
    steps: dict[str, StepRow],
    now: datetime,
    lease_seconds: float,
    source: RowSource,
) -> Transition:
    """Apply `command` to copies of the locked rows; raise Drop to refuse it."""
    if isinstance(command, CreateRun):
        if run is not None:
            raise Drop("invalid_transition", f"run {command.run_id} already exists")
        return _create_run(command, now, lease_seconds, source)
    if run is None:
        raise Drop("unknown_entity", f"no run {command.run_id}")
    t = Transition(run, steps, source, now, lease_seconds, fence=field_of(command, "fence", None))
    if run.status == "queued" and not isinstance(command, CancelRun | SendEvent):
        raise Drop("invalid_transition", "run is queued for a concurrency slot")

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
        p.resume_work(t)
    elif isinstance(command, RetryStep):
        _manual_retry(t, command)
    elif isinstance(command, DispatchStep):
        _dispatch(t, command)
    elif isinstance(command, StartStep):
        step = attempt_step(t, command.step_key, command.attempt, "queued")
        p.start(t, step)
    elif isinstance(command, CompleteStep):
        step = attempt_step(t, command.step_key, command.attempt, "running", command.fence)
        p.complete(t, step, command.output, fence=command.fence)
        if command.continue_on is not None:
            p.continue_inline(t, command.continue_on, also=command.continue_with)
    elif isinstance(command, FailStep):
        step = attempt_step(t, command.step_key, command.attempt, "running", command.fence)
        error = {
            "message": command.error,
            "type": command.error_type,
            "traceback": command.traceback,
        }
        p.fail_attempt(t, step, error, retryable=command.retryable, fence=command.fence)
    elif isinstance(command, SuspendStep):
        _suspend(t, command)
    elif isinstance(command, WakeStep):
        wake(t, command)
    elif isinstance(command, ChildFinished):
        child_finished(t, command)
    elif isinstance(command, SendEvent):
        send_event(t, command)
    elif isinstance(command, ExpireLease):
        step = attempt_step(t, command.step_key, command.attempt, "running")
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
        p.fail_attempt(t, step, error, retryable=True)
    else:  # pragma: no cover - the union is closed
        raise Drop("invalid_payload", f"unhandled command type {type(command).__name__}")
    p.settle(t)
    return t


def _create_run(
    command: CreateRun, now: datetime, lease_seconds: float, source: RowSource
) -> Transition:
    run = RunRow(
        run_id=command.run_id,
        workflow=command.workflow,
        status="pending",
        concurrency_key=command.concurrency_key,
        input=command.input,
        output=None,
        error=None,
        last_seq=0,
        concurrency_limit=command.concurrency_limit,
        parent_run_id=command.parent_run_id,
        parent_step_key=command.parent_step_key,
        parent_attempt=command.parent_attempt,
        traceparent=command.traceparent,
    )
    t = Transition(run, {}, source, now, lease_seconds, run_created=True)
    payload: dict[str, Any] = {
        "workflow": command.workflow,
        "input": command.input,
        "concurrency_key": command.concurrency_key,
    }
    if command.concurrency_key is not None:
        payload["concurrency_limit"] = command.concurrency_limit
        _claim_launch(t, command)
    if command.parent_run_id is not None:
        payload.update(
            parent_run_id=command.parent_run_id,
            parent_step_key=command.parent_step_key,
            parent_attempt=command.parent_attempt,
        )
    t.emit("run_created", **payload)
    if run.status == "queued":
        t.emit("run_queued", concurrency_key=command.concurrency_key)
    else:
        t.followups.append(FollowUp("default", unplanned_start(command.run_id, command.workflow)))
    return t


def _claim_launch(t: Transition, command: CreateRun) -> None:
    """Take a free slot of the key, queue for one, or refuse (transiently: the key frees)."""
    assert command.concurrency_key is not None
    key = t.source.concurrency(command.concurrency_key)
    limit = command.concurrency_limit
    if (key.holders or key.queued) and key.limit != limit:
        conflict = ConcurrencyLimitConflict(command.concurrency_key, key.limit, limit)
        raise Drop("key_taken", str(conflict), error=conflict)
    t.key_limit = (command.concurrency_key, limit)
    slot = key.free_slot(limit) if not key.queued else None
    if slot is not None:
        t.run.concurrency_slot = slot
    elif command.on_conflict == "queue":
        t.run.status = "queued"
    else:
        err = ConcurrencyKeyTaken(command.concurrency_key, key.holder)
        raise Drop("key_taken", str(err), error=err)


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
    dependants: dict[str, list[str]] = {s.step_key: [] for s in command.steps}
    for spec in command.steps:
        for d in spec.depends_on:
            dependants[d].append(spec.step_key)
    created = []
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
            kind=spec.kind,
            dependants=tuple(dependants[spec.step_key]),
            waiting_on=len(spec.depends_on),
            map_over=spec.map_over,
        )
        t.add_step(step)
        created.append(step)
        t.emit(
            "step_created",
            step,
            depends_on=list(spec.depends_on),
            max_attempts=spec.max_attempts,
            queue=spec.queue,
            timeout_seconds=spec.timeout_seconds,
            backoff=step.backoff,
            kind=spec.kind,
            map_over=spec.map_over,
        )
    for step in created:
        if step.waiting_on == 0:
            p.ready(t, step)
    if command.continue_on is not None:
        p.continue_inline(t, command.continue_on)


def _cancel_run(t: Transition, command: CancelRun) -> None:
    if t.run.status in RUN_TERMINAL:
        raise Drop("terminal", f"run is {t.run.status}")
    unfinished = sorted(t.source.unfinished(), key=lambda s: s.step_key)
    p.cancel_children(t, unfinished, command.reason)
    for step in unfinished:
        step = t.steps.setdefault(step.step_key, step)
        if step.status not in STEP_TERMINAL:
            t.move(step, "cancelled")
            step.lease_expires_at = None
            step.wake_at = None
            t.emit("step_cancelled", step, reason=command.reason)
    t.set_run("cancelled", error={"message": command.reason or "cancelled"})
    t.emit("run_cancelled", reason=command.reason)
    p.run_ended(t)


def _dispatch(t: Transition, command: DispatchStep) -> None:
    step = get_step(t, command.step_key)
    if step.status in STEP_TERMINAL:
        raise Drop("terminal", f"step {step.step_key} is {step.status}")
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
    # Before the run's state: a failed run can be reopened before this retry is due, and
    # only a refusal for now keeps the dispatch (its key, its outbox row) for that.
    due = step.next_attempt_at
    if due is not None and due > t.now:
        raise Drop(
            "not_due",
            f"attempt {command.attempt} is due at {due.isoformat()} (database clock)",
            resend=FollowUp(step.queue, command, not_before=due),
        )
    if t.run.status in RUN_TERMINAL:
        raise Drop("terminal", f"run is {t.run.status}")
    if t.run.status == "paused":
        raise Drop("paused", "run is paused; resuming it dispatches due retries")
    if t.run.steps_failed > 0:
        raise Drop("invalid_transition", "a step of this run failed; nothing more is dispatched")
    p.queue(t, step)


def _manual_retry(t: Transition, command: RetryStep) -> None:
    step = get_step(t, command.step_key)
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
    if step.kind == "map":
        raise Drop(
            "invalid_transition",
            f"map {step.step_key} failed because its upstream's output is not a list; "
            "retrying cannot change that",
        )
    reopening = t.run.status == "failed"
    if reopening:
        _reclaim_slot(t)
        t.set_run("running", error=None)
        t.emit("run_resumed", reason="manual_retry", step_key=step.step_key)
    p.queue(t, step, manual=True, requested_by=command.requested_by)
    p.resume_work(t)
    if reopening:
        fire_due_timers(t)


def _reclaim_slot(t: Transition) -> None:
    """A failed run reopened by a retry holds its key again, if a slot is free."""
    key = t.run.concurrency_key
    if key is None:
        return
    state = t.source.concurrency(key)
    slot = state.free_slot(state.limit)
    if slot is None or state.queued:
        holder = state.holder if state.holders else "a queued run"
        err = ConcurrencyKeyTaken(key, holder)
        raise Drop("key_taken", str(err), error=err)
    t.run.concurrency_slot = slot


def _suspend(t: Transition, command: SuspendStep) -> None:
    step = attempt_step(t, command.step_key, command.attempt, "running", command.fence)
    until = command.until
    step.lease_expires_at = None
    if isinstance(until, AwaitEvent):
        t.move(step, "waiting")
        step.event_name = until.event
        step.wake_at = (
            None
            if until.timeout_seconds is None
            else t.now + timedelta(seconds=until.timeout_seconds)
        )
        t.emit(
            "step_waiting",
            step,
            event=until.event,
            timeout_at=None if step.wake_at is None else step.wake_at.isoformat(),
            fence=command.fence,
        )
        kept = t.source.buffered_event(until.event)
        if kept is not None:
            t.consumed.append((kept.received_seq, step.step_key, len(t.events)))
            p.complete(t, step, kept.payload, event=until.event, received_seq=kept.received_seq)
    elif isinstance(until, AwaitChild):
        _start_child(t, step, command, until)
    else:
        wake_at = until.wake_at or t.now + timedelta(seconds=until.seconds or 0.0)
        t.move(step, "sleeping")
        step.wake_at = wake_at
        t.emit("step_sleeping", step, wake_at=wake_at.isoformat(), fence=command.fence)


def _start_child(t: Transition, step: StepRow, command: SuspendStep, until: AwaitChild) -> None:
    child_id = child_run_id(t.run.run_id, step.step_key, step.attempt)
    t.move(step, "waiting")
    step.child_run_id = child_id
    t.emit("step_waiting", step, child_run_id=child_id, workflow=until.workflow, fence=t.fence)
    create = CreateRun(
        run_id=child_id,
        workflow=until.workflow,
        input=until.input,
        idempotency_key=f"create_run:{child_id}",
        parent_run_id=t.run.run_id,
        parent_step_key=step.step_key,
        parent_attempt=step.attempt,
        traceparent=t.run.traceparent,  # one trace: the child's steps hang under the parent's
    )
    child = _create_run(create, t.now, t.lease_seconds, t.source)
    t.others.append(
        OtherRun(
            child.run,
            receipt_key=create.idempotency_key,
            receipt_command=create,
            created=True,
            events=child.events,
        )
    )
    t.followups.extend(child.followups)
