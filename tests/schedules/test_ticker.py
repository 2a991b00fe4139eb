"""Schedules against a real Postgres and Redis with a controllable clock: `now` is passed
in, so a day of ticks (or a DST change) takes milliseconds, not minutes."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from executor.client import Client
from executor.ledger.verify import verify
from executor.recovery.sweep import sweep
from executor.schedules import ticker
from executor.schedules.model import (
    InvalidSchedule,
    ScheduleExists,
    ScheduleNotFound,
    tick_key,
    ticks_between,
)
from executor.schedules.ticker import fire_due
from executor.storage.db import connect

T0 = datetime(2025, 1, 1, 0, 0, 30, tzinfo=UTC)  # hourly ticks fall at 01:00, 02:00, ...


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


@pytest.fixture
def client(db_url: str, redis_url: str) -> Iterator[Client]:
    with Client(db_url, redis_url) as opened:
        yield opened


def scheduled_runs(client: Client, name: str) -> list[dict[str, Any]]:
    """Every run the schedule started, oldest tick first, with its input's tick."""
    with client.pool.connection() as conn:
        return conn.execute(
            "SELECT r.run_id, r.workflow, r.input, rc.idempotency_key AS key "
            "FROM executor.runs r JOIN executor.receipts rc "
            "  ON rc.run_id = r.run_id AND rc.command_type = 'create_run' "
            "WHERE r.input -> '_schedule' ->> 'name' = %s "
            "ORDER BY r.input -> '_schedule' ->> 'tick'",
            (name,),
        ).fetchall()


def ticks_of(client: Client, name: str) -> list[str]:
    return [r["input"]["_schedule"]["tick"] for r in scheduled_runs(client, name)]


def test_a_due_tick_starts_one_run_with_the_tick_in_its_input(client: Client) -> None:
    client.create_schedule("hourly", "0 * * * *", "noop", {"region": "eu"}, now=T0)
    assert fire_due(client, now=at("2025-01-01T00:59:59Z")).started == 0
    report = fire_due(client, now=at("2025-01-01T01:00:02Z"))
    assert (report.started, report.duplicates, report.skipped) == (1, 0, 0)
    [run] = scheduled_runs(client, "hourly")
    assert run["key"] == "schedule:hourly:2025-01-01T01:00:00Z"
    assert run["workflow"] == "noop"
    assert run["input"] == {
        "region": "eu",
        "_schedule": {"name": "hourly", "tick": "2025-01-01T01:00:00Z"},
    }
    assert fire_due(client, now=at("2025-01-01T01:30:00Z")).started == 0
    row = client.get_schedule("hourly")
    assert row is not None
    assert (row.last_tick, row.next_tick) == (at("2025-01-01T01:00Z"), at("2025-01-01T02:00Z"))


@pytest.mark.parametrize(
    ("created", "until", "expected"),
    [
        # spring: 02:30 does not exist on the 30th and fires at 03:00 CEST
        ("2025-03-28T12:00Z", "2025-04-01T00:00Z", ["03-29 01:30", "03-30 01:00", "03-31 00:30"]),
        # autumn: 02:30 happens twice on the 26th and fires twice
        (
            "2025-10-24T12:00Z",
            "2025-10-28T00:00Z",
            ["10-25 00:30", "10-26 00:30", "10-26 01:30", "10-27 01:30"],
        ),
    ],
)
def test_a_leader_sweeping_every_five_minutes_across_a_dst_change_in_berlin(
    client: Client, created: str, until: str, expected: list[str]
) -> None:
    client.create_schedule(
        "nightly", "30 2 * * *", "noop", timezone="Europe/Berlin", catchup="none", now=at(created)
    )
    now = at(created)
    while now < at(until):
        fire_due(client, now=now)
        now += timedelta(minutes=5)
    started = [
        datetime.fromisoformat(t).strftime("%m-%d %H:%M") for t in ticks_of(client, "nightly")
    ]
    assert started == expected


