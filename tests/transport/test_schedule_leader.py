"""A schedule's sweep leader SIGKILLed at the tick, with real `executor worker` processes.

The kill point is forced, not hoped for: the first worker runs with the ticker's test seam
set, so it stops itself (SIGSTOP) right after a tick's run committed and before the schedule
row advanced, still holding the sweep lock and the row lock. The test then SIGKILLs it and a
second worker takes over the sweep: it must start that same tick again, be told it is a
duplicate, and start each later tick once.
"""

from __future__ import annotations

import os
import signal
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis as redis_lib
from psycopg.rows import dict_row
from support.waiting import wait_for

from executor.client import Client
from executor.schedules.model import tick_key, ticks_between
from executor.schedules.ticker import STOP_AFTER_START_ENV

from .conftest import Workers, assert_verified

pytestmark = pytest.mark.slow

NAME = "every-minute"


def rows(database_url: str, sql: str, *params: Any) -> list[dict[str, Any]]:
    with psycopg.connect(database_url, row_factory=dict_row, autocommit=True) as conn:
        return conn.execute(sql, params).fetchall()


def stopped(pid: int) -> bool:
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    return state == "T"


def test_a_leader_killed_between_starting_a_tick_and_advancing_the_schedule(
    workers: Workers, client: Client, redis: redis_lib.Redis, db_url: str
) -> None:
    [db_now] = [r["now"] for r in rows(db_url, "SELECT now() AS now")]
    created = db_now - timedelta(seconds=150)  # two or three minute ticks are due at once
    client.create_schedule(NAME, "* * * * *", "noop", catchup="all", now=created)
    first: datetime = client.get_schedule(NAME).next_tick  # type: ignore[union-attr]

    doomed = workers.start(via="executor", **{STOP_AFTER_START_ENV: "1"})
    wait_for(lambda: stopped(doomed.pid), timeout=30, what="the leader to stop at the seam",
             context=workers.output)  # fmt: skip
    receipts = rows(db_url, "SELECT idempotency_key, outcome FROM executor.receipts "
                    "WHERE command_type = 'create_run'")  # fmt: skip
    assert receipts == [{"idempotency_key": tick_key(NAME, first), "outcome": "applied"}]
    row = client.get_schedule(NAME)
    assert row is not None
    assert (row.last_tick, row.next_tick) == (None, first)  # the run committed, the row did not

    os.kill(doomed.pid, signal.SIGKILL)
    doomed.wait()
    [killed_at] = [r["now"] for r in rows(db_url, "SELECT now() AS now")]
    workers.start(via="executor")

    def caught_up() -> bool:
        current = client.get_schedule(NAME)
        return (
            current is not None
            and current.last_tick is not None
            and (current.next_tick > killed_at)
        )

    wait_for(caught_up, timeout=60, what="the second leader to catch up", context=workers.output)
    last = client.get_schedule(NAME).last_tick  # type: ignore[union-attr]
    expected = list(ticks_between("* * * * *", "UTC", first, last))
    assert len(expected) >= 2
    started = rows(
        db_url,
        "SELECT r.input -> '_schedule' ->> 'tick' AS tick, count(*) AS n FROM executor.runs r "
        "WHERE r.input -> '_schedule' ->> 'name' = %s GROUP BY 1 ORDER BY 1",
        NAME,
    )
    assert [(r["tick"], r["n"]) for r in started if r["tick"] <= last.isoformat()[:19] + "Z"] == [
        (tick_key(NAME, t).split(":", 2)[2], 1) for t in expected
    ]
    dup = rows(db_url, "SELECT count(*) AS n FROM executor.drops WHERE idempotency_key = %s "
               "AND reason = 'duplicate'", tick_key(NAME, first))  # fmt: skip
    assert dup == [{"n": 1}]  # the second leader retried the first tick and was told

    run_ids = [r["run_id"] for r in rows(db_url, "SELECT run_id FROM executor.runs")]
    wait_for(
        lambda: all(client.get_run(r).done for r in run_ids),  # type: ignore[union-attr]
        timeout=60,
        what="the scheduled runs to complete",
        context=lambda: (
            str(rows(db_url, "SELECT run_id, status FROM executor.runs"))
            + str(
                rows(
                    db_url,
                    "SELECT idempotency_key, attempts, push_after, now() FROM executor.outbox",
                )
            )
            + str(rows(db_url, "SELECT run_id, step_key, status FROM executor.steps"))
        ),
    )
    assert_verified(db_url)
