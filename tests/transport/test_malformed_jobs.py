"""I8: a malformed job is rejected with a clear, recorded reason; the worker keeps running and
no run or step changes.

Jobs are written straight into Redis the way an attacker or a buggy producer with Redis
access could: a job hash plus its id on the queue list.
"""

from __future__ import annotations

import builtins
import json
import pickle
import time
import uuid
import zlib
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis as redis_lib
from psycopg.rows import dict_row
from rq.job import Job
from support.waiting import wait_for

from executor.client import Client
from executor.transport.dispatch import DELIVER
from executor.transport.worker import Rejection, screen_job

from .conftest import Workers, assert_verified


class OpensAFile:
    """Unpickling this creates the file: the proof that nothing was unpickled is its absence."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (builtins.open, (str(self.path), "w"))


def job_data(func: str, args: list[Any], kwargs: dict[str, Any] | None = None) -> bytes:
    return json.dumps([func, None, args, kwargs or {}]).encode()


def malformed(canary: Path) -> dict[str, tuple[bytes, str]]:
    """name → (job data as stored in Redis, what the recorded reason must say)."""
    start = {"type": "start_step", "run_id": "r1", "step_key": "a", "attempt": 1}
    return {
        "bad_json": (b'["executor.transport.jobs.deliver", null, [{"type": ', "not valid JSON"),
        "not_utf8": (b"\xff\xfe\x00garbage", "not UTF-8"),
        "schema": (job_data(DELIVER, [{**start, "attempt": "one"}]), "attempt"),
        "extra_field": (job_data(DELIVER, [{**start, "sudo": True}]), "Extra inputs"),
        "unknown_type": (
            job_data(DELIVER, [{**start, "type": "drop_tables"}]),
            "unknown command type",
        ),
        "foreign_function": (
            job_data("os.system", [f"touch {canary}"]),
            "'os.system', which is not on the allow-list",
        ),
        "three_arguments": (
            job_data(DELIVER, [start, [], []]),
            "takes the command and, optionally, a chain of starts",
        ),
        "chain_not_a_list": (job_data(DELIVER, [start, start]), "a chain must be a list"),
        "chain_of_another_run": (
            job_data(DELIVER, [start, [{**start, "run_id": "r2"}]]),
            "start_step commands of the job's own run only",
        ),
        "chain_after_no_start": (
            job_data(
                DELIVER, [{"type": "cancel_run", "run_id": "r1", "idempotency_key": "k"}, [start]]
            ),
            "only a start_step job may bring a chain",
        ),
        "chain_bad_start": (job_data(DELIVER, [start, [{**start, "attempt": "one"}]]), "attempt"),
        "pickle_compressed": (
            zlib.compress(pickle.dumps(OpensAFile(canary), protocol=5)),
            "pickled payload (pickle protocol 5)",
        ),
        "pickle_protocol_0": (pickle.dumps(OpensAFile(canary), protocol=0), "pickled payload"),
    }


def inject(redis: redis_lib.Redis, data: bytes, *, queue: str = "default", **fields: str) -> str:
    job_id = f"evil-{uuid.uuid4().hex[:12]}"
    mapping: dict[str | bytes, bytes | float | int | str] = {
        "data": data,
        "origin": queue,
        "status": "queued",
        "created_at": "2026-01-01T00:00:00.000000Z",
        "enqueued_at": "2026-01-01T00:00:00.000000Z",
        "description": "injected",
        "timeout": "30",
    }
    mapping.update(fields)
    redis.hset(Job.key_for(job_id), mapping=mapping)
    redis.sadd("rq:queues", f"rq:queue:{queue}")
    redis.rpush(f"rq:queue:{queue}", job_id)
    return job_id


def ledger_counts(database_url: str) -> dict[str, Any]:
    with psycopg.connect(database_url, row_factory=dict_row) as conn:
        return {
            "runs": conn.execute(
                "SELECT run_id, status, last_seq, updated_at FROM executor.runs ORDER BY run_id"
            ).fetchall(),
            "steps": conn.execute(
                "SELECT run_id, step_key, status, attempt, updated_at FROM executor.steps"
                " ORDER BY run_id, step_key"
            ).fetchall(),
            "events": conn.execute("SELECT count(*) AS n FROM executor.events").fetchone(),
            "receipts": conn.execute("SELECT count(*) AS n FROM executor.receipts").fetchone(),
        }


def invalid_drops(database_url: str) -> list[dict[str, Any]]:
    with psycopg.connect(database_url, row_factory=dict_row) as conn:
        return conn.execute(
            "SELECT reason, detail, raw, run_id FROM executor.drops"
            " WHERE reason = 'invalid_payload' ORDER BY drop_id"
        ).fetchall()


# --- screening, in process -------------------------------------------------------------------


def test_screen_rejects_each_kind_without_running_anything(
    redis: redis_lib.Redis, tmp_path: Path
) -> None:
    canary = tmp_path / "pwned"
    for name, (data, expected) in malformed(canary).items():
        job = Job.fetch(inject(redis, data), connection=redis)
        rejection = screen_job(job)
        assert isinstance(rejection, Rejection), name
        assert expected in rejection.detail, (name, rejection.detail)
    assert not canary.exists()


def test_screen_passes_a_good_job(redis: redis_lib.Redis) -> None:
    command = {"type": "start_run", "run_id": "r1", "workflow": "order", "steps": []}
    job = Job.fetch(inject(redis, job_data(DELIVER, [command])), connection=redis)
    assert screen_job(job) is None


# --- a real worker ---------------------------------------------------------------------------


@pytest.mark.slow
def test_malformed_jobs_are_recorded_and_the_worker_keeps_going(
    workers: Workers, client: Client, redis: redis_lib.Redis, db_url: str, tmp_path: Path
) -> None:
    canary = tmp_path / "pwned"
    worker = workers.start()
    workers.wait_registered(redis, 1)
    before = client.start_run("noop", None)
    assert client.wait(before, timeout=30).status == "completed"
    snapshot = ledger_counts(db_url)

    kinds = malformed(canary)
    ids = {name: inject(redis, data) for name, (data, _) in kinds.items()}
    # RQ itself cannot load this hash (its status is not an RQ status).
    ids["unloadable_hash"] = inject(redis, job_data(DELIVER, [{}]), status="pwned")
    expected = {name: reason for name, (_, reason) in kinds.items()}
    expected["unloadable_hash"] = "RQ cannot load the job hash"

    drops = wait_for(
        lambda: (d := invalid_drops(db_url)) and len(d) >= len(ids) and d,
        timeout=30,
        what="every malformed job to be recorded",
        context=lambda: f"{invalid_drops(db_url)}\n{workers.output()}",
    )
    assert len(drops) == len(ids)
    for name, job_id in ids.items():
        mine = [d for d in drops if f"job {job_id} " in d["detail"]]
        assert len(mine) == 1, (name, drops)
        assert expected[name] in mine[0]["detail"], (name, mine[0]["detail"])
        assert mine[0]["run_id"] is None
        assert not redis.exists(Job.key_for(job_id)), name
    assert not canary.exists(), "a payload was unpickled or a foreign function ran"
    assert ledger_counts(db_url) == snapshot

    # Still alive and still working.
    time.sleep(0.5)
    assert worker.poll() is None, workers.output()
    after = client.start_run("noop", None)
    assert client.wait(after, timeout=30).status == "completed"
    assert worker.poll() is None
    assert "rejected job" in workers.output()
    assert_verified(db_url)


@pytest.mark.slow
def test_a_bad_command_reaching_deliver_is_recorded_not_retried(
    workers: Workers, client: Client, redis: redis_lib.Redis, db_url: str
) -> None:
    """Any RQ worker with our serializer running `deliver` (not only ours) stays safe."""
    workers.start(worker_class="rq.worker.SimpleWorker")
    workers.wait_registered(redis, 1)
    job_id = inject(redis, job_data(DELIVER, [{"type": "start_step", "run_id": "r1"}]))
    drops = wait_for(lambda: invalid_drops(db_url), timeout=30, what="the drop")
    assert "step_key" in drops[0]["detail"]
    job = Job.fetch(job_id, connection=redis)
    wait_for(lambda: job.get_status() == "finished", timeout=10, what="the job to finish")
    assert ledger_counts(db_url)["runs"] == []
