"""`GET /metrics`: the ledger, the queues and the dashboard itself in Prometheus text format.

- Runs and steps by status, drops by reason, the outbox backlog and expired leases come
  from SQL (whole-table counts, cached for a few seconds so many scrapers cost one query).
- Queue depths and workers come from RQ.
- Action latency (every `apply()` the dashboard makes, by action and outcome) and request
  latency (by route template) are histograms kept in this process.
- psycopg pool statistics (`get_stats()`) of the dashboard's read pool and of the client pool
  that commits actions.

Hand-written exposition (format 0.0.4): no extra dependency for a dozen series.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from executor.commands.state import DROP_REASONS, RUN_STATUSES, STEP_STATUSES
from executor.dashboard.models import TransportSnapshot
from executor.dashboard.queries import LedgerCounts

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

Labels = tuple[tuple[str, str], ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Labels) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels) + "}"


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))


class Histogram:
    """A thread-safe cumulative histogram with a fixed label set."""

    def __init__(self, name: str, help_: str, label_names: Sequence[str]) -> None:
        self.name = name
        self.help = help_
        self.label_names = tuple(label_names)
        self.buckets = LATENCY_BUCKETS
        self._lock = threading.Lock()
        self._series: dict[Labels, tuple[list[int], list[float]]] = {}

    def observe(self, value: float, **labels: str) -> None:
        key: Labels = tuple((n, labels[n]) for n in self.label_names)
        with self._lock:
            counts, total = self._series.setdefault(key, ([0] * len(self.buckets), [0.0, 0.0]))
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    counts[i] += 1
            total[0] += value
            total[1] += 1

    def time(self, **labels: str) -> _Timer:
        return _Timer(self, labels)

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        with self._lock:
            series = sorted((k, (list(c), list(t))) for k, (c, t) in self._series.items())
        for labels, (counts, (total, count)) in series:
            for bound, n in zip(self.buckets, counts, strict=True):
                lines.append(f"{self.name}_bucket{_labels((*labels, ('le', _number(bound))))} {n}")
            lines.append(f"{self.name}_bucket{_labels((*labels, ('le', '+Inf')))} {int(count)}")
            lines.append(f"{self.name}_sum{_labels(labels)} {_number(total)}")
            lines.append(f"{self.name}_count{_labels(labels)} {int(count)}")
        return lines


@dataclass
class _Timer:
    histogram: Histogram
    labels: dict[str, str]
    start: float = 0.0

    def __enter__(self) -> _Timer:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.histogram.observe(time.perf_counter() - self.start, **self.labels)


def gauge(
    name: str, help_: str, samples: Iterable[tuple[Labels, float]], kind: str = "gauge"
) -> list[str]:
    lines = [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]
    lines.extend(f"{name}{_labels(labels)} {_number(value)}" for labels, value in samples)
    return lines


class TTLCache:
    """One value, recomputed at most every `ttl` seconds, shared by concurrent callers."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._lock = threading.Lock()
        self._value: object = None
        self._at = -math.inf

    def get(self, compute: Callable[[], object]) -> object:
        with self._lock:
            if time.monotonic() - self._at >= self.ttl:
                self._value = compute()
                self._at = time.monotonic()
            return self._value


class DashboardMetrics:
    """The histograms this process keeps, and the rendering of a full scrape."""

    def __init__(self, cache_seconds: float = 5.0) -> None:
        self.actions = Histogram(
            "executor_dashboard_action_duration_seconds",
            "Time of commands applied by the dashboard (retry, cancel, pause, resume), "
            "commit and push included, by action and outcome.",
            ("action", "outcome"),
        )
        self.requests = Histogram(
            "executor_dashboard_request_duration_seconds",
            "Time to serve dashboard HTTP requests, by route template, method and status class.",
            ("route", "method", "status"),
        )
        self.ledger_cache = TTLCache(cache_seconds)

    def render(
        self,
        counts: LedgerCounts | None,
        transport: TransportSnapshot,
        pools: Mapping[str, Mapping[str, int]],
        database_error: str | None = None,
    ) -> str:
        out: list[str] = []
        out += gauge(
            "executor_database_up",
            "1 if the dashboard could read the ledger for this scrape.",
            [((), 0 if counts is None else 1)],
        )
        if counts is not None:
            out += gauge(
                "executor_runs",
                "Runs in the ledger by status.",
                [((("status", s),), counts.runs.get(s, 0)) for s in RUN_STATUSES],
            )
            out += gauge(
                "executor_steps",
                "Steps in the ledger by status.",
                [((("status", s),), counts.steps.get(s, 0)) for s in STEP_STATUSES],
            )
            out += gauge(
                "executor_drops_total",
                "Deliveries dropped by the handler, by reason.",
                [((("reason", r),), counts.drops.get(r, 0)) for r in DROP_REASONS],
                kind="counter",
            )
            h = counts.health
            out += gauge(
                "executor_outbox_pending",
                "Follow-up commands committed but not yet confirmed pushed to Redis.",
                [((), h.outbox_pending)],
            )
            out += gauge(
                "executor_outbox_oldest_age_seconds",
                "Age of the oldest outbox row (0 when empty).",
                [((), h.outbox_oldest_seconds or 0.0)],
            )
            out += gauge(
                "executor_leases_expired",
                "Running attempts whose lease has expired and await the reaper.",
                [((), h.leases_expired)],
            )
        out += gauge(
            "executor_redis_up",
            "1 if the dashboard could read RQ's queues and workers for this scrape.",
            [((), 1 if transport.ok else 0)],
        )
        if transport.ok:
            samples: list[tuple[Labels, float]] = []
            for q in transport.queues:
                for state in ("queued", "started", "failed", "scheduled", "deferred"):
                    samples.append(((("queue", q.name), ("state", state)), getattr(q, state)))
            out += gauge("executor_queue_jobs", "RQ jobs per queue and registry.", samples)
            by_state: dict[str, int] = {}
            for w in transport.workers:
                by_state[w.state] = by_state.get(w.state, 0) + 1
            out += gauge(
                "executor_workers",
                "Registered RQ workers by state.",
                [((("state", s),), n) for s, n in sorted(by_state.items())],
            )
            out += gauge(
                "executor_worker_heartbeat_age_seconds",
                "Seconds since each worker's last heartbeat.",
                [
                    ((("worker", w.name),), w.heartbeat_age_seconds)
                    for w in transport.workers
                    if w.heartbeat_age_seconds is not None
                ],
            )
        pool_samples: dict[str, list[tuple[Labels, float]]] = {}
        for pool_name, stats in sorted(pools.items()):
            for stat, value in sorted(stats.items()):
                name = stat.removeprefix("pool_")
                pool_samples.setdefault(name, []).append(((("pool", pool_name),), value))
        for stat, samples in sorted(pool_samples.items()):
            out += gauge(
                f"executor_db_pool_{stat}",
                f"psycopg_pool get_stats() {stat}.",
                samples,
            )
        out += self.actions.render()
        out += self.requests.render()
        if database_error:
            out.append(f"# database error: {database_error.splitlines()[0][:200]}")
        return "\n".join(out) + "\n"
