"""Durable waits and dynamic shape through real worker processes: a map, a timer, an event,
a child run, and what killing every worker or flushing Redis does to them (nothing)."""

from __future__ import annotations

import os
import secrets
import signal
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
import redis as redis_lib
from psycopg.rows import dict_row
from support.waiting import wait_for
from support.web import TestClient

from executor.client import Client
from executor.commands.models import CancelRun
from executor.dashboard.app import create_app
from executor.dashboard.settings import DashboardSettings

from .conftest import Workers, assert_verified, rows

pytestmark = pytest.mark.slow


def drops(db_url: str, run_id: str, command_type: str) -> list[str]:
    found = rows(
        db_url,
        "SELECT reason FROM executor.drops WHERE run_id = %s AND command_type = %s"
        " ORDER BY drop_id",
        run_id,
        command_type,
    )
    return [r["reason"] for r in found]


def step(db_url: str, run_id: str, key: str) -> dict[str, Any]:
    with psycopg.connect(db_url, row_factory=dict_row) as conn:
        row = conn.execute(
            "SELECT status, attempt, output, child_run_id FROM executor.steps"
            " WHERE run_id = %s AND step_key = %s",
            (run_id, key),
        ).fetchone()
    return row or {}


def test_map_sleep_approval_and_child_complete_a_run(
    workers: Workers, client: Client, redis: redis_lib.Redis, db_url: str
) -> None:
    workers.start()
    workers.start()
    workers.wait_registered(redis, 2)
    run_id = client.start_run("t_onboard", {"n": 3})
    early = client.send_event(run_id, "unrelated", {"x": 1}, idempotency_key="noise")
    assert early.applied  # kept for a step that may wait for it later; nobody does
    wait_for(
        lambda: step(db_url, run_id, "approval").get("status") == "waiting",
        timeout=30,
        what="the approval step to wait",
        context=workers.output,
    )
    assert step(db_url, run_id, "cool_off")["status"] == "completed"
    sent = client.send_event(run_id, "approved", "ann", idempotency_key="approve-1")
    assert sent.applied
    assert client.send_event(run_id, "approved", "ann", idempotency_key="approve-1").reason == (
        "duplicate"
    )
    view = client.wait(run_id, timeout=30)
    assert view.status == "completed", workers.output()
    assert view.output == {"welcome": {"accounts": 3, "invoice": {"bill": {"billed": "ann"}}}}
    child = step(db_url, run_id, "invoice")["child_run_id"]
    child_view = client.get_run(child)
    assert child_view is not None
    assert child_view.parent_run_id == run_id
    late = client.send_event(run_id, "approved", "bob", idempotency_key="approve-2")
    assert late.reason == "terminal"
    assert_verified(db_url)


def test_an_event_sent_before_the_wait_is_kept_and_an_empty_map_completes(
    workers: Workers, client: Client, redis: redis_lib.Redis, db_url: str
) -> None:
    workers.start()
    workers.wait_registered(redis, 1)
    run_id = client.start_run("t_onboard", {"n": 0})
    assert client.send_event(run_id, "approved", "early", idempotency_key="a").applied
    # The same send again, before the wait too: one intent, kept once.
    assert client.send_event(run_id, "approved", "again", idempotency_key="a").reason == (
        "duplicate"
    )
    view = client.wait(run_id, timeout=30)
    assert view.status == "completed", workers.output()
    assert view.output == {"welcome": {"accounts": 0, "invoice": {"bill": {"billed": "early"}}}}
    assert client.send_event(run_id, "approved", "late", idempotency_key="b").reason == "terminal"
    assert client.send_event(run_id, "approved", "x", idempotency_key="a").reason == "duplicate"
    received = rows(
        db_url,
        "SELECT consumed_by, payload FROM executor.run_events WHERE run_id = %s",
        run_id,
    )
    assert received == [{"consumed_by": "approval", "payload": "early"}]
    assert drops(db_url, run_id, "send_event") == ["duplicate", "terminal", "duplicate"]
    assert_verified(db_url)


