"""The dispatcher, the serializer and the relay, against real Redis and Postgres.

fakeredis would be faster, but RQ's unique enqueue is a Lua script and fakeredis has no Lua
without an extra package; the real servers answer in well under a millisecond here.
"""

from __future__ import annotations

import pickle
import re
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
import redis as redis_lib
from psycopg_pool import ConnectionPool
from redis.backoff import NoBackoff
from redis.retry import Retry
from rq.job import Job, JobStatus
from rq.queue import Queue
from support.items import start_step_item

from executor.commands.models import CreateRun, StartRun, StartStep, StepSpec
from executor.ledger.handler import Ledger
from executor.ledger.outcome import OutboxItem
from executor.recovery.sweep import SweepReport, sweep
from executor.transport.dispatch import DELIVER, SEARCHED_QUEUE_LENGTH, Dispatcher, job_id_for
from executor.transport.serializer import JSONCommandSerializer, RefusedPayload
from executor.transport.worker import screen_job
from queue_config import ExecutorSettings

Pool = ConnectionPool[psycopg.Connection[dict[str, Any]]]


@pytest.fixture
def settings() -> ExecutorSettings:
    return ExecutorSettings(outbox_grace_seconds=0.5, step_timeout_grace_seconds=2)


def queued_ids(redis: redis_lib.Redis, name: str) -> list[str]:
    return Queue(name, connection=redis, serializer=JSONCommandSerializer).get_job_ids()


# --- job ids and the serializer ---------------------------------------------------------------


def test_job_ids_are_deterministic_valid_and_distinct() -> None:
    keys = ["start_step:r1:a:1", "start_step:r1:a:2", "x" * 300, "a b/c", "a_b_c", "é:ü"]
    ids = [job_id_for(k) for k in keys]
    assert ids == [job_id_for(k) for k in keys]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"[A-Za-z0-9_-]+", i) for i in ids)
    assert ids[0].startswith("start_step_r1_a_1-")


def test_serializer_round_trips_json() -> None:
    value: list[Any] = ["executor.transport.jobs.deliver", None, [{"type": "start_step"}], {}]
    assert JSONCommandSerializer.loads(JSONCommandSerializer.dumps(value)) == value


@pytest.mark.parametrize("protocol", [0, 1, 2, 5])
def test_serializer_refuses_pickles_by_name(protocol: int) -> None:
    data = pickle.dumps(("os.system", None, ["true"], {}), protocol=protocol)
    with pytest.raises(RefusedPayload, match="pickled payload"):
        JSONCommandSerializer.loads(data)


@pytest.mark.parametrize(
    ("data", "expected"),
    [(b"\xff\xfe{}", "not UTF-8"), (b'{"a": ', "not valid JSON"), (b"", "empty payload")],
)
def test_serializer_refuses_non_json(data: bytes, expected: str) -> None:
    with pytest.raises(RefusedPayload, match=expected):
        JSONCommandSerializer.loads(data)


# --- push ----------------------------------------------------------------------------------


def test_push_enqueues_a_json_job_naming_deliver(
    redis: redis_lib.Redis, settings: ExecutorSettings
) -> None:
    item = start_step_item()
    Dispatcher(redis, settings).push([item])
    job_id = job_id_for(item.idempotency_key)
    assert queued_ids(redis, "high") == [job_id]
    raw = Job.fetch(job_id, connection=redis, serializer=JSONCommandSerializer)
    assert raw.func_name == DELIVER
    assert raw.args == [item.command]
    assert raw.timeout == settings.queue("high").job_timeout
    assert raw.result_ttl == settings.queue("high").result_ttl
    assert JSONCommandSerializer.loads(raw.data)[0] == DELIVER


def test_pushing_twice_leaves_one_job(redis: redis_lib.Redis, settings: ExecutorSettings) -> None:
    dispatcher = Dispatcher(redis, settings)
    dispatcher.push([start_step_item()])
    dispatcher.push([start_step_item(outbox_id=2)])
    assert dispatcher.ensure_job(start_step_item().command, "high") == "present"
    assert len(queued_ids(redis, "high")) == 1


