"""One run as its page and `GET /api/runs/{run_id}` show it, in a bounded number of rows.

A run may hold a map of ten thousand items, so the page never reads them as rows: it reads
the steps of the graph (items excluded), the items of each map counted by status (one
grouped scan along the run's primary key), the few failed items an operator must see, and
the run's children (a partial index). The items themselves are read a page at a time, by
item index (`list_items`), for the items page and its endpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from psycopg.rows import dict_row

from executor.dashboard.models import ChildRun, Drop, Event, ItemCounts, Run, Step, in_graph_order
from executor.dashboard.queries import RUN_COLUMNS, Pool, _fetch, _fetch_one

STEP_COLUMNS = (
    "run_id, step_key, status, attempt, max_attempts, depends_on, queue, timeout_seconds, "
    "output, error, lease_expires_at, next_attempt_at, created_at, updated_at, kind, "
    "parent_step, item_index, items_total, items_done, wake_at, event_name, child_run_id"
)
RUN_DETAIL_COLUMNS = (
    f"{RUN_COLUMNS}, input, output, concurrency_limit, concurrency_slot, queue_position, "
    "parent_run_id, parent_step_key"
)
FAILED_ITEMS_SHOWN = 20
CHILDREN_SHOWN = 200


@dataclass
class RunDetail:
    run: Run
    steps: list[Step]
    events: list[Event]
    events_more: bool
    drops: list[Drop]
    drops_more: bool
    items: dict[str, ItemCounts] = field(default_factory=dict)
    failed_items: list[Step] = field(default_factory=list)
    children: list[ChildRun] = field(default_factory=list)
    children_more: bool = False
    queue_place: tuple[int, int] | None = None
    """(position, of how many) for a queued run, oldest first."""

    @property
    def children_by_id(self) -> dict[str, ChildRun]:
        return {c.run_id: c for c in self.children}


def get_run(
    pool: Pool,
    run_id: str,
    *,
    events_after: int = 0,
    events_limit: int = 500,
    drops_limit: int = 200,
) -> RunDetail | None:
    with pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        cur.execute(f"SELECT {RUN_DETAIL_COLUMNS} FROM executor.runs WHERE run_id = %s", (run_id,))
        run_row = cur.fetchone()
        if run_row is None:
            return None
        cur.execute(
            f"SELECT {STEP_COLUMNS} FROM executor.steps WHERE run_id = %s"
            " AND parent_step IS NULL ORDER BY created_at, step_key",
            (run_id,),
        )
        step_rows = cur.fetchall()
        cur.execute(
            "SELECT parent_step, status, count(*) AS n FROM executor.steps WHERE run_id = %s"
            " GROUP BY parent_step, status",
            (run_id,),
        )
        grouped = cur.fetchall()
        cur.execute(
            "SELECT run_id, seq, type, step_key, attempt, idempotency_key, payload, created_at"
            " FROM executor.events WHERE run_id = %s AND seq > %s ORDER BY seq LIMIT %s",
            (run_id, events_after, events_limit + 1),
        )
        event_rows = cur.fetchall()
        cur.execute(
            "SELECT drop_id, idempotency_key, run_id, step_key, attempt, command_type, reason,"
            " detail, command, raw, received_at FROM executor.drops WHERE run_id = %s"
            " ORDER BY drop_id DESC LIMIT %s",
            (run_id, drops_limit + 1),
        )
        drop_rows = cur.fetchall()
        cur.execute(
            "SELECT run_id, workflow, status, parent_step_key, created_at, updated_at"
            " FROM executor.runs WHERE parent_run_id = %s ORDER BY created_at, run_id LIMIT %s",
            (run_id, CHILDREN_SHOWN + 1),
        )
        child_rows = cur.fetchall()
    counts: dict[str, int] = {}
    items: dict[str, dict[str, int]] = {}
    for g in grouped:
        counts[g["status"]] = counts.get(g["status"], 0) + g["n"]
        if g["parent_step"] is not None:
            items.setdefault(g["parent_step"], {})[g["status"]] = g["n"]
    detail = RunDetail(
        run=Run.from_row({**run_row, "steps": counts}),
        steps=in_graph_order([Step.from_row(r) for r in step_rows]),
        events=[Event.from_row(r) for r in event_rows[:events_limit]],
        events_more=len(event_rows) > events_limit,
        drops=[Drop.from_row(r) for r in drop_rows[:drops_limit]],
        drops_more=len(drop_rows) > drops_limit,
        items={
            key: ItemCounts(step_key=key, total=sum(by.values()), by_status=by)
            for key, by in items.items()
        },
        children=[ChildRun.from_row(r) for r in child_rows[:CHILDREN_SHOWN]],
        children_more=len(child_rows) > CHILDREN_SHOWN,
    )
    failing = [key for key, by in items.items() if by.get("failed")]
    if failing:
        detail.failed_items = [
            Step.from_row(r)
            for r in _fetch(
                pool,
                f"SELECT {STEP_COLUMNS} FROM executor.steps WHERE run_id = %s"
                " AND parent_step = ANY(%s) AND status = 'failed'"
                " ORDER BY parent_step, item_index LIMIT %s",
                (run_id, failing, FAILED_ITEMS_SHOWN),
            )
        ]
    if detail.run.status == "queued":
        detail.queue_place = queue_place(pool, detail.run)
    return detail


def queue_place(pool: Pool, run: Run) -> tuple[int, int] | None:
    """Where a queued run stands in its key's queue, along the queue's partial index."""
    if run.concurrency_key is None or run.queue_position is None:
        return None
    row = _fetch_one(
        pool,
        "SELECT count(*) FILTER (WHERE queue_position < %s) AS ahead, count(*) AS total"
        " FROM executor.runs WHERE concurrency_key = %s AND status = 'queued'",
        (run.queue_position, run.concurrency_key),
    )
    return None if row is None else (int(row["ahead"]) + 1, int(row["total"]))


def get_step(pool: Pool, run_id: str, step_key: str) -> Step | None:
    row = _fetch_one(
        pool,
        f"SELECT {STEP_COLUMNS} FROM executor.steps WHERE run_id = %s AND step_key = %s",
        (run_id, step_key),
    )
    return None if row is None else Step.model_validate(row)


def run_status(pool: Pool, run_id: str) -> str | None:
    row = _fetch_one(pool, "SELECT status FROM executor.runs WHERE run_id = %s", (run_id,))
    return None if row is None else str(row["status"])


@dataclass(frozen=True)
class ItemsPage:
    map_step: Step
    counts: ItemCounts
    items: list[Step]
    next_after: int | None
    """The item index to continue after, or None on the last page."""


def list_items(
    pool: Pool,
    run_id: str,
    map_key: str,
    *,
    status: str | None = None,
    after: int = -1,
    limit: int = 100,
) -> ItemsPage | None:
    """One page of a map's items in index order (along `steps_items`), with their counts."""
    step = get_step(pool, run_id, map_key)
    if step is None or step.kind != "map":
        return None
    where = "run_id = %s AND parent_step = %s AND item_index > %s"
    params: list[Any] = [run_id, map_key, after]
    if status:
        where += " AND status = %s"
        params.append(status)
    rows = _fetch(
        pool,
        f"SELECT {STEP_COLUMNS} FROM executor.steps WHERE {where} ORDER BY item_index LIMIT %s",
        [*params, limit + 1],
    )
    by_status = {
        r["status"]: int(r["n"])
        for r in _fetch(
            pool,
            "SELECT status, count(*) AS n FROM executor.steps"
            " WHERE run_id = %s AND parent_step = %s GROUP BY status",
            (run_id, map_key),
        )
    }
    items = [Step.from_row(r) for r in rows[:limit]]
    return ItemsPage(
        map_step=step,
        counts=ItemCounts(step_key=map_key, total=sum(by_status.values()), by_status=by_status),
        items=items,
        next_after=items[-1].item_index if len(rows) > limit else None,
    )