def test_a_failing_child_fails_its_parent_step(
    workers: Workers, client: Client, redis: redis_lib.Redis, db_url: str
) -> None:
    workers.start()
    workers.wait_registered(redis, 1)
    run_id = client.start_run("t_onboard", {"n": 1})
    client.send_event(run_id, "approved", "nobody", idempotency_key="a")
    view = client.wait(run_id, timeout=30)
    assert view.status == "failed", workers.output()
    assert step(db_url, run_id, "invoice")["status"] == "failed"
    assert_verified(db_url)


def test_a_sleeping_step_survives_every_worker_killed_and_a_flushed_redis_and_fires_once(
    workers: Workers, client: Client, redis: redis_lib.Redis, db_url: str
) -> None:
    """The timer lives in Postgres: SIGKILL every worker (the leader among them) and flush
    the test's Redis db while the step sleeps, start a new worker, and it fires, once."""
    first = [workers.start(), workers.start()]
    workers.wait_registered(redis, 2)
    run_id = client.start_run("t_nap")
    wait_for(
        lambda: step(db_url, run_id, "nap").get("status") == "sleeping",
        timeout=30,
        what="the nap to sleep",
        context=workers.output,
    )
    for proc in first:
        os.kill(proc.pid, signal.SIGKILL)
    for proc in first:
        proc.wait(timeout=10)
    redis.flushdb()  # this session's db index only: the server is shared
    assert not redis.keys("*")
    [due] = rows(
        db_url, "SELECT wake_at FROM executor.steps WHERE run_id = %s AND step_key = 'nap'", run_id
    )
    wait_for(
        lambda: rows(db_url, "SELECT now() > %s AS past", due["wake_at"])[0]["past"],
        timeout=10,
        what="the timer's time to pass with no worker alive",
    )
    assert step(db_url, run_id, "nap")["status"] == "sleeping"  # nobody fired it
    workers.start()
    view = client.wait(run_id, timeout=30)
    assert view.status == "completed", workers.output()
    assert view.output == {"woke": {"woke": 1}}
    fired = rows(
        db_url,
        "SELECT created_at - %s AS late FROM executor.events"
        " WHERE run_id = %s AND step_key = 'nap' AND type = 'step_completed'",
        due["wake_at"],
        run_id,
    )
    assert len(fired) == 1
    assert fired[0]["late"].total_seconds() > 0  # never early
    wakes = rows(
        db_url,
        "SELECT outcome FROM executor.receipts WHERE run_id = %s AND command_type = 'wake_step'",
        run_id,
    )
    assert wakes == [{"outcome": "applied"}]
    assert_verified(db_url)


def test_cancelling_a_parent_mid_flight_cancels_its_child_whose_report_is_then_terminal(
    workers: Workers, client: Client, redis: redis_lib.Redis, db_url: str
) -> None:
    workers.start()
    workers.wait_registered(redis, 1)
    run_id = client.start_run("t_parent")
    child = wait_for(
        lambda: step(db_url, run_id, "kid").get("child_run_id"),
        timeout=30,
        what="the child run to start",
        context=workers.output,
    )
    wait_for(
        lambda: step(db_url, child, "gate").get("status") == "waiting",
        timeout=30,
        what="the child to wait at its gate",
        context=workers.output,
    )
    assert client.apply(CancelRun(run_id=run_id, reason="stop", idempotency_key="c1")).applied
    child_view = client.wait(child, timeout=30)
    assert child_view.status == "cancelled", workers.output()
    assert [s.status for s in child_view.steps] == ["cancelled", "cancelled"]
    # The child's end reports to its parent, which is cancelled already: dropped as terminal.
    wait_for(
        lambda: drops(db_url, run_id, "child_finished") == ["terminal"],
        timeout=30,
        what="the parent to drop the child's late report",
        context=workers.output,
    )
    parent_view = client.get_run(run_id)
    assert parent_view is not None
    assert parent_view.status == "cancelled"
    assert {s.step_key: s.status for s in parent_view.steps} == {
        "kid": "cancelled",
        "after_kid": "cancelled",
    }
    assert drops(db_url, child, "cancel_run") == []  # the cancel applied once
    assert_verified(db_url)


