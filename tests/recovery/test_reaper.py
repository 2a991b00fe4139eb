"""The reaper and the relay (I7), case by case, against a real Postgres and Redis.

Nothing here waits for a clock: leases are born expired (`Ledger(pool, lease_seconds=-1)`),
the reaper's grace is zero, backoffs are zero or long, and lost or dead jobs are made by
flushing the test's Redis db or by editing RQ's job hash the way a dying worker leaves it.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
import redis as redis_lib
from psycopg_pool import ConnectionPool
from rq.job import Job
from rq.queue import Queue

from executor.commands.models import (
    BackoffPolicy,
    CompleteStep,
    CreateRun,
    DispatchStep,
    FailStep,
    StartRun,
    StartStep,
    StepSpec,
    parse_obj,
)
from executor.ledger.handler import Ledger
from executor.ledger.verify import verify
from executor.recovery.reaper import ReapReport, reap
from executor.recovery.relay import RelayReport, relay
from executor.transport.dispatch import Dispatcher, job_id_for
from executor.transport.serializer import JSONCommandSerializer
from queue_config import ExecutorSettings, QueueSettings

Pool = ConnectionPool[psycopg.Connection[dict[str, Any]]]

RUN = "r1"
QUEUE = "high"
# How RQ writes `started_at`; a worker that took the job then and died never updates it.
LONG_AGO = "2020-01-01T00:00:00.000000Z"


@pytest.fixture
def settings() -> ExecutorSettings:
    # A long outbox grace keeps the relay out of reaper tests; the reaper acts at once.
    return ExecutorSettings(recovery_grace_seconds=0.0, outbox_grace_seconds=30.0)


@pytest.fixture
def ledger(pool: Pool) -> Ledger:
    return Ledger(pool)


@pytest.fixture
def dispatcher(pool: Pool, redis: redis_lib.Redis, settings: ExecutorSettings) -> Dispatcher:
    return Dispatcher(redis, settings, pool)


# --- helpers ---------------------------------------------------------------------------------


def spec(key: str, *, max_attempts: int = 3, backoff: float = 0.0) -> StepSpec:
    return StepSpec(
        step_key=key,
        queue=QUEUE,
        max_attempts=max_attempts,
        backoff=BackoffPolicy(initial=backoff, cap=backoff, jitter=False),
    )


def launch(ledger: Ledger, dispatcher: Dispatcher | None, *steps: StepSpec) -> None:
    """Create and start RUN; with a dispatcher, push the follow-ups as a worker would."""
    created = ledger.apply(CreateRun(run_id=RUN, workflow="wf", idempotency_key=f"create:{RUN}"))
    started = ledger.apply(StartRun(run_id=RUN, workflow="wf", steps=steps))
    assert created.applied, created.summary()
    assert started.applied, started.summary()
    if dispatcher is not None:
        dispatcher.push(created.followups + started.followups)


def apply_ok(ledger: Ledger, command: Any, dispatcher: Dispatcher | None = None) -> None:
    outcome = ledger.apply(command)
    assert outcome.applied, outcome.summary()
    if dispatcher is not None:
        dispatcher.push(outcome.followups)


def step_row(pool: Pool, key: str) -> dict[str, Any]:
    with pool.connection() as conn:
        row = conn.execute(
            "SELECT status, attempt FROM executor.steps WHERE run_id = %s AND step_key = %s",
            (RUN, key),
        ).fetchone()
    assert row is not None
    return dict(row)


def run_status(pool: Pool) -> str:
    with pool.connection() as conn:
        row = conn.execute("SELECT status FROM executor.runs WHERE run_id = %s", (RUN,)).fetchone()
    assert row is not None
    return str(row["status"])


def receipts(pool: Pool, command_type: str | None = None) -> list[tuple[str, str]]:
    """(idempotency key, outcome) of every delivery recorded, oldest first."""
    with pool.connection() as conn:
        rows = conn.execute(
            "SELECT idempotency_key, outcome FROM executor.receipts"
            " WHERE %(t)s::text IS NULL OR command_type = %(t)s"
            " ORDER BY received_at, idempotency_key",
            {"t": command_type},
        ).fetchall()
    return [(r["idempotency_key"], r["outcome"]) for r in rows]


def drops(pool: Pool) -> list[tuple[str, str]]:
    with pool.connection() as conn:
        rows = conn.execute(
            "SELECT idempotency_key, reason FROM executor.drops ORDER BY drop_id"
        ).fetchall()
    return [(r["idempotency_key"], r["reason"]) for r in rows]


def outbox_keys(pool: Pool) -> list[str]:
    with pool.connection() as conn:
        rows = conn.execute(
            "SELECT idempotency_key FROM executor.outbox ORDER BY outbox_id"
        ).fetchall()
    return [r["idempotency_key"] for r in rows]


def queued_ids(redis: redis_lib.Redis, name: str = QUEUE) -> list[str]:
    return Queue(name, connection=redis, serializer=JSONCommandSerializer).get_job_ids()


def fetch(redis: redis_lib.Redis, key: str) -> Job:
    return Job.fetch(job_id_for(key), connection=redis, serializer=JSONCommandSerializer)


def die_while_started(redis: redis_lib.Redis, key: str, started_at: str) -> None:
    """Leave the job carrying `key` as a worker that took it and was killed leaves it."""
    job_id = job_id_for(key)
    Queue(QUEUE, connection=redis, serializer=JSONCommandSerializer).remove(job_id)
    redis.hset(Job.key_for(job_id), mapping={"status": "started", "started_at": started_at})


def assert_verified(pool: Pool) -> None:
    with pool.connection() as conn:
        report = verify(conn)
    assert report.ok, [str(v) for v in report.violations]


# --- 1. a running step whose lease expired ----------------------------------------------------


@pytest.mark.parametrize(("max_attempts", "after", "late_reason"), [
    (2, "retrying", "stale_attempt"),
    (1, "failed", "terminal"),
])  # fmt: skip
def test_expired_lease_is_expired_once(
    pool: Pool,
    redis: redis_lib.Redis,
    ledger: Ledger,
    dispatcher: Dispatcher,
    settings: ExecutorSettings,
    max_attempts: int,
    after: str,
    late_reason: str,
) -> None:
    # A long backoff keeps the retry's own dispatch out of the picture.
    launch(ledger, dispatcher, spec("a", max_attempts=max_attempts, backoff=600), spec("b"))
    apply_ok(Ledger(pool, lease_seconds=-1), StartStep(run_id=RUN, step_key="a", attempt=1))
    apply_ok(ledger, StartStep(run_id=RUN, step_key="b", attempt=1))  # lease held for 30 s

    report = reap(pool, ledger, dispatcher, settings)
    assert report == ReapReport(expired=1)
    assert step_row(pool, "a") == {"status": after, "attempt": 1}
    assert step_row(pool, "b") == {"status": "running", "attempt": 1}
    assert run_status(pool) == "running"  # b is still in flight
    expiries = receipts(pool, "expire_lease")
    assert len(expiries) == 1
    assert expiries[0][0].startswith(f"expire_lease:{RUN}:a:1:")
    assert expiries[0][1] == "applied"
    assert drops(pool) == []

    recorded = receipts(pool)
    for _ in range(2):
        assert reap(pool, ledger, dispatcher, settings) == ReapReport()
    assert receipts(pool) == recorded
    assert drops(pool) == []

    # I6: the worker that lost the lease reports late; its result is refused.
    late = ledger.apply(CompleteStep(run_id=RUN, step_key="a", attempt=1, output=1))
    assert (late.applied, late.reason) == (False, late_reason)
    assert step_row(pool, "a") == {"status": after, "attempt": 1}
    assert_verified(pool)


# --- 2. a queued step whose start job is missing ----------------------------------------------


def test_queued_step_with_a_lost_start_job_is_repushed_with_the_same_key(
    pool: Pool,
    redis: redis_lib.Redis,
    ledger: Ledger,
    dispatcher: Dispatcher,
    settings: ExecutorSettings,
) -> None:
    launch(ledger, dispatcher, spec("a"))
    key = f"start_step:{RUN}:a:1"
    job_id = job_id_for(key)
    assert queued_ids(redis) == [job_id]
    assert outbox_keys(pool) == []

    # A queued job present in Redis is left exactly as it is.
    before = redis.hgetall(Job.key_for(job_id))
    assert reap(pool, ledger, dispatcher, settings) == ReapReport()
    assert redis.hgetall(Job.key_for(job_id)) == before
    assert queued_ids(redis) == [job_id]

    # Redis loses everything: the same command is pushed again under the same job id.
    redis.flushdb()
    assert reap(pool, ledger, dispatcher, settings) == ReapReport(requeued=1)
    assert queued_ids(redis) == [job_id]
    job = fetch(redis, key)
    expected = StartStep(run_id=RUN, step_key="a", attempt=1).model_dump(mode="json")
    assert job.args == [expected]
    assert job.args[0]["idempotency_key"] == key
    assert job.meta["idempotency_key"] == key
    assert reap(pool, ledger, dispatcher, settings) == ReapReport()  # present now
    assert queued_ids(redis) == [job_id]

    # A worker took it and was killed before starting the step: the job counts as lost.
    die_while_started(redis, key, LONG_AGO)
    assert reap(pool, ledger, dispatcher, settings) == ReapReport(requeued=1)
    assert queued_ids(redis) == [job_id]
    assert redis.hget(Job.key_for(job_id), "status") == b"queued"

    # The reaper applied nothing; the step waited in `queued` throughout.
    assert receipts(pool, "start_step") == []
    assert step_row(pool, "a") == {"status": "queued", "attempt": 1}

    # Delivered, the re-pushed job starts the step once; a second delivery is a duplicate.
    command = parse_obj(fetch(redis, key).args[0])
    assert ledger.apply(command).applied
    assert ledger.apply(command).reason == "duplicate"
    assert step_row(pool, "a") == {"status": "running", "attempt": 1}
    assert_verified(pool)


# --- 3. a retrying step past its backoff whose dispatch job is missing -------------------------


def fail_into_retry(ledger: Ledger, dispatcher: Dispatcher, step: str = "a") -> None:
    """Start attempt 1 and fail it; the zero backoff makes attempt 2's dispatch due at once."""
    apply_ok(ledger, StartStep(run_id=RUN, step_key=step, attempt=1))
    apply_ok(ledger, FailStep(run_id=RUN, step_key=step, attempt=1, error="boom"), dispatcher)
    assert step_row(ledger.pool, step) == {"status": "retrying", "attempt": 1}


