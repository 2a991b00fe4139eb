"""Every SQL statement the dashboard's pages run: parameterised, read-only, index-backed.

Lists page by keyset, never by OFFSET, and never count a whole table: the runs list walks
`runs_created` / `runs_status_created` / `runs_workflow_created` from a `(created_at,
run_id)` cursor, failed steps walk the partial index `steps_failed`, drops walk `drop_id`.
The total on the runs page is the planner's estimate (`pg_class.reltuples`); counts that
must be exact are capped (`LIMIT n` inside the count).

The dashboard runs these on its own pool, whose sessions are `default_transaction_read_only`
with a statement timeout, so a page can neither write nor hold the database hostage.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, TypeVar

from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from executor.dashboard.models import Drop, FailedStep, RunSummary

Pool = ConnectionPool[Any]
T = TypeVar("T")

RUN_COLUMNS = "run_id, workflow, status, concurrency_key, error, last_seq, created_at, updated_at"
DROP_COLUMNS = (
    "drop_id, idempotency_key, run_id, step_key, attempt, command_type, reason, detail, "
    "command, raw, received_at"
)


class BadCursor(ValueError):
    """A pagination cursor that was not made by this dashboard."""


@dataclass(frozen=True)
class Cursor:
    """A position in a keyset-ordered list: the sort key of one row, opaque to users."""

    values: tuple[Any, ...]

    def encode(self) -> str:
        raw = [v.isoformat() if isinstance(v, datetime) else v for v in self.values]
        return base64.urlsafe_b64encode(json.dumps(raw).encode()).rstrip(b"=").decode()

    @classmethod
    def decode(cls, text: str, kinds: tuple[type, ...]) -> Cursor:
        try:
            raw = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
            if not isinstance(raw, list) or len(raw) != len(kinds):
                raise BadCursor("wrong shape")
            values: list[Any] = []
            for kind, value in zip(kinds, raw, strict=True):
                if kind is datetime and isinstance(value, str):
                    values.append(datetime.fromisoformat(value))
                elif _fits(kind, value):
                    values.append(value)
                else:
                    raise BadCursor(f"a {kind.__name__} cannot be {value!r:.40}")
        except (ValueError, TypeError, RecursionError) as exc:
            raise BadCursor(f"bad cursor {text[:40]!r}") from exc
        return cls(tuple(values))


def _fits(kind: type, value: Any) -> bool:
    """An int the database's bigint holds, or text it can store (no NUL)."""
    if kind is int:
        return type(value) is int and -(2**63) <= value < 2**63
    return kind is str and isinstance(value, str) and "\x00" not in value


@dataclass(frozen=True)
class PageRequest:
    limit: int = 50
    after: Cursor | None = None  # older rows than this one
    before: Cursor | None = None  # newer rows than this one


@dataclass(frozen=True)
class Page(Generic[T]):
    items: list[T]
    next: str | None = None  # cursor for older rows
    prev: str | None = None  # cursor for newer rows
    estimated_total: int | None = None
    total_is_exact: bool = False


def _paginate(
    rows: list[dict[str, Any]], req: PageRequest, key: tuple[str, ...]
) -> tuple[list[dict[str, Any]], str | None, str | None]:
    """Trim the extra row, restore newest-first order and work out both neighbours."""
    more = len(rows) > req.limit
    rows = rows[: req.limit]
    if req.before is not None:
        rows.reverse()

    def cursor(row: dict[str, Any]) -> str:
        return Cursor(tuple(row[k] for k in key)).encode()

    if not rows:
        return rows, None, None
    if req.before is not None:
        return rows, cursor(rows[-1]), cursor(rows[0]) if more else None
    prev = cursor(rows[0]) if req.after is not None else None
    return rows, cursor(rows[-1]) if more else None, prev


def _keyset_page(
    pool: Pool,
    select: str,
    where: list[str],
    params: list[Any],
    req: PageRequest,
    order_by: tuple[str, ...],
    key: tuple[str, ...],
) -> tuple[list[dict[str, Any]], str | None, str | None]:
    """One page by keyset: newest first, `order_by` columns (SQL) paired with `key` (rows).

    Never an OFFSET, so a page deep in 100k runs costs what the first page costs.
    """
    where = list(where)
    params = list(params)
    order = "DESC"
    columns = ", ".join(order_by)
    marks = ", ".join(["%s"] * len(order_by))
    if req.after is not None:
        where.append(f"({columns}) < ({marks})")
        params.extend(req.after.values)
    elif req.before is not None:
        where.append(f"({columns}) > ({marks})")
        params.extend(req.before.values)
        order = "ASC"
    sql = select
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY " + ", ".join(f"{c} {order}" for c in order_by) + " LIMIT %s"
    params.append(req.limit + 1)
    return _paginate(_fetch(pool, sql, params), req, key)


