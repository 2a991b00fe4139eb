"""The outbox relay: pushes again every outbox row whose command is still undecided.

A row lives until the transaction that applies or finally refuses its command deletes it.
It is still here when its push failed (Redis down), its job was lost (a flushed Redis, a
killed worker), its delivery failed (the ledger was unreachable), its command was refused
for now (a paused run, a key in use), or when its process died before the row fell due.
Whenever a row's `push_after` passes, the relay pushes it again and moves `push_after` on by
a backoff, claiming the batch in a short transaction of its own (`UPDATE … SKIP LOCKED`) so
it never holds a lock a worker applying one of these commands would wait for.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from executor.ledger.outcome import OutboxItem
from executor.storage.db import Pool
from executor.transport.dispatch import Dispatcher
from queue_config import ExecutorSettings

log = logging.getLogger("executor.relay")

# The backoff doubles per push, from the grace period up to 32 times it.
CLAIM_DUE = """
UPDATE executor.outbox AS o
SET attempts = o.attempts + 1,
    push_after = now() + make_interval(secs => %(grace)s * power(2, least(o.attempts, 5)))
FROM (
    SELECT outbox_id FROM executor.outbox
    WHERE push_after <= now()
    ORDER BY push_after, outbox_id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
) AS due
WHERE o.outbox_id = due.outbox_id
RETURNING o.outbox_id, o.run_id, o.queue, o.idempotency_key, o.command, o.not_before,
          o.timeout_seconds
"""


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
        with pool.connection() as conn:
            rows = conn.execute(
                CLAIM_DUE,
                {"grace": settings.outbox_grace_seconds, "limit": settings.relay_batch_size},
            ).fetchall()
        if not rows:
            break
        items = [OutboxItem(**r) for r in rows]
        pushed = dispatcher.push_items(items)
        report.claimed += len(items)
        report.pushed += len(pushed)
        report.failed += len(items) - len(pushed)
        if len(pushed) < len(items):
            left = len(items) - len(pushed)
            log.warning("relay: %d outbox row(s) not pushed; kept for later", left)
            break
        if len(items) < settings.relay_batch_size:
            break
    return report
