"""Retention: delete terminal runs with every row they own, in batches no worker waits on.

A run is prunable when it is `completed`, `failed` or `cancelled` and its last update is
older than the cutoff. Each batch is one transaction that

1. picks up to `batch_size` such runs, oldest first, `FOR UPDATE SKIP LOCKED`: a run whose
   row a worker's command holds right now is skipped (left for the next batch), never
   waited for;
2. deletes their receipts, drops and outbox rows (all by run_id), their buffered external
   events (executor.run_events, where that table exists), events and steps, then the runs;
3. commits, so a batch that fails leaves the ones before it done.

`lock_timeout` is set for the batch, so if any row it must delete is locked (an outbox row
the relay is pushing), the batch gives up within milliseconds instead of queueing behind
the lock and is tried again. The other direction, a worker waiting for the pruner, happens
only to a command for a run in the batch being deleted (a late delivery to a long finished
run): it waits for that batch's commit, then finds no run and is dropped as
`unknown_entity`. A batch's length bounds that wait (see docs/retention.md for figures).

What a pruned run's idempotency keys do: its receipts are gone, so the keys are free again.
A `create_run` repeated with the key of a pruned run starts a new run; a late command for
it is dropped as `unknown_entity`; a schedule tick inside a backfilled range whose run was
pruned starts again.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import errors as pg_errors
from psycopg_pool import ConnectionPool

from executor.errors import ExecutorError
from executor.storage.db import db_now

if TYPE_CHECKING:
    from executor.recovery.sweep import SweepContext

log = logging.getLogger("executor.retention")

Conn = psycopg.Connection[dict[str, Any]]
Pool = ConnectionPool[Conn]

TERMINAL = ("completed", "failed", "cancelled")
BATCH_SIZE = 500
LOCK_TIMEOUT_MS = 100
_MAX_LOCK_RETRIES = 3

# Deleted in this order, runs last; each is keyed by run_id. A table missing from the schema
# (run_events and hooks, before the migration that adds them) is skipped.
CHILD_TABLES = ("receipts", "drops", "outbox", "run_events", "hooks", "events", "steps")

_PRUNABLE = """
SELECT run_id FROM executor.runs
WHERE status IN ('completed', 'failed', 'cancelled') AND updated_at < %s
ORDER BY updated_at, run_id
LIMIT %s
FOR UPDATE SKIP LOCKED
"""

_COUNT_RUNS = """
SELECT status, count(*) AS n FROM executor.runs
WHERE status IN ('completed', 'failed', 'cancelled') AND updated_at < %s
GROUP BY status
"""

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 7 * 86_400}


class InvalidDuration(ExecutorError, ValueError):
    """Not a duration: write a number and a unit, like 30d, 12h, 90m, 45s or 2w."""


def parse_duration(text: str) -> timedelta:
    match = _DURATION.match(text)
    if match is None:
        raise InvalidDuration(f"{text!r} is not a duration: use a number and s, m, h, d or w")
    return timedelta(seconds=float(match[1]) * _UNITS[match[2]])


@dataclass
class PruneReport:
    cutoff: datetime
    dry_run: bool = False
    runs: int = 0
    by_status: dict[str, int] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)
    batches: int = 0
    lock_timeouts: int = 0
    slowest_batch: float = 0.0
    seconds: float = 0.0

    @property
    def runs_per_second(self) -> float:
        return self.runs / self.seconds if self.seconds > 0 else 0.0

    def __str__(self) -> str:
        rows = ", ".join(f"{n} {t}" for t, n in self.rows.items() if n)
        verb = "would prune" if self.dry_run else "pruned"
        text = f"{verb} {self.runs} terminal run(s) last updated before {self.cutoff.isoformat()}"
        if rows:
            text += f" with {rows}"
        if not self.dry_run and self.runs:
            text += (
                f"; {self.batches} batch(es) in {self.seconds:.1f}s "
                f"({self.runs_per_second:.0f} runs/s, "
                f"slowest batch {self.slowest_batch * 1000:.0f} ms)"
            )
        if self.lock_timeouts:
            text += f"; {self.lock_timeouts} batch(es) gave way to a lock and were retried"
        return text


def prune(
    pool: Pool,
    older_than: timedelta,
    *,
    dry_run: bool = False,
    batch_size: int = BATCH_SIZE,
    max_batches: int | None = None,
    lock_timeout_ms: int = LOCK_TIMEOUT_MS,
    now: datetime | None = None,
) -> PruneReport:
    """Delete terminal runs last updated more than `older_than` before `now` (database clock).

    `max_batches` bounds the work of one call (the sweep leader does one batch per sweep).
    """
    if older_than <= timedelta(0):
        raise InvalidDuration("the retention period must be positive")
    started = time.monotonic()
    with pool.connection() as conn:
        cutoff = (now or db_now(conn)) - older_than
        tables = _existing_tables(conn)
    report = PruneReport(cutoff=cutoff, dry_run=dry_run, rows=dict.fromkeys(tables, 0))
    if dry_run:
        _count(pool, report, tables)
    else:
        retries = 0
        while max_batches is None or report.batches < max_batches:
            try:
                deleted = _prune_batch(pool, report, tables, batch_size, lock_timeout_ms)
            except pg_errors.LockNotAvailable:
                report.lock_timeouts += 1
                retries += 1
                if retries > _MAX_LOCK_RETRIES:
                    log.warning("prune: stopped after %d lock timeouts in a row", retries)
                    break
                time.sleep(0.05 * retries)
                continue
            retries = 0
            if deleted < batch_size:
                break
    report.seconds = time.monotonic() - started
    if report.runs and not dry_run:
        log.info("%s", report)
    return report


def prune_for_leader(context: SweepContext) -> PruneReport | None:
    """One batch of `retention_days` pruning, for the sweep leader; None when unset."""
    days = context.settings.retention_days
    if days is None:
        return None
    return prune(context.pool, timedelta(days=days), max_batches=1)


def _existing_tables(conn: Conn) -> tuple[str, ...]:
    found = conn.execute(
        "SELECT array_agg(t) AS present FROM unnest(%s::text[]) AS t "
        "WHERE to_regclass('executor.' || t) IS NOT NULL",
        (list(CHILD_TABLES),),
    ).fetchone()
    present = set((found or {}).get("present") or ())
    return tuple(t for t in CHILD_TABLES if t in present)


def _prune_batch(
    pool: Pool, report: PruneReport, tables: tuple[str, ...], batch_size: int, lock_ms: int
) -> int:
    began = time.monotonic()
    with pool.connection() as conn, conn.transaction():
        conn.execute(f"SET LOCAL lock_timeout = '{int(lock_ms)}ms'")
        ids = [r["run_id"] for r in conn.execute(_PRUNABLE, (report.cutoff, batch_size))]
        if not ids:
            return 0
        counts = {}
        for table in tables:
            cur = conn.execute(f"DELETE FROM executor.{table} WHERE run_id = ANY(%s)", (ids,))
            counts[table] = cur.rowcount
        gone = conn.execute(
            "DELETE FROM executor.runs WHERE run_id = ANY(%s) RETURNING status", (ids,)
        ).fetchall()
    for table, n in counts.items():
        report.rows[table] += n
    for row in gone:
        report.by_status[row["status"]] = report.by_status.get(row["status"], 0) + 1
    report.runs += len(gone)
    report.batches += 1
    report.slowest_batch = max(report.slowest_batch, time.monotonic() - began)
    return len(ids)


def _count(pool: Pool, report: PruneReport, tables: tuple[str, ...]) -> None:
    with pool.connection() as conn:
        for row in conn.execute(_COUNT_RUNS, (report.cutoff,)):
            report.by_status[row["status"]] = int(row["n"])
        report.runs = sum(report.by_status.values())
        for table in tables:
            found = conn.execute(
                f"SELECT count(*) AS n FROM executor.{table} WHERE run_id IN ("
                "SELECT run_id FROM executor.runs WHERE status IN ('completed', 'failed', "
                "'cancelled') AND updated_at < %s)",
                (report.cutoff,),
            ).fetchone()
            report.rows[table] = int(found["n"]) if found else 0
