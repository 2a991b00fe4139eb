"""The state machines as tables: event type -> allowed from-statuses -> to-status, plus checks.

A new event is a new row here. `checks` run before the move (the step or run still has its
from-status) and return a Problem or None; `effects` run after it. Whatever no table says —
an unknown event, a from-status not listed, a wrong attempt, a second start or outcome for an
attempt — the replay engine (replay.py) reports as a broken step history (I1) and stops
replaying that run, since its state can no longer be trusted. Problems from checks do not
stop the replay: the history is still a path, it breaks a rule of the run.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

from executor.ledger.verify.state import (
    RUN_LIVE,
    STEP_IN_FLIGHT,
    STEP_TERMINAL,
    Event,
    Problem,
    RunState,
    StepState,
    parse,
)

RunCheck = Callable[[RunState, Event], Problem | None]
RunEffect = Callable[[RunState, Event, str], None]
StepCheck = Callable[[RunState, Event, StepState], Problem | None]
StepEffect = Callable[[RunState, Event, StepState, str], None]


@dataclass(frozen=True)
class RunEdge:
    moves: Mapping[str, str | None]  # from-status -> to-status; None leaves it unchanged
    checks: tuple[RunCheck, ...] = ()
    effects: tuple[RunEffect, ...] = ()


@dataclass(frozen=True)
class StepEdge:
    moves: Mapping[str, str]
    # "same": the step's current attempt; "next": current + 1; "any": not checked.
    attempt: Literal["same", "next", "any"] = "same"
    start: bool = False  # at most one per attempt (I1)
    outcome: bool = False  # the attempt's one outcome (I1)
    fenced: bool = False  # carries its attempt's start fence when a worker sent it (I6)
    checks: tuple[StepCheck, ...] = ()
    effects: tuple[StepEffect, ...] = ()


# --- run checks ------------------------------------------------------------------------------


_COMPLETED = frozenset({"completed"})
_FAILED = frozenset({"failed"})


def _all_steps_completed(run: RunState, ev: Event) -> Problem | None:
    step = run.first_outside(_COMPLETED)
    if step is None:
        return None
    return Problem(
        "run",
        "run_completed_early",
        f"run_completed while step {step.key} is {step.status}",
        step.key,
    )


def _leaf_outputs(run: RunState, ev: Event) -> Problem | None:
    """The run's output is the outputs of the steps nobody depends on (items excluded)."""
    if run.counts["completed"] != len(run.steps):
        return None  # already reported; the output means nothing then
    depended = {d for s in run.steps.values() for d in s.upstream}
    expected = {
        k: parse(s.output) for k, s in run.steps.items() if k not in depended and s.parent is None
    }
    if parse(ev.output) != expected:
        return Problem(
            "run", "run_output", "run_completed output is not the outputs of its final steps"
        )
    return None


def _a_step_failed(run: RunState, ev: Event) -> Problem | None:
    if run.counts["failed"]:
        return None
    return Problem("run", "run_failed_without_failure", "run_failed but no step failed")


def _nothing_in_flight(run: RunState, ev: Event) -> Problem | None:
    step = run.first_step(STEP_IN_FLIGHT)
    if step is None:
        return None
    return Problem(
        "run", "run_failed_early", f"run_failed while step {step.key} is {step.status}", step.key
    )


def _no_unfinished_steps(run: RunState, ev: Event) -> Problem | None:
    step = run.first_outside(STEP_TERMINAL)
    if step is None:
        return None
    return Problem(
        "run",
        "run_cancelled_early",
        f"run_cancelled while step {step.key} is {step.status} (cancel ends every step)",
        step.key,
    )


def _reopened_by_manual_retry(run: RunState, ev: Event) -> Problem | None:
    if run.status == "failed" and ev.payload.get("reason") != "manual_retry":
        return Problem(
            "run",
            "reopen_without_retry",
            f"failed run reopened with reason {ev.payload.get('reason')!r}, not manual_retry",
        )
    return None


def _consumer_exists(run: RunState, ev: Event) -> Problem | None:
    consumer = ev.payload.get("consumed_by") or ev.step_key
    if consumer is not None and consumer not in run.steps:
        return Problem(
            "I1", "unknown_step", f"event consumed by step {consumer}, never created", consumer
        )
    return None


def _await_manual_queue(run: RunState, ev: Event, before: str) -> None:
    if before == "failed":
        run.reopen = (ev.key, ev.seq)


def _keep_output(run: RunState, ev: Event, before: str) -> None:
    run.output = ev.output


RUN_EVENTS: dict[str, RunEdge] = {
    "run_queued": RunEdge({"pending": "queued"}),
    "run_admitted": RunEdge({"queued": "pending"}),
    "run_started": RunEdge({"pending": "running"}),
    "run_paused": RunEdge({"running": "paused"}),
    "run_resumed": RunEdge(
        {"paused": "running", "failed": "running"},
        checks=(_reopened_by_manual_retry,),
        effects=(_await_manual_queue,),
    ),
    "run_completed": RunEdge(
        {"running": "completed"},
        checks=(_all_steps_completed, _leaf_outputs),
        effects=(_keep_output,),
    ),
    "run_failed": RunEdge({"running": "failed"}, checks=(_a_step_failed, _nothing_in_flight)),
    "run_cancelled": RunEdge({s: "cancelled" for s in RUN_LIVE}, checks=(_no_unfinished_steps,)),
    # An external event: buffered or consumed, it moves no status by itself.
    "event_received": RunEdge({s: None for s in RUN_LIVE}, checks=(_consumer_exists,)),
}


# --- step checks -----------------------------------------------------------------------------


