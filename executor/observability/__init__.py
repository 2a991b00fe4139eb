"""Metrics and traces, behind one call per place the core reports something.

The core calls these and nothing else of prometheus_client or OpenTelemetry, each call one
line marked `# observability`:

- `Ledger.apply`: `command_outcome(outcome)` after each decided delivery,
  `ledger_retry(exc)` when a transaction is retried;
- `jobs.deliver`: `job_received(job)` as a job starts (its enqueue time, for queue wait);
- `StepRunner.run_started`: `step_attempt(pool, run_id, info, run)` around each attempt (a
  span, the duration, the queue wait);
- `Client.start_run`: `run_traceparent(workflow, run_id)` for the `create_run` command.

Each is a no-op until metrics are enabled (`executor worker --metrics-port`) or an
OpenTelemetry SDK is configured, so a client or a test pays a flag check and nothing more.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

from executor.observability import metrics, tracing
from executor.observability.tracing import run_traceparent

if TYPE_CHECKING:
    from executor.ledger.outcome import Outcome, StepContext

__all__ = [
    "command_outcome",
    "job_received",
    "ledger_retry",
    "run_traceparent",
    "step_attempt",
]

T = TypeVar("T")

_enqueued_at: contextvars.ContextVar[datetime | None] = contextvars.ContextVar(
    "executor_job_enqueued_at", default=None
)


def command_outcome(outcome: Outcome) -> None:
    """Count one decided delivery: `applied`, or its drop reason."""
    if metrics.enabled():
        metrics.count_command(
            outcome.command_type, "applied" if outcome.applied else str(outcome.reason)
        )


def ledger_retry(exc: BaseException) -> None:
    """Count one retried ledger transaction, by the error that caused it."""
    if metrics.enabled():
        metrics.count_retry(type(exc).__name__)


def job_received(job: Any) -> None:
    """Remember when the job being run was enqueued (RQ records it, in UTC)."""
    enqueued = getattr(job, "enqueued_at", None)
    if isinstance(enqueued, datetime) and enqueued.tzinfo is None:
        enqueued = enqueued.replace(tzinfo=UTC)
    _enqueued_at.set(enqueued if isinstance(enqueued, datetime) else None)


def _take_queue_wait() -> float | None:
    """Seconds since the current job's enqueue, once per job: the first step it starts
    waited in the queue; steps it continues in place did not."""
    enqueued = _enqueued_at.get()
    if enqueued is None:
        return None
    _enqueued_at.set(None)
    return (datetime.now(UTC) - enqueued).total_seconds()


def _outcome_of(result: Any) -> tuple[str, str | None]:
    kind = getattr(result, "type", None)
    if kind == "complete_step":
        return "completed", None
    if kind == "fail_step":
        return "failed", str(getattr(result, "error", ""))[:500]
    return "lease_lost", None


def step_attempt(
    pool: Any, run_id: str, info: StepContext, attempt: Callable[..., T], *args: Any
) -> T:
    """Run one step attempt (`attempt(*args)`, which returns its result command, or None
    when the lease was lost) inside its span, timing it."""
    waited = _take_queue_wait()
    if not (metrics.enabled() or tracing.active()):
        return attempt(*args)
    started = time.perf_counter()
    outcome = "error"
    try:
        with tracing.step_span(pool, run_id, info.workflow, info.step_key, info.attempt) as span:
            result = attempt(*args)
            outcome, error = _outcome_of(result)
            tracing.set_result(span, outcome, error)
            return result
    finally:
        metrics.observe_step(
            info.workflow, info.step_key, outcome, time.perf_counter() - started, waited
        )
