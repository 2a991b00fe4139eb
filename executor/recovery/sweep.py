"""One recovery sweep: the outbox relay, the reaper, due schedule ticks and retention, by
one leader at a time.

`Leader` (executor.recovery.leader) runs sweeps inside every worker process; `sweep_once`
is `executor sweep`, a single pass from outside. Whoever gets the advisory lock does the
work and the others skip at once (never a wait). Running the relay and reaper twice
concurrently would be safe anyway (SKIP LOCKED, unique job ids, idempotency keys); the lock
only saves the duplicate work.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

import redis

from executor.ledger.handler import Ledger
from executor.recovery.reaper import ReapReport, reap
from executor.recovery.relay import RelayReport, relay
from executor.retention.prune import PruneReport, prune_for_leader
from executor.schedules.ticker import FireReport, fire_due
from executor.storage.db import Pool, open_pool
from executor.transport.dispatch import Dispatcher
from queue_config import ExecutorSettings, load_settings

# "ex-sweep" in ASCII as a bigint; distinct from the migration lock.
SWEEP_LOCK_KEY = 0x65782D7377656570


class SweepContext(Protocol):
    """What a sweep needs; a worker's Runtime provides it."""

    @property
    def settings(self) -> ExecutorSettings: ...
    @property
    def pool(self) -> Pool: ...
    @property
    def ledger(self) -> Ledger: ...
    @property
    def dispatcher(self) -> Dispatcher: ...


@dataclass
class SweepReport:
    leader: bool
    relay: RelayReport = field(default_factory=RelayReport)
    reap: ReapReport = field(default_factory=ReapReport)
    schedules: FireReport | None = None
    pruned: PruneReport | None = None
    seconds: float = 0.0

    @property
    def did_work(self) -> bool:
        r, p = self.relay, self.reap
        fired = self.schedules is not None and self.schedules.did_work
        pruned = self.pruned is not None and self.pruned.runs > 0
        return bool(r.claimed or p.expired or p.woken or p.busy) or fired or pruned

    def __str__(self) -> str:
        if not self.leader:
            return "sweep skipped: another process holds the sweep lock"
        r, p = self.relay, self.reap
        return (
            f"sweep in {self.seconds * 1000:.0f} ms: relayed {r.pushed}/{r.claimed} outbox rows"
            f"{f' ({r.failed} failed)' if r.failed else ''}; expired {p.expired} leases; "
            f"fired {p.woken} timers"
            f"{f'; {p.busy} commands hit a busy ledger' if p.busy else ''}"
            f"{f'; {self.schedules}' if self.schedules is not None else ''}"
            f"{f'; {self.pruned}' if self.pruned is not None and self.pruned.runs else ''}"
        )


def sweep_work(context: SweepContext) -> SweepReport:
    """The sweep itself, for a caller that already leads."""
    started = time.monotonic()
    relayed = relay(context.pool, context.dispatcher, context.settings)
    reaped = reap(context.pool, context.ledger, context.dispatcher)
    fired = fire_due(context)
    pruned = prune_for_leader(context)
    return SweepReport(
        leader=True,
        relay=relayed,
        reap=reaped,
        schedules=fired,
        pruned=pruned,
        seconds=time.monotonic() - started,
    )


def sweep(context: SweepContext, *, lock_timeout: float | None = None) -> SweepReport:
    """Relay then reap, if no one else is sweeping. Postgres/Redis errors propagate."""
    settings = context.settings
    timeout = lock_timeout if lock_timeout is not None else max(1.0, settings.sweep_interval)
    with context.pool.connection(timeout=timeout) as conn, conn.transaction():
        row = conn.execute(
            "SELECT pg_try_advisory_xact_lock(%s) AS ok", (SWEEP_LOCK_KEY,)
        ).fetchone()
        if row is None or not row["ok"]:
            return SweepReport(leader=False)
        return sweep_work(context)


@dataclass
class _Context:
    settings: ExecutorSettings
    pool: Pool
    ledger: Ledger
    dispatcher: Dispatcher


def sweep_once(
    database_url: str, redis_url: str, settings: ExecutorSettings | None = None
) -> SweepReport:
    """One sweep from outside a worker (`executor sweep`): own pool and Redis, closed after."""
    settings = settings or load_settings()
    pool = open_pool(database_url, name="sweep", max_size=4)
    client: redis.Redis = redis.Redis.from_url(redis_url)
    try:
        context = _Context(
            settings=settings,
            pool=pool,
            ledger=Ledger(
                pool,
                lease_seconds=settings.lease_seconds,
                outbox_grace_seconds=settings.outbox_grace_seconds,
            ),
            dispatcher=Dispatcher(client, settings, pool),
        )
        return sweep(context)
    finally:
        pool.close()
        client.close()
