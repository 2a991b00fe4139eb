"""The one job function workers run: `deliver(command)`.

Every RQ job we enqueue names this function and nothing else, with one JSON command as its
argument, and for a share of a fan-out a second: the chain, further `start_step` commands of
the same run to run after the first (see `StepRunner._hold`). `deliver` decodes both
strictly and routes the command:

- `start_step` → the StepRunner (apply the start, run the step, apply its outcome);
- `start_run` without steps (what `create_run` leaves in the outbox, since clients do not
  load workflow code) → plan the steps from this worker's registry, then apply;
- anything else → `Ledger.apply`;

then pushes the follow-ups the commit wrote to the outbox. A dropped command ends the job at
once; the drop is in the ledger, in the log and in the job's return value. Ledger or network
errors propagate, failing the RQ job: the command was not applied, its outbox row is still
there, and the relay sends it again.

`ExecutorWorker` screens jobs before they get here; `deliver` still validates on its own so
that any RQ worker with our serializer that runs it stays safe.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from rq import get_current_job
from rq.job import Job

from executor import observability
from executor.commands.models import (
    COMMAND_TYPES,
    BackoffPolicy,
    Command,
    StartRun,
    StartStep,
    parse_obj,
    wire,
)
from executor.errors import (
    ConcurrencyKeyTaken,
    ConcurrencyLimitConflict,
    InvalidCommand,
    InvalidWorkflow,
    UnknownWorkflow,
)
from executor.ledger.outcome import OutboxItem, Outcome
from executor.transport.runtime import Runtime, get_runtime
from executor.workflows.runner import plan_run

log = logging.getLogger("executor.jobs")

# Stands in for the graph while the rest of a step-less start_run is validated strictly.
_PLACEHOLDER = [{"step_key": "_planned_by_worker"}]


def deliver(command: dict[str, Any], then: Any = None) -> str:
    """RQ entry point: apply one command (and run the chain of starts `then` after it, if
    the job brought one); returns a one-line account of what happened."""
    job = get_current_job()
    observability.job_received(job)  # observability: the enqueue time, for queue wait
    if job is None:
        return handle(get_runtime(), command, then=then)
    return handle(
        get_runtime(), command, job_timeout=job.timeout, queue=job.origin, job=job, then=then
    )


def new_fence() -> str:
    """A token for one delivery: who owns the attempt this job starts."""
    return uuid.uuid4().hex[:16]


def handle(
    runtime: Runtime,
    payload: Any,
    *,
    job_timeout: float | None = None,
    queue: str | None = None,
    job: Job | None = None,
    then: Any = None,
) -> str:
    """Decode, route and apply one command payload (already JSON-decoded).

    A step job may go on to run dependants in place for half its `job_timeout`, so the
    chain ends well before RQ's timeout for the job fires. A transient refusal deletes the
    job as it finishes (RQ's result_ttl=0), so the outbox can deliver the same command,
    under the same job id, again.
    """
    try:
        command = decode(payload)
        chain = decode_chain(command, then)
    except InvalidCommand as exc:
        kind = payload.get("type") if isinstance(payload, dict) else None
        runtime.ledger.record_invalid(
            _raw(payload), str(exc), command_type=kind if kind in COMMAND_TYPES else None
        )
        return f"dropped invalid_payload: {exc}"

    runner = runtime.runner
    fence = new_fence()
    try:
        budget, rearm = _in_place_budget(job_timeout)
        if isinstance(command, StartStep):
            held = _held(runtime, chain, queue)
            if held and (not budget or runtime.limits.of(command.workflow, queue or "")):
                runtime.dispatcher.push(held)  # each start on its own: no chain, or limited
                held = []
            if not _take_turn(runtime, command, queue, job):
                runtime.dispatcher.push(held)
                return "deferred: rate limited; the step stays queued, its attempt uncharged"
            outcome = runner.run(
                command, fence=fence, continue_for=budget, on_continue=rearm, then=held
            )
        else:
            if isinstance(command, StartRun) and not command.steps:
                retry = runtime.settings.retry
                try:
                    command = plan_run(
                        command,
                        max_attempts=retry.max_attempts,
                        backoff=BackoffPolicy.model_validate(retry.backoff.model_dump()),
                        continue_on=(
                            _ledger_queue(runtime, queue)
                            if budget and not runtime.limits.of(command.workflow, queue or "")
                            else None
                        ),
                        fence=fence,
                    )
                except (UnknownWorkflow, InvalidWorkflow) as exc:
                    # Refused by this worker's code, not by the ledger: a worker with other
                    # code may still plan the run, so the key stays usable.
                    reason = (
                        "unknown_entity" if isinstance(exc, UnknownWorkflow) else "invalid_payload"
                    )
                    outcome = runtime.ledger.record_drop(command, reason, str(exc))
                    return _finish(outcome, job)
            outcome = runner.apply(command, rearm=rearm)
            runtime.dispatcher.push(outcome.followups)
            if outcome.continued or outcome.owner:
                outcome = runner.run_started(
                    command.run_id, outcome, fence=fence, continue_for=budget, on_continue=rearm
                )
    except (ConcurrencyKeyTaken, ConcurrencyLimitConflict) as exc:
        # Recorded as a transient key_taken drop; the same launch may apply once the key frees.
        log.info("dropped %s: %s", command.describe(), exc)
        if job is not None:
            job.result_ttl = 0
        return f"dropped key_taken: {exc}"
    return _finish(outcome, job)


# A limited step waits in place for a turn this close; a later turn hands the job back, so
# the worker can serve other queues meanwhile.
WAIT_IN_PLACE = 1.0


def _take_turn(runtime: Runtime, command: StartStep, queue: str | None, job: Job | None) -> bool:
    """Wait for the step's turn under its rate limits; False if the job was handed back."""
    limits = runtime.limits.of(command.workflow, queue or "default")
    while limits:
        wait = runtime.limits.limiter.wait_for(limits)
        if wait <= 0:
            return True
        if wait <= WAIT_IN_PLACE or job is None:
            time.sleep(min(wait, WAIT_IN_PLACE))
            continue
        # The step is still queued and its outbox row still there; this only saves a turn
        # of the relay. The job is deleted as it finishes so the same id can come back.
        job.result_ttl = 0
        runtime.dispatcher.later.add(
            OutboxItem(
                outbox_id=0,
                run_id=command.run_id,
                queue=queue or "default",
                idempotency_key=command.idempotency_key,
                command=wire(command),
                not_before=datetime.now(UTC) + timedelta(seconds=wait),
                timeout_seconds=(job.meta or {}).get("step_timeout"),
            )
        )
        return False
    return True


def _finish(outcome: Outcome, job: Job | None) -> str:
    summary = outcome.summary()
    if outcome.dropped:
        log.info("%s", summary)
        if outcome.transient and job is not None:
            job.result_ttl = 0
    return summary


# Cleared by the forking worker: its parent kills a job's process at the job's original
# deadline, which no alarm re-armed inside the process can move.
CONTINUE_IN_PLACE = True


def _in_place_budget(job_timeout: float | None) -> tuple[float, Callable[[], None] | None]:
    """How long a job may go on running dependants in place, and how to re-arm its timeout.

    RQ arms one SIGALRM per job; a step run in place gets the whole timeout again, as it
    would have in a job of its own. Only in the main thread of an in-process worker.
    """
    if (
        not CONTINUE_IN_PLACE
        or job_timeout is None
        or threading.current_thread() is not threading.main_thread()
    ):
        return 0.0, None
    seconds = math.ceil(job_timeout)

    def rearm() -> None:
        signal.alarm(seconds)

    return job_timeout / 2, rearm


def _ledger_queue(runtime: Runtime, queue: str | None) -> str | None:
    """The queue name steps use for the RQ queue this job came from (`default` is an alias)."""
    if queue is None:
        return None
    return "default" if queue == runtime.dispatcher.route("default") else queue


MAX_CHAIN = 1_000


def decode_chain(command: Command, then: Any) -> list[StartStep]:
    """The starts a job brought to run after `command`: starts of the same run only."""
    if then is None:
        return []
    if not isinstance(command, StartStep):
        raise InvalidCommand("only a start_step job may bring a chain of further starts")
    if not isinstance(then, list) or len(then) > MAX_CHAIN:
        raise InvalidCommand(f"a chain must be a list of at most {MAX_CHAIN} start_step commands")
    chain = []
    for raw in then:
        start = decode(raw)
        if not isinstance(start, StartStep) or start.run_id != command.run_id:
            raise InvalidCommand("a chain holds start_step commands of the job's own run only")
        chain.append(start)
    return chain


def _held(runtime: Runtime, chain: list[StartStep], queue: str | None) -> list[OutboxItem]:
    """A job's chain as the outbox items they are: each has its row, the relay's to push if
    the chain never gets to it; pushed from here only when the job must leave some."""
    ledger_queue = _ledger_queue(runtime, queue) or "default"
    return [
        OutboxItem(
            outbox_id=0,
            run_id=start.run_id,
            queue=ledger_queue,
            idempotency_key=start.idempotency_key,
            command=wire(start),
        )
        for start in chain
    ]


def decode(payload: Any) -> Command:
    """Strictly parse a command payload; raises InvalidCommand with a readable reason.

    A `start_run` with no steps is the one incomplete command we accept: it is validated in
    full with a placeholder step graph, then handed on with no steps for `plan_run` to fill.
    """
    if not isinstance(payload, dict):
        raise InvalidCommand(f"a command must be a JSON object, got {type(payload).__name__}")
    kind = payload.get("type")
    if kind not in COMMAND_TYPES:
        raise InvalidCommand(
            f"unknown command type {repr(kind)[:100]}; known types: {', '.join(COMMAND_TYPES)}"
        )
    if kind == "start_run" and payload.get("steps", []) == []:
        checked = parse_obj({**payload, "steps": _PLACEHOLDER})
        assert isinstance(checked, StartRun)
        return StartRun.model_construct(**{**dict(checked), "steps": ()})
    return parse_obj(payload)


def _raw(payload: Any) -> str:
    try:
        return json.dumps(payload, ensure_ascii=False)[:10_000]
    except (TypeError, ValueError):
        return repr(payload)[:10_000]
