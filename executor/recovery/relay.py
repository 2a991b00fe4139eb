"""The outbox relay: pushes outbox rows the handler's caller did not (or not yet could).

The caller of `Ledger.apply` pushes follow-ups right after commit and deletes their rows. A
row is still here when that push failed (Redis down), when its process died between commit
and push, or when it is not due yet (a retry's backoff). The relay claims such rows with
`FOR UPDATE SKIP LOCKED`, so a concurrent caller confirming its own push never waits on it,
pushes them and deletes them in the same transaction: a row disappears only once Redis has
its job. Rows younger than `outbox_grace_seconds` are left to the caller that wrote them,
unless they were written for later and are now due.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool

from executor.ledger.outcome import OutboxItem
from executor.transport.dispatch import Dispatcher
from queue_config import ExecutorSettings

log = logging.getLogger("executor.relay")

Pool = ConnectionPool[psycopg.Connection[dict[str, Any]]]

# `not_before > created_at` marks rows written for later (a backoff); rows for now have
# not_before = created_at = the writing transaction's now().
CLAIM_DUE = """
SELECT outbox_id, run_id, queue, idempotency_key, command, not_before, timeout_seconds
FROM executor.outbox
WHERE not_before <= now()
  AND (created_at <= now() - make_interval(secs => %s) OR not_before > created_at)
ORDER BY not_before, outbox_id
LIMIT %s
FOR UPDATE SKIP LOCKED
"""

DELETE_PUSHED = "DELETE FROM executor.outbox WHERE outbox_id = ANY(%s)"

COUNT_FAILED = "UPDATE executor.outbox SET attempts = attempts + 1 WHERE outbox_id = ANY(%s)"


@dataclass
class RelayReport:
    claimed: int = 0
    pushed: int = 0
    failed: int = 0


def relay(
    pool: Pool, dispatcher: Dispatcher, settings: ExecutorSettings, *, max_batches: int = 20
) -> RelayReport:
    """Push due outbox rows in batches until none are left (or `max_batches` ran)."""
    report = RelayReport()
    for _ in range(max_batches):
        claimed, pushed = _relay_batch(pool, dispatcher, settings)
        report.claimed += claimed
        report.pushed += pushed
        report.failed += claimed - pushed
        if claimed < settings.relay_batch_size or pushed < claimed:
            break
    return report


def _relay_batch(pool: Pool, dispatcher: Dispatcher, settings: ExecutorSettings) -> tuple[int, int]:
    with pool.connection() as conn, conn.transaction():
        rows = conn.execute(
            CLAIM_DUE, (settings.outbox_grace_seconds, settings.relay_batch_size)
        ).fetchall()
        if not rows:
            return 0, 0
        items = [OutboxItem.model_validate(r) for r in rows]
        pushed = dispatcher.push_items(items)
        if pushed:
            conn.execute(DELETE_PUSHED, (pushed,))
        failed = [i.outbox_id for i in items if i.outbox_id not in set(pushed)]
        if failed:
            conn.execute(COUNT_FAILED, (failed,))
            log.warning(
                "relay: %d outbox row(s) could not be pushed; kept for the next sweep", len(failed)
            )
    return len(rows), len(pushed)
