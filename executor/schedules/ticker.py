"""Starting scheduled runs: each due tick once, however often the leader crashes.

`fire_due` is called by the sweep leader (one process at a time). For each due schedule it
locks the row, starts the ticks its catchup asks for, then advances `last_tick` and
`next_tick` in the same transaction that held the lock. A tick is started by applying
`CreateRun` with the idempotency key `schedule:<name>:<tick>` through the one handler, a
transaction of its own that commits before the row advances. So a leader that dies between
the two leaves the row where it was; the next leader starts the same tick again, the ledger
drops it as a `duplicate` (the receipt of the first), and the row advances. Exactly one run
per tick comes from the key, not from the row.

Which due ticks start (a tick is due when its time has passed; it is *missed* when it is
more than `schedule_grace_seconds` old, i.e. nothing ran when it fell):

- `all`: every due tick, oldest first (at most `max_ticks` per schedule per call; the rest
  on the next call).
- `latest`: only the most recent due tick, missed or not; older ones are skipped.
- `none`: the most recent due tick if it is on time; missed ones are skipped.

Backfill and trigger start runs outside that cycle and never move the row: a backfilled tick
has the same key as the leader's, so whichever comes second is the duplicate.
"""

from __future__ import annotations

import logging
import os
import signal
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from executor.commands.models import CreateRun
from executor.errors import ExecutorError
from executor.schedules import store
from executor.schedules.model import (
    InvalidSchedule,
    Schedule,
    latest_tick,
    next_tick,
    run_id_for,
    tick_key,
    ticks_between,
    utc_iso,
)
from executor.storage.db import db_now

if TYPE_CHECKING:
    from executor.recovery.sweep import SweepContext

log = logging.getLogger("executor.schedules")

MAX_SCHEDULES_PER_CALL = 100
MAX_TICKS_PER_CALL = 100
MAX_BACKFILL_TICKS = 10_000
_COUNT_CAP = 100_000

# Test seam for the crash window: when set, the process stops itself (SIGSTOP) right after a
# tick's run committed and before the schedule row advances, so a test can SIGKILL it there.
STOP_AFTER_START_ENV = "EXECUTOR_TEST_SCHEDULE_STOP_AFTER_START"

DUE = """
SELECT name FROM executor.schedules
WHERE NOT paused AND next_tick <= %s
ORDER BY next_tick, name
LIMIT %s
"""

LOCK_DUE = f"""
SELECT {store.COLUMNS} FROM executor.schedules
WHERE name = %s AND NOT paused AND next_tick <= %s
FOR UPDATE SKIP LOCKED
"""

ADVANCE = """
UPDATE executor.schedules SET last_tick = %s, next_tick = %s, updated_at = now()
WHERE name = %s
"""


@dataclass(frozen=True)
class TickResult:
    schedule: str
    tick: datetime
    run_id: str
    idempotency_key: str
    started: bool  # False: the key was taken, the run was started before (a duplicate)


@dataclass(frozen=True)
class TickPlan:
    """What a due schedule does now: the ticks to start and where its row moves."""

    start: tuple[datetime, ...]
    skipped: int
    last_tick: datetime | None
    next_tick: datetime


@dataclass
class TickReport:
    ticks: list[TickResult] = field(default_factory=list)

    @property
    def started(self) -> int:
        return sum(t.started for t in self.ticks)

    @property
    def duplicates(self) -> int:
        return sum(not t.started for t in self.ticks)


@dataclass
class BackfillReport(TickReport):
    """The ticks of a range: each started now or found started before."""


@dataclass(kw_only=True)
class FireReport(TickReport):
    """One leader pass: ticks started (or found started), missed ticks skipped, errors."""

    now: datetime
    skipped: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def did_work(self) -> bool:
        return bool(self.ticks or self.skipped or self.errors)

    def __str__(self) -> str:
        text = f"started {self.started} scheduled run(s)"
        if self.duplicates:
            text += f", {self.duplicates} tick(s) already started"
        if self.skipped:
            text += f", skipped {self.skipped} missed tick(s)"
        if self.errors:
            text += f", {len(self.errors)} error(s): {self.errors[0]}"
        return text


def plan(schedule: Schedule, now: datetime, *, grace: timedelta, max_ticks: int) -> TickPlan:
    """Decide a due schedule's ticks; pure, so catchup is tested without a database."""
    first = schedule.next_tick
    if first > now:
        return TickPlan((), 0, schedule.last_tick, first)
    cron, tz = schedule.cron, schedule.timezone
    if schedule.catchup == "all":
        ticks: list[datetime] = []
        tick = first
        while tick <= now and len(ticks) < max_ticks:
            ticks.append(tick)
            tick = next_tick(cron, tz, tick)
        return TickPlan(tuple(ticks), 0, ticks[-1], tick)
    latest = latest_tick(cron, tz, now)
    missed = _count(cron, tz, first, latest)
    following = next_tick(cron, tz, latest)
    if schedule.catchup == "latest" or now - latest <= grace:
        return TickPlan((latest,), missed - 1, latest, following)
    return TickPlan((), missed, schedule.last_tick, following)


