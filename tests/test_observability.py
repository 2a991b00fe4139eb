"""Worker metrics and traces: real jobs through a real RQ worker class, in this process, so
the SDK's in-memory exporter and a private registry can see what the core reported."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.util._once import Once
from prometheus_client import CollectorRegistry
from redis import Redis

from executor.client import Client
from executor.commands.models import BackoffPolicy, CreateRun, StepSpec
from executor.errors import ConfigurationError
from executor.observability import metrics, tracing
from executor.transport.runtime import reset_runtime
from executor.transport.worker import ExecutorWorker
from executor.workflows.definition import FatalError, StepContext, Workflow
from queue_config import load_settings

chain = Workflow("obs_chain", max_attempts=2, backoff=BackoffPolicy(initial=0, jitter=False))


@chain.step
def first(ctx: StepContext) -> int:
    with trace.get_tracer("user-code").start_as_current_span("inside first"):
        return 1


@chain.step(depends_on=[first])
def second(ctx: StepContext) -> int:
    if ctx.attempt == 1:
        raise RuntimeError("flaky")
    return 2


@chain.step(depends_on=[second])
def third(ctx: StepContext) -> int:
    if ctx.input == "fail":
        raise FatalError("no")
    return 3


def _reset_tracer_provider() -> None:
    # The API lets a process set its provider once; tests put it back as they found it.
    trace._TRACER_PROVIDER_SET_ONCE = Once()
    trace._TRACER_PROVIDER = None


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    _reset_tracer_provider()
    trace.set_tracer_provider(provider)
    tracing._cache.clear()
    try:
        yield exporter
    finally:
        provider.shutdown()
        _reset_tracer_provider()
        tracing._cache.clear()


@pytest.fixture
def registry() -> Iterator[CollectorRegistry]:
    reg = CollectorRegistry()
    metrics.enable(reg)
    try:
        yield reg
    finally:
        metrics.disable()


def _work(db_url: str, redis: Redis, *, forget_trace_context: bool = False) -> None:
    """Drain the queues one job at a time, alternating between two worker objects; with
    `forget_trace_context` each job starts with an empty traceparent cache, as a job on
    another machine would."""
    settings = load_settings(env={})
    workers = [
        ExecutorWorker(
            list(settings.queue_names),
            connection=redis,
            settings=settings,
            database_url=db_url,
            name=f"obs-{i}",
        )
        for i in range(2)
    ]
    idle = 0
    try:
        for turn in range(40):
            if forget_trace_context:
                tracing._cache.clear()
            idle = 0 if workers[turn % 2].work(burst=True, max_jobs=1) else idle + 1
            if idle == 2:
                break
    finally:
        reset_runtime()


def test_one_trace_shows_the_whole_run_across_workers(
    db_url: str, redis_url: str, redis: Redis, spans: InMemorySpanExporter
) -> None:
    tracer = trace.get_tracer("app")
    with Client(db_url, redis_url) as client:
        with tracer.start_as_current_span("checkout request") as caller:
            run_id = client.start_run("obs_chain", {"n": 1})
        _work(db_url, redis, forget_trace_context=True)
        assert client.wait(run_id, timeout=5).status == "completed"
        with client.pool.connection() as conn:
            stored = conn.execute(
                "SELECT traceparent FROM executor.runs WHERE run_id = %s", (run_id,)
            ).fetchone()
    finished = spans.get_finished_spans()
    by_name: dict[str, list[Any]] = {}
    for span in finished:
        by_name.setdefault(span.name, []).append(span)
    trace_id = caller.get_span_context().trace_id
    (run_span,) = by_name["run obs_chain"]
    assert run_span.parent.span_id == caller.get_span_context().span_id
    assert stored is not None
    assert stored["traceparent"].startswith(f"00-{trace_id:032x}-{run_span.context.span_id:016x}-")
    attempts = [s for s in finished if s.name.startswith("step obs_chain.")]
    assert sorted(
        (s.attributes["executor.step_key"], s.attributes["executor.attempt"]) for s in attempts
    ) == [
        ("first", 1),
        ("second", 1),
        ("second", 2),
        ("third", 1),
    ]
    for span in attempts:
        assert span.context.trace_id == trace_id
        assert span.parent.span_id == run_span.context.span_id
        assert span.attributes["executor.run_id"] == run_id
    failed = next(
        s for s in attempts if s.attributes["executor.attempt"] == 1 and "second" in s.name
    )
    assert failed.attributes["executor.outcome"] == "failed"
    assert failed.status.status_code.name == "ERROR"
    # A span the step's own code opens nests under the attempt's span.
    (inner,) = by_name["inside first"]
    (first_span,) = [s for s in attempts if s.name == "step obs_chain.first"]
    assert inner.parent.span_id == first_span.context.span_id


def test_without_an_sdk_nothing_is_stored_or_queried(db_url: str, redis_url: str) -> None:
    assert not tracing.active()
    with Client(db_url, redis_url) as client:
        run_id = client.start_run("obs_chain", None)
        with client.pool.connection() as conn:
            row = conn.execute(
                "SELECT traceparent FROM executor.runs WHERE run_id = %s", (run_id,)
            ).fetchone()
    assert row == {"traceparent": None}


def test_a_malformed_traceparent_is_refused_at_the_command() -> None:
    with pytest.raises(ValueError, match="traceparent"):
        CreateRun(run_id="r1", workflow="w", idempotency_key="k", traceparent="00-xyz")


def test_worker_metrics_count_steps_waits_commands_and_outcomes(
    db_url: str, redis_url: str, redis: Redis, registry: CollectorRegistry
) -> None:
    with Client(db_url, redis_url) as client:
        ok = client.start_run("obs_chain", None)
        bad = client.start_run("obs_chain", "fail")
        _work(db_url, redis)
        assert client.wait(ok, timeout=5).status == "completed"
        assert client.wait(bad, timeout=5).status == "failed"

    def value(name: str, **labels: str) -> float:
        found = registry.get_sample_value(name, labels)
        return 0.0 if found is None else found

    steps = "executor_step_duration_seconds_count"
    assert value(steps, workflow="obs_chain", step="first", outcome="completed") == 2
    assert value(steps, workflow="obs_chain", step="second", outcome="failed") == 2
    assert value(steps, workflow="obs_chain", step="second", outcome="completed") == 2
    assert value(steps, workflow="obs_chain", step="third", outcome="completed") == 1
    assert value(steps, workflow="obs_chain", step="third", outcome="failed") == 1
    # Every attempt here came from a job of its own or continued in place; only the former
    # waited in a queue, and each of those was observed once.
    waits = sum(
        value("executor_step_queue_wait_seconds_count", workflow="obs_chain", step=s)
        for s in ("first", "second", "third")
    )
    assert 1 <= waits <= 8
    commands = "executor_commands_total"
    assert value(commands, type="create_run", outcome="applied") == 2
    assert value(commands, type="start_run", outcome="applied") == 2
    assert value(commands, type="complete_step", outcome="applied") == 5
    assert value(commands, type="fail_step", outcome="applied") == 3


def test_map_items_share_their_maps_series() -> None:
    assert metrics.step_label("resize[12]") == "resize"
    assert metrics.step_label("resize") == "resize"
    assert StepSpec(step_key="resize[12]").step_key == "resize[12]"


def test_worker_metrics_endpoint_serves_the_outbox_backlog(pool: Any) -> None:
    exporter = metrics.serve(0, "127.0.0.1", pool=lambda: pool)
    try:
        metrics.count_command("start_step", "duplicate")
        with pool.connection() as conn:
            conn.execute(
                "INSERT INTO executor.outbox (run_id, queue, idempotency_key, command, not_before)"
                " VALUES ('r1', 'default', 'k1', '{}', now() - interval '30 seconds')"
            )
        url = f"http://127.0.0.1:{exporter.port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        assert 'executor_commands_total{outcome="duplicate",type="start_step"} 1.0' in text
        assert "executor_outbox_backlog 1.0" in text
        oldest = next(
            line for line in text.splitlines() if line.startswith("executor_outbox_oldest_due")
        )
        assert float(oldest.split()[1]) >= 29
        with pytest.raises(ConfigurationError, match="metrics-port of its own"):
            metrics.serve(exporter.port, "127.0.0.1", pool=lambda: pool)
    finally:
        exporter.close()


def test_the_sample_prometheus_files_parse_and_name_real_metrics() -> None:
    import re
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parent.parent
    source = "\n".join(p.read_text() for p in (root / "executor").rglob("*.py"))
    config = yaml.safe_load((root / "docs/prometheus/prometheus.yml").read_text())
    assert {job["job_name"] for job in config["scrape_configs"]} == {
        "executor-dashboard",
        "executor-worker",
    }
    rules = yaml.safe_load((root / "docs/prometheus/alerts.yml").read_text())
    alerts = {r["alert"]: r["expr"] for g in rules["groups"] for r in g["rules"]}
    assert {"ExecutorRunsStuck", "ExecutorOutboxBacklog", "ExecutorHighDropRate"} <= set(alerts)
    for name in set(re.findall(r"executor_[a-z_]+", " ".join(alerts.values()))):
        assert f'"{name.removesuffix("_total")}"' in source, name