def assert_redispatched_by_sweep(pool: Pool, redis: redis_lib.Redis) -> None:
    assert step_row(pool, "a") == {"status": "queued", "attempt": 2}
    assert receipts(pool, "dispatch_step") == [(f"dispatch_step:{RUN}:a:2:sweep:1", "applied")]
    assert job_id_for(f"start_step:{RUN}:a:2") in queued_ids(redis)
    assert outbox_keys(pool) == []


def test_overdue_retry_without_a_dispatch_job_is_redispatched_under_a_sweep_key(
    pool: Pool,
    redis: redis_lib.Redis,
    ledger: Ledger,
    dispatcher: Dispatcher,
    settings: ExecutorSettings,
) -> None:
    launch(ledger, dispatcher, spec("a"))
    fail_into_retry(ledger, dispatcher)
    natural = f"dispatch_step:{RUN}:a:2"
    assert job_id_for(natural) in queued_ids(redis)

    # While the natural dispatch job waits in its queue, the reaper leaves the step to it.
    assert reap(pool, ledger, dispatcher, settings) == ReapReport()
    assert receipts(pool, "dispatch_step") == []

    redis.flushdb()
    assert reap(pool, ledger, dispatcher, settings) == ReapReport(redispatched=1)
    assert_redispatched_by_sweep(pool, redis)

    # Nothing more to do; the natural job, had it survived somewhere, is refused when late.
    assert reap(pool, ledger, dispatcher, settings) == ReapReport()
    late = ledger.apply(DispatchStep(run_id=RUN, step_key="a", attempt=2))
    assert (late.applied, late.reason) == (False, "invalid_transition")
    assert step_row(pool, "a") == {"status": "queued", "attempt": 2}
    assert_verified(pool)


