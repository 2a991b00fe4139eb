"""The per-process context jobs run in: settings, one Postgres pool, the Ledger, Redis, the
dispatcher and the step runner.

Built once per process, lazily, and kept across jobs: opening a pool per job would cost a
connection handshake per step. psycopg_pool checks each connection as it is handed out
(`check_connection`), so after a Postgres restart the dead connections are discarded and
new ones opened; nothing here has to notice the restart.

A forked child (RQ's forking worker runs each job in one) must not use its parent's pool:
the sockets are shared with the parent, and the pool's maintenance threads did not survive
the fork. `get_runtime()` sees the pid change and builds a fresh context, keeping the
inherited one referenced and never closing it, because closing would end the parent's
sessions on the shared sockets.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import redis
from psycopg_pool import ConnectionPool

from executor.commands.models import parse_obj
from executor.ledger.handler import Ledger
from executor.ledger.outcome import OutboxItem
from executor.storage.db import open_pool
from executor.transport.dispatch import Dispatcher
from executor.transport.ratelimit import Limiter, RateLimits
from executor.workflows.registry import load_modules
from executor.workflows.runner import StepRunner
from queue_config import ExecutorSettings, load_settings

log = logging.getLogger("executor.runtime")

Pool = ConnectionPool[psycopg.Connection[dict[str, Any]]]


@dataclass
class Runtime:
    settings: ExecutorSettings
    database_url: str
    pool: Pool
    ledger: Ledger
    redis: redis.Redis
    dispatcher: Dispatcher
    runner: StepRunner
    limits: RateLimits
    pid: int = field(default_factory=os.getpid)
    owns_redis: bool = True

    def close(self) -> None:
        """Close the pool (and Redis, if we opened it); only ever in the process that built it."""
        if self.pid != os.getpid():
            return
        self.pool.close()
        if self.owns_redis:
            self.redis.close()


def build_runtime(
    settings: ExecutorSettings,
    *,
    database_url: str | None = None,
    redis_client: redis.Redis | None = None,
    pool_min_size: int = 1,
) -> Runtime:
    """Open a pool, import the workflow modules and wire the ledger, dispatcher and runner."""
    from executor.config import resolve_database_url, resolve_redis_url

    if database_url is None:
        database_url = resolve_database_url()
    owns_redis = redis_client is None
    if redis_client is None:
        redis_client = redis.Redis.from_url(resolve_redis_url())
    load_modules(settings.workflow_modules)
    pool = open_pool(
        database_url,
        name=f"executor-{os.getpid()}",
        min_size=pool_min_size,
        max_size=settings.pool_size,
    )
    ledger = Ledger(
        pool,
        lease_seconds=settings.lease_seconds,
        outbox_grace_seconds=settings.outbox_grace_seconds,
    )
    dispatcher = Dispatcher(redis_client, settings, pool)
    limits = RateLimits(settings, Limiter(redis_client), dispatcher.route)
    runner = StepRunner(
        ledger,
        dispatcher.push,
        heartbeat_interval=settings.heartbeat_interval,
        may_continue=lambda workflow, queue: not limits.of(workflow, queue),
        busy=dispatcher.backlogged,
        workers=dispatcher.workers_on,
    )
    dispatcher.later.deliver = _deliver_later(ledger, dispatcher)
    return Runtime(
        settings=settings,
        database_url=database_url,
        pool=pool,
        ledger=ledger,
        redis=redis_client,
        dispatcher=dispatcher,
        runner=runner,
        limits=limits,
        owns_redis=owns_redis,
    )


def _deliver_later(ledger: Ledger, dispatcher: Dispatcher) -> Callable[[OutboxItem], None]:
    """Apply a retry's dispatch when it falls due, here, instead of sending it as a job.

    Refused as not due (our clock runs ahead of the database's), it comes back from the
    handler with its due time and goes on the timer again, no sooner than 50 ms later.
    """

    def deliver(item: OutboxItem) -> None:
        if item.command.get("type") != "dispatch_step":
            dispatcher.push_items([item])
            return
        outcome = ledger.apply(parse_obj(item.command))
        for followup in outcome.followups:
            if outcome.reason == "not_due":
                soonest = datetime.now(UTC) + timedelta(milliseconds=50)
                due = max(followup.not_before or soonest, soonest)
                dispatcher.later.add(replace(followup, not_before=due))
            else:
                dispatcher.push([followup])

    return deliver


_lock = threading.Lock()
_current: Runtime | None = None
_inherited: list[Runtime] = []  # from before a fork: referenced so they are never finalized
_defaults: dict[str, Any] = {}


def configure_runtime(
    settings: ExecutorSettings | None = None,
    *,
    database_url: str | None = None,
    redis_client: redis.Redis | None = None,
) -> Runtime:
    """Build this process's runtime now (a worker does this at start, to fail fast).

    The arguments are remembered, so a forked child rebuilds with the same settings and the
    same Redis client (redis-py resets its connections in a child by itself).
    """
    global _current
    with _lock:
        _defaults.update(settings=settings, database_url=database_url, redis_client=redis_client)
        if _current is not None and _current.pid == os.getpid():
            _current.close()
        _current = _build_from_defaults()
        return _current


def get_runtime() -> Runtime:
    """This process's runtime, built on first use (and again in a forked child)."""
    global _current
    current = _current
    if current is not None and current.pid == os.getpid():
        return current
    with _lock:
        if _current is not None and _current.pid == os.getpid():
            return _current
        if _current is not None:
            _inherited.append(_current)
            log.debug("rebuilding the runtime in forked process %d", os.getpid())
        _current = _build_from_defaults()
        return _current


def reset_runtime() -> None:
    """Close and forget this process's runtime (tests, and orderly worker shutdown)."""
    global _current
    with _lock:
        if _current is not None:
            _current.close()
        _current = None
        _defaults.clear()


def _build_from_defaults() -> Runtime:
    settings = _defaults.get("settings") or load_settings()
    return build_runtime(
        settings,
        database_url=_defaults.get("database_url"),
        redis_client=_defaults.get("redis_client"),
    )