def _count(cron: str, tz: str, first: datetime, last: datetime) -> int:
    """Ticks in [first, last], counted up to a cap (a per-second schedule down for a week)."""
    n = 0
    for _ in ticks_between(cron, tz, first, last):
        n += 1
        if n >= _COUNT_CAP:
            break
    return n


def fire_due(
    context: SweepContext, now: datetime | None = None, *, max_ticks: int = MAX_TICKS_PER_CALL
) -> FireReport:
    """Start the due ticks of every due schedule; the sweep leader's entry point.

    Database errors propagate (the sweep logs them and tries again); a schedule whose run
    could not be started (the ledger busy) is reported and retried on the next call.
    """
    with context.pool.connection() as conn:
        moment = now or db_now(conn)
        names = [r["name"] for r in conn.execute(DUE, (moment, MAX_SCHEDULES_PER_CALL))]
    report = FireReport(now=moment)
    grace = timedelta(seconds=context.settings.schedule_grace_seconds)
    for name in names:
        _fire_one(context, name, moment, grace, max_ticks, report)
    if report.did_work:
        log.info("schedules: %s", report)
    return report


def _fire_one(
    context: SweepContext,
    name: str,
    now: datetime,
    grace: timedelta,
    max_ticks: int,
    report: FireReport,
) -> None:
    with context.pool.connection() as conn, conn.transaction():
        row = conn.execute(LOCK_DUE, (name, now)).fetchone()
        if row is None:
            return  # paused, deleted or advanced since the listing, or being paused now
        schedule = Schedule.model_validate(row)
        todo = plan(schedule, now, grace=grace, max_ticks=max_ticks)
        last, following = todo.last_tick, todo.next_tick
        for i, tick in enumerate(todo.start):
            try:
                result = start_tick(context, schedule, tick)
            except ExecutorError as exc:
                report.errors.append(f"{name} {utc_iso(tick)}: {exc}")
                log.warning("schedule %s: tick %s not started: %s", name, utc_iso(tick), exc)
                last = todo.start[i - 1] if i else schedule.last_tick
                following = tick
                break
            report.ticks.append(result)
            _after_start()
        report.skipped += todo.skipped
        if todo.skipped:
            log.info("schedule %s: skipped %d missed tick(s)", name, todo.skipped)
        conn.execute(ADVANCE, (last, following, name))


def _after_start() -> None:
    if os.environ.get(STOP_AFTER_START_ENV):
        os.kill(os.getpid(), signal.SIGSTOP)


def start_tick(
    context: SweepContext,
    schedule: Schedule,
    tick: datetime,
    *,
    key: str | None = None,
    **extra: Any,
) -> TickResult:
    """Start the run of one tick, or learn that its key started one already."""
    key = key or tick_key(schedule.name, tick)
    run_id = run_id_for(key)
    command = CreateRun(
        run_id=run_id,
        workflow=schedule.workflow,
        input=schedule.run_input(tick, **extra),
        idempotency_key=key,
    )
    outcome = context.ledger.apply(command)
    if outcome.followups:
        context.dispatcher.push(outcome.followups)
    if not outcome.applied and outcome.reason != "duplicate":
        raise ExecutorError(f"run for {key} not started: {outcome.reason} ({outcome.detail})")
    return TickResult(schedule.name, tick, run_id, key, started=outcome.applied)


def trigger(context: SweepContext, name: str, *, idempotency_key: str | None = None) -> TickResult:
    """Start a run of the schedule now, outside its ticks (the row does not move).

    The same `idempotency_key` twice starts one run; without one each call starts a run.
    """
    schedule = store.require(context.pool, name)
    key = idempotency_key or f"schedule:{name}:manual:{uuid.uuid4().hex}"
    with context.pool.connection() as conn:
        moment = db_now(conn)
    return start_tick(context, schedule, moment, key=key, manual=True)


def backfill(
    context: SweepContext,
    name: str,
    start: datetime,
    end: datetime,
    *,
    now: datetime | None = None,
    limit: int = MAX_BACKFILL_TICKS,
) -> BackfillReport:
    """Start every tick in [start, end] that has not started; safe to repeat.

    Only past ticks: the schedule starts its future ones itself. Paused schedules may be
    backfilled (that is how the ticks a pause skipped are run after all).
    """
    schedule = store.require(context.pool, name)
    if start.tzinfo is None or end.tzinfo is None:
        raise InvalidSchedule("backfill bounds need a time zone (the CLI reads naive ones in it)")
    if end < start:
        raise InvalidSchedule(f"backfill range ends ({utc_iso(end)}) before it starts")
    if now is None:
        with context.pool.connection() as conn:
            now = db_now(conn)
    if end > now:
        raise InvalidSchedule(
            f"backfill covers past ticks only; {utc_iso(end)} is after now ({utc_iso(now)})"
        )
    ticks = []
    for tick in ticks_between(schedule.cron, schedule.timezone, start, end):
        ticks.append(tick)
        if len(ticks) > limit:
            raise InvalidSchedule(f"backfill of more than {limit} ticks; split the range")
    report = BackfillReport()
    for tick in ticks:
        report.ticks.append(start_tick(context, schedule, tick))
    return report