def test_a_long_started_natural_dispatch_job_counts_as_dead(
    pool: Pool,
    redis: redis_lib.Redis,
    ledger: Ledger,
    dispatcher: Dispatcher,
    settings: ExecutorSettings,
) -> None:
    """Regression: a dispatch job RQ still shows as `started` kept the step waiting forever."""
    launch(ledger, dispatcher, spec("a"))
    fail_into_retry(ledger, dispatcher)
    die_while_started(redis, f"dispatch_step:{RUN}:a:2", LONG_AGO)

    assert reap(pool, ledger, dispatcher, settings) == ReapReport(redispatched=1)
    assert_redispatched_by_sweep(pool, redis)
    assert reap(pool, ledger, dispatcher, settings) == ReapReport()
    assert_verified(pool)


def test_a_recently_started_natural_dispatch_job_is_trusted_for_the_grace(
    pool: Pool,
    redis: redis_lib.Redis,
    ledger: Ledger,
    settings: ExecutorSettings,
) -> None:
    settings = settings.model_copy(update={"recovery_grace_seconds": 60.0})
    dispatcher = Dispatcher(redis, settings, pool)
    launch(ledger, dispatcher, spec("a"))
    fail_into_retry(ledger, dispatcher)
    with pool.connection() as conn:  # the backoff ended an hour ago, well past the grace
        conn.execute("UPDATE executor.steps SET next_attempt_at = now() - interval '1 hour'")
    natural = f"dispatch_step:{RUN}:a:2"

    # Started just now by a worker that may still be applying it: left alone.
    die_while_started(redis, natural, datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"))
    assert reap(pool, ledger, dispatcher, settings) == ReapReport()
    assert step_row(pool, "a") == {"status": "retrying", "attempt": 1}

    # Started longer ago than the grace: its worker is gone.
    die_while_started(redis, natural, LONG_AGO)
    assert reap(pool, ledger, dispatcher, settings) == ReapReport(redispatched=1)
    assert_redispatched_by_sweep(pool, redis)
    assert_verified(pool)


# --- 4. a retrying step in a run where a sibling failed terminally ----------------------------


def test_retrying_step_after_a_sibling_failed_is_never_redispatched(
    pool: Pool,
    redis: redis_lib.Redis,
    ledger: Ledger,
    dispatcher: Dispatcher,
    settings: ExecutorSettings,
) -> None:
    """Regression: every sweep applied a fresh `:sweep:<n>` key, and every one was dropped."""
    launch(ledger, dispatcher, spec("a", max_attempts=1), spec("b"), spec("c"))
    for key in ("a", "b"):
        apply_ok(ledger, StartStep(run_id=RUN, step_key=key, attempt=1))
    apply_ok(ledger, FailStep(run_id=RUN, step_key="a", attempt=1, error="fatal"), dispatcher)
    assert step_row(pool, "a") == {"status": "failed", "attempt": 1}
    fail_into_retry(ledger, dispatcher, "c")
    # The natural dispatch is delivered and dropped (nothing more of this run is dispatched),
    # and Redis then forgets the job.
    late = ledger.apply(DispatchStep(run_id=RUN, step_key="c", attempt=2))
    assert (late.applied, late.reason) == (False, "invalid_transition")
    redis.flushdb()
    assert run_status(pool) == "running"  # b is still running

    recorded, dropped = receipts(pool), drops(pool)
    for _ in range(4):
        assert reap(pool, ledger, dispatcher, settings) == ReapReport()
    assert receipts(pool) == recorded
    assert drops(pool) == dropped
    assert not any(":sweep:" in key for key, _ in receipts(pool))
    assert step_row(pool, "c") == {"status": "retrying", "attempt": 1}

    # Once b finishes the run fails, and the reaper stays quiet.
    apply_ok(ledger, CompleteStep(run_id=RUN, step_key="b", attempt=1, output="ok"), dispatcher)
    assert run_status(pool) == "failed"
    assert reap(pool, ledger, dispatcher, settings) == ReapReport()
    assert step_row(pool, "c") == {"status": "retrying", "attempt": 1}
    assert_verified(pool)


# --- 5. a pending run with no start_run job ----------------------------------------------------


def test_pending_run_without_a_start_job_is_restarted(
    pool: Pool,
    redis: redis_lib.Redis,
    ledger: Ledger,
    dispatcher: Dispatcher,
    settings: ExecutorSettings,
) -> None:
    created = ledger.apply(CreateRun(run_id=RUN, workflow="wf", idempotency_key=f"create:{RUN}"))
    assert created.applied
    key = f"start_run:{RUN}"
    job_id = job_id_for(key)

    # Its outbox row is still there: that is the relay's to push, not the reaper's.
    assert outbox_keys(pool) == [key]
    assert reap(pool, ledger, dispatcher, settings) == ReapReport()
    assert queued_ids(redis, "default") == []

    # The process that committed it died before pushing, and the row went with a lost push.
    with pool.connection() as conn:
        conn.execute("DELETE FROM executor.outbox")
    assert reap(pool, ledger, dispatcher, settings) == ReapReport(restarted=1)
    assert queued_ids(redis, settings.default_queue) == [job_id]
    assert fetch(redis, key).args == [created.followups[0].command]
    assert reap(pool, ledger, dispatcher, settings) == ReapReport()
    assert queued_ids(redis, settings.default_queue) == [job_id]

    # Lost again with a flushed Redis: pushed again.
    redis.flushdb()
    assert reap(pool, ledger, dispatcher, settings) == ReapReport(restarted=1)
    assert queued_ids(redis, settings.default_queue) == [job_id]
    assert receipts(pool) == [(f"create:{RUN}", "applied")]
    assert run_status(pool) == "pending"
    assert_verified(pool)


def test_a_pending_run_start_job_lands_where_workers_listen_with_a_custom_default_queue(
    pool: Pool, redis: redis_lib.Redis, ledger: Ledger
) -> None:
    """`default_queue` names where start_run jobs go; workers listen on `queue_names` only.

    Regression: the handler's start_run follow-up went to a queue literally named "default"
    whatever the setting said, and the reaper, finding that job "present" under its id, never
    re-pushed it: the run stayed pending for good (I7). The dispatcher now routes "default".
    """
    settings = ExecutorSettings(
        queues=(QueueSettings(name="high"), QueueSettings(name="main")),
        default_queue="main",
        recovery_grace_seconds=0.0,
    )
    dispatcher = Dispatcher(redis, settings, pool)
    created = ledger.apply(CreateRun(run_id=RUN, workflow="wf", idempotency_key=f"create:{RUN}"))
    assert created.applied
    dispatcher.push(created.followups)
    reap(pool, ledger, dispatcher, settings)
    job_id = job_id_for(f"start_run:{RUN}")
    listened = {name: queued_ids(redis, name) for name in settings.queue_names}
    assert any(job_id in ids for ids in listened.values()), (
        f"start_run job is in {fetch(redis, f'start_run:{RUN}').origin!r}, "
        f"workers listen on {list(settings.queue_names)}"
    )


# --- 6. the outbox relay -----------------------------------------------------------------------


def test_relay_pushes_due_rows_past_the_grace_and_keeps_rows_not_yet_due(
    pool: Pool,
    redis: redis_lib.Redis,
    ledger: Ledger,
    dispatcher: Dispatcher,
    settings: ExecutorSettings,
) -> None:
    launch(ledger, None, spec("a", backoff=600))  # nothing pushed: every row stays
    apply_ok(ledger, StartStep(run_id=RUN, step_key="a", attempt=1))
    apply_ok(ledger, FailStep(run_id=RUN, step_key="a", attempt=1, error="boom"))
    start_run, start_step, dispatch = (
        f"start_run:{RUN}",
        f"start_step:{RUN}:a:1",
        f"dispatch_step:{RUN}:a:2",
    )
    assert outbox_keys(pool) == [start_run, start_step, dispatch]

    # All younger than the grace (their writers may still push them); the dispatch not due.
    assert relay(pool, dispatcher, settings) == RelayReport()
    assert outbox_keys(pool) == [start_run, start_step, dispatch]

    with pool.connection() as conn:
        conn.execute(
            "UPDATE executor.outbox SET created_at = created_at - interval '1 minute',"
            " not_before = not_before - interval '1 minute'"
        )
    assert relay(pool, dispatcher, settings) == RelayReport(claimed=2, pushed=2)
    assert outbox_keys(pool) == [dispatch]  # due in 9 minutes: stays
    assert queued_ids(redis, "default") == [job_id_for(start_run)]
    assert queued_ids(redis) == [job_id_for(start_step)]
    assert relay(pool, dispatcher, settings) == RelayReport()

    # Once due, it goes too.
    with pool.connection() as conn:
        conn.execute("UPDATE executor.outbox SET not_before = now() - interval '1 second'")
    assert relay(pool, dispatcher, settings) == RelayReport(claimed=1, pushed=1)
    assert outbox_keys(pool) == []
    assert queued_ids(redis) == [job_id_for(start_step), job_id_for(dispatch)]
    assert fetch(redis, dispatch).args[0]["idempotency_key"] == dispatch
    assert step_row(pool, "a") == {"status": "retrying", "attempt": 1}
    assert_verified(pool)
