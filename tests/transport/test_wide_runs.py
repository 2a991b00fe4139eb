"""Dynamic and wide shapes through real worker processes: maps of 0, 1 and 10,000 items, and
a run of one root, 10,000 parallel steps and a join (10,002 steps in one graph).

The two large runs print how long they took (`-s` shows it); they are the scale DESIGN asks
for ("ten thousand items in one run must work"), not a benchmark.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import redis as redis_lib

from executor.client import Client

from .conftest import Workers, assert_verified, rows
from .workflows_for_tests import WIDE

pytestmark = pytest.mark.slow


def counts(db_url: str, run_id: str) -> dict[str, int]:
    found = rows(
        db_url,
        "SELECT status, count(*) AS n FROM executor.steps WHERE run_id = %s GROUP BY status",
        run_id,
    )
    return {r["status"]: int(r["n"]) for r in found}


@pytest.mark.parametrize("n", [0, 1])
def test_a_small_map_completes(
    n: int, workers: Workers, client: Client, redis: redis_lib.Redis, db_url: str
) -> None:
    workers.start()
    workers.wait_registered(redis, 1)
    run_id = client.start_run("t_fan", {"n": n})
    view = client.wait(run_id, timeout=30)
    assert view.status == "completed", workers.output()
    assert view.output == {"total": {"items": n, "sum": sum(i * i for i in range(n))}}
    assert {s.step_key: s.output for s in view.steps if s.parent_step} == {
        f"square[{i}]": i * i for i in range(n)
    }
    assert_verified(db_url)


def _finish(client: Client, workers: Workers, db_url: str, run_id: str, timeout: float) -> Any:
    """Wait for the run, failing early (with the logs) if it stops making progress."""
    deadline = time.monotonic() + timeout
    last, stalled_since = -1, time.monotonic()
    while True:
        view = client.get_run(run_id)
        assert view is not None
        if view.done:
            return view
        done = counts(db_url, run_id).get("completed", 0)
        if done != last:
            last, stalled_since = done, time.monotonic()
        if time.monotonic() - stalled_since > 60 or time.monotonic() > deadline:
            pytest.fail(f"run {run_id} stalled at {counts(db_url, run_id)}\n{workers.output()}")
        time.sleep(0.5)


def at_scale(
    workers: Workers,
    client: Client,
    redis: redis_lib.Redis,
    db_url: str,
    workflow: str,
    input: Any,
    what: str,
) -> Any:
    """Run it through two `executor worker` processes; print how long it took."""
    for _ in range(2):
        workers.start(via="executor")
    workers.wait_registered(redis, 2)
    started = time.monotonic()
    run_id = client.start_run(workflow, input)
    view = _finish(client, workers, db_url, run_id, timeout=900)
    print(f"\n{what}: {time.monotonic() - started:.1f} s through 2 workers")
    failed = rows(
        db_url,
        "SELECT step_key, attempt, error FROM executor.steps"
        " WHERE run_id = %s AND status = 'failed' LIMIT 5",
        run_id,
    )
    assert view.status == "completed", f"{view.error} {failed}\n{workers.output()}"
    return view


@pytest.mark.huge
@pytest.mark.timeout(900)  # _finish fails it sooner if it stops making progress
def test_a_map_of_ten_thousand_items_completes(
    workers: Workers, client: Client, redis: redis_lib.Redis, db_url: str
) -> None:
    view = at_scale(workers, client, redis, db_url, "t_fan", {"n": 10_000}, "map of 10,000 items")
    assert view.output == {"total": {"items": 10_000, "sum": sum(i * i for i in range(10_000))}}
    assert counts(db_url, view.run_id) == {"completed": 10_003}
    [m] = rows(
        db_url,
        "SELECT items_total, items_done, jsonb_array_length(output) AS n, output -> 9999 AS last"
        " FROM executor.steps WHERE run_id = %s AND step_key = 'square'",
        view.run_id,
    )
    assert (m["items_total"], m["items_done"], m["n"], m["last"]) == (
        10_000,
        10_000,
        10_000,
        9999**2,
    )
    assert_verified(db_url)


@pytest.mark.huge
@pytest.mark.timeout(900)  # _finish fails it sooner if it stops making progress
def test_a_run_of_ten_thousand_parallel_steps_and_a_join_completes(
    workers: Workers, client: Client, redis: redis_lib.Redis, db_url: str
) -> None:
    what = f"root -> {WIDE:,} parallel steps -> join"
    view = at_scale(workers, client, redis, db_url, "t_wide", None, what)
    assert view.output == {"join": {"branches": WIDE, "sum": WIDE}}
    assert counts(db_url, view.run_id) == {"completed": WIDE + 2}
    assert_verified(db_url)
