"""Worker metrics with prometheus_client, served by `executor worker --metrics-port N`.

What is measured (label sets are bounded: workflow and step names come from workflow code,
map items `name[3]` are counted under `name`, outcomes and drop reasons are fixed sets):

- `executor_step_duration_seconds{workflow,step,outcome}`: one step attempt, start to result
  (`completed`, `failed`, `lease_lost`, or `error` when it raised out of the runner);
- `executor_step_queue_wait_seconds{workflow,step}`: from the job's enqueue to its start
  (steps started in place have no queue and are not observed);
- `executor_commands_total{type,outcome}`: every delivery the ledger decided in this
  process, `applied` or the drop reason;
- `executor_ledger_retries_total{error}`: transactions retried after a serialization failure,
  deadlock or racing insert;
- `executor_outbox_backlog` / `executor_outbox_oldest_due_seconds`: outbox rows due now and
  the age of the oldest, read from Postgres at scrape time (each worker reports the same
  global numbers: alert on `max`).

Multiprocess choice. Each `executor worker` process serves its own port and keeps its
numbers in a *private* `PROMETHEUS_MULTIPROC_DIR` (a fresh temporary folder, removed at
exit). prometheus_client's multiprocess mode is what lets the forking worker's children
(one per job) count into their parent's numbers; the private folder is what keeps several
workers on one machine from clobbering each other: a folder shared between independent
workers would have to be wiped at start-up (as the library requires), and each new worker
would wipe the others' counts. Scrape every worker's port (see docs/observability.md).

Nothing here costs anything until `enable()` or `serve()` is called: the recording functions
return at once, and prometheus_client is imported only then (it is in the `metrics` and
`dashboard` extras, not a core dependency).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from executor.errors import ConfigurationError

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry, Counter, Histogram
    from prometheus_client.metrics_core import Metric

log = logging.getLogger("executor.observability")

STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600)
OUTBOX_COUNT_CAP = 100_000
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

_MAP_ITEM = re.compile(r"\[\d+\]$")


@dataclass(frozen=True)
class _Metrics:
    step_duration: Histogram
    queue_wait: Histogram
    commands: Counter
    ledger_retries: Counter


_metrics: _Metrics | None = None


def enabled() -> bool:
    return _metrics is not None


def step_label(step_key: str) -> str:
    """Map items share their map's series: `resize[3]` is counted as `resize`."""
    return _MAP_ITEM.sub("", step_key)


def enable(registry: CollectorRegistry | None = None) -> None:
    """Create the metrics, registered on `registry` (None: on no registry, as the
    multiprocess collector reads them from files instead)."""
    global _metrics
    from prometheus_client import Counter, Histogram

    _metrics = _Metrics(
        step_duration=Histogram(
            "executor_step_duration_seconds",
            "Time of one step attempt, from its start to its result, by outcome.",
            ("workflow", "step", "outcome"),
            buckets=STEP_BUCKETS,
            registry=registry,
        ),
        queue_wait=Histogram(
            "executor_step_queue_wait_seconds",
            "Time a step's job waited in its queue, from enqueue to start.",
            ("workflow", "step"),
            buckets=WAIT_BUCKETS,
            registry=registry,
        ),
        commands=Counter(
            "executor_commands",
            "Deliveries decided by the ledger in this process: applied, or the drop reason.",
            ("type", "outcome"),
            registry=registry,
        ),
        ledger_retries=Counter(
            "executor_ledger_retries",
            "Ledger transactions retried after a serialization failure, deadlock or race.",
            ("error",),
            registry=registry,
        ),
    )


def disable() -> None:
    global _metrics
    _metrics = None


# --- recording (called through executor.observability) --------------------------------------


def observe_step(
    workflow: str, step_key: str, outcome: str, seconds: float, waited: float | None
) -> None:
    m = _metrics
    if m is None:
        return
    step = step_label(step_key)
    m.step_duration.labels(workflow, step, outcome).observe(seconds)
    if waited is not None:
        m.queue_wait.labels(workflow, step).observe(max(0.0, waited))


