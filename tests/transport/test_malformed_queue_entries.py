"""I2/I8 for queue entries RQ cannot turn into a job: each is recorded as invalid_payload,
removed from Redis, and the worker keeps running; a worker whose loop does die exits non-zero.

Entries are written straight into Redis, as a buggy producer with Redis access could. With
one queue RQ dequeues by BLMOVE into an intermediate queue, with several by BLPOP; both
paths are exercised, with real `executor worker` processes.
"""

from __future__ import annotations

import os
import signal
import uuid
from typing import Any

import psycopg
import pytest
import redis as redis_lib
from psycopg.rows import dict_row
from rq.queue import Queue
from rq.worker import BaseWorker
from support.waiting import wait_for

from executor.client import Client
from executor.ledger.handler import Ledger, Pool
from executor.transport import worker as worker_module
from executor.transport.dispatch import DELIVER
from executor.transport.entries import MalformedEntry, ScreeningQueue, job_key, printable
from executor.transport.worker import ExecutorWorker

from .conftest import Workers, assert_verified
from .test_malformed_jobs import inject, invalid_drops, job_data

QUEUE = "default"
QUEUE_KEY = f"rq:queue:{QUEUE}"
INTERMEDIATE_KEY = f"{QUEUE_KEY}:intermediate"

# A command that would create a run if anything ever ran it.
MUST_NOT_RUN = job_data(
    DELIVER, [{"type": "start_run", "run_id": "must-not-run", "workflow": "noop", "steps": []}]
)


def job_fields(**overrides: bytes | str) -> dict[str | bytes, bytes | str]:
    fields: dict[str | bytes, bytes | str] = {
        "data": MUST_NOT_RUN,
        "origin": QUEUE,
        "status": "queued",
        "created_at": "2026-01-01T00:00:00.000000Z",
        "enqueued_at": "2026-01-01T00:00:00.000000Z",
        "description": "injected",
        "timeout": "30",
    }
    fields.update(overrides)
    return fields


def entries() -> dict[str, tuple[bytes, dict[str | bytes, bytes | str], str]]:
    """name -> (raw job id, job hash, what the recorded detail must say)."""
    tag = uuid.uuid4().hex[:8].encode()
    no_data = job_fields()
    del no_data["data"]
    return {
        "not_utf8_id": (b"evil-\xff\xfe-" + tag, job_fields(), "the job id is not valid UTF-8"),
        "nul_in_id": (b"evil-\x00-" + tag, job_fields(), "RQ refuses the job id"),
        "hash_without_data": (b"evil-nodata-" + tag, no_data, "the job hash has no `data` field"),
    }


def push(redis: redis_lib.Redis, raw_id: bytes, fields: dict[str | bytes, bytes | str]) -> None:
    redis.hset(job_key(raw_id), mapping=fields)  # type: ignore[arg-type]
    redis.sadd("rq:queues", QUEUE_KEY)
    redis.rpush(QUEUE_KEY, raw_id)


def in_redis(redis: redis_lib.Redis, raw_id: bytes) -> list[str]:
    """Where the entry still is; empty once it is gone."""
    found = []
    if redis.exists(job_key(raw_id)):
        found.append("job hash")
    for key in (QUEUE_KEY, INTERMEDIATE_KEY):
        if raw_id in redis.lrange(key, 0, -1):
            found.append(key)
    return found


def runs(database_url: str) -> list[dict[str, Any]]:
    with psycopg.connect(database_url, row_factory=dict_row) as conn:
        return conn.execute("SELECT run_id, status FROM executor.runs ORDER BY run_id").fetchall()


def assert_recorded(drop: dict[str, Any], raw_id: bytes, expected: str) -> None:
    shown = printable(raw_id)
    assert shown.isprintable(), shown
    assert drop["detail"].startswith(f"job {shown} on queue {QUEUE}: "), drop["detail"]
    assert expected in drop["detail"], drop["detail"]
    # The raw record shows the id and the hash, with NUL and non-UTF-8 bytes escaped.
    assert repr(raw_id)[2:-1] in drop["raw"], drop["raw"]
    assert "injected" in drop["raw"], drop["raw"]
    assert drop["run_id"] is None