def test_a_failed_job_is_replaced_and_a_finished_one_kept(
    redis: redis_lib.Redis, settings: ExecutorSettings
) -> None:
    dispatcher = Dispatcher(redis, settings)
    first, second = start_step_item(attempt=1), start_step_item(attempt=2)
    dispatcher.push([first, second])
    queue = Queue("high", connection=redis, serializer=JSONCommandSerializer)
    for item, status in ((first, JobStatus.FAILED), (second, JobStatus.FINISHED)):
        queue.remove(job_id_for(item.idempotency_key))
        redis.hset(Job.key_for(job_id_for(item.idempotency_key)), "status", status.value)
    assert dispatcher.ensure_job(first.command, "high") == "replaced"
    assert dispatcher.ensure_job(second.command, "high") == "present"
    assert queued_ids(redis, "high") == [job_id_for(first.idempotency_key)]


def test_a_long_started_job_is_replaced_only_when_asked(
    redis: redis_lib.Redis, settings: ExecutorSettings
) -> None:
    dispatcher = Dispatcher(redis, settings)
    item = start_step_item()
    dispatcher.push([item])
    key = Job.key_for(job_id_for(item.idempotency_key))
    long_ago = (datetime.now(UTC) - timedelta(minutes=5)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    redis.hset(key, mapping={"status": "started", "started_at": long_ago})
    assert dispatcher.ensure_job(item.command, "high") == "present"
    assert dispatcher.ensure_job(item.command, "high", replace_started_after=60) == "replaced"
    assert redis.hget(key, "status") == b"queued"


def one_pushed(
    redis: redis_lib.Redis, settings: ExecutorSettings
) -> tuple[Dispatcher, OutboxItem, Queue, str]:
    """One start pushed to `high`: the dispatcher, the item, its queue and its job id."""
    dispatcher = Dispatcher(redis, settings)
    item = start_step_item()
    dispatcher.push([item])
    queue = Queue("high", connection=redis, serializer=JSONCommandSerializer)
    return dispatcher, item, queue, job_id_for(item.idempotency_key)


def test_a_queued_job_a_dead_worker_took_off_its_queue_is_replaced(
    redis: redis_lib.Redis, settings: ExecutorSettings
) -> None:
    dispatcher, item, queue, job_id = one_pushed(redis, settings)
    redis.lmove(queue.key, queue.intermediate_queue_key)  # a worker's dequeue, then SIGKILL
    assert dispatcher.ensure_job(item.command, "high") == "present"  # no re-push asked
    assert dispatcher.ensure_job(item.command, "high", replace_started_after=60) == "replaced"
    assert queued_ids(redis, "high") == [job_id]
    queue.remove(job_id)  # on no list at all, its status still queued
    assert dispatcher.ensure_job(item.command, "high", replace_started_after=60) == "replaced"
    assert queued_ids(redis, "high") == [job_id]


def test_a_re_push_searches_a_long_queue_for_its_job_only_once_it_is_short(
    redis: redis_lib.Redis, settings: ExecutorSettings
) -> None:
    """A relay pass over a backlog asks about every job in it: bounded, not O(queue)."""
    dispatcher, item, queue, job_id = one_pushed(redis, settings)
    queue.remove(job_id)
    filler = [f"filler-{i}" for i in range(SEARCHED_QUEUE_LENGTH + 1)]
    redis.rpush(queue.key, *filler)
    assert dispatcher.ensure_job(item.command, "high", replace_started_after=60) == "present"
    redis.ltrim(queue.key, 0, SEARCHED_QUEUE_LENGTH - 1)
    assert dispatcher.ensure_job(item.command, "high", replace_started_after=60) == "replaced"
    assert queued_ids(redis, "high")[-1] == job_id


def test_items_not_yet_due_stay_out_of_redis(
    redis: redis_lib.Redis, settings: ExecutorSettings
) -> None:
    later = start_step_item(not_before=datetime.now(UTC) + timedelta(minutes=1))
    Dispatcher(redis, settings).push([later])
    assert queued_ids(redis, "high") == []


def test_unknown_queue_gets_the_default_queue_settings(
    redis: redis_lib.Redis, settings: ExecutorSettings
) -> None:
    command = StartStep(run_id="r1", step_key="a", attempt=1).model_dump(mode="json")
    Dispatcher(redis, settings).ensure_job(command, "gpu")
    job = Job.fetch(job_id_for(command["idempotency_key"]), connection=redis)
    assert job.origin == "gpu"
    assert job.timeout == settings.queue("default").job_timeout


# --- with the ledger: outbox rows, step timeouts, Redis down -----------------------------------


def create_and_start(ledger: Ledger, timeout: float | None = None) -> tuple[OutboxItem, ...]:
    ledger.apply(CreateRun(run_id="r1", workflow="wf", idempotency_key="create:r1"))
    spec = StepSpec(step_key="a", queue="high", timeout_seconds=timeout)
    outcome = ledger.apply(StartRun(run_id="r1", workflow="wf", steps=(spec,)))
    assert outcome.applied
    return outcome.followups


def outbox_ids(pool: Pool) -> list[int]:
    with pool.connection() as conn:
        return [r["outbox_id"] for r in conn.execute("SELECT outbox_id FROM executor.outbox")]


def test_push_keeps_the_rows_and_uses_the_step_timeout(
    pool: Pool, redis: redis_lib.Redis, settings: ExecutorSettings
) -> None:
    ledger = Ledger(pool)
    ledger.apply(CreateRun(run_id="r0", workflow="wf", idempotency_key="create:r0"))
    followups = create_and_start(ledger, timeout=7.5)
    assert len(outbox_ids(pool)) == 2  # r0's start_run (r1's went with its start), a start_step
    Dispatcher(redis, settings, pool).push(followups)
    assert len(outbox_ids(pool)) == 2  # a row goes when its command is decided, not pushed
    job = Job.fetch(
        job_id_for(followups[0].idempotency_key), connection=redis, serializer=JSONCommandSerializer
    )
    assert job.timeout == 10  # ceil(7.5 + 2)
    assert job.meta["step_timeout"] == 7.5


def test_redis_down_does_not_raise(
    pool: Pool, redis: redis_lib.Redis, settings: ExecutorSettings
) -> None:
    followups = create_and_start(Ledger(pool))
    dead: redis_lib.Redis = redis_lib.Redis(
        host="127.0.0.1", port=1, socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0)
    )
    Dispatcher(dead, settings, pool).push(followups)
    assert len(outbox_ids(pool)) == 1
    assert queued_ids(redis, "high") == []