def _fetch(pool: Pool, sql: str, params: Any = ()) -> list[dict[str, Any]]:
    with pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        cur.execute(sql, params)
        rows: list[dict[str, Any]] = cur.fetchall()
        return rows


def _fetch_one(pool: Pool, sql: str, params: Any = ()) -> dict[str, Any] | None:
    rows = _fetch(pool, sql, params)
    return rows[0] if rows else None


# --- runs --------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunFilter:
    statuses: tuple[str, ...] = ()
    workflow: str | None = None
    concurrency_key: str | None = None
    created_from: datetime | None = None
    created_to: datetime | None = None
    run_id_prefix: str | None = None

    @property
    def empty(self) -> bool:
        return self == RunFilter()


def _like_prefix(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def list_runs(pool: Pool, f: RunFilter, req: PageRequest) -> Page[RunSummary]:
    where: list[str] = []
    params: list[Any] = []
    if len(f.statuses) == 1:
        where.append("status = %s")
        params.append(f.statuses[0])
    elif f.statuses:
        where.append("status = ANY(%s)")
        params.append(list(f.statuses))
    if f.workflow:
        where.append("workflow = %s")
        params.append(f.workflow)
    if f.concurrency_key:
        where.append("concurrency_key = %s")
        params.append(f.concurrency_key)
    if f.created_from:
        where.append("created_at >= %s")
        params.append(f.created_from)
    if f.created_to:
        where.append("created_at < %s")
        params.append(f.created_to)
    if f.run_id_prefix:
        where.append("run_id LIKE %s")
        params.append(_like_prefix(f.run_id_prefix))
    rows, nxt, prev = _keyset_page(
        pool,
        f"SELECT {RUN_COLUMNS} FROM executor.runs",
        where,
        params,
        req,
        ("created_at", "run_id"),
        ("created_at", "run_id"),
    )
    counts = step_counts(pool, [r["run_id"] for r in rows])
    items = [RunSummary.from_row({**r, "steps": counts.get(r["run_id"], {})}) for r in rows]
    if not f.empty:
        return Page(items, nxt, prev)
    total, exact = estimated_runs(pool)
    return Page(items, nxt, prev, total, exact)


def step_counts(pool: Pool, run_ids: list[str]) -> dict[str, dict[str, int]]:
    """Steps per status for a page of runs: one primary-key range scan per run."""
    if not run_ids:
        return {}
    out: dict[str, dict[str, int]] = {}
    for row in _fetch(
        pool,
        "SELECT run_id, status, count(*) AS n FROM executor.steps"
        " WHERE run_id = ANY(%s) GROUP BY run_id, status",
        (run_ids,),
    ):
        out.setdefault(row["run_id"], {})[row["status"]] = row["n"]
    return out


EXACT_COUNT_CAP = 10_000


def estimated_runs(pool: Pool) -> tuple[int, bool]:
    """(total, exact): exact below 10,000 runs (a capped count), else the planner's estimate
    (`pg_class.reltuples`, free, and good to a few percent once autovacuum has run)."""
    row = _fetch_one(
        pool, "SELECT reltuples::bigint AS n FROM pg_class WHERE oid = 'executor.runs'::regclass"
    )
    estimate = int(row["n"]) if row and row["n"] is not None else -1
    if estimate >= EXACT_COUNT_CAP:
        return estimate, False
    capped = _fetch_one(
        pool,
        "SELECT count(*) AS n FROM (SELECT 1 FROM executor.runs LIMIT %s) AS capped",
        (EXACT_COUNT_CAP,),
    )
    n = int(capped["n"]) if capped else 0
    if n < EXACT_COUNT_CAP:
        return n, True
    return max(estimate, EXACT_COUNT_CAP), False


def run_exists(pool: Pool, run_id: str) -> bool:
    return (
        _fetch_one(pool, "SELECT 1 AS one FROM executor.runs WHERE run_id = %s", (run_id,))
        is not None
    )


def workflows(pool: Pool, limit: int = 200) -> list[str]:
    """Distinct workflow names, by a loose index scan over `runs_workflow_created`."""
    rows = _fetch(
        pool,
        """
        WITH RECURSIVE w AS (
            (SELECT workflow FROM executor.runs ORDER BY workflow LIMIT 1)
            UNION ALL
            SELECT (SELECT r.workflow FROM executor.runs r WHERE r.workflow > w.workflow
                    ORDER BY r.workflow LIMIT 1)
            FROM w WHERE w.workflow IS NOT NULL
        )
        SELECT workflow FROM w WHERE workflow IS NOT NULL LIMIT %s
        """,
        (limit,),
    )
    return [r["workflow"] for r in rows]


# --- failed steps ------------------------------------------------------------------------


@dataclass(frozen=True)
class FailedFilter:
    workflow: str | None = None
    step_key: str | None = None
    run_id: str | None = None
    failed_from: datetime | None = None
    failed_to: datetime | None = None
    error_contains: str | None = None


def _failed_where(f: FailedFilter) -> tuple[list[str], list[Any]]:
    where = ["s.status = 'failed'"]
    params: list[Any] = []
    if f.workflow:
        where.append("r.workflow = %s")
        params.append(f.workflow)
    if f.step_key:
        where.append("s.step_key = %s")
        params.append(f.step_key)
    if f.run_id:
        where.append("s.run_id = %s")
        params.append(f.run_id)
    if f.failed_from:
        where.append("s.updated_at >= %s")
        params.append(f.failed_from)
    if f.failed_to:
        where.append("s.updated_at < %s")
        params.append(f.failed_to)
    if f.error_contains:
        where.append("s.error->>'message' ILIKE %s")
        params.append("%" + _like_prefix(f.error_contains))
    return where, params


_FAILED_SELECT = """
SELECT s.run_id, s.step_key, s.attempt, s.max_attempts, s.error, s.updated_at,
       r.workflow, r.status AS run_status
FROM executor.steps AS s JOIN executor.runs AS r USING (run_id)
"""


def list_failed_steps(pool: Pool, f: FailedFilter, req: PageRequest) -> Page[FailedStep]:
    where, params = _failed_where(f)
    rows, nxt, prev = _keyset_page(
        pool,
        _FAILED_SELECT,
        where,
        params,
        req,
        ("s.updated_at", "s.run_id", "s.step_key"),
        ("updated_at", "run_id", "step_key"),
    )
    return Page([FailedStep.from_row(r) for r in rows], nxt, prev)


def retryable_failed_steps(pool: Pool, f: FailedFilter, limit: int) -> list[FailedStep]:
    """The failed steps a bulk retry would act on (their run is failed or running), oldest first."""
    where, params = _failed_where(f)
    where.append("r.status IN ('failed', 'running')")
    sql = (
        _FAILED_SELECT
        + " WHERE "
        + " AND ".join(where)
        + " ORDER BY s.updated_at, s.run_id, s.step_key LIMIT %s"
    )
    return [FailedStep.from_row(r) for r in _fetch(pool, sql, [*params, limit])]


def count_failed_steps(pool: Pool, cap: int = 1000) -> int:
    """Failed steps, counted up to `cap` along the partial index (the nav badge)."""
    row = _fetch_one(
        pool,
        "SELECT count(*) AS n FROM"
        " (SELECT 1 FROM executor.steps WHERE status = 'failed' LIMIT %s) AS capped",
        (cap,),
    )
    return int(row["n"]) if row else 0


# --- drops -------------------------------------------------------------------------------


@dataclass(frozen=True)
class DropFilter:
    reason: str | None = None
    command_type: str | None = None
    run_id: str | None = None
    received_from: datetime | None = None


def list_drops(pool: Pool, f: DropFilter, req: PageRequest) -> Page[Drop]:
    where: list[str] = []
    params: list[Any] = []
    if f.reason:
        where.append("reason = %s")
        params.append(f.reason)
    if f.command_type:
        where.append("command_type = %s")
        params.append(f.command_type)
    if f.run_id:
        where.append("run_id = %s")
        params.append(f.run_id)
    if f.received_from:
        where.append("received_at >= %s")
        params.append(f.received_from)
    rows, nxt, prev = _keyset_page(
        pool,
        f"SELECT {DROP_COLUMNS} FROM executor.drops",
        where,
        params,
        req,
        ("drop_id",),
        ("drop_id",),
    )
    return Page([Drop.from_row(r) for r in rows], nxt, prev)