@pytest.mark.slow
@pytest.mark.parametrize("queues", [(), (QUEUE,)], ids=["all queues (BLPOP)", "one queue (BLMOVE)"])
def test_each_malformed_entry_is_recorded_and_the_worker_keeps_going(
    workers: Workers,
    client: Client,
    redis: redis_lib.Redis,
    db_url: str,
    queues: tuple[str, ...],
) -> None:
    worker = workers.start(via="executor", args=queues)
    workers.wait_registered(redis, 1)
    kinds = entries()
    for raw_id, fields, _ in kinds.values():
        push(redis, raw_id, fields)

    drops = wait_for(
        lambda: (d := invalid_drops(db_url)) and len(d) >= len(kinds) and d,
        timeout=30,
        what="every malformed entry to be recorded",
        context=lambda: f"{invalid_drops(db_url)}\n{workers.output()}",
    )
    assert len(drops) == len(kinds), drops
    for name, (raw_id, _, expected) in kinds.items():
        mine = [d for d in drops if d["detail"].startswith(f"job {printable(raw_id)} ")]
        assert len(mine) == 1, (name, drops)
        assert_recorded(mine[0], raw_id, expected)
        assert in_redis(redis, raw_id) == [], name

    # Still alive, and the next job runs.
    run_id = client.start_run("noop", None)
    assert client.wait(run_id, timeout=30).status == "completed", workers.output()
    assert worker.poll() is None, workers.output()
    assert runs(db_url) == [{"run_id": run_id, "status": "completed"}]
    assert "rejected job" in workers.output()
    assert "unhandled exception" not in workers.output()
    assert_verified(db_url)


@pytest.mark.slow
def test_an_undecodable_id_left_in_an_intermediate_queue_is_recorded(
    workers: Workers, client: Client, redis: redis_lib.Redis, db_url: str
) -> None:
    """Left by a worker that died between BLMOVE and screening (or by RQ crashing on it):
    RQ's maintenance decodes every id there and would die on it at each start."""
    raw_id, fields, _ = entries()["not_utf8_id"]
    redis.hset(job_key(raw_id), mapping=fields)  # type: ignore[arg-type]
    redis.sadd("rq:queues", QUEUE_KEY)
    redis.rpush(INTERMEDIATE_KEY, raw_id)

    worker = workers.start(via="executor", args=(QUEUE,))
    drops = wait_for(lambda: invalid_drops(db_url), timeout=30, what="the record")
    assert len(drops) == 1
    assert_recorded(drops[0], raw_id, "the job id is not valid UTF-8")
    assert in_redis(redis, raw_id) == []
    run_id = client.start_run("noop", None)
    assert client.wait(run_id, timeout=30).status == "completed", workers.output()
    assert worker.poll() is None, workers.output()


class LedgerDownOnce:
    """Stands in for the runtime: the first record fails as with Postgres down, then the
    real ledger records."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = self
        self.real = ledger
        self.calls = 0

    def record_invalid(self, raw: str, detail: str, *, command_type: str | None = None) -> Any:
        self.calls += 1
        if self.calls == 1:
            raise psycopg.OperationalError("connection refused (test)")
        return self.real.record_invalid(raw, detail, command_type=command_type)


def test_an_entry_is_requeued_not_lost_while_the_ledger_is_unreachable(
    redis: redis_lib.Redis, pool: Pool, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deleting an entry whose record failed would lose the only evidence of it."""
    raw_id, fields, expected = entries()["nul_in_id"]
    push(redis, raw_id, fields)
    good = inject(redis, MUST_NOT_RUN)
    runtime = LedgerDownOnce(Ledger(pool))
    monkeypatch.setattr(worker_module, "get_runtime", lambda: runtime)
    worker = ExecutorWorker([QUEUE], connection=redis)

    dequeued = worker.dequeue_job_and_maintain_ttl(1)
    assert dequeued is not None
    assert dequeued[0].id == good
    assert runtime.calls == 1
    assert invalid_drops(db_url) == []
    assert in_redis(redis, raw_id) == ["job hash", QUEUE_KEY]

    assert worker.dequeue_job_and_maintain_ttl(1, max_idle_time=1) is None
    assert runtime.calls == 2
    (drop,) = invalid_drops(db_url)
    assert_recorded(drop, raw_id, expected)
    assert in_redis(redis, raw_id) == []


