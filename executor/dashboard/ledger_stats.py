"""What Postgres says about the ledger as a whole: backlog, counts and stuck runs.

For the queues page and `/metrics`; the whole-table counts are cached by the caller so that
several scrapers cost one query every few seconds, and never run for a page.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from executor.dashboard.models import LedgerHealth

Pool = ConnectionPool[Any]

STUCK_CAP = 1000

# Stuck, as `executor verify` means it: not terminal, nothing queued, running, sleeping,
# waiting or in the outbox, and no change for `stuck_after` seconds (so a run between two
# commits is not counted). Queued (waiting for a slot) and paused runs wait by design.
STUCK_RUNS = f"""
SELECT count(*) AS n FROM (
    SELECT 1 FROM executor.runs AS r
    WHERE r.status IN ('pending', 'running')
      AND r.updated_at < now() - make_interval(secs => %s)
      AND NOT EXISTS (
          SELECT 1 FROM executor.steps AS s
          WHERE s.run_id = r.run_id
            AND s.status IN ('queued', 'running', 'retrying', 'sleeping', 'waiting'))
      AND NOT EXISTS (SELECT 1 FROM executor.outbox AS o WHERE o.run_id = r.run_id)
    LIMIT {STUCK_CAP}
) AS stuck
"""


def ledger_health(pool: Pool) -> LedgerHealth:
    with pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            "SELECT count(*) AS n, EXTRACT(EPOCH FROM now() - min(created_at))::float8 AS oldest"
            " FROM executor.outbox"
        )
        outbox = cur.fetchone() or {}
        cur.execute(
            "SELECT status, count(*) AS n FROM executor.steps"
            " WHERE status IN ('queued', 'retrying', 'sleeping', 'waiting') GROUP BY status"
        )
        waiting = {r["status"]: r["n"] for r in cur.fetchall()}
        # Along the partial index of queued runs, never the whole table.
        cur.execute("SELECT count(*) AS n FROM executor.runs WHERE status = 'queued'")
        queued_runs = cur.fetchone() or {}
        cur.execute(
            "SELECT count(*) AS n, count(*) FILTER (WHERE lease_expires_at < now()) AS expired"
            " FROM executor.steps WHERE status = 'running'"
        )
        running = cur.fetchone() or {}
    return LedgerHealth(
        outbox_pending=outbox.get("n") or 0,
        outbox_oldest_seconds=outbox.get("oldest"),
        steps_queued=waiting.get("queued", 0),
        steps_retrying=waiting.get("retrying", 0),
        steps_running=running.get("n") or 0,
        steps_sleeping=waiting.get("sleeping", 0),
        steps_waiting=waiting.get("waiting", 0),
        leases_expired=running.get("expired") or 0,
        runs_queued=queued_runs.get("n") or 0,
    )


@dataclass(frozen=True)
class LedgerCounts:
    runs: dict[str, int]
    steps: dict[str, int]
    drops: dict[str, int]
    stuck_runs: int
    health: LedgerHealth


def ledger_counts(pool: Pool, stuck_after_seconds: float) -> LedgerCounts:
    """Whole-table counts for /metrics (cached by the caller; never on a page)."""
    with pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        cur.execute("SELECT status, count(*) AS n FROM executor.runs GROUP BY status")
        runs = {r["status"]: r["n"] for r in cur.fetchall()}
        cur.execute("SELECT status, count(*) AS n FROM executor.steps GROUP BY status")
        steps = {r["status"]: r["n"] for r in cur.fetchall()}
        cur.execute("SELECT reason, count(*) AS n FROM executor.drops GROUP BY reason")
        drops = {r["reason"]: r["n"] for r in cur.fetchall()}
        cur.execute(STUCK_RUNS, (stuck_after_seconds,))
        stuck = cur.fetchone() or {}
    return LedgerCounts(runs, steps, drops, int(stuck.get("n") or 0), ledger_health(pool))


def ping(pool: Pool) -> None:
    with pool.connection() as conn:
        conn.execute("SELECT 1")
