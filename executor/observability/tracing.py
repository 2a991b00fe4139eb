"""OpenTelemetry traces: a span where a run starts, and one per step attempt under it.

The caller of `start_run` gets a span `run <workflow>` (a child of whatever span it is in);
its W3C `traceparent` travels in the `create_run` command and is stored on the run row
(`executor.runs.traceparent`). Step jobs are produced later from the ledger's outbox, by
whichever worker, so they cannot carry the caller's context themselves: the runner reads the
run's traceparent and starts each attempt's span `step <workflow>.<step>` as its child, with
the span current while the step function runs (spans the step makes nest under it). One
trace thus shows a whole run across workers and retries.

Only the OpenTelemetry *API* is used (the optional `otel` extra); the application installs
and configures an SDK and exporter (`opentelemetry-instrument`, or a TracerProvider set in a
workflow module). With no API installed, or no SDK configured, every function here is a
no-op that does not touch the database.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

try:
    from opentelemetry import trace
    from opentelemetry.trace import SpanKind, Status, StatusCode
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
except ImportError:  # pragma: no cover - the otel extra is not installed
    trace = None  # type: ignore[assignment]

TRACER_NAME = "executor"
_CACHE_SIZE = 4096

_cache: OrderedDict[str, str | None] = OrderedDict()
_cache_lock = threading.Lock()


def active() -> bool:
    """True when an SDK tracer provider is installed (spans would be recorded)."""
    if trace is None:
        return False
    provider = trace.get_tracer_provider()
    return not isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider)


def run_traceparent(workflow: str, run_id: str) -> str | None:
    """Open and close the run's span; returns its traceparent for the create_run command."""
    if not active():
        return None
    tracer = trace.get_tracer(TRACER_NAME)
    attributes = {"executor.workflow": workflow, "executor.run_id": run_id}
    with tracer.start_as_current_span(
        f"run {workflow}", kind=SpanKind.PRODUCER, attributes=attributes
    ):
        carrier: dict[str, str] = {}
        TraceContextTextMapPropagator().inject(carrier)
    return carrier.get("traceparent")


def traceparent_of(pool: Any, run_id: str) -> str | None:
    """The run's stored traceparent, cached: it never changes once the run exists."""
    with _cache_lock:
        if run_id in _cache:
            _cache.move_to_end(run_id)
            return _cache[run_id]
    with pool.connection() as conn:
        row = conn.execute(
            "SELECT traceparent FROM executor.runs WHERE run_id = %s", (run_id,)
        ).fetchone()
    value = None if row is None else row["traceparent"]
    with _cache_lock:
        _cache[run_id] = value
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return value


@contextlib.contextmanager
def step_span(
    pool: Any, run_id: str, workflow: str, step_key: str, attempt: int
) -> Iterator[Any | None]:
    """The attempt's span, current for the duration, a child of the run's span; None (and
    no query) when tracing is off."""
    if not active():
        yield None
        return
    parent = traceparent_of(pool, run_id)
    context = TraceContextTextMapPropagator().extract({"traceparent": parent}) if parent else None
    tracer = trace.get_tracer(TRACER_NAME)
    attributes: dict[str, str | int] = {
        "executor.run_id": run_id,
        "executor.workflow": workflow,
        "executor.step_key": step_key,
        "executor.attempt": attempt,
    }
    with tracer.start_as_current_span(
        f"step {workflow}.{step_key}",
        context=context,
        kind=SpanKind.CONSUMER,
        attributes=attributes,
    ) as span:
        yield span


def set_result(span: Any | None, outcome: str, error: str | None) -> None:
    """Label the span with how the attempt ended; a failure marks it as an error."""
    if span is None:
        return
    span.set_attribute("executor.outcome", outcome)
    if outcome != "completed":
        span.set_status(Status(StatusCode.ERROR, error or outcome))