def test_plain_rq_fails_or_skips_these_entries(redis: redis_lib.Redis) -> None:
    """The premise, pinned to the RQ in use: if this fails, RQ changed and `entries` may be
    revisited."""
    kinds = entries()
    plain = Queue(QUEUE, connection=redis)
    push(redis, *kinds["not_utf8_id"][:2])
    with pytest.raises(UnicodeDecodeError):
        Queue.dequeue_any([plain], None, redis)
    push(redis, *kinds["nul_in_id"][:2])
    with pytest.raises(ValueError, match="Job ID must only contain"):
        Queue.dequeue_any([plain], None, redis)
    raw_id, fields, _ = kinds["hash_without_data"]
    push(redis, raw_id, fields)
    assert Queue.dequeue_any([plain], None, redis) is None  # skipped silently...
    assert "job hash" in in_redis(redis, raw_id)  # ...and left behind


def test_the_screening_queue_raises_malformed_entry_with_the_raw_id(
    redis: redis_lib.Redis,
) -> None:
    queue = ScreeningQueue(QUEUE, connection=redis)
    for name, (raw_id, fields, expected) in entries().items():
        push(redis, raw_id, fields)
        with pytest.raises(MalformedEntry) as caught:
            ScreeningQueue.dequeue_any([queue], None, redis)
        assert caught.value.raw_id == raw_id, name
        assert caught.value.queue_key == QUEUE_KEY, name
        assert expected in caught.value.detail, name
    good = inject(redis, MUST_NOT_RUN)
    dequeued = ScreeningQueue.dequeue_any([queue], None, redis)
    assert dequeued is not None
    assert dequeued[0].id == good


@pytest.mark.slow
def test_a_worker_whose_loop_dies_exits_non_zero(
    workers: Workers, redis: redis_lib.Redis, db_url: str
) -> None:
    """RQ logs an unhandled exception in its loop and returns normally (exit 0), so a
    supervisor restarting failed workers would leave it dead; ours raises WorkerDied."""
    worker = workers.start(via="rq", worker_class="faulty_worker.BuggyRejectWorker")
    workers.wait_registered(redis, 1)
    inject(redis, b"not json")  # rejected by screening, where the planted bug fires
    assert worker.wait(timeout=30) != 0, workers.output()
    output = workers.output()
    assert "found an unhandled exception" in output
    assert "its work loop died of PlantedBug" in output


@pytest.mark.slow
def test_a_worker_stopped_or_drained_exits_zero(
    workers: Workers, redis: redis_lib.Redis, db_url: str
) -> None:
    """The guard that makes a dying loop fail must not fail a clean stop."""
    idle = workers.start(via="executor")
    workers.wait_registered(redis, 1)
    # Idle is set in the loop, after RQ installed its signal handlers.
    wait_for(
        lambda: [w for w in BaseWorker.all(connection=redis) if w.get_state() == "idle"],
        timeout=30,
        what="the worker to be idle in its loop",
    )
    os.kill(idle.pid, signal.SIGTERM)
    assert idle.wait(timeout=30) == 0, workers.output()

    raw_id, fields, _ = entries()["not_utf8_id"]
    push(redis, raw_id, fields)
    burst = workers.start(via="executor", args=("--burst",))
    assert burst.wait(timeout=60) == 0, workers.output()
    assert len(invalid_drops(db_url)) == 1
    assert in_redis(redis, raw_id) == []


@pytest.mark.slow
def test_executor_worker_exits_non_zero_when_redis_breaks_its_loop(
    workers: Workers, client: Client, redis: redis_lib.Redis, db_url: str
) -> None:
    """A registry key of the wrong type makes RQ's bookkeeping fail outside any job."""
    worker = workers.start(via="executor")
    workers.wait_registered(redis, 1)
    redis.set("rq:wip:default", "not a sorted set")
    client.start_run("noop", None)
    assert worker.wait(timeout=30) != 0, workers.output()
    assert "its work loop died of ResponseError" in workers.output()
