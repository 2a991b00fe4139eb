"""Real RQ worker processes against real Postgres and Redis, with the failures I7 names:
a worker SIGKILLed mid-step, Redis flushed mid-flight, every job delivered twice, and
Postgres restarted under the workers.

Leases, heartbeats and sweeps are shortened through EXECUTOR_* variables (see conftest), so
each recovery takes a few seconds.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import redis as redis_lib
from psycopg.rows import dict_row
from support.waiting import wait_for

from executor.client import Client
from executor.commands.models import CompleteStep
from executor.storage import embedded
from executor.storage.migrate import migrate

from .conftest import Workers, assert_verified
from .workflows_for_tests import DuplicatingDispatcher

pytestmark = pytest.mark.slow

# `order`'s charge_card has 5 attempts: at flake 0.1 a run fails by chance once in 10^5.
NOOP_EVENTS = 19  # created, started, 4 x (created, queued, started, completed), completed


def rows(database_url: str, sql: str, *params: Any) -> list[dict[str, Any]]:
    with psycopg.connect(database_url, row_factory=dict_row, connect_timeout=2) as conn:
        return conn.execute(sql, params).fetchall()


def step(database_url: str, run_id: str, step_key: str) -> dict[str, Any]:
    found = rows(
        database_url,
        "SELECT status, attempt, output FROM executor.steps WHERE run_id = %s AND step_key = %s",
        run_id,
        step_key,
    )
    return found[0] if found else {}


def statuses(database_url: str, run_ids: list[str]) -> dict[str, str]:
    found = rows(
        database_url, "SELECT run_id, status FROM executor.runs WHERE run_id = ANY(%s)", run_ids
    )
    return {r["run_id"]: r["status"] for r in found}


def all_terminal(database_url: str, run_ids: list[str]) -> dict[str, str] | None:
    try:
        found = statuses(database_url, run_ids)
    except psycopg.Error:
        return None  # the test may be restarting the server
    done = {k: v for k, v in found.items() if v in ("completed", "failed", "cancelled")}
    return done if len(done) == len(run_ids) else None


def test_a_sigkilled_worker_s_step_is_retried_and_its_late_result_is_stale(
    workers: Workers, client: Client, redis: redis_lib.Redis, db_url: str
) -> None:
    doomed = workers.start()
    workers.wait_registered(redis, 1)
    run_id = client.start_run("sleepy", {"seconds": 3})
    wait_for(
        lambda: step(db_url, run_id, "nap") == {"status": "running", "attempt": 1, "output": None},
        timeout=20,
        what="attempt 1 to start",
        context=workers.output,
    )
    os.kill(doomed.pid, signal.SIGKILL)
    doomed.wait()
    killed_at = time.monotonic()
    survivor = workers.start()

    wait_for(
        lambda: (
            step(db_url, run_id, "nap").get("attempt") == 2
            and step(db_url, run_id, "nap")["status"] == "running"
        ),
        timeout=20,
        what="attempt 2 to start after the lease expired",
        context=workers.output,
    )
    recovered_in = time.monotonic() - killed_at
    # The killed attempt's completion, arriving late: fenced off by its attempt number.
    late = client.ledger.apply(
        CompleteStep(fence="f", run_id=run_id, step_key="nap", attempt=1, output={"late": True})
    )
    assert (late.applied, late.reason) == (False, "stale_attempt"), late.summary()

    view = client.wait(run_id, timeout=30)
    assert view.status == "completed"
    assert view.output == {"nap": {"slept": 3.0, "attempt": 2}}
    assert recovered_in < 2 + 0.3 + 5  # lease + sweep interval + slack for a busy machine
    kinds = [
        (e["type"], e["attempt"])
        for e in rows(
            db_url,
            "SELECT type, attempt FROM executor.events WHERE run_id = %s ORDER BY seq",
            run_id,
        )
        if e["type"].startswith("step_")
    ]
    assert ("step_retrying", 1) in kinds
    assert kinds.count(("step_completed", 2)) == 1
    assert survivor.poll() is None
    assert_verified(db_url)


def test_flushing_redis_mid_flight_loses_no_run(
    workers: Workers, client: Client, redis: redis_lib.Redis, db_url: str
) -> None:
    procs = [workers.start(), workers.start()]
    workers.wait_registered(redis, 2)
    run_ids = [client.start_run("order", {"items": 2, "flake": 0.1}) for _ in range(50)]
    wait_for(
        lambda: sum(s == "completed" for s in statuses(db_url, run_ids).values()) >= 5,
        timeout=30,
        what="some runs to complete",
        context=workers.output,
    )
    redis.flushdb()
    in_flight = [s for s in statuses(db_url, run_ids).values() if s != "completed"]
    assert in_flight, "every run finished before the flush; the test proved nothing"
    done = wait_for(
        lambda: all_terminal(db_url, run_ids),
        timeout=90,
        what="all 50 runs to finish after FLUSHDB",
        context=workers.output,
    )
    assert set(done.values()) == {"completed"}
    assert all(p.poll() is None for p in procs)
    assert_verified(db_url)


def test_every_job_delivered_twice_changes_nothing_and_every_duplicate_is_recorded(
    workers: Workers, client: Client, redis: redis_lib.Redis, db_url: str
) -> None:
    for _ in range(2):
        workers.start(worker_class="workflows_for_tests.DuplicatingWorker")
    workers.wait_registered(redis, 2)
    client._dispatcher = DuplicatingDispatcher(client.redis, client.settings, client.pool)
    run_ids = [client.start_run("noop", None) for _ in range(20)]
    done = wait_for(
        lambda: all_terminal(db_url, run_ids),
        timeout=60,
        what="all runs to finish",
        context=workers.output,
    )
    assert set(done.values()) == {"completed"}
    wait_for(  # the second copies may still be in flight after the runs completed
        lambda: redis.llen("rq:queue:default") == 0 and redis.llen("rq:queue:high") == 0,
        timeout=20,
        what="the queues to drain",
    )
    time.sleep(0.5)

    events = rows(
        db_url,
        "SELECT run_id, count(*) AS n FROM executor.events WHERE run_id = ANY(%s) GROUP BY run_id",
        run_ids,
    )
    assert {e["n"] for e in events} == {NOOP_EVENTS}
    drops = rows(
        db_url,
        "SELECT run_id, reason, command_type, count(*) AS n FROM executor.drops"
        " GROUP BY run_id, reason, command_type",
    )
    by_kind = {(d["reason"], d["command_type"]): 0 for d in drops}
    for d in drops:
        by_kind[(d["reason"], d["command_type"])] += d["n"]
    # Every job that carried a command was delivered twice: one start_run per run, and one
    # start_step per step that travelled as a job. The others were started in place (`first`
    # by the start_run, one branch by `first`'s completion, the join `last` by the second
    # branch's), and the second branch travels only when its worker let it go: it keeps it
    # back and starts it with its next completion when the queue is busy.
    (jobs,) = rows(
        db_url,
        "SELECT count(*) AS n FROM executor.receipts WHERE run_id = ANY(%s)"
        " AND command_type = 'start_step' AND outcome = 'applied'",
        run_ids,
    )
    # A kept-back branch can also meet its own copies: the relay pushes its row once the
    # 1 s grace is over (twice over, here) while its worker may start it in place first
    # (the pushed start is then invalid_transition) or find it started (its own start is a
    # duplicate). So the start_step drops are at least one per start job, of two kinds.
    assert 0 <= jobs["n"] <= len(run_ids)
    assert by_kind.pop(("duplicate", "start_run")) == 20
    assert by_kind.pop(("duplicate", "start_step"), 0) >= jobs["n"]
    assert set(by_kind) <= {("invalid_transition", "start_step")}, by_kind
    assert_verified(db_url)


@pytest.fixture
def own_postgres() -> Iterator[tuple[str, str]]:
    """A Postgres server this test may stop and start: (data folder, URL)."""
    folder = tempfile.mkdtemp(prefix="exr-")
    try:
        url = embedded.ensure_postgres(folder)
        migrate(url)
        yield folder, url
    finally:
        embedded.stop_embedded(folder)
        shutil.rmtree(folder, ignore_errors=True)


def test_workers_reconnect_after_postgres_restarts(
    own_postgres: tuple[str, str],
    workers: Workers,
    redis: redis_lib.Redis,
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    folder, url = own_postgres
    procs = [workers.start(database_url=url), workers.start(database_url=url)]
    workers.wait_registered(redis, 2)
    monkeypatch.setenv("EXECUTOR_LEASE_SECONDS", "2")
    monkeypatch.setenv("EXECUTOR_HEARTBEAT_INTERVAL", "0.3")
    with Client(url, redis_url) as client:
        run_ids = [client.start_run("order", {"items": 1}) for _ in range(30)]
    wait_for(
        lambda: sum(s == "completed" for s in statuses(url, run_ids).values()) >= 3,
        timeout=30,
        what="some runs to complete",
        context=workers.output,
    )
    in_flight = [s for s in statuses(url, run_ids).values() if s != "completed"]
    embedded.stop_embedded(folder)
    assert in_flight, "every run finished before the restart; the test proved nothing"
    time.sleep(1.0)
    assert embedded.ensure_postgres(folder) == url
    done = wait_for(
        lambda: all_terminal(url, run_ids),
        timeout=90,
        what="all runs to finish after the restart",
        interval=0.2,
        context=workers.output,
    )
    assert set(done.values()) == {"completed"}, done
    assert all(p.poll() is None for p in procs)
    assert_verified(url)


def test_a_step_over_its_timeout_is_stopped_even_if_it_swallows_exceptions(
    workers: Workers, client: Client, redis: redis_lib.Redis, db_url: str
) -> None:
    workers.start(EXECUTOR_STEP_TIMEOUT_GRACE_SECONDS="0.5")
    workers.wait_registered(redis, 1)
    run_id = client.start_run("t_timed", None)
    view = client.wait(run_id, timeout=30)
    assert view.status == "failed"
    (overrun,) = view.steps
    assert overrun.error["type"] == "StepTimeout", overrun.error


@pytest.mark.parametrize("via", ["rq", "executor"])
def test_the_forking_worker_runs_the_same_work(
    via: str, workers: Workers, client: Client, redis: redis_lib.Redis, db_url: str
) -> None:
    workers.start(
        via=via,
        worker_class="executor.transport.worker.ExecutorForkingWorker",
        EXECUTOR_WORKER_CLASS="fork",
    )
    workers.wait_registered(redis, 1)
    run_ids = [client.start_run("order", {"items": 1, "flake": 0.1}) for _ in range(5)]
    for run_id in run_ids:
        view = client.wait(run_id, timeout=60)
        assert view.status == "completed", [(s.step_key, s.attempt, s.error) for s in view.steps]
    assert_verified(db_url)