def _upstream_completed(run: RunState, ev: Event, step: StepState) -> Problem | None:
    """Leaving `pending` needs every upstream completed; an item needs its map's upstream."""
    if step.status != "pending":
        return None
    owner = step
    if step.parent is not None:
        parent = run.steps.get(step.parent)
        if parent is None:
            return Problem(
                "run", "dependency_order", f"item of unknown map {step.parent}", step.key
            )
        owner = parent
    for dep in (*step.upstream, *(owner.upstream if owner is not step else ())):
        upstream = run.steps.get(dep)
        if upstream is None:
            return Problem(
                "run", "dependency_order", f"{ev.type} but upstream {dep} never created", step.key
            )
        if upstream.status != "completed":
            return Problem(
                "run",
                "dependency_order",
                f"{ev.type} of {step.key} while its upstream {dep} is {upstream.status}",
                step.key,
            )
    return None


def _run_running(run: RunState, ev: Event, step: StepState) -> Problem | None:
    if run.status != "running":
        return Problem("run", "dispatch_while_not_running", f"step_queued while run {run.status}")
    return None


def _manual_only_from_failed(run: RunState, ev: Event, step: StepState) -> Problem | None:
    manual = ev.manual
    if step.status == "failed" and not manual:
        return Problem("I1", "transition", "failed step queued again without a manual retry")
    if manual and step.status != "failed":
        return Problem("I1", "transition", f"manual retry of a step that is {step.status}")
    return None


def _nothing_failed(run: RunState, ev: Event, step: StepState) -> Problem | None:
    """After a terminal failure only a manual retry dispatches (DESIGN: state machines)."""
    if not run.counts["failed"] or ev.manual:
        return None
    failed = run.first_step(_FAILED)
    assert failed is not None
    return Problem(
        "run",
        "dispatch_after_failure",
        f"step_queued of {step.key} after step {failed.key} failed terminally (no manual retry)",
    )


def _map_only_from_pending(run: RunState, ev: Event, step: StepState) -> Problem | None:
    if step.status == "pending" and not step.is_map:
        return Problem(
            "I1", "transition", f"{ev.type} from pending: only a map step skips the queue"
        )
    return None


def _map_items_completed(run: RunState, ev: Event, step: StepState) -> Problem | None:
    if not step.is_map:
        return None
    declared = step.items_declared
    if step.status == "pending" and (step.items or declared):
        return Problem("run", "map_incomplete", "map step completed before waiting on its items")
    if step.items_completed != step.items or (declared is not None and step.items != declared):
        return Problem(
            "run",
            "map_incomplete",
            f"map step completed with {step.items_completed} of "
            f"{declared if declared is not None else step.items} items completed",
        )
    return None


def _within_budget(run: RunState, ev: Event, step: StepState) -> Problem | None:
    if (ev.attempt or 0) >= step.max_attempts:
        return Problem(
            "I1", "retry_budget", f"step_retrying at attempt {ev.attempt} of {step.max_attempts}"
        )
    return None


def _new_attempt(run: RunState, ev: Event, step: StepState, before: str) -> None:
    step.attempt = ev.attempt or 0
    step.fence = None
    step.child_run_id = None
    if run.reopen is not None and run.reopen[0] == ev.key and ev.manual:
        run.reopen = None


def _record_start(run: RunState, ev: Event, step: StepState, before: str) -> None:
    step.started.add(step.attempt)
    step.fence = ev.fence


def _record_completion(run: RunState, ev: Event, step: StepState, before: str) -> None:
    step.output = ev.output
    if step.parent is not None and step.parent in run.steps:
        run.steps[step.parent].items_completed += 1


def _record_wait(run: RunState, ev: Event, step: StepState, before: str) -> None:
    if "items" in ev.payload:
        step.items_declared = int(ev.payload["items"])
    if ev.payload.get("child_run_id") is not None:
        step.child_run_id = str(ev.payload["child_run_id"])


_ENDED_BY = ("running", "sleeping", "waiting")

STEP_EVENTS: dict[str, StepEdge] = {
    "step_queued": StepEdge(
        {"pending": "queued", "retrying": "queued", "failed": "queued"},
        attempt="next",
        checks=(_run_running, _upstream_completed, _manual_only_from_failed, _nothing_failed),
        effects=(_new_attempt,),
    ),
    "step_started": StepEdge({"queued": "running"}, start=True, effects=(_record_start,)),
    "step_sleeping": StepEdge({"running": "sleeping"}, fenced=True),
    "step_waiting": StepEdge(
        {"running": "waiting", "pending": "waiting"},
        fenced=True,
        checks=(_map_only_from_pending, _upstream_completed),
        effects=(_record_wait,),
    ),
    "step_completed": StepEdge(
        {**{s: "completed" for s in _ENDED_BY}, "pending": "completed"},
        outcome=True,
        fenced=True,
        checks=(_map_only_from_pending, _upstream_completed, _map_items_completed),
        effects=(_record_completion,),
    ),
    # A map whose upstream's output is no list fails straight from pending.
    "step_failed": StepEdge(
        {**{s: "failed" for s in _ENDED_BY}, "pending": "failed"},
        outcome=True,
        fenced=True,
        checks=(_map_only_from_pending, _upstream_completed),
    ),
    "step_retrying": StepEdge(
        {s: "retrying" for s in _ENDED_BY}, outcome=True, fenced=True, checks=(_within_budget,)
    ),
    "step_cancelled": StepEdge(
        {s: "cancelled" for s in ("pending", "queued", "running", "retrying", *_ENDED_BY[1:])},
        attempt="any",
    ),
}

# Run-row counters the core keeps incrementally, by the step statuses they count (None: all).
COUNTERS: dict[str, frozenset[str] | None] = {
    "steps_total": None,
    "steps_completed": frozenset({"completed"}),
    "steps_active": STEP_IN_FLIGHT,
    "steps_failed": frozenset({"failed"}),
}