def test_a_hook_url_used_twice_and_a_forged_one_while_a_real_worker_runs_the_run(
    workers: Workers, client: Client, redis: redis_lib.Redis, db_url: str, redis_url: str
) -> None:
    """A third party posts to the run's hook URL through the dashboard app: a forged token
    is a 404 that changes nothing, the real one applies once (the redelivery is a
    duplicate), and the worker process finishes the run with the payload."""
    workers.start()
    workers.wait_registered(redis, 1)
    run_id = client.start_run("t_gate", {})
    wait_for(
        lambda: step(db_url, run_id, "gate").get("status") == "waiting",
        timeout=30,
        what="the run to wait at its gate",
        context=workers.output,
    )
    base = "http://dashboard.example"
    path = client.hook_url(run_id, "open", base_url=base).removeprefix(base)
    forged = path[:-6] + ("AAAAAA" if not path.endswith("AAAAAA") else "BBBBBB")
    settings = DashboardSettings(
        database_url=db_url,
        redis_url=redis_url,
        viewer_tokens=(secrets.token_urlsafe(24),),
        operator_tokens=(secrets.token_urlsafe(24),),
    )
    with TestClient(create_app(settings, backend=client), base_url="http://127.0.0.1") as web:
        refused = web.post(forged, json={"by": "mallory"})
        assert refused.status_code == 404, refused.text
        assert step(db_url, run_id, "gate")["status"] == "waiting"
        first = web.post(path, json={"by": "acme"})
        assert (first.status_code, first.json()["outcome"]) == (200, "applied"), first.text
        again = web.post(path, json={"by": "acme"})
        assert (again.status_code, again.json()["outcome"]) == (200, "duplicate"), again.text
    view = client.wait(run_id, timeout=30)
    assert view.status == "completed", workers.output()
    assert view.output == {"through": {"by": "acme"}}
    assert drops(db_url, run_id, "send_event") == ["duplicate"]
    assert_verified(db_url)


def test_a_sleep_until_a_computed_time_then_a_wait_whose_timeout_fails_the_run(
    workers: Workers, client: Client, redis: redis_lib.Redis, db_url: str
) -> None:
    workers.start()
    workers.wait_registered(redis, 1)
    wake = datetime.now(UTC) + timedelta(seconds=1)
    run_id = client.start_run("t_deadline", {"until": wake.isoformat()})
    view = client.wait(run_id, timeout=30)
    assert view.status == "failed", workers.output()
    [slept] = rows(
        db_url,
        "SELECT (payload->>'wake_at')::timestamptz AS wake_at,"
        " (SELECT created_at FROM executor.events AS c WHERE c.run_id = e.run_id"
        "   AND c.type = 'step_completed' AND c.step_key = 'until') AS fired"
        " FROM executor.events AS e"
        " WHERE run_id = %s AND type = 'step_sleeping' AND step_key = 'until'",
        run_id,
    )
    assert slept["wake_at"] == wake  # the time the step computed from its input
    assert slept["fired"] >= slept["wake_at"]  # never early, on the database clock
    reply = step(db_url, run_id, "reply")
    assert (reply["status"], reply["attempt"]) == ("failed", 1)
    [error] = rows(
        db_url,
        "SELECT error FROM executor.steps WHERE run_id = %s AND step_key = 'reply'",
        run_id,
    )
    assert error["error"]["type"] == "WaitTimeout"
    assert_verified(db_url)