@pytest.mark.parametrize(
    ("catchup", "now", "started", "skipped"),
    [
        ("all", "05:30", ["01", "02", "03", "04", "05"], 0),
        ("latest", "05:30", ["05"], 4),
        ("none", "05:30", [], 5),
        ("none", "05:00:30", ["05"], 4),  # 30 s late is on time (grace 60 s), not missed
    ],
)
def test_catchup_decides_the_ticks_missed_while_nothing_ran(
    client: Client, catchup: str, now: str, started: list[str], skipped: int
) -> None:
    client.create_schedule("s", "0 * * * *", "noop", catchup=catchup, now=T0)  # type: ignore[arg-type]
    report = fire_due(client, now=at(f"2025-01-01T{now}Z"))
    assert [t.tick.strftime("%H") for t in report.ticks] == started
    assert report.skipped == skipped
    assert [t[11:13] for t in ticks_of(client, "s")] == started
    row = client.get_schedule("s")
    assert row is not None
    assert row.next_tick == at("2025-01-01T06:00Z")
    assert fire_due(client, now=at(f"2025-01-01T{now}Z")).did_work is False


def test_catchup_all_is_bounded_per_call_and_finishes_over_calls(client: Client) -> None:
    client.create_schedule("s", "0 * * * *", "noop", catchup="all", now=T0)
    now = at("2025-01-01T05:30Z")
    assert [r.started for r in (fire_due(client, now=now, max_ticks=2) for _ in range(4))] == [
        2,
        2,
        1,
        0,
    ]
    assert len(ticks_of(client, "s")) == 5


def test_paused_schedules_start_nothing_and_resume_from_the_next_tick(client: Client) -> None:
    client.create_schedule("s", "0 * * * *", "noop", catchup="all", now=T0)
    paused = client.pause_schedule("s")
    assert paused.paused
    assert fire_due(client, now=at("2025-01-01T03:30Z")).started == 0
    resumed = client.resume_schedule("s", now=at("2025-01-01T03:40Z"))
    assert (resumed.paused, resumed.next_tick) == (False, at("2025-01-01T04:00Z"))
    assert fire_due(client, now=at("2025-01-01T04:00:01Z")).started == 1
    # 01:00-03:00 fell while paused: skipped whatever catchup says
    assert ticks_of(client, "s") == ["2025-01-01T04:00:00Z"]
    assert client.resume_schedule("s", now=at("2025-01-01T09:00Z")).next_tick == at(
        "2025-01-01T05:00Z"
    )  # resuming one that runs changes nothing


def test_a_deleted_schedule_starts_nothing_and_its_runs_stay(client: Client) -> None:
    client.create_schedule("s", "0 * * * *", "noop", now=T0)
    fire_due(client, now=at("2025-01-01T01:00:01Z"))
    client.delete_schedule("s")
    assert client.get_schedule("s") is None
    assert fire_due(client, now=at("2025-01-01T02:00:01Z")).started == 0
    assert len(scheduled_runs(client, "s")) == 1
    with pytest.raises(ScheduleNotFound):
        client.delete_schedule("s")
    with pytest.raises(ScheduleNotFound):
        client.pause_schedule("s")


def test_backfill_of_24_ticks_starts_24_runs_once_even_run_twice(client: Client) -> None:
    client.create_schedule("s", "0 * * * *", "noop", now=at("2025-02-01T00:00Z"))
    start, end = at("2025-01-01T00:00Z"), at("2025-01-01T23:00Z")
    now = at("2025-02-01T00:00Z")
    first = client.backfill_schedule("s", start, end, now=now)
    second = client.backfill_schedule("s", start, end, now=now)
    assert (len(first.ticks), first.started, first.duplicates) == (24, 24, 0)
    assert (len(second.ticks), second.started, second.duplicates) == (24, 0, 24)
    assert ticks_of(client, "s") == [f"2025-01-01T{h:02}:00:00Z" for h in range(24)]
    with connect(client.database_url) as conn:
        drops = conn.execute(
            "SELECT count(*) AS n FROM executor.drops WHERE reason = 'duplicate' "
            "AND idempotency_key LIKE 'schedule:s:%'"
        ).fetchone()
    assert drops is not None
    assert drops["n"] == 24
    row = client.get_schedule("s")
    assert row is not None
    assert row.last_tick is None


