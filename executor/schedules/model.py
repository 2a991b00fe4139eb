"""A schedule: a cron expression read in a time zone, a workflow, its input, a catch-up rule.

Ticks are computed by croniter in the schedule's zone (zoneinfo) and stored in UTC. Daylight
saving time is whatever croniter makes of it, and the tests pin that down for Europe/Berlin:
a tick inside the hour skipped in spring fires at the first valid time after it (02:30 on
the last Sunday of March fires at 03:00 CEST), and a tick inside the hour that repeats in
autumn fires twice (02:30 CEST, then 02:30 CET, an hour apart in UTC). Each next tick is
computed afresh from the previous one rather than from a croniter iterator kept in memory:
a leader restarted from the row must land on the same tick, and croniter answers the same
either way (checked across both transitions in the tests).

The tick's UTC instant names it: `schedule:<name>:<tick>` is the idempotency key of the run
it starts, so two leaders (or a leader and a backfill) asking for the same tick make one run.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter
from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationError, field_validator

from executor.commands.models import Identifier
from executor.errors import ExecutorError

Catchup = Literal["none", "latest", "all"]
CATCHUP_MODES: tuple[Catchup, ...] = ("none", "latest", "all")

# Added to every scheduled run's input: which schedule and which tick (a backfilled run must
# know which hour it stands for). A schedule's own input may not use the key.
SCHEDULE_INPUT_KEY = "_schedule"

# Run ids of ticks are derived from their key, so a duplicate's drop row names the run the
# tick did start. The namespace is fixed forever: changing it would re-derive every id.
_RUN_ID_NAMESPACE = uuid.UUID("6f1f4c1e-5b7a-4d0e-9a51-0c3d2f7e8b90")


class InvalidSchedule(ExecutorError, ValueError):
    """The schedule is not valid (cron expression, time zone, input or range)."""


class ScheduleNotFound(ExecutorError):
    """No schedule of that name."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"no schedule named {name!r}")


class ScheduleExists(ExecutorError):
    """A schedule of that name exists already; delete it first to replace it."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"a schedule named {name!r} exists already; delete it first")


def zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError) as exc:
        # OSError: a name that is a folder of the zone database (`America`) or too long.
        raise InvalidSchedule(f"unknown time zone {name!r} (use an IANA name)") from exc


def check_cron(expression: str) -> str:
    expression = expression.strip()
    if not croniter.is_valid(expression):
        raise InvalidSchedule(f"not a cron expression croniter accepts: {expression!r}")
    try:
        # Valid syntax may still name no date at all (`0 0 30 2 *`, February 30th).
        croniter(expression, datetime(2000, 1, 1, tzinfo=UTC)).get_next(datetime)
    except (ValueError, KeyError) as exc:
        raise InvalidSchedule(f"cron expression {expression!r} never fires: {exc}") from exc
    return expression


def next_tick(cron: str, timezone: str, after: datetime) -> datetime:
    """The first tick strictly after `after`, in UTC."""
    found: datetime = croniter(cron, after.astimezone(zone(timezone))).get_next(datetime)
    return found.astimezone(UTC)


def latest_tick(cron: str, timezone: str, at: datetime) -> datetime:
    """The last tick at or before `at`, in UTC (croniter's get_prev is strict, so check `at`)."""
    previous: datetime = croniter(cron, at.astimezone(zone(timezone))).get_prev(datetime)
    previous = previous.astimezone(UTC)
    following = next_tick(cron, timezone, previous)
    return following if following <= at else previous


def ticks_between(cron: str, timezone: str, start: datetime, end: datetime) -> Iterator[datetime]:
    """Every tick t with start <= t <= end, in order, in UTC."""
    tick = next_tick(cron, timezone, start - timedelta(seconds=1))
    while tick < start:
        tick = next_tick(cron, timezone, tick)
    while tick <= end:
        yield tick
        tick = next_tick(cron, timezone, tick)


def utc_iso(moment: datetime) -> str:
    """`2025-03-30T01:00:00Z`: the form ticks take in keys, inputs and the CLI."""
    text = moment.astimezone(UTC).isoformat(timespec="seconds")
    return text.replace("+00:00", "Z")


def tick_key(name: str, tick: datetime) -> str:
    return f"schedule:{name}:{utc_iso(tick)}"


def run_id_for(idempotency_key: str) -> str:
    return uuid.uuid5(_RUN_ID_NAMESPACE, idempotency_key).hex


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ScheduleSpec(_Model):
    """What a user gives to create a schedule; validated before anything is stored."""

    name: Identifier
    cron: str = Field(min_length=1, max_length=200)
    workflow: Identifier
    input: dict[str, JsonValue] = Field(default_factory=dict)
    timezone: str = Field(default="UTC", min_length=1, max_length=100)
    catchup: Catchup = "latest"

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str) -> str:
        return check_cron(value)

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        zone(value)
        return value

    @field_validator("input")
    @classmethod
    def _input(cls, value: dict[str, Any]) -> dict[str, Any]:
        if SCHEDULE_INPUT_KEY in value:
            raise InvalidSchedule(f"input key {SCHEDULE_INPUT_KEY!r} is set by the scheduler")
        return value

    @classmethod
    def parse(cls, **fields: Any) -> ScheduleSpec:
        """Validate, raising InvalidSchedule with every problem in one message."""
        try:
            return cls.model_validate(fields)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'schedule'}: {e['msg']}"
                for e in exc.errors()
            )
            raise InvalidSchedule(f"invalid schedule: {problems}") from exc

    def run_input(self, tick: datetime, **extra: JsonValue) -> dict[str, JsonValue]:
        """The run's input: the schedule's, plus which schedule and tick started it."""
        origin: dict[str, JsonValue] = {"name": self.name, "tick": utc_iso(tick), **extra}
        return {**self.input, SCHEDULE_INPUT_KEY: origin}


class Schedule(ScheduleSpec):
    """A stored schedule: the row of executor.schedules."""

    paused: bool
    last_tick: datetime | None
    next_tick: datetime
    created_at: datetime
    updated_at: datetime

    def describe(self) -> str:
        state = "paused" if self.paused else f"next {utc_iso(self.next_tick)}"
        return f"{self.name} ({self.cron!r} {self.timezone}, {self.workflow}, {state})"
