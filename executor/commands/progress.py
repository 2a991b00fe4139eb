"""How a run moves forward: readiness, completion, failure and the end of a run.

Incremental by construction. A completed step decrements `waiting_on` of each of its
dependants and queues those that reach zero; an item bumps its map's `items_done`; the run
compares its counters. Nothing here walks the run's steps, so the cost of a command is the
cost of what it changes.
"""

from __future__ import annotations

import random
from datetime import timedelta
from typing import Any

from executor.commands.models import (
    CancelRun,
    ChildFinished,
    DispatchStep,
    StartStep,
    unplanned_start,
)
from executor.commands.state import StepRow
from executor.commands.transition import FollowUp, NewEvent, OtherRun, Transition


def backoff_delay(policy: dict[str, Any], attempt: int) -> float:
    """Exponential backoff after `attempt` failed, capped, with full jitter when enabled."""
    initial = float(policy.get("initial", 1.0))
    multiplier = float(policy.get("multiplier", 2.0))
    cap = float(policy.get("cap", 60.0))
    delay = min(cap, initial * multiplier ** max(0, attempt - 1))
    if policy.get("jitter", True):
        delay = random.uniform(delay / 2, delay)
    return delay


def moving(t: Transition) -> bool:
    """Only a running run with no failed step dispatches anything new."""
    return t.run.status == "running" and t.run.steps_failed == 0


def queue(t: Transition, step: StepRow, **payload: Any) -> None:
    if step.status == "retrying":
        t.spent_keys.append(f"dispatch_step:{t.run.run_id}:{step.step_key}:{step.attempt + 1}")
    step.attempt += 1
    t.move(step, "queued")
    step.next_attempt_at = None
    step.error = None
    step.wake_at = None
    step.child_run_id = None  # an earlier attempt's child; this attempt starts its own
    t.emit("step_queued", step, **payload)
    t.followups.append(
        FollowUp(
            step.queue,
            StartStep(
                run_id=t.run.run_id,
                step_key=step.step_key,
                attempt=step.attempt,
                workflow=t.run.workflow,
            ),
            timeout_seconds=step.timeout_seconds,
        )
    )


def ready(t: Transition, step: StepRow) -> None:
    """A pending step whose upstream all completed: queue it (or expand it, for a map)."""
    if not moving(t):
        return  # stays pending with waiting_on = 0; resume or a reopening retry finds it
    if step.kind == "map":
        _expand(t, step)
    else:
        queue(t, step)


def _expand(t: Transition, m: StepRow) -> None:
    assert m.map_over is not None
    upstream = t.step(m.map_over)
    values = upstream.output if upstream is not None else None
    m.attempt = 1
    if not isinstance(values, list):
        t.move(m, "failed")
        m.error = {
            "message": f"map_over {m.map_over!r} returned {type(values).__name__}, not a list",
            "type": "MapOverNotAList",
        }
        t.emit("step_failed", m, error=m.error)
        return
    t.move(m, "waiting")
    m.items_total = len(values)
    m.items_done = 0
    t.emit("step_waiting", m, items=len(values))
    for index, value in enumerate(values):
        item = StepRow(
            step_key=f"{m.step_key}[{index}]",
            status="pending",
            attempt=0,
            max_attempts=m.max_attempts,
            depends_on=(),
            queue=m.queue,
            timeout_seconds=m.timeout_seconds,
            backoff=m.backoff,
            kind="item",
            parent_step=m.step_key,
            item_index=index,
            item=value,
        )
        t.add_step(item)
        t.emit(
            "step_created",
            item,
            parent=m.step_key,
            index=index,
            max_attempts=item.max_attempts,
            queue=item.queue,
        )
        queue(t, item)
    if not values:
        complete(t, m, [])


def complete(t: Transition, step: StepRow, output: Any, **payload: Any) -> None:
    """The step completed: tell its map and its dependants."""
    t.move(step, "completed")
    step.output = output
    step.error = None
    step.lease_expires_at = None
    step.wake_at = None
    t.emit("step_completed", step, output=output, **payload)
    if step.parent_step is not None:
        parent = t.step(step.parent_step)
        assert parent is not None
        assert parent.items_total is not None
        parent.items_done += 1
        parent.dirty = True
        if parent.items_done == parent.items_total and parent.status == "waiting":
            complete(t, parent, _item_outputs(t, parent))
    for dependant in t.load(step.dependants):
        dependant.waiting_on -= 1
        dependant.dirty = True
        if dependant.waiting_on == 0 and dependant.status == "pending":
            ready(t, dependant)


def _item_outputs(t: Transition, m: StepRow) -> list[Any]:
    outputs = t.source.item_outputs(m.step_key)
    for s in t.steps.values():
        if s.parent_step == m.step_key and s.item_index is not None and s.dirty:
            outputs[s.item_index] = s.output
    return outputs


def fail_attempt(
    t: Transition, step: StepRow, error: dict[str, Any], *, retryable: bool, **payload: Any
) -> None:
    step.lease_expires_at = None
    step.wake_at = None
    step.error = error
    if retryable and step.attempt < step.max_attempts:
        t.move(step, "retrying")
        step.next_attempt_at = t.now + timedelta(seconds=backoff_delay(step.backoff, step.attempt))
        t.emit(
            "step_retrying",
            step,
            error=error,
            next_attempt_at=step.next_attempt_at.isoformat(),
            **payload,
        )
        t.followups.append(
            FollowUp(
                step.queue,
                DispatchStep(run_id=t.run.run_id, step_key=step.step_key, attempt=step.attempt + 1),
                not_before=step.next_attempt_at,
            )
        )
    else:
        t.move(step, "failed")
        step.next_attempt_at = None
        t.emit("step_failed", step, error=error, **payload)