def test_one_sweeper_at_a_time(
    pool: Pool, redis: redis_lib.Redis, settings: ExecutorSettings
) -> None:
    class Context:
        def __init__(self) -> None:
            self.settings = settings
            self.pool = pool
            self.ledger = Ledger(pool)
            self.dispatcher = Dispatcher(redis, settings, pool)

    with pool.connection() as conn, conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (0x65782D7377656570,))
        assert not sweep(Context()).leader
    report: SweepReport = sweep(Context())
    assert report.leader
    assert "relayed 0/0" in str(report)


# --- chains ----------------------------------------------------------------------------------


def test_a_chain_is_one_job_and_the_relay_pushes_its_other_starts_on_their_own(
    redis: redis_lib.Redis, settings: ExecutorSettings
) -> None:
    """The chain's job carries the first start and the others; if the chain never gets to
    them, each row's push (the relay's) enqueues it on its own, the first stays one job."""
    first, *rest = (start_step_item(i, attempt=i) for i in (1, 2, 3))
    dispatcher = Dispatcher(redis, settings)
    dispatcher.push([replace(first, then=tuple(rest))])
    assert queued_ids(redis, "high") == [job_id_for(first.idempotency_key)]
    job = Job.fetch(
        job_id_for(first.idempotency_key), connection=redis, serializer=JSONCommandSerializer
    )
    assert job.args == [first.command, [r.command for r in rest]]
    assert screen_job(job) is None
    assert sorted(dispatcher.push_items([first, *rest])) == [1, 2, 3]
    assert queued_ids(redis, "high") == [job_id_for(i.idempotency_key) for i in (first, *rest)]
