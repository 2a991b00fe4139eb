"""`GET /metrics`: the ledger, the queues and the dashboard itself, with prometheus_client.

- Runs and steps by status, drops by reason, stuck runs, the outbox backlog and expired
  leases come from SQL (whole-table counts, cached for a few seconds so many scrapers cost
  one query), read by a custom collector at scrape time.
- Queue depths and workers come from RQ.
- Action latency (every `apply()` the dashboard makes, by action and outcome) and request
  latency (by route template, a fixed method set and status class) are histograms.
- psycopg pool statistics (`get_stats()`) of the dashboard's pools.

Each app has a registry of its own, so several apps in one process (tests, embedders) do
not share or collide. Every label value comes from a fixed set or from the ledger's own
vocabulary; nothing a client sends becomes a label.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from executor.commands.state import DROP_REASONS, RUN_STATUSES, STEP_STATUSES
from executor.dashboard.ledger_stats import LedgerCounts
from executor.dashboard.models import TransportSnapshot

log = logging.getLogger("executor.dashboard")

CONTENT_TYPE = CONTENT_TYPE_LATEST
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(frozen=True)
class Scrape:
    counts: LedgerCounts | None
    transport: TransportSnapshot
    pools: Mapping[str, Mapping[str, int]]


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
    def __init__(self, cache_seconds: float = 5.0) -> None:
        self.registry = CollectorRegistry()
        self.actions = Histogram(
            "executor_dashboard_action_duration_seconds",
            "Time of commands applied by the dashboard (retry, cancel, pause, resume), "
            "commit and push included, by action and outcome.",
            ("action", "outcome"),
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.requests = Histogram(
            "executor_dashboard_request_duration_seconds",
            "Time to serve dashboard HTTP requests, by route template, method and status class.",
            ("route", "method", "status"),
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.ledger_cache = TTLCache(cache_seconds)
        self._source: Callable[[], Scrape] | None = None
        self.registry.register(_LedgerCollector(self))

    def bind(self, source: Callable[[], Scrape]) -> None:
        """Where the scrape-time numbers come from (set once the app has its pools)."""
        self._source = source

    def observe_request(self, route: str, method: str, status: str, seconds: float) -> None:
        self.requests.labels(route, method, status).observe(seconds)

    def observe_action(self, action: str, outcome: str, seconds: float) -> None:
        self.actions.labels(action, outcome).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def scrape(self) -> Scrape | None:
        return None if self._source is None else self._source()


def _gauge(name: str, help_: str, label: str, values: Mapping[str, float]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, help_, labels=[label])
    for key, value in values.items():
        family.add_metric([key], value)
    return family


class _LedgerCollector:
    def __init__(self, metrics: DashboardMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        scrape = self._metrics.scrape()
        if scrape is None:
            return
        counts = scrape.counts
        yield GaugeMetricFamily(
            "executor_database_up",
            "1 if the dashboard could read the ledger for this scrape.",
            value=0 if counts is None else 1,
        )
        if counts is not None:
            yield from _ledger(counts)
        transport = scrape.transport
        yield GaugeMetricFamily(
            "executor_redis_up",
            "1 if the dashboard could read RQ's queues and workers for this scrape.",
            value=1 if transport.ok else 0,
        )
        if transport.ok:
            yield from _transport(transport)
        yield from _pools(scrape.pools)


def _ledger(counts: LedgerCounts) -> Iterator[Metric]:
    yield _gauge(
        "executor_runs",
        "Runs in the ledger by status.",
        "status",
        {s: counts.runs.get(s, 0) for s in sorted({*RUN_STATUSES, *counts.runs})},
    )
    yield _gauge(
        "executor_steps",
        "Steps in the ledger by status.",
        "status",
        {s: counts.steps.get(s, 0) for s in sorted({*STEP_STATUSES, *counts.steps})},
    )
    drops = CounterMetricFamily(
        "executor_drops", "Deliveries dropped by the handler, by reason.", labels=["reason"]
    )
    for reason in sorted({*DROP_REASONS, *counts.drops}):
        drops.add_metric([reason], counts.drops.get(reason, 0))
    yield drops
    yield GaugeMetricFamily(
        "executor_runs_stuck",
        "Runs that are not terminal with nothing queued, running, waiting or in the outbox, "
        "unchanged for a while (counted up to 1000).",
        value=counts.stuck_runs,
    )
    h = counts.health
    yield GaugeMetricFamily(
        "executor_outbox_pending",
        "Follow-up commands committed but not yet confirmed pushed to Redis.",
        value=h.outbox_pending,
    )
    yield GaugeMetricFamily(
        "executor_outbox_oldest_age_seconds",
        "Age of the oldest outbox row (0 when empty).",
        value=h.outbox_oldest_seconds or 0.0,
    )
    yield GaugeMetricFamily(
        "executor_leases_expired",
        "Running attempts whose lease has expired and await the reaper.",
        value=h.leases_expired,
    )


def _transport(transport: TransportSnapshot) -> Iterator[Metric]:
    jobs = GaugeMetricFamily(
        "executor_queue_jobs", "RQ jobs per queue and registry.", labels=["queue", "state"]
    )
    for q in transport.queues:
        for state in ("queued", "started", "failed", "scheduled", "deferred"):
            jobs.add_metric([q.name, state], getattr(q, state))
    yield jobs
    by_state: dict[str, float] = {}
    for w in transport.workers:
        by_state[w.state] = by_state.get(w.state, 0) + 1
    yield _gauge("executor_workers", "Registered RQ workers by state.", "state", by_state)
    yield _gauge(
        "executor_worker_heartbeat_age_seconds",
        "Seconds since each worker's last heartbeat.",
        "worker",
        {
            w.name: w.heartbeat_age_seconds
            for w in transport.workers
            if w.heartbeat_age_seconds is not None
        },
    )


def _pools(pools: Mapping[str, Mapping[str, int]]) -> Iterator[Metric]:
    by_stat: dict[str, dict[str, float]] = {}
    for pool_name, stats in sorted(pools.items()):
        for stat, value in sorted(stats.items()):
            by_stat.setdefault(stat.removeprefix("pool_"), {})[pool_name] = value
    for stat, samples in sorted(by_stat.items()):
        yield _gauge(
            f"executor_db_pool_{stat}", f"psycopg_pool get_stats() {stat}.", "pool", samples
        )
