"""Durable waits and dynamic shape through real worker processes: a map, a timer, an event,
a child run, and what killing every worker or flushing Redis does to them (nothing)."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
import redis as redis_lib
from psycopg.rows import dict_row

from executor.client import Client

from .conftest import Workers, assert_verified, wait_for

pytestmark = pytest.mark.slow


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
    view = client.wait(run_id, timeout=30)
    assert view.status == "completed", workers.output()
    assert view.output == {"welcome": {"accounts": 0, "invoice": {"bill": {"billed": "early"}}}}
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
