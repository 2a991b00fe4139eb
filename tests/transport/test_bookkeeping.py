"""RQ's success bookkeeping for a plain job in one round trip (`executor.transport.bookkeeping`).

The tripwire for an RQ upgrade: the same job run by a worker with RQ's own
`handle_job_success` and by one with ours leaves the same keys, of the same types, with the
same members and fields, in real Redis.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import redis as redis_lib
from redis.connection import AbstractConnection
from rq import Queue, SimpleWorker
from rq.exceptions import StopRequested
from rq.job import Job, JobStatus
from rq.suspension import suspend
from rq.utils import now
from rq.worker import WorkerStatus
from support.waiting import wait_for

from executor.transport import bookkeeping
from executor.transport import worker as worker_module
from executor.transport.serializer import JSONCommandSerializer
from executor.transport.worker import ExecutorWorker, _ExecutorWorkerMixin

# Times, and the fields that say which process it was: they differ between any two runs.
VOLATILE = {
    b"birth",
    b"last_heartbeat",
    b"death",
    b"created_at",
    b"enqueued_at",
    b"started_at",
    b"ended_at",
    b"total_working_time",
    b"pid",
    b"hostname",
    b"ip_address",
    b"current_job_working_time",
}


class Lean(_ExecutorWorkerMixin, SimpleWorker):
    """The executor worker's bookkeeping on a job of RQ's own: no runtime to start, no
    screening (neither is what is compared), success handling counted in writes."""

    writes: list[int] = []

    def bootstrap(self, *args: Any, **kwargs: Any) -> None:
        SimpleWorker.bootstrap(self, *args, **kwargs)

    def execute_job(self, job: Job, queue: Queue) -> None:
        SimpleWorker.execute_job(self, job, queue)

    def handle_job_success(self, *args: Any, **kwargs: Any) -> None:
        before = _Writes.count
        super().handle_job_success(*args, **kwargs)
        Lean.writes.append(_Writes.count - before)


class _Writes:
    count = 0


@pytest.fixture(autouse=True)
def _count_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    original = AbstractConnection.send_packed_command

    def counted(self: AbstractConnection, *args: Any, **kwargs: Any) -> None:
        _Writes.count += 1
        original(self, *args, **kwargs)

    monkeypatch.setattr(AbstractConnection, "send_packed_command", counted)


def run_one_job(redis: redis_lib.Redis, worker_class: type[SimpleWorker]) -> int:
    """Socket writes the whole life of the worker took, one job included."""
    before = _Writes.count
    queue = Queue("q", connection=redis, serializer=JSONCommandSerializer)
    queue.enqueue("time.sleep", 0, job_id="j", result_ttl=0)
    worker = worker_class([queue], connection=redis, name="w", serializer=JSONCommandSerializer)
    assert worker.work(burst=True)
    assert redis.hget(worker.key, "successful_job_count") == b"1"
    return _Writes.count - before


def keyspace(redis: redis_lib.Redis) -> dict[bytes, Any]:
    """Every key with its type and what can be compared between runs."""
    seen: dict[bytes, Any] = {}
    for key in sorted(redis.scan_iter()):
        kind = redis.type(key)
        if kind == b"hash":
            fields = redis.hgetall(key)
            value: Any = {k: (None if k in VOLATILE else v) for k, v in fields.items()}
        elif kind == b"zset":
            value = sorted(redis.zrange(key, 0, -1))
        elif kind == b"set":
            value = sorted(redis.smembers(key))
        elif kind == b"list":
            value = redis.lrange(key, 0, -1)
        else:
            value = None if key.startswith(b"rq:") else redis.get(key)
        seen[key] = (kind, value)
    return seen


def test_a_plain_job_leaves_the_keys_rq_leaves_and_costs_one_round_trip(
    redis: redis_lib.Redis,
) -> None:
    stock = run_one_job(redis, SimpleWorker)
    theirs = keyspace(redis)
    redis.flushdb()
    Lean.writes.clear()
    lean = run_one_job(redis, Lean)
    ours = keyspace(redis)
    assert ours == theirs
    assert not any(b":job:j" in key for key in ours)  # the job is gone, as result_ttl=0 says
    assert Lean.writes == [1]
    assert lean <= stock - 5, (lean, stock)


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({}, True),
        ({"result_ttl": 60}, False),
        ({"result_ttl": -1}, False),
        ({"repeat": None}, True),
    ],
)
def test_only_a_job_whose_result_is_discarded_at_once_is_plain(
    redis: redis_lib.Redis, options: dict[str, Any], expected: bool
) -> None:
    queue = Queue("q", connection=redis, serializer=JSONCommandSerializer)
    job = queue.enqueue("time.sleep", 0, **{"result_ttl": 0, **options})
    assert bookkeeping.plain(job, default_result_ttl=0) is expected


@pytest.mark.parametrize("result_ttl", [0, 60])
def test_our_worker_takes_the_short_path_only_for_a_plain_job(
    redis: redis_lib.Redis, result_ttl: int
) -> None:
    """Through the executor worker's override, with the execution RQ's loop would make."""
    queue = Queue("q", connection=redis, serializer=JSONCommandSerializer)
    job = queue.enqueue("time.sleep", 0, job_id="j", result_ttl=result_ttl)
    worker = ExecutorWorker([queue], connection=redis, name="w")
    execution = worker.prepare_execution(job)
    worker.prepare_job_execution(job, remove_from_intermediate_queue=True)
    job.started_at = job.ended_at = now()
    before = _Writes.count
    worker.handle_job_success(
        job=job, queue=queue, started_job_registry=queue.started_job_registry, execution=execution
    )
    writes = _Writes.count - before
    assert queue.started_job_registry.get_job_ids() == []
    assert int(redis.hget(worker.key, "successful_job_count") or 0) == 1
    if result_ttl == 0:
        assert writes == 1
        assert not redis.exists(job.key)
    else:  # RQ's own path: the job is kept, finished, for its result
        assert writes > 1
        assert Job.fetch("j", connection=redis, serializer=JSONCommandSerializer).get_status() == (
            JobStatus.FINISHED
        )
        assert 0 < redis.ttl(job.key) <= 60


def test_a_worker_does_not_write_the_state_it_last_wrote(redis: redis_lib.Redis) -> None:
    worker = ExecutorWorker([Queue("q", connection=redis)], connection=redis, name="w")
    before = _Writes.count
    worker.set_state(WorkerStatus.IDLE)
    worker.set_state(WorkerStatus.IDLE)  # what a simple worker does after a job and at dequeue
    assert _Writes.count - before == 1
    assert redis.hget(worker.key, "state") == b"idle"
    with redis.pipeline() as pipe:  # a write in a pipeline may never be sent: it always goes
        worker.set_state(WorkerStatus.BUSY, pipeline=pipe)
        pipe.execute()
    assert redis.hget(worker.key, "state") == b"busy"
    before = _Writes.count
    worker.set_state(WorkerStatus.IDLE)
    worker.set_state(WorkerStatus.BUSY)
    worker.set_state(WorkerStatus.BUSY)
    assert _Writes.count - before == 2
    assert redis.hget(worker.key, "state") == b"busy"
    assert worker.get_state() == WorkerStatus.BUSY


def test_a_worker_asks_whether_it_is_suspended_at_most_once_a_second(
    redis: redis_lib.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = [1000.0]
    monkeypatch.setattr(worker_module.time, "monotonic", lambda: clock[0])
    worker = ExecutorWorker([Queue("q", connection=redis)], connection=redis, name="w")
    before = _Writes.count
    worker.check_for_suspension(burst=True)
    worker.check_for_suspension(burst=True)  # the next job, a moment later
    assert _Writes.count - before == 1
    suspend(redis)
    worker.check_for_suspension(burst=True)  # not asked yet: within the second
    clock[0] += worker_module.SUSPENSION_ASKED_EVERY
    with pytest.raises(StopRequested):  # RQ's answer to a suspended burst worker
        worker.check_for_suspension(burst=True)


def test_a_worker_stops_its_listener_at_once_after_it_saw_the_unsubscribe(
    redis: redis_lib.Redis,
) -> None:
    """The interleaving that held SIGTERMed workers for a minute, forced: the listener reads
    the unsubscribe reply before stop() runs, then waits for a subscription."""
    worker = ExecutorWorker([Queue("q", connection=redis)], connection=redis, name="w")
    worker.subscribe()
    assert worker.pubsub is not None
    assert worker.pubsub_thread is not None
    wait_for(lambda: worker.pubsub.subscribed, timeout=10, what="the subscription")
    worker.pubsub.unsubscribe()
    wait_for(lambda: not worker.pubsub.subscribed, timeout=10, what="the listener to read it")
    started = time.monotonic()
    worker.unsubscribe()
    assert time.monotonic() - started < 5  # RQ's own listener: 60 s
    assert not worker.pubsub_thread.is_alive()
