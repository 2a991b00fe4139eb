"""The step runner: start an attempt through the handler, run it, record how it ended.

The start is applied before any user code runs, under the *fence* of this delivery (a token
the worker draws per job). If the handler drops it (a duplicate job, a stale attempt, a
cancelled run) the function never runs, so at-least-once delivery turns into at-most-once
execution per attempt. While the function runs, a heartbeat thread extends the lease,
fenced by attempt and token: if the attempt was given to someone else, the heartbeat
learns it and `ctx.heartbeat()` raises LeaseLost.

Uncertain commits. A command whose COMMIT reached Postgres but whose answer did not (the
connection dropped, Postgres restarted, the job's timeout fired during COMMIT) is sent again
on a fresh connection until it gets an answer. Its key is recorded, so the second try is a
`duplicate`; if the first try started a step under our fence, the handler says we own it
(`Outcome.owner`) and hands it back, and we run it. No attempt is lost or charged because an
answer was.
"""

from __future__ import annotations

import json
import logging
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import psycopg
from pydantic import ValidationError

from executor import observability
from executor.commands.models import (
    MAX_STEPS,
    BackoffPolicy,
    Command,
    CompleteStep,
    FailStep,
    StartRun,
    StartStep,
    SuspendStep,
)
from executor.errors import (
    InvalidWorkflow,
    LeaseLost,
    LedgerBusy,
    StepTimeout,
    UnknownWorkflow,
)
from executor.ledger.handler import Ledger
from executor.ledger.outcome import OutboxItem, Outcome
from executor.ledger.outcome import StepContext as StepContextInfo
from executor.workflows.definition import FatalError, StepContext, StepDefinition, Suspension
from executor.workflows.heartbeats import Heartbeats, Lease
from executor.workflows.registry import get_workflow

log = logging.getLogger("executor.runner")

Push = Callable[[Sequence[OutboxItem]], None]
Outcome_ = CompleteStep | FailStep | SuspendStep

CHAIN_LENGTH = 32
"""At most this many starts of a fan-out ride in one job: shorter chains spread a fan-out
over more workers, longer ones save more jobs (a step run in a chain costs one command and
no job of its own)."""

# Interruptions after which we cannot know whether the COMMIT went through.
_UNCERTAIN = (psycopg.OperationalError, psycopg.InterfaceError, StepTimeout, LedgerBusy)


def plan_run(
    command: StartRun,
    *,
    max_attempts: int = 3,
    backoff: BackoffPolicy | None = None,
    continue_on: str | None = None,
    fence: str | None = None,
) -> StartRun:
    """Fill a start_run job's step graph from the workflow registered in this process.

    `max_attempts` and `backoff` are the configured defaults for steps that set neither;
    `continue_on` offers to run a root step of that queue in place (StartRun.continue_on).
    Raises UnknownWorkflow, or InvalidWorkflow for a graph no run may have (too many steps).
    """
    if command.steps:
        return command
    wf = get_workflow(command.workflow)
    specs = wf.specs(max_attempts=max_attempts, backoff=backoff)
    if len(specs) > MAX_STEPS:
        raise InvalidWorkflow(
            f"workflow {wf.name!r} has {len(specs)} steps; a run may have at most {MAX_STEPS}"
        )
    try:
        return StartRun(
            run_id=command.run_id,
            workflow=command.workflow,
            steps=specs,
            idempotency_key=command.idempotency_key,
            continue_on=continue_on,
            fence=fence,
        )
    except ValidationError as exc:
        problems = "; ".join(str(e["msg"]) for e in exc.errors()[:3])
        raise InvalidWorkflow(f"workflow {wf.name!r} cannot be planned: {problems}") from exc


