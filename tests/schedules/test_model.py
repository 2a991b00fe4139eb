"""Ticks and catch-up decisions, without a database: croniter's DST rules as the schedule
sees them, and `plan` for each catchup mode."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from executor.schedules.model import (
    InvalidSchedule,
    Schedule,
    ScheduleSpec,
    latest_tick,
    next_tick,
    tick_key,
    ticks_between,
)
from executor.schedules.ticker import plan

BERLIN = "Europe/Berlin"
GRACE = timedelta(seconds=60)


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


def hours(ticks: list[datetime]) -> list[str]:
    return [t.strftime("%m-%d %H:%M") for t in ticks]


def schedule(catchup: str, first: str, *, cron: str = "0 * * * *", tz: str = "UTC") -> Schedule:
    return Schedule.model_validate(
        {
            "name": "s",
            "cron": cron,
            "workflow": "noop",
            "timezone": tz,
            "catchup": catchup,
            "paused": False,
            "last_tick": None,
            "next_tick": at(first),
            "created_at": at(first) - timedelta(hours=1),
            "updated_at": at(first) - timedelta(hours=1),
        }
    )


def test_a_daily_tick_in_the_skipped_spring_hour_fires_at_three() -> None:
    ticks = list(
        ticks_between("30 2 * * *", BERLIN, at("2025-03-29T00:00Z"), at("2025-04-01T00:00Z"))
    )
    # 02:30 CET on the 29th, 03:00 CEST on the 30th (02:30 does not exist), 02:30 CEST on the 31st
    assert hours(ticks) == ["03-29 01:30", "03-30 01:00", "03-31 00:30"]


def test_a_daily_tick_in_the_repeated_autumn_hour_fires_twice() -> None:
    ticks = list(
        ticks_between("30 2 * * *", BERLIN, at("2025-10-25T00:00Z"), at("2025-10-28T00:00Z"))
    )
    # 02:30 CEST and 02:30 CET on the 26th, an hour apart in UTC
    assert hours(ticks) == ["10-25 00:30", "10-26 00:30", "10-26 01:30", "10-27 01:30"]


@pytest.mark.parametrize(("day", "count"), [("2025-03-30", 23), ("2025-10-26", 25)])
def test_hourly_ticks_follow_utc_through_both_changes(day: str, count: int) -> None:
    start = datetime.fromisoformat(f"{day}T00:00").replace(
        tzinfo=__import__("zoneinfo").ZoneInfo(BERLIN)
    )
    end = start + timedelta(days=1) - timedelta(seconds=1)
    ticks = list(ticks_between("0 * * * *", BERLIN, start, end))
    assert len(ticks) == count  # the local day is 23 or 25 hours long
    assert all(b - a == timedelta(hours=1) for a, b in itertools.pairwise(ticks))


def test_keys_name_the_tick_in_utc() -> None:
    tick = next_tick("30 2 * * *", BERLIN, at("2025-10-26T00:31Z"))
    assert tick_key("nightly", tick) == "schedule:nightly:2025-10-26T01:30:00Z"


@settings(max_examples=200, deadline=None)
@given(
    cron=st.sampled_from(["30 2 * * *", "0 * * * *", "*/20 1-3 * * *", "0 3 * * 0"]),
    base=st.sampled_from([at("2025-03-29T12:00Z"), at("2025-10-25T12:00Z")]),
    offset=st.integers(min_value=0, max_value=3 * 86_400),
)
def test_latest_tick_is_the_last_of_the_forward_ticks(
    cron: str, base: datetime, offset: int
) -> None:
    """The catch-up modes jump with get_prev; it must agree with walking forward."""
    now = base + timedelta(seconds=offset)
    walked = list(ticks_between(cron, BERLIN, base - timedelta(days=7), now))
    assert latest_tick(cron, BERLIN, now) == walked[-1]
    if walked[-1] != now:
        assert latest_tick(cron, BERLIN, walked[-1]) == walked[-1]


# --- catchup: ticks 01:00 .. 05:00 fell while nothing ran -----------------------------------


def test_all_starts_every_missed_tick_in_order() -> None:
    p = plan(
        schedule("all", "2025-01-01T01:00Z"), at("2025-01-01T05:30Z"), grace=GRACE, max_ticks=100
    )
    assert hours(list(p.start)) == [f"01-01 0{h}:00" for h in range(1, 6)]
    assert (p.skipped, p.last_tick, p.next_tick) == (
        0,
        at("2025-01-01T05:00Z"),
        at("2025-01-01T06:00Z"),
    )


def test_all_is_bounded_per_call_and_resumes_where_it_stopped() -> None:
    p = plan(
        schedule("all", "2025-01-01T01:00Z"), at("2025-01-01T05:30Z"), grace=GRACE, max_ticks=2
    )
    assert hours(list(p.start)) == ["01-01 01:00", "01-01 02:00"]
    assert p.next_tick == at("2025-01-01T03:00Z")  # still due: the next call goes on


def test_latest_starts_only_the_most_recent() -> None:
    p = plan(
        schedule("latest", "2025-01-01T01:00Z"), at("2025-01-01T05:30Z"), grace=GRACE, max_ticks=100
    )
    assert (list(p.start), p.skipped) == ([at("2025-01-01T05:00Z")], 4)
    assert p.next_tick == at("2025-01-01T06:00Z")


def test_none_skips_missed_ticks_to_the_next_future_one() -> None:
    p = plan(
        schedule("none", "2025-01-01T01:00Z"), at("2025-01-01T05:30Z"), grace=GRACE, max_ticks=100
    )
    assert (p.start, p.skipped, p.last_tick) == ((), 5, None)
    assert p.next_tick == at("2025-01-01T06:00Z")


def test_none_still_starts_a_tick_that_is_late_but_on_time() -> None:
    p = plan(
        schedule("none", "2025-01-01T01:00Z"),
        at("2025-01-01T05:00:30Z"),
        grace=GRACE,
        max_ticks=100,
    )
    assert (list(p.start), p.skipped) == ([at("2025-01-01T05:00Z")], 4)


def test_a_schedule_not_due_plans_nothing() -> None:
    p = plan(
        schedule("all", "2025-01-01T01:00Z"), at("2025-01-01T00:59Z"), grace=GRACE, max_ticks=100
    )
    assert (p.start, p.skipped, p.next_tick) == ((), 0, at("2025-01-01T01:00Z"))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"cron": "61 * * * *"}, "cron"),
        ({"timezone": "Mars/Olympus"}, "time zone"),
        ({"timezone": "America"}, "time zone"),  # a folder of the zone database
        ({"timezone": "x" * 100}, "time zone"),
        ({"cron": "0 0 30 2 *"}, "never fires"),  # February 30th: valid syntax, no date
        ({"input": {"_schedule": 1}}, "_schedule"),
        ({"catchup": "some"}, "catchup"),
        ({"name": "has space"}, "name"),
    ],
)
def test_invalid_schedules_are_refused_with_the_reason(
    fields: dict[str, object], message: str
) -> None:
    base = {"name": "s", "cron": "* * * * *", "workflow": "noop"}
    with pytest.raises(InvalidSchedule, match=message):
        ScheduleSpec.parse(**{**base, **fields})
