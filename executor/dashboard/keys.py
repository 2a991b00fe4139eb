"""Concurrency keys in use: each key's limit, the runs holding its slots, and its queue.

The query `executor runs --keys` runs, made to page: a key is *in use* while some run holds
one of its slots or waits queued for one, so the keys of a page come from the two partial
indexes that hold exactly those runs (`runs_concurrency_slot`, `runs_queued_by_key`), never
from `executor.concurrency_keys` (one row per key ever used: millions, for per-customer
keys). Each key shows at most `HOLDERS_SHOWN` holders and the `QUEUED_SHOWN` oldest queued
runs, with the full counts beside them, so a queue of ten thousand costs what one of ten
does.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from executor.dashboard.models import _Row
from executor.dashboard.queries import Pool, _fetch

HOLDERS_SHOWN = 50
QUEUED_SHOWN = 20


class KeyRun(_Row):
    run_id: str
    workflow: str
    status: str
    slot: int | None = None
    position: int | None = None
    created_at: datetime


class ConcurrencyKey(_Row):
    concurrency_key: str
    concurrency_limit: int
    holding: int
    holders: list[KeyRun]
    queued_total: int
    queued: list[KeyRun]

    @property
    def full(self) -> bool:
        return self.holding >= self.concurrency_limit


@dataclass(frozen=True)
class KeysPage:
    keys: list[ConcurrencyKey]
    next: str | None
    """The last key of this page: pass it as `after` for the next."""


_PAGE = """
WITH used AS (
    (SELECT DISTINCT concurrency_key FROM executor.runs
     WHERE concurrency_slot IS NOT NULL AND {cond} ORDER BY 1 LIMIT %(n)s)
    UNION
    (SELECT DISTINCT concurrency_key FROM executor.runs
     WHERE status = 'queued' AND {cond} ORDER BY 1 LIMIT %(n)s)
), page AS (SELECT concurrency_key FROM used ORDER BY 1 LIMIT %(n)s)
SELECT k.concurrency_key, k.concurrency_limit,
    (SELECT count(*) FROM executor.runs AS r
     WHERE r.concurrency_key = k.concurrency_key AND r.concurrency_slot IS NOT NULL) AS holding,
    (SELECT coalesce(jsonb_agg(h ORDER BY h.slot), '[]') FROM (
        SELECT r.run_id, r.workflow, r.status, r.concurrency_slot AS slot, r.created_at
        FROM executor.runs AS r
        WHERE r.concurrency_key = k.concurrency_key AND r.concurrency_slot IS NOT NULL
        ORDER BY r.concurrency_slot LIMIT %(holders)s) AS h) AS holders,
    (SELECT count(*) FROM executor.runs AS r
     WHERE r.concurrency_key = k.concurrency_key AND r.status = 'queued') AS queued_total,
    (SELECT coalesce(jsonb_agg(q ORDER BY q.position), '[]') FROM (
        SELECT r.run_id, r.workflow, r.status, r.queue_position AS position, r.created_at
        FROM executor.runs AS r
        WHERE r.concurrency_key = k.concurrency_key AND r.status = 'queued'
        ORDER BY r.queue_position LIMIT %(queued)s) AS q) AS queued
FROM page JOIN executor.concurrency_keys AS k USING (concurrency_key)
ORDER BY k.concurrency_key
"""


def keys_in_use(
    pool: Pool, *, key: str | None = None, after: str | None = None, limit: int = 50
) -> KeysPage:
    """One page of keys in use, by name; `key` for that key alone."""
    cond = "concurrency_key = %(key)s" if key else "concurrency_key > %(after)s"
    rows = _fetch(
        pool,
        _PAGE.format(cond=cond),
        {
            "key": key,
            "after": after or "",
            "n": limit + 1,
            "holders": HOLDERS_SHOWN,
            "queued": QUEUED_SHOWN,
        },
    )
    keys = [ConcurrencyKey.from_row(r) for r in rows[:limit]]
    return KeysPage(keys, keys[-1].concurrency_key if len(rows) > limit else None)
