"""Rate limits hold across worker processes: a limited step waits unstarted, never fails."""

from __future__ import annotations

import pytest
import redis as redis_lib

from executor.client import Client
from executor.transport.ratelimit import Limiter, Rate, RateLimits
from queue_config import ExecutorSettings, QueueSettings

from .conftest import Workers, assert_verified

pytestmark = pytest.mark.slow


def test_twenty_a_second_over_three_workers(
    workers: Workers, client: Client, redis: redis_lib.Redis, db_url: str
) -> None:
    for _ in range(3):
        workers.start()
    workers.wait_registered(redis, 3)
    n = 60
    run_id = client.start_run("t_limited", {"n": n})
    view = client.wait(run_id, timeout=60)
    assert view.status == "completed", workers.output()
    with client.pool.connection() as conn:
        starts = conn.execute(
            "SELECT created_at FROM executor.events WHERE run_id = %s"
            " AND type = 'step_started' AND step_key LIKE 'each[%%' ORDER BY created_at",
            (run_id,),
        ).fetchall()
        attempts = conn.execute(
            "SELECT max(attempt) AS a, count(*) FILTER (WHERE status <> 'completed') AS bad"
            " FROM executor.steps WHERE run_id = %s",
            (run_id,),
        ).fetchone()
    assert len(starts) == n
    assert attempts == {"a": 1, "bad": 0}  # nothing failed, no attempt charged
    span = (starts[-1]["created_at"] - starts[0]["created_at"]).total_seconds()
    rate = (n - 1) / span
    assert 16 <= rate <= 24, f"{rate:.1f} starts/s"
    assert_verified(db_url)


def test_a_queue_limit_and_a_workflow_limit_are_checked_together(
    redis: redis_lib.Redis,
) -> None:
    settings = ExecutorSettings(
        queues=(QueueSettings(name="default", rate_limit="1/h"), QueueSettings(name="low"))
    )
    limits = RateLimits(settings, Limiter(redis, prefix="test-rate:"), lambda q: q)
    assert limits.of(None, "low") == {}
    on_default = limits.of(None, "default")
    assert on_default == {"queue:default": Rate(1 / 3600)}
    both = {**on_default, "workflow:w": Rate.parse("10/s")}
    assert limits.limiter.wait_for(both) == 0.0  # the first start is free
    spent = redis.get("test-rate:workflow:w")
    wait = limits.limiter.wait_for(both)
    assert 3590 < wait <= 3600  # the hourly queue limit decides
    # Refused as a whole: the refusal spent nothing of the workflow's own limit.
    assert redis.get("test-rate:workflow:w") == spent


@pytest.mark.parametrize(
    ("text", "per_second"), [("50/s", 50.0), ("120/m", 2.0), ("7.2/h", 0.002), (" 3 / sec ", 3.0)]
)
def test_rates_parse(text: str, per_second: float) -> None:
    assert Rate.parse(text).per_second == pytest.approx(per_second)


@pytest.mark.parametrize("text", ["50", "0/s", "-1/s", "5/day", "fast"])
def test_bad_rates_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="rate limit"):
        Rate.parse(text)