class StepRunner:
    def __init__(
        self,
        ledger: Ledger,
        push: Push,
        *,
        heartbeat_interval: float = 10.0,
        may_continue: Callable[[str, str], bool] | None = None,
        busy: Callable[[str], bool] | None = None,
        workers: Callable[[str], int] | None = None,
    ) -> None:
        """`may_continue(workflow, queue)` says whether a step may start in place without a
        trip through the queue (not when a rate limit must see every start); `busy(queue)`
        whether the queue has work waiting, so no worker is idle to take a job of ours;
        `workers(queue)` how many workers take its jobs, the chains a fan-out is split into."""
        self.ledger = ledger
        self.push = push
        self.heartbeat_interval = heartbeat_interval
        self.may_continue = may_continue or (lambda workflow, queue: True)
        self.busy = busy or (lambda queue: False)
        self.workers = workers or (lambda queue: 1)
        self._heartbeats = Heartbeats()

    def apply(self, command: Command, *, rearm: Callable[[], None] | None = None) -> Outcome:
        """Apply `command` and learn its outcome, however long the answer takes.

        Retries on a fresh connection for up to a lease after an interruption that may have
        hidden a commit (`_UNCERTAIN`); `rearm` re-arms the job's timeout first when that
        interruption was the timeout itself.
        """
        deadline = time.monotonic() + self.ledger.lease_seconds
        delay = 0.05
        while True:
            try:
                return self.ledger.apply(command)
            except _UNCERTAIN as exc:
                if isinstance(exc, StepTimeout) and rearm is not None:
                    rearm()
                if time.monotonic() + delay > deadline:
                    raise
                log.warning(
                    "no answer for %s (%s); asking again in %.2fs",
                    command.describe(),
                    type(exc).__name__,
                    delay,
                )
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    def run(
        self,
        command: StartStep,
        *,
        fence: str,
        continue_for: float = 0.0,
        on_continue: Callable[[], None] | None = None,
        then: Sequence[OutboxItem] = (),
    ) -> Outcome:
        """Start the attempt `command` names under `fence`, run it, and then, for up to
        `continue_for` seconds, the dependants its completions start in place and the
        starts of `then` (a chain the job brought).

        A completion may start one ready dependant routed to the same queue in its own
        transaction (see CompleteStep.continue_on); this loop runs it without a trip through
        Redis. The budget keeps the whole chain inside the job timeout RQ armed for the job.
        A start that does not apply (another delivery ran that step) passes to the next.
        """
        held = list(then)
        outcome = self.apply(command.model_copy(update={"fence": fence}), rearm=on_continue)
        if not (outcome.applied or outcome.owner):
            log.info("not running %s: %s (%s)", command.describe(), outcome.reason, outcome.detail)
            outcome = self._start_held(held, fence, on_continue) or outcome
            if not (outcome.applied or outcome.owner):
                return outcome
        return self.run_started(
            command.run_id,
            outcome,
            fence=fence,
            continue_for=continue_for,
            on_continue=on_continue,
            held=held,
        )

    def run_started(
        self,
        run_id: str,
        outcome: Outcome,
        *,
        fence: str,
        continue_for: float = 0.0,
        on_continue: Callable[[], None] | None = None,
        held: list[OutboxItem] | None = None,
    ) -> Outcome:
        """Run the attempt an applied command already started (its `step_context`), and on.

        `on_continue` runs before each step started in place (the transport re-arms the job's
        timeout there, so every step gets a whole one). `held`: starts to run next, in order.
        """
        deadline = time.monotonic() + continue_for
        info = outcome.step_context
        last = outcome
        held = [] if held is None else held
        unpushed: list[OutboxItem] = []
        try:
            while info is not None:
                if last is not outcome and on_continue is not None:
                    on_continue()
                may_continue = (
                    info.queue
                    if info.timeout_seconds is None
                    and time.monotonic() < deadline
                    and self.may_continue(info.workflow, info.queue)
                    else None
                )
                lease = Lease(self.ledger, run_id, info, fence)
                # The lease is kept until the outcome is committed: a report queued behind
                # the run's lock (a busy map) must not lose to the reaper's verdict.
                with self._heartbeats.watch(lease.beat, self.heartbeat_interval, lease.lost):
                    # What the last completion queued is pushed under this attempt's lease:
                    # ten thousand jobs take seconds, and the lease runs from that commit.
                    if unpushed:
                        self.push(unpushed)
                        unpushed = []
                    final = observability.step_attempt(  # observability
                        self.ledger.pool, run_id, info, self._attempt, info, lease, may_continue
                    )
                    if final is None:
                        return last
                    if isinstance(final, CompleteStep) and may_continue and held:
                        nxt = held[0].command["step_key"]
                        final = final.model_copy(update={"continue_with": nxt})
                    ended = self.apply(final, rearm=on_continue)
                last = ended
                if ended.applied or ended.owner:
                    # An owner's duplicate: our first try committed unseen; what it started
                    # is ours to run, and the relay pushes what it queued.
                    if ended.applied:
                        unpushed = self._hold(ended.followups, held, run_id, may_continue)
                    info = ended.step_context if (ended.continued or ended.owner) else None
                    if info is not None and held and held[0].command["step_key"] == info.step_key:
                        held.pop(0)
                    if info is None and held and time.monotonic() < deadline:
                        started = self._start_held(held, fence, on_continue)
                        info = started.step_context if started is not None else None
                else:
                    if ended.reason != "duplicate":
                        log.warning(
                            "result of %s dropped: %s (%s)",
                            final.describe(),
                            ended.reason,
                            ended.detail,
                        )
                    return ended
            return last
        finally:
            if unpushed:
                self.push(unpushed)
            self.push(held)  # whatever we did not get to goes to whoever is free

    def _hold(
        self,
        followups: Sequence[OutboxItem],
        held: list[OutboxItem],
        run_id: str,
        queue: str | None,
    ) -> list[OutboxItem]:
        """Keep back the starts this worker could run next; returns the rest, to push.

        While the queue is busy anyway, all of them. Otherwise a fan-out is split into a
        chain for each worker on the queue (more, if chains would exceed CHAIN_LENGTH): this
        worker keeps the first, and each other goes as one job, whose worker runs its starts
        one after another. A step run in a chain costs one command (its completion starts
        the next) instead of a start and a completion, and no job of its own.
        A kept start's outbox row stays: if its worker dies, the relay pushes it once the
        grace is over."""
        if queue is None:
            return list(followups)
        startable: list[OutboxItem] = []
        rest: list[OutboxItem] = []
        for item in followups:
            (startable if _startable(item, run_id, queue) else rest).append(item)
        if not startable:
            return rest
        if self.busy(queue):
            held.extend(startable)
            return rest
        if len(startable) < 2:
            return list(followups)
        count = max(min(self.workers(queue), len(startable)), -(-len(startable) // CHAIN_LENGTH))
        size, extra = divmod(len(startable), count)
        chains, start = [], 0
        for i in range(count):
            end = start + size + (1 if i < extra else 0)
            chains.append(startable[start:end])
            start = end
        held.extend(chains[0])
        return rest + [replace(chain[0], then=tuple(chain[1:])) for chain in chains[1:]]

    def _start_held(
        self, held: list[OutboxItem], fence: str, rearm: Callable[[], None] | None
    ) -> Outcome | None:
        """Start the next kept-back step under our fence; None if none could start (each
        was taken by another delivery, or its run has moved on)."""
        while held:
            item = held.pop(0)
            start = StartStep.model_validate({**item.command, "fence": fence})
            outcome = self.apply(start, rearm=rearm)
            if outcome.applied or outcome.owner:
                return outcome
        return None

    def _attempt(
        self, info: StepContextInfo, lease: Lease, continue_on: str | None
    ) -> Outcome_ | None:
        """Run one started attempt (its lease beaten by the caller); None if it was lost."""
        run_id = lease.run_id
        ids = _Ids(run_id, info.step_key, info.attempt, lease.fence)
        ctx = StepContext(
            run_id=run_id,
            step_key=info.step_key,
            attempt=info.attempt,
            max_attempts=info.max_attempts,
            input=info.run_input,
            upstream=info.upstream,
            workflow=info.workflow,
            item=info.item,
            index=info.item_index,
            _beat=lease.beat,
            _lost=lease.lost,
        )
        try:
            return self._call(ids, info, ctx, continue_on)
        except LeaseLost:
            log.warning(
                "%s/%s attempt %d lost its lease; its result is discarded",
                run_id,
                info.step_key,
                info.attempt,
            )
            return None

    def _call(
        self, ids: _Ids, info: StepContextInfo, ctx: StepContext, continue_on: str | None
    ) -> Outcome_:
        try:
            step = _definition(ctx.workflow, info.parent_step or info.step_key)
        except UnknownWorkflow as exc:
            return ids.fail(str(exc), "UnknownWorkflow", retryable=True)
        except LookupError as exc:
            return ids.fail(str(exc), "UnknownStep", retryable=False)
        try:
            output = step.fn(ctx)
        except LeaseLost:
            raise
        except StepTimeout as exc:
            return _failure(ids, exc, retryable=True)
        except Exception as exc:
            if ctx.lease_lost:
                raise LeaseLost(str(exc)) from exc
            return _failure(ids, exc, retryable=not isinstance(exc, FatalError))
        if ctx.lease_lost:
            raise LeaseLost("lease lost before completion")
        try:
            if isinstance(output, Suspension):
                return SuspendStep(
                    run_id=ids.run_id,
                    step_key=ids.step_key,
                    attempt=ids.attempt,
                    fence=ids.fence,
                    until=output.until,
                )
            json.dumps(output, allow_nan=False)
            return CompleteStep(
                run_id=ids.run_id,
                step_key=ids.step_key,
                attempt=ids.attempt,
                fence=ids.fence,
                output=output,
                continue_on=continue_on,
            )
        except (TypeError, ValueError) as exc:
            # Not JSON the ledger can store (a tuple, int keys, NaN, a NUL character), or a
            # wait it cannot keep (a naive datetime): retrying cannot fix that, so say so once
            # instead of max_attempts times.
            return _failure(ids, exc, retryable=False)


def _startable(item: OutboxItem, run_id: str, queue: str) -> bool:
    command = item.command
    return (
        command.get("type") == "start_step"
        and command.get("run_id") == run_id
        and item.queue == queue
        and item.timeout_seconds is None
    )


def _definition(workflow: str, step_key: str) -> StepDefinition:
    wf = get_workflow(workflow)
    step = wf.steps.get(step_key)
    if step is None:
        raise LookupError(f"workflow {wf.name!r} has no step {step_key!r} in this worker")
    return step


@dataclass(frozen=True)
class _Ids:
    run_id: str
    step_key: str
    attempt: int
    fence: str

    def fail(
        self, error: str, error_type: str, *, retryable: bool, tb: str | None = None
    ) -> FailStep:
        return FailStep(
            run_id=self.run_id,
            step_key=self.step_key,
            attempt=self.attempt,
            fence=self.fence,
            error=_storable(error)[:10_000],
            error_type=_storable(error_type)[:500],
            traceback=None if tb is None else _storable(tb),
            retryable=retryable,
        )


def _storable(text: str) -> str:
    """Error text as Postgres can store it: a NUL becomes a visible escape."""
    return text.replace("\x00", "\\x00")


def _failure(ids: _Ids, exc: BaseException, *, retryable: bool) -> FailStep:
    text = "".join(traceback.format_exception(exc))
    return ids.fail(
        str(exc) or type(exc).__name__,
        type(exc).__qualname__,
        retryable=retryable,
        tb=text[-50_000:],
    )