def test_a_tick_backfilled_before_the_leader_reaches_it_starts_once(client: Client) -> None:
    client.create_schedule("s", "0 * * * *", "noop", now=T0)
    client.backfill_schedule(
        "s", at("2025-01-01T01:00Z"), at("2025-01-01T01:00Z"), now=at("2025-01-01T01:00:01Z")
    )
    report = fire_due(client, now=at("2025-01-01T01:00:02Z"))
    assert (report.started, report.duplicates) == (0, 1)
    assert len(scheduled_runs(client, "s")) == 1


def test_backfill_refuses_future_ticks_and_reversed_or_huge_ranges(client: Client) -> None:
    client.create_schedule("s", "* * * * *", "noop", now=T0)
    now = at("2025-01-10T00:00Z")
    with pytest.raises(InvalidSchedule, match="past"):
        client.backfill_schedule("s", at("2025-01-09T00:00Z"), at("2025-01-11T00:00Z"), now=now)
    with pytest.raises(InvalidSchedule, match="before"):
        client.backfill_schedule("s", at("2025-01-09T00:00Z"), at("2025-01-08T00:00Z"), now=now)
    with pytest.raises(InvalidSchedule, match="split"):
        client.backfill_schedule("s", at("2025-01-01T00:00Z"), at("2025-01-09T00:00Z"), now=now)
    assert scheduled_runs(client, "s") == []


class Crash(BaseException):
    """Stands for the leader dying: not an Exception, so nothing on the way catches it."""


def test_a_leader_dying_between_the_run_and_the_row_makes_the_next_retry_a_duplicate(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    client.create_schedule("s", "0 * * * *", "noop", now=T0)
    now = at("2025-01-01T01:00:05Z")

    def die() -> None:
        raise Crash

    monkeypatch.setattr(ticker, "_after_start", die)
    with pytest.raises(Crash):
        fire_due(client, now=now)
    row = client.get_schedule("s")
    assert row is not None
    assert row.last_tick is None
    assert len(scheduled_runs(client, "s")) == 1

    monkeypatch.undo()
    report = fire_due(client, now=now)
    assert (report.started, report.duplicates) == (0, 1)
    [tick] = report.ticks
    assert tick.idempotency_key == tick_key("s", at("2025-01-01T01:00Z"))
    assert len(scheduled_runs(client, "s")) == 1
    row = client.get_schedule("s")
    assert row is not None
    assert row.last_tick == at("2025-01-01T01:00Z")


def test_trigger_starts_a_run_now_and_its_key_makes_it_once(client: Client) -> None:
    client.create_schedule("s", "0 0 1 1 *", "noop", {"a": 1}, now=T0)
    first = client.trigger_schedule("s", idempotency_key="ops-1")
    again = client.trigger_schedule("s", idempotency_key="ops-1")
    other = client.trigger_schedule("s")
    assert first == again != other
    view = client.get_run(first)
    assert view is not None
    assert view.input["_schedule"]["manual"] is True
    assert view.input["a"] == 1
    row = client.get_schedule("s")
    assert row is not None
    assert row.last_tick is None


def test_creating_validates_and_names_are_unique(client: Client) -> None:
    client.create_schedule("s", "0 * * * *", "noop", now=T0)
    with pytest.raises(ScheduleExists):
        client.create_schedule("s", "0 * * * *", "noop", now=T0)
    with pytest.raises(InvalidSchedule, match="cron"):
        client.create_schedule("t", "every hour", "noop")
    with pytest.raises(InvalidSchedule, match="time zone"):
        client.create_schedule("t", "0 * * * *", "noop", timezone="Europe/Atlantis")
    assert [s.name for s in client.list_schedules()] == ["s"]


def test_the_sweep_leader_starts_due_ticks_by_the_database_clock(client: Client) -> None:
    with client.pool.connection() as conn:
        db_now = conn.execute("SELECT now() AS now").fetchone()["now"]  # type: ignore[index]
    client.create_schedule(
        "s", "* * * * *", "noop", catchup="all", now=db_now - timedelta(minutes=3)
    )
    report = sweep(client)
    assert report.schedules is not None
    expected = list(
        ticks_between("* * * * *", "UTC", db_now - timedelta(minutes=3), report.schedules.now)
    )
    assert report.schedules.started == len(expected) >= 2
    assert "scheduled run" in str(report)
    with connect(client.database_url) as conn:
        assert verify(conn).ok