def resume_work(t: Transition) -> None:
    """A run runs again (resumed, or reopened by a manual retry): restart what was held.

    Ready steps that waited out the pause or the failure are queued, and retries already
    due are dispatched now. A retry not yet due still has its dispatch in the outbox (a
    transient refusal leaves it there), which delivers it when due.
    """
    for step in sorted(t.source.resumable(), key=lambda s: s.step_key):
        step = t.steps.setdefault(step.step_key, step)
        if step.status == "pending" and step.waiting_on == 0:
            ready(t, step)
        elif (
            step.status == "retrying"
            and moving(t)
            and (step.next_attempt_at is None or step.next_attempt_at <= t.now)
        ):
            queue(t, step)


def settle(t: Transition) -> None:
    """Complete or fail a running run whose counters say it is done."""
    run = t.run
    if run.status != "running":
        return
    if run.steps_failed > 0:
        if run.steps_active == 0 and not _waits_on_a_child(t):
            failed = (
                next((s.step_key for s in t.steps.values() if s.status == "failed"), None)
                or t.source.failed_step()
            )
            error = {"message": f"step {failed} failed", "step_key": failed}
            t.set_run("failed", error=error)
            t.emit("run_failed", error=error)
            run_ended(t)
    elif run.steps_total > 0 and run.steps_completed == run.steps_total:
        output = t.source.sink_outputs()
        for s in t.steps.values():
            if s.dirty and not s.dependants and s.parent_step is None:
                output[s.step_key] = s.output
        output = dict(sorted(output.items()))
        t.set_run("completed", output=output)
        t.emit("run_completed", output=output)
        run_ended(t)


def _waits_on_a_child(t: Transition) -> bool:
    """A step waiting on a child run holds the run open until the child reports.

    Failing the run first would refuse the child's `child_finished` as `terminal`, for good
    (its key is the child's, derived): a manual retry reopening the run would then leave that
    step waiting forever. Read only when the run is about to fail.
    """
    for row in t.source.unfinished():
        step = t.steps.get(row.step_key, row)
        if step.kind == "child" and step.status == "waiting":
            return True
    return False


def run_ended(t: Transition) -> None:
    """The run is terminal: free its slot for the oldest queued run, tell its parent."""
    run = t.run
    t.ended = True
    if run.concurrency_slot is not None and run.concurrency_key is not None:
        slot, run.concurrency_slot = run.concurrency_slot, None
        admitted = t.source.oldest_queued(run.concurrency_key)
        if admitted is not None:
            admitted.status = "pending"
            admitted.concurrency_slot = slot
            other = OtherRun(
                admitted,
                receipt_key=f"admit_run:{admitted.run_id}",
                receipt_command=unplanned_start(admitted.run_id, admitted.workflow),
            )
            other.events.append(
                NewEvent("run_admitted", payload={"slot": slot, "released_by": run.run_id})
            )
            t.others.append(other)
            t.followups.append(
                FollowUp("default", unplanned_start(admitted.run_id, admitted.workflow))
            )
    if run.parent_run_id is not None:
        assert run.parent_step_key is not None
        assert run.parent_attempt is not None
        t.followups.append(
            FollowUp(
                "default",
                ChildFinished(
                    run_id=run.parent_run_id,
                    step_key=run.parent_step_key,
                    attempt=run.parent_attempt,
                    child_run_id=run.run_id,
                    status=run.status,  # type: ignore[arg-type]
                    output=run.output if run.status == "completed" else None,
                    error=run.error if run.status != "completed" else None,
                ),
            )
        )


def cancel_children(t: Transition, steps: list[StepRow], reason: str | None) -> None:
    for step in steps:
        if step.kind == "child" and step.child_run_id and step.status == "waiting":
            t.followups.append(
                FollowUp(
                    "default",
                    CancelRun(
                        run_id=step.child_run_id,
                        idempotency_key=f"cancel_run:{step.child_run_id}:parent_cancelled",
                        reason=reason or f"parent run {t.run.run_id} was cancelled",
                    ),
                )
            )


def continue_inline(t: Transition, queue_name: str, *, also: str | None = None) -> None:
    """Start one queued step here, for the sending worker to run in place: one this
    transaction made ready, else `also`, a step the sender holds back, if still queued.

    Only a step routed to the worker's own queue and with no timeout of its own qualifies:
    the job already running was armed with its queue's timeout, and routing must hold.
    """

    def fits(step: StepRow | None) -> bool:
        return (
            step is not None
            and step.queue == queue_name
            and step.timeout_seconds is None
            and step.status == "queued"
        )

    for followup in t.followups:
        command = followup.command
        if not isinstance(command, StartStep) or command.run_id != t.run.run_id:
            continue
        step = t.steps[command.step_key]
        if fits(step):
            t.followups.remove(followup)
            start(t, step)
            t.continued = step
            return
    held = None if also is None else t.step(also)
    if held is not None and fits(held) and t.run.status == "running":
        start(t, held)
        t.spent_keys.append(f"start_step:{t.run.run_id}:{held.step_key}:{held.attempt}")
        t.continued = held


def start(t: Transition, step: StepRow) -> None:
    t.move(step, "running")
    step.fence = t.fence
    step.lease_expires_at = t.now + timedelta(seconds=t.lease_seconds)
    t.emit("step_started", step, lease_expires_at=step.lease_expires_at.isoformat(), fence=t.fence)
    t.started = step
