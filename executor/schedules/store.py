"""The rows of executor.schedules: create, read, pause, resume, delete.

These are the operations the CLI, `Client` and the dashboard share; starting runs is the
ticker's. Pausing and deleting take the row lock the ticker holds while it starts a
schedule's ticks, so once `pause` returns no further tick of that schedule starts.

Every function takes `now` for tests with a controllable clock; by default it is the
database's clock, the one every worker agrees on.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import psycopg
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool

from executor.schedules.model import (
    Catchup,
    Schedule,
    ScheduleExists,
    ScheduleNotFound,
    ScheduleSpec,
    next_tick,
)
from executor.storage.db import db_now

Conn = psycopg.Connection[dict[str, Any]]
Pool = ConnectionPool[Conn]

COLUMNS = (
    "name, cron, workflow, input, timezone, catchup, paused, last_tick, next_tick, "
    "created_at, updated_at"
)

INSERT = f"""
INSERT INTO executor.schedules (name, cron, workflow, input, timezone, catchup, paused, next_tick)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (name) DO NOTHING
RETURNING {COLUMNS}
"""

SELECT_ONE = f"SELECT {COLUMNS} FROM executor.schedules WHERE name = %s"
SELECT_ALL = f"SELECT {COLUMNS} FROM executor.schedules ORDER BY name"

PAUSE = f"""
UPDATE executor.schedules SET paused = true, updated_at = now()
WHERE name = %s
RETURNING {COLUMNS}
"""

RESUME = f"""
UPDATE executor.schedules SET paused = false, next_tick = %s, updated_at = now()
WHERE name = %s
RETURNING {COLUMNS}
"""

DELETE = "DELETE FROM executor.schedules WHERE name = %s RETURNING name"


def create(
    pool: Pool,
    name: str,
    cron: str,
    workflow: str,
    input: dict[str, Any] | None = None,
    *,
    timezone: str = "UTC",
    catchup: Catchup = "latest",
    paused: bool = False,
    now: datetime | None = None,
) -> Schedule:
    """Store a new schedule whose first tick is the first one after `now`.

    Raises InvalidSchedule for a bad cron expression, zone or input, ScheduleExists if the
    name is taken.
    """
    spec = ScheduleSpec.parse(
        name=name,
        cron=cron,
        workflow=workflow,
        input={} if input is None else input,
        timezone=timezone,
        catchup=catchup,
    )
    with pool.connection() as conn:
        moment = now or db_now(conn)
        row = conn.execute(
            INSERT,
            (
                spec.name,
                spec.cron,
                spec.workflow,
                Jsonb(spec.input),
                spec.timezone,
                spec.catchup,
                paused,
                next_tick(spec.cron, spec.timezone, moment),
            ),
        ).fetchone()
    if row is None:
        raise ScheduleExists(spec.name)
    return Schedule.model_validate(row)


def get(pool: Pool, name: str) -> Schedule | None:
    with pool.connection() as conn:
        row = conn.execute(SELECT_ONE, (name,)).fetchone()
    return None if row is None else Schedule.model_validate(row)


def require(pool: Pool, name: str) -> Schedule:
    found = get(pool, name)
    if found is None:
        raise ScheduleNotFound(name)
    return found


def list_all(pool: Pool) -> list[Schedule]:
    with pool.connection() as conn:
        rows = conn.execute(SELECT_ALL).fetchall()
    return [Schedule.model_validate(r) for r in rows]


def pause(pool: Pool, name: str) -> Schedule:
    """Stop starting ticks. Waits for a tick being started right now, then returns."""
    with pool.connection() as conn:
        row = conn.execute(PAUSE, (name,)).fetchone()
    if row is None:
        raise ScheduleNotFound(name)
    return Schedule.model_validate(row)


def resume(pool: Pool, name: str, *, now: datetime | None = None) -> Schedule:
    """Start ticks again from the first one after `now`.

    Ticks that fell while the schedule was paused are skipped, whatever its catchup says:
    pausing is asking for them not to run (`backfill` runs them if that was wrong). Resuming
    a schedule that is not paused changes nothing.
    """
    with pool.connection() as conn, conn.transaction():
        row = conn.execute(SELECT_ONE + " FOR UPDATE", (name,)).fetchone()
        if row is None:
            raise ScheduleNotFound(name)
        current = Schedule.model_validate(row)
        if not current.paused:
            return current
        moment = now or db_now(conn)
        row = conn.execute(
            RESUME, (next_tick(current.cron, current.timezone, moment), name)
        ).fetchone()
    assert row is not None
    return Schedule.model_validate(row)


def delete(pool: Pool, name: str) -> None:
    """Remove the schedule; the runs it started stay (their keys keep their ticks taken)."""
    with pool.connection() as conn:
        row = conn.execute(DELETE, (name,)).fetchone()
    if row is None:
        raise ScheduleNotFound(name)
