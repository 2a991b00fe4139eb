"""RQ's unique enqueue for many jobs at once (`executor.transport.enqueue`), on real Redis.

It calls RQ's own script with RQ's own arguments, so the first test compares, field by
field, a job enqueued here with the same job enqueued by `Queue.enqueue_job(unique=True)`:
an RQ release that changes what a job hash holds fails here.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
import redis as redis_lib
from redis.connection import AbstractConnection
from rq.job import Job, JobStatus
from rq.queue import Queue
from support.items import start_step_item

from executor.ledger.outcome import OutboxItem
from executor.transport import enqueue as batch
from executor.transport.dispatch import Dispatcher, job_id_for
from executor.transport.serializer import JSONCommandSerializer
from queue_config import ExecutorSettings

TIMESTAMPS = {b"created_at", b"enqueued_at"}


@pytest.fixture
def dispatcher(redis: redis_lib.Redis) -> Dispatcher:
    return Dispatcher(redis, ExecutorSettings(outbox_grace_seconds=0.5))


def item(step: str, outbox_id: int = 1) -> OutboxItem:
    return start_step_item(outbox_id, step_key=step, timeout_seconds=5.0)


def job_for(dispatcher: Dispatcher, it: OutboxItem, job_id: str | None = None) -> Any:
    return dispatcher._job(
        job_id or job_id_for(it.idempotency_key), it.command, it.queue, it.timeout_seconds
    )


def queued(redis: redis_lib.Redis, name: str = "high") -> list[str]:
    return Queue(name, connection=redis, serializer=JSONCommandSerializer).get_job_ids()


@pytest.fixture
def round_trips(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts what redis-py writes to a socket: one write per round trip."""
    count = [0]
    original = AbstractConnection.send_packed_command

    def counted(self: AbstractConnection, *args: Any, **kwargs: Any) -> None:
        count[0] += 1
        original(self, *args, **kwargs)

    monkeypatch.setattr(AbstractConnection, "send_packed_command", counted)
    return count


def test_a_job_enqueued_here_is_the_hash_rq_writes(
    redis: redis_lib.Redis, dispatcher: Dispatcher
) -> None:
    it = item("a")
    queue, theirs = job_for(dispatcher, it, "by-rq")
    queue.enqueue_job(theirs, unique=True)
    _, ours = job_for(dispatcher, it, "by-us")
    assert batch.enqueue(redis, [(queue, ours)]) == [True]

    def fields(job_id: str) -> dict[bytes, bytes]:
        raw = redis.hgetall(Job.key_for(job_id))
        return {k: v for k, v in raw.items() if k not in TIMESTAMPS}

    assert fields("by-us") == fields("by-rq")
    assert set(redis.hgetall(Job.key_for("by-us"))) == set(redis.hgetall(Job.key_for("by-rq")))
    assert redis.ttl(Job.key_for("by-us")) == redis.ttl(Job.key_for("by-rq"))
    assert queued(redis) == ["by-rq", "by-us"]
    assert queue.key.encode() in redis.smembers(Queue.redis_queues_keys)
    fetched = Job.fetch("by-us", connection=redis, serializer=JSONCommandSerializer)
    assert fetched.get_status() == JobStatus.QUEUED
    assert fetched.args == [it.command]


def test_many_jobs_go_in_one_round_trip_and_in_order(
    redis: redis_lib.Redis, dispatcher: Dispatcher, round_trips: list[int]
) -> None:
    items = [item(f"s{i:03d}", i) for i in range(300)]
    dispatcher._queue("high").get_redis_server_version()  # RQ asks it once per queue
    round_trips[0] = 0
    assert dispatcher.push_items(items) == [it.outbox_id for it in items]
    assert round_trips[0] == 1
    assert queued(redis) == [job_id_for(it.idempotency_key) for it in items]


def test_an_existing_id_is_left_alone_within_and_across_batches(
    redis: redis_lib.Redis, dispatcher: Dispatcher
) -> None:
    a, b = item("a"), item("b")
    assert batch.enqueue(redis, [job_for(dispatcher, a), job_for(dispatcher, a)]) == [True, False]
    before = redis.hgetall(Job.key_for(job_id_for(a.idempotency_key)))
    assert batch.enqueue(redis, [job_for(dispatcher, b), job_for(dispatcher, a)]) == [True, False]
    assert redis.hgetall(Job.key_for(job_id_for(a.idempotency_key))) == before
    assert queued(redis) == [job_id_for(a.idempotency_key), job_id_for(b.idempotency_key)]


def test_chunks_and_a_server_that_lost_the_script(
    redis: redis_lib.Redis, dispatcher: Dispatcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(batch, "CHUNK", 2)
    items = [item(f"s{i}", i) for i in range(5)]
    redis.script_flush()
    assert batch.enqueue(redis, [job_for(dispatcher, it) for it in items]) == [True] * 5
    redis.script_flush()
    assert batch.enqueue(redis, [job_for(dispatcher, it) for it in items]) == [False] * 5
    assert queued(redis) == [job_id_for(it.idempotency_key) for it in items]


def test_without_rqs_pieces_it_enqueues_one_at_a_time(
    redis: redis_lib.Redis, dispatcher: Dispatcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(batch, "AVAILABLE", False)
    a, b = item("a"), item("b")
    assert batch.enqueue(redis, [job_for(dispatcher, a), job_for(dispatcher, a)]) == [True, False]
    assert dispatcher.push_items([a, b]) == [a.outbox_id, b.outbox_id]
    assert queued(redis) == [job_id_for(a.idempotency_key), job_id_for(b.idempotency_key)]


def test_a_batch_replaces_only_the_jobs_that_will_never_run(
    redis: redis_lib.Redis, dispatcher: Dispatcher
) -> None:
    """Of three existing ids: a queued job stays, a failed one and a queued one on no queue
    (its worker died holding it) are replaced; a new one is enqueued. All count as pushed."""
    waiting, failed, lost, new = item("w", 1), item("f", 2), item("l", 3), item("n", 4)
    assert dispatcher.push_items([waiting, failed, lost]) == [1, 2, 3]
    failed_id, lost_id = (job_id_for(it.idempotency_key) for it in (failed, lost))
    redis.hset(Job.key_for(failed_id), "status", JobStatus.FAILED.value)
    redis.lrem(dispatcher._queue("high").key, 0, failed_id)
    redis.lrem(dispatcher._queue("high").key, 0, lost_id)
    assert dispatcher.push_items([waiting, failed, lost, new]) == [4, 1, 2, 3]
    assert sorted(queued(redis)) == sorted(
        job_id_for(it.idempotency_key) for it in (waiting, failed, lost, new)
    )
    status = Job.fetch(failed_id, connection=redis, serializer=JSONCommandSerializer).get_status()
    assert status == JobStatus.QUEUED


def test_redis_down_pushes_nothing_and_says_so(
    dispatcher: Dispatcher, caplog: pytest.LogCaptureFixture
) -> None:
    down = Dispatcher(
        redis_lib.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2),
        dispatcher.settings,
    )
    with caplog.at_level(logging.WARNING, logger="executor.dispatch"):
        assert down.push_items([item("a"), item("b", 2)]) == []
    assert "left in the outbox for the relay" in caplog.text
