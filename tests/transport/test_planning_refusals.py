"""Deliveries a worker refuses before the handler decides them still leave a record (I2),
and refusals a later state can lift keep their key: a run of a workflow no worker knows yet,
and commands submitted through `Client.submit` while Redis loses them."""

from __future__ import annotations

import json

import psycopg
import pytest
import redis as redis_lib
from support.waiting import wait_for

from executor.cli.main import main
from executor.client import Client
from executor.commands.models import CancelRun, PauseRun, ResumeRun, wire
from executor.errors import ConcurrencyKeyTaken

from .conftest import FAST, Workers, assert_verified, rows

pytestmark = pytest.mark.slow


def status(db_url: str, run_id: str, step_key: str | None = None) -> str | None:
    if step_key is None:
        found = rows(db_url, "SELECT status FROM executor.runs WHERE run_id = %s", run_id)
    else:
        found = rows(
            db_url,
            "SELECT status FROM executor.steps WHERE run_id = %s AND step_key = %s",
            run_id,
            step_key,
        )
    return found[0]["status"] if found else None


def test_a_run_of_a_workflow_no_worker_knows_waits_pending_and_starts_once_one_does(
    workers: Workers, client: Client, redis: redis_lib.Redis, db_url: str
) -> None:
    ignorant = workers.start()
    workers.wait_registered(redis, 1)
    run_id = client.start_run("t_late", {"who": "ann"})
    key = f"start_run:{run_id}"
    drops = wait_for(
        lambda: rows(
            db_url,
            "SELECT reason, command_type, detail FROM executor.drops WHERE idempotency_key = %s",
            key,
        ),
        timeout=30,
        what="the refused start_run to be recorded",
        context=workers.output,
    )
    assert (drops[0]["reason"], drops[0]["command_type"]) == ("unknown_entity", "start_run")
    assert "no workflow 't_late'" in drops[0]["detail"]
    assert status(db_url, run_id) == "pending"
    # Not burned: no receipt, and the outbox row stays for the relay to deliver again.
    assert rows(db_url, "SELECT 1 FROM executor.receipts WHERE idempotency_key = %s", key) == []
    assert rows(db_url, "SELECT 1 FROM executor.outbox WHERE idempotency_key = %s", key) != []
    assert_verified(db_url)

    ignorant.kill()
    ignorant.wait(timeout=10)
    with psycopg.connect(db_url) as conn:  # no waiting out the relay's backoff
        conn.execute("UPDATE executor.outbox SET push_after = now()")
    modules = f"{FAST['EXECUTOR_WORKFLOW_MODULES']},late_workflows"
    workers.start(EXECUTOR_WORKFLOW_MODULES=modules)
    view = client.wait(run_id, timeout=30)
    assert view.status == "completed", workers.output()
    assert view.output == {"hello": "hello ann"}
    receipts = rows(db_url, "SELECT outcome FROM executor.receipts WHERE idempotency_key = %s", key)
    assert receipts == [{"outcome": "applied"}]
    assert_verified(db_url)


@pytest.mark.parametrize("via", ["client", "cli"])
def test_submitted_resume_and_cancel_survive_a_flushed_redis(
    workers: Workers,
    client: Client,
    redis: redis_lib.Redis,
    db_url: str,
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
    via: str,
) -> None:
    """`Client.submit` and `executor submit --command` commit the command to the outbox
    before pushing it: with no worker alive and the test's Redis db flushed, the relay of
    the next worker still delivers it. The CLI variant sends the event with `executor send`."""
    monkeypatch.setenv("EXECUTOR_DATABASE_URL", db_url)
    monkeypatch.setenv("EXECUTOR_REDIS_URL", redis_url)
    first = workers.start()
    workers.wait_registered(redis, 1)
    held, doomed = client.start_run("t_gate"), client.start_run("t_gate")
    for run_id in (held, doomed):
        wait_for(
            lambda run_id=run_id: status(db_url, run_id, "gate") == "waiting",
            timeout=30,
            what=f"run {run_id} to wait at its gate",
            context=workers.output,
        )
    assert client.apply(PauseRun(run_id=held, idempotency_key="pause-1")).applied
    first.kill()
    first.wait(timeout=10)

    resume = ResumeRun(run_id=held, idempotency_key="resume-1")
    cancel = CancelRun(run_id=doomed, reason="no longer needed", idempotency_key="cancel-1")
    for command in (resume, cancel):
        if via == "cli":
            assert main(["submit", "--command", json.dumps(wire(command))]) == 0
        else:
            client.submit(command)
    assert redis.keys("rq:job:*"), "the submitted jobs never reached Redis"
    redis.flushdb()
    outbox = rows(db_url, "SELECT idempotency_key FROM executor.outbox ORDER BY outbox_id")
    assert [r["idempotency_key"] for r in outbox][-2:] == ["resume-1", "cancel-1"]
    assert (status(db_url, held), status(db_url, doomed)) == ("paused", "running")

    workers.start()
    wait_for(
        lambda: (status(db_url, held), status(db_url, doomed)) == ("running", "cancelled"),
        timeout=30,
        what="the relay to deliver the resume and the cancel",
        context=workers.output,
    )
    outcomes = rows(
        db_url,
        "SELECT idempotency_key, outcome FROM executor.receipts"
        " WHERE idempotency_key IN ('resume-1', 'cancel-1') ORDER BY idempotency_key",
    )
    assert outcomes == [
        {"idempotency_key": "cancel-1", "outcome": "applied"},
        {"idempotency_key": "resume-1", "outcome": "applied"},
    ]
    assert rows(db_url, "SELECT 1 FROM executor.outbox WHERE idempotency_key LIKE '%%-1'") == []
    if via == "cli":
        sent = ["send", held, "open", "--payload", '"yes"', "--idempotency-key", "open-1"]
        assert main(sent) == 0
        assert main(sent) == 1  # the same key again: a duplicate, applied once
    else:
        assert client.send_event(held, "open", "yes", idempotency_key="open-1").applied
    assert client.wait(held, timeout=30).output == {"through": "yes"}
    assert_verified(db_url)


def test_a_launch_refused_by_a_held_key_starts_when_retried_after_the_holder_completes(
    workers: Workers, client: Client, redis: redis_lib.Redis, db_url: str
) -> None:
    workers.start()
    workers.wait_registered(redis, 1)
    holder = client.start_run("t_gate", {}, concurrency_key="acct-7", idempotency_key="holder")
    # While the key is held, every retry with the same idempotency key names the holder.
    for _ in range(2):
        with pytest.raises(ConcurrencyKeyTaken) as refused:
            client.start_run("t_gate", {}, concurrency_key="acct-7", idempotency_key="launch")
        assert refused.value.holder_run_id == holder
    assert client.send_event(holder, "open", "go", idempotency_key="open-holder").applied
    assert client.wait(holder, timeout=30).status == "completed", workers.output()
    # The key was never burned: the same call now starts the run, and again returns it.
    second = client.start_run("t_gate", {}, concurrency_key="acct-7", idempotency_key="launch")
    assert second != holder
    again = client.start_run("t_gate", {}, concurrency_key="acct-7", idempotency_key="launch")
    assert again == second
    assert client.send_event(second, "open", "go", idempotency_key="open-second").applied
    assert client.wait(second, timeout=30).status == "completed", workers.output()
    refusals = rows(
        db_url,
        "SELECT reason FROM executor.drops WHERE idempotency_key = 'launch' ORDER BY drop_id",
    )
    assert [r["reason"] for r in refusals] == ["key_taken", "key_taken", "duplicate"]
    assert_verified(db_url)
