"""Cron schedules: rows in executor.schedules, ticks started by the sweep leader.

`model` validates schedules and computes ticks (croniter, zoneinfo); `store` creates,
lists, pauses, resumes and deletes rows; `ticker` starts runs (`fire_due` for the leader,
`backfill` and `trigger` for operators). `Client` and the CLI are thin layers over these,
and a dashboard page needs nothing else: `store.list_all`, `store.pause`, `store.resume`
and `ticker.trigger(context, name)` with any object offering settings, pool, ledger and
dispatcher (a `Client` does).
"""

from executor.schedules.model import (
    CATCHUP_MODES,
    Catchup,
    InvalidSchedule,
    Schedule,
    ScheduleExists,
    ScheduleNotFound,
    ScheduleSpec,
)
from executor.schedules.ticker import BackfillReport, FireReport, TickResult, fire_due

__all__ = [
    "CATCHUP_MODES",
    "BackfillReport",
    "Catchup",
    "FireReport",
    "InvalidSchedule",
    "Schedule",
    "ScheduleExists",
    "ScheduleNotFound",
    "ScheduleSpec",
    "TickResult",
    "fire_due",
]
