"""What operators do to schedules, for the API and the Schedules page alike.

Schedules are rows, not runs: pausing, resuming, creating and deleting one changes
`executor.schedules` through `executor.schedules.store` (on the dashboard's writing pool;
the pages' pool is read-only). Triggering starts a run, a command like any other, through
`executor.schedules.ticker.trigger`; the form's key (minted when the page was rendered)
makes a double click start one run, and says so.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from executor.dashboard.context import DashboardContext
from executor.errors import ExecutorError
from executor.schedules import store, ticker
from executor.schedules.model import (
    InvalidSchedule,
    Schedule,
    ScheduleExists,
    ScheduleNotFound,
    utc_iso,
)

ACTIONS = ("pause", "resume", "trigger", "delete")


@dataclass(frozen=True)
class ScheduleResult:
    action: str
    name: str
    ok: bool
    message: str
    http_status: int
    schedule: Schedule | None = None
    run_id: str | None = None
    started: bool | None = None
    idempotency_key: str | None = None

    @property
    def level(self) -> str:
        if not self.ok:
            return "error"
        return "ok" if self.started is not False else "warn"

    def to_json(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "name": self.name,
            "ok": self.ok,
            "message": self.message,
            "schedule": None if self.schedule is None else self.schedule.model_dump(mode="json"),
            "run_id": self.run_id,
            "started": self.started,
            "idempotency_key": self.idempotency_key,
        }


def _pool(ctx: DashboardContext) -> Any:
    if ctx.write_pool is None:
        raise ExecutorError("the dashboard has no writing database pool")
    return ctx.write_pool


def act(ctx: DashboardContext, action: str, name: str, key: str | None = None) -> ScheduleResult:
    """Pause, resume, trigger (with `key`) or delete the schedule `name`."""
    started_at = time.perf_counter()
    result = _act(ctx, action, name, key)
    outcome = "applied" if result.ok else f"http_{result.http_status}"
    if result.started is False:
        outcome = "duplicate"
    ctx.metrics.observe_action(f"schedule_{action}", outcome, time.perf_counter() - started_at)
    return result


def _act(ctx: DashboardContext, action: str, name: str, key: str | None) -> ScheduleResult:
    if action not in ACTIONS:
        raise ValueError(f"no schedule action {action!r}")
    try:
        if action == "pause":
            found = store.pause(_pool(ctx), name)
            return _ok(action, found, f"paused: schedule {name} starts no tick until resumed")
        if action == "resume":
            found = store.resume(_pool(ctx), name)
            return _ok(
                action, found, f"resumed: schedule {name} ticks next at {utc_iso(found.next_tick)}"
            )
        if action == "delete":
            store.delete(_pool(ctx), name)
            return ScheduleResult(
                action,
                name,
                True,
                f"deleted: schedule {name} is gone; the runs it started stay",
                200,
            )
        return _trigger(ctx, name, key)
    except ScheduleNotFound as exc:
        return ScheduleResult(action, name, False, str(exc), 404)
    except ExecutorError as exc:
        return ScheduleResult(action, name, False, f"not done: {exc}", 503, idempotency_key=key)


def _trigger(ctx: DashboardContext, name: str, key: str | None) -> ScheduleResult:
    scheduler = ctx.scheduler()
    if scheduler is None:
        raise ExecutorError("this dashboard's backend cannot start runs of schedules")
    tick = ticker.trigger(scheduler, name, idempotency_key=key)
    if tick.started:
        message = f"triggered: schedule {name} started run {tick.run_id}"
    else:
        message = (
            f"already triggered: this exact request started run {tick.run_id} before; "
            "nothing was started twice"
        )
    return ScheduleResult(
        "trigger",
        name,
        True,
        message,
        200,
        run_id=tick.run_id,
        started=tick.started,
        idempotency_key=tick.idempotency_key,
    )


def _ok(action: str, schedule: Schedule, message: str) -> ScheduleResult:
    return ScheduleResult(action, schedule.name, True, message, 200, schedule=schedule)


def create(ctx: DashboardContext, fields: dict[str, Any]) -> ScheduleResult:
    """Store a new schedule (`fields` as `Client.create_schedule` takes them)."""
    name = str(fields.get("name", ""))
    try:
        found = store.create(_pool(ctx), **fields)
    except ScheduleExists as exc:
        return ScheduleResult("create", name, False, str(exc), 409)
    except InvalidSchedule as exc:
        return ScheduleResult("create", name, False, str(exc), 422)
    return ScheduleResult(
        "create", found.name, True, f"created: {found.describe()}", 201, schedule=found
    )