def count_command(command_type: str | None, outcome: str) -> None:
    m = _metrics
    if m is not None:
        m.commands.labels(command_type or "unknown", outcome).inc()


def count_retry(error: str) -> None:
    m = _metrics
    if m is not None:
        m.ledger_retries.labels(error).inc()


# --- the outbox, read at scrape time ----------------------------------------------------------

OUTBOX_SQL = f"""
SELECT (SELECT count(*) FROM (SELECT 1 FROM executor.outbox WHERE not_before <= now()
                              LIMIT {OUTBOX_COUNT_CAP}) AS due) AS due,
       EXTRACT(EPOCH FROM now() - (SELECT min(not_before) FROM executor.outbox
                                   WHERE not_before <= now()))::float8 AS oldest
"""


class OutboxCollector:
    """Outbox backlog from Postgres on each scrape: always current, whichever worker leads
    the sweep, and never stale in a process that stopped relaying."""

    def __init__(self, pool: Callable[[], Any]) -> None:
        self._pool = pool

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import GaugeMetricFamily

        up = GaugeMetricFamily(
            "executor_worker_database_up", "1 if this scrape could read the outbox."
        )
        try:
            with self._pool().connection() as conn:
                row = conn.execute(OUTBOX_SQL).fetchone()
        except Exception as exc:
            log.warning("metrics: could not read the outbox: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield GaugeMetricFamily(
            "executor_outbox_backlog",
            f"Outbox rows due to be pushed to Redis (counted up to {OUTBOX_COUNT_CAP}).",
            value=int(row["due"] or 0),
        )
        yield GaugeMetricFamily(
            "executor_outbox_oldest_due_seconds",
            "How long the oldest due outbox row has been waiting (0 when none).",
            value=float(row["oldest"] or 0.0),
        )


# --- serving ----------------------------------------------------------------------------------


@dataclass
class Exporter:
    """The running metrics endpoint of one worker process; `close()` stops it and removes
    its private multiprocess folder."""

    port: int
    folder: str
    registry: CollectorRegistry
    _server: Any
    _owner: int

    def close(self) -> None:
        if os.getpid() != self._owner:  # a forked child leaves its parent's server alone
            return
        from prometheus_client import values

        self._server.shutdown()
        self._server.server_close()
        disable()
        if os.environ.get(MULTIPROC_ENV) == self.folder:
            del os.environ[MULTIPROC_ENV]
        values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]
        shutil.rmtree(self.folder, ignore_errors=True)


def serve(port: int, host: str = "127.0.0.1", *, pool: Callable[[], Any]) -> Exporter:
    """Serve this process's metrics (and its forked children's) on `host:port`.

    Must run before any job: the multiprocess value class is chosen here, and metrics made
    earlier would keep their in-memory values.
    """
    from prometheus_client import CollectorRegistry, start_http_server, values
    from prometheus_client.multiprocess import MultiProcessCollector

    folder = tempfile.mkdtemp(prefix=f"executor-metrics-{os.getpid()}-")
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=folder)  # type: ignore[no-untyped-call]
    registry.register(OutboxCollector(pool))
    try:
        server, _thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        shutil.rmtree(folder, ignore_errors=True)
        raise ConfigurationError(
            f"cannot serve worker metrics on {host}:{port}: {exc}; every worker process "
            "needs a --metrics-port of its own"
        ) from exc
    # From here on every metric value (this process's and its forked children's) is a file
    # in `folder`, which the collector above sums at each scrape.
    os.environ[MULTIPROC_ENV] = folder
    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]
    enable(registry=None)
    bound = int(server.server_address[1])
    log.info("worker metrics on http://%s:%d/metrics", host, bound)
    return Exporter(bound, folder, registry, server, os.getpid())
