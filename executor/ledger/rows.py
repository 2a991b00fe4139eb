"""Rows between Postgres and the state machine: parsing what the handler locked, and the
`RowSource` that pulls in the few further rows a decision needs, on the same transaction.

Each `RowSource` read is one statement, reached through a partial index (sql/005) and
locking what it returns, and is made only by the decisions that need it (a run completing,
a resume, a launch), so the hot path — start and complete a step — stays at the rows the
first round trip locked.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from executor.commands.state import RunEvent, RunRow, StepRow
from executor.commands.transition import KeyState
from executor.ledger import queries as q
from executor.ledger.pipe import Pipe


def timestamp(value: str | datetime | None) -> datetime | None:
    if value is None or isinstance(value, datetime):
        return value
    return datetime.fromisoformat(value)


# The order of the fields in the arrays the locking call answers with (sql/011).
RUN_FIELDS = (
    "run_id", "workflow", "status", "concurrency_key", "input", "output", "error", "last_seq",
    "concurrency_limit", "concurrency_slot", "steps_total", "steps_completed", "steps_active",
    "steps_failed", "parent_run_id", "parent_step_key", "parent_attempt", "traceparent",
)  # fmt: skip
STEP_FIELDS = (
    "step_key", "status", "attempt", "max_attempts", "queue", "timeout_seconds", "backoff",
    "output", "error", "lease_expires_at", "next_attempt_at", "kind", "dependants",
    "waiting_on", "map_over", "parent_step", "item_index", "item", "items_total", "items_done",
    "fence", "wake_at", "event_name", "child_run_id", "depends_on", "upstreams", "ctid",
)  # fmt: skip


def locked_run(fields: list[Any]) -> dict[str, Any]:
    """A run row as the locking call answers it (an array in RUN_FIELDS order), by name."""
    return dict(zip(RUN_FIELDS, fields, strict=True))


def locked_step(fields: list[Any]) -> dict[str, Any]:
    """A step row as the locking call answers it, by name (STEP_FIELDS)."""
    return dict(zip(STEP_FIELDS, fields, strict=True))


def run_from_row(row: dict[str, Any]) -> RunRow:
    return RunRow(
        run_id=row["run_id"],
        workflow=row["workflow"],
        status=row["status"],
        concurrency_key=row["concurrency_key"],
        input=row["input"],
        output=row["output"],
        error=row["error"],
        last_seq=row["last_seq"],
        concurrency_limit=row["concurrency_limit"],
        concurrency_slot=row["concurrency_slot"],
        steps_total=row["steps_total"],
        steps_completed=row["steps_completed"],
        steps_active=row["steps_active"],
        steps_failed=row["steps_failed"],
        parent_run_id=row["parent_run_id"],
        parent_step_key=row["parent_step_key"],
        parent_attempt=row["parent_attempt"],
        traceparent=row.get("traceparent"),
    )


def step_from_row(row: dict[str, Any]) -> StepRow:
    return StepRow(
        step_key=row["step_key"],
        status=row["status"],
        attempt=row["attempt"],
        max_attempts=row["max_attempts"],
        depends_on=tuple(row.get("depends_on") or ()),  # a long one is left out
        queue=row["queue"],
        timeout_seconds=row["timeout_seconds"],
        backoff=row["backoff"],
        output=row["output"],
        error=row["error"],
        lease_expires_at=timestamp(row["lease_expires_at"]),
        next_attempt_at=timestamp(row["next_attempt_at"]),
        kind=row["kind"],
        dependants=tuple(row["dependants"]),
        waiting_on=row["waiting_on"],
        map_over=row["map_over"],
        parent_step=row["parent_step"],
        item_index=row["item_index"],
        item=row["item"],
        items_total=row["items_total"],
        items_done=row["items_done"],
        fence=row["fence"],
        wake_at=timestamp(row["wake_at"]),
        event_name=row["event_name"],
        child_run_id=row["child_run_id"],
        upstreams=row["upstreams"] if "upstreams" in row else len(row["depends_on"]),
        ctid=row.get("ctid"),
    )


def key_state(concurrency_key: str, row: dict[str, Any]) -> KeyState:
    return KeyState(
        concurrency_key=concurrency_key,
        limit=int(row["limit"]),
        holders={int(slot): run for slot, run in row["holders"].items()},
        queued=int(row["queued"]),
    )


class DbSource:
    """The handler's `RowSource`: reads on the command's own transaction."""

    def __init__(
        self, conn: Pipe, run_id: str, *, launch_key: KeyState | None = None, limit: int = 1
    ) -> None:
        self.conn = conn
        self.run_id = run_id
        self.launch_key = launch_key
        self.limit = limit

    def _steps(self, sql: str, *params: Any) -> list[StepRow]:
        return [step_from_row(r) for r in self.conn.execute(sql, (self.run_id, *params))]

    def steps(self, keys: Iterable[str]) -> dict[str, StepRow]:
        wanted = sorted(set(keys))
        if not wanted:
            return {}
        rows = self.conn.execute(q.STEPS_BY_KEY, (wanted, self.run_id)).fetchall()
        return {r["step_key"]: step_from_row(r) for r in rows}

    def resumable(self) -> list[StepRow]:
        return self._steps(q.STEPS_RESUMABLE)

    def unfinished(self) -> list[StepRow]:
        return self._steps(q.STEPS_UNFINISHED)

    def failed_step(self) -> str | None:
        row = self.conn.execute(q.FAILED_STEP, (self.run_id,)).fetchone()
        return None if row is None else str(row["step_key"])

    def sink_outputs(self) -> dict[str, Any]:
        rows = self.conn.execute(q.SINK_OUTPUTS, (self.run_id,)).fetchall()
        return {r["step_key"]: r["output"] for r in rows}

    def item_outputs(self, map_key: str) -> list[Any]:
        rows = self.conn.execute(q.ITEM_OUTPUTS, (self.run_id, map_key)).fetchall()
        return [r["output"] for r in rows]

    def waiting_for(self, event: str) -> list[StepRow]:
        return self._steps(q.STEPS_WAITING_FOR, event)

    def buffered_event(self, event: str) -> RunEvent | None:
        row = self.conn.execute(q.BUFFERED_EVENT, (self.run_id, event)).fetchone()
        if row is None:
            return None
        return RunEvent(event=event, received_seq=int(row["received_seq"]), payload=row["payload"])

    def concurrency(self, concurrency_key: str) -> KeyState:
        if self.launch_key is not None and self.launch_key.concurrency_key == concurrency_key:
            return self.launch_key  # locked by the first round trip
        params = {"key": concurrency_key, "limit": self.limit, "run_id": self.run_id}
        self.conn.execute(q.ENSURE_KEY, params)
        row = self.conn.execute(q.KEY_STATE, params).fetchone()
        assert row is not None
        return key_state(concurrency_key, row)

    def oldest_queued(self, concurrency_key: str) -> RunRow | None:
        self.concurrency(concurrency_key)  # the key's lock orders admissions and launches
        for _ in range(100):
            row = self.conn.execute(q.OLDEST_QUEUED, (concurrency_key,)).fetchone()
            if row is not None:
                return run_from_row(row)
            # A locked row that stopped matching (a queued run cancelled meanwhile) makes
            # LIMIT 1 ... FOR UPDATE return nothing even when other queued runs exist.
            found = self.conn.execute(q.ANY_QUEUED, (concurrency_key,)).fetchone()
            if found is None or not found["any"]:
                return None
        return None
