"""Recovery (I7), case by case, against a real Postgres and Redis.

An outbox row lives until the transaction that decides its command deletes it; the relay
pushes every undecided row again once its `push_after` passes. The reaper expires dead
leases and fires due timers. Nothing here waits for a clock: leases are born expired,
`push_after` is moved into the past by hand, and lost or dead jobs are made by flushing the
test's Redis db or by editing RQ's job hash the way a dying worker leaves it.
"""

from __future__ import annotations

from typing import Any

import pytest
import redis as redis_lib
from rq.job import Job
from rq.queue import Queue

from executor.commands.models import (
    BackoffPolicy,
    CompleteStep,
    CreateRun,
    DispatchStep,
    FailStep,
    PauseRun,
    ResumeRun,
    StartRun,
    StartStep,
    StepSpec,
    SuspendStep,
)
from executor.commands.models import Sleep as SleepFor
from executor.ledger.handler import Ledger
from executor.ledger.verify import verify
from executor.recovery.reaper import ReapReport, fire_timers, reap
from executor.recovery.relay import RelayReport, relay
from executor.storage.db import Pool
from executor.transport.dispatch import Dispatcher, job_id_for
from executor.transport.serializer import JSONCommandSerializer
from queue_config import ExecutorSettings, QueueSettings

RUN = "r1"
QUEUE = "high"
LONG_AGO = "2020-01-01T00:00:00.000000Z"  # how RQ writes `started_at`


@pytest.fixture
def settings() -> ExecutorSettings:
    return ExecutorSettings(outbox_grace_seconds=30.0)


@pytest.fixture
def ledger(pool: Pool) -> Ledger:
    return Ledger(pool, outbox_grace_seconds=30.0)


@pytest.fixture
def dispatcher(pool: Pool, redis: redis_lib.Redis, settings: ExecutorSettings) -> Dispatcher:
    return Dispatcher(redis, settings, pool)


def spec(key: str, *, max_attempts: int = 3, backoff: float = 0.0, **kw: Any) -> StepSpec:
    return StepSpec(
        step_key=key,
        queue=QUEUE,
        max_attempts=max_attempts,
        backoff=BackoffPolicy(initial=backoff, cap=backoff, jitter=False),
        **kw,
    )


def launch(ledger: Ledger, dispatcher: Dispatcher | None, *steps: StepSpec) -> None:
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


def outbox(pool: Pool) -> list[tuple[str, int]]:
    with pool.connection() as conn:
        rows = conn.execute(
            "SELECT idempotency_key, attempts FROM executor.outbox ORDER BY outbox_id"
        ).fetchall()
    return [(r["idempotency_key"], r["attempts"]) for r in rows]


def make_due(pool: Pool) -> None:
    with pool.connection() as conn:
        conn.execute("UPDATE executor.outbox SET push_after = now() - interval '1 second'")


def drops(pool: Pool) -> list[tuple[str, str]]:
    with pool.connection() as conn:
        rows = conn.execute(
            "SELECT idempotency_key, reason FROM executor.drops ORDER BY drop_id"
        ).fetchall()
    return [(r["idempotency_key"], r["reason"]) for r in rows]


def queued_ids(redis: redis_lib.Redis, name: str = QUEUE) -> list[str]:
    return Queue(name, connection=redis, serializer=JSONCommandSerializer).get_job_ids()


def assert_verified(pool: Pool) -> None:
    with pool.connection() as conn:
        report = verify(conn)
    assert report.ok, [str(v) for v in report.violations]


# --- the outbox row lives until its command is decided ---------------------------------------


def test_a_row_goes_with_the_transaction_that_applies_its_command(
    pool: Pool, ledger: Ledger, dispatcher: Dispatcher, redis: redis_lib.Redis
) -> None:
    launch(ledger, dispatcher, spec("a"))  # create_run's start_run row went with start_run
    assert outbox(pool) == [(f"start_step:{RUN}:a:1", 0)]
    assert queued_ids(redis) == [job_id_for(f"start_step:{RUN}:a:1")]  # pushed, row kept
    apply_ok(ledger, StartStep(run_id=RUN, step_key="a", attempt=1))
    assert outbox(pool) == []


def test_a_final_refusal_and_a_duplicate_spend_the_row_too(pool: Pool, ledger: Ledger) -> None:
    launch(ledger, None, spec("a"))
    late = ledger.apply(DispatchStep(run_id=RUN, step_key="a", attempt=1))
    assert late.reason == "invalid_transition"
    apply_ok(ledger, StartStep(run_id=RUN, step_key="a", attempt=1))
    with pool.connection() as conn:  # a re-pushed copy of an already applied command
        conn.execute(
            "INSERT INTO executor.outbox (run_id, queue, idempotency_key, command)"
            " VALUES (%s, 'high', %s, '{}')",
            (RUN, f"start_step:{RUN}:a:1"),
        )
    assert ledger.apply(StartStep(run_id=RUN, step_key="a", attempt=1)).reason == "duplicate"
    assert outbox(pool) == []


def test_the_relay_pushes_an_undecided_row_after_a_flush_and_backs_off(
    pool: Pool,
    ledger: Ledger,
    dispatcher: Dispatcher,
    redis: redis_lib.Redis,
    settings: ExecutorSettings,
) -> None:
    created = ledger.apply(CreateRun(run_id="r0", workflow="wf", idempotency_key="create:r0"))
    dispatcher.push(created.followups)
    launch(ledger, dispatcher, spec("a"))
    redis.flushdb()
    assert relay(pool, dispatcher, settings) == RelayReport()  # not past push_after yet
    make_due(pool)
    assert relay(pool, dispatcher, settings) == RelayReport(claimed=2, pushed=2)
    assert queued_ids(redis) == [job_id_for(f"start_step:{RUN}:a:1")]
    assert queued_ids(redis, "default") == [job_id_for("start_run:r0")]
    assert [n for _, n in outbox(pool)] == [1, 1]
    assert relay(pool, dispatcher, settings) == RelayReport()  # backed off
    with pool.connection() as conn:
        waits = conn.execute(
            "SELECT extract(epoch FROM push_after - now()) AS s FROM executor.outbox"
        ).fetchall()
    assert all(25 < float(w["s"]) <= 30.5 for w in waits)  # grace * 2**0 the first time
    make_due(pool)
    relay(pool, dispatcher, settings)  # the same job id is still queued: pushed once only
    assert queued_ids(redis) == [job_id_for(f"start_step:{RUN}:a:1")]
    with pool.connection() as conn:
        waits = conn.execute(
            "SELECT extract(epoch FROM push_after - now()) AS s FROM executor.outbox"
        ).fetchall()
    assert all(55 < float(w["s"]) <= 60.5 for w in waits)  # then doubling


@pytest.mark.parametrize("status", ["failed", "started"])
def test_a_dead_job_is_replaced_when_its_row_is_pushed_again(
    pool: Pool,
    ledger: Ledger,
    dispatcher: Dispatcher,
    redis: redis_lib.Redis,
    settings: ExecutorSettings,
    status: str,
) -> None:
    """A job that failed (the ledger was unreachable) or that a killed worker left `started`
    carries a command still undecided, since its row is still here: it is replaced."""
    launch(ledger, dispatcher, spec("a"))
    job_id = job_id_for(f"start_step:{RUN}:a:1")
    Queue(QUEUE, connection=redis, serializer=JSONCommandSerializer).remove(job_id)
    redis.hset(Job.key_for(job_id), mapping={"status": status, "started_at": LONG_AGO})
    make_due(pool)
    relay(pool, dispatcher, settings)
    assert queued_ids(redis) == [job_id]


def test_the_relay_never_holds_a_lock_a_worker_waits_for(
    pool: Pool, ledger: Ledger, dispatcher: Dispatcher, settings: ExecutorSettings
) -> None:
    """The claim commits before anything is pushed; a relay mid-push blocks no apply."""
    launch(ledger, None, spec("a"))
    make_due(pool)
    seen: list[Any] = []

    class Watching(Dispatcher):
        def push_items(self, items: Any) -> list[int]:
            with pool.connection() as conn:
                conn.execute("SET lock_timeout = '200ms'")
                seen.append(ledger.apply(StartStep(run_id=RUN, step_key="a", attempt=1)))
            return super().push_items(items)

    relay(pool, Watching(dispatcher.redis, settings, pool), settings)
    assert seen
    assert seen[0].applied


# --- retries: due later, refused for now ---------------------------------------------------


def test_a_retry_is_pushed_when_due_by_its_writer_and_else_by_the_relay(
    pool: Pool,
    ledger: Ledger,
    dispatcher: Dispatcher,
    redis: redis_lib.Redis,
    settings: ExecutorSettings,
) -> None:
    launch(ledger, dispatcher, spec("a", backoff=600))
    apply_ok(ledger, StartStep(run_id=RUN, step_key="a", attempt=1))
    failed = ledger.apply(FailStep(fence="f", run_id=RUN, step_key="a", attempt=1, error="x"))
    dispatcher.push(failed.followups)
    dispatch_key = f"dispatch_step:{RUN}:a:2"
    assert dispatcher.later.pending() == 1  # the writer keeps it on a timer
    assert job_id_for(dispatch_key) not in queued_ids(redis)
    assert relay(pool, dispatcher, settings) == RelayReport()  # the relay waits past due
    with pool.connection() as conn:
        conn.execute(
            "UPDATE executor.outbox SET not_before = now() - interval '1 minute',"
            " push_after = now() - interval '1 second' WHERE idempotency_key = %s",
            (dispatch_key,),
        )
        conn.execute("UPDATE executor.steps SET next_attempt_at = now() - interval '1 minute'")
    relay(pool, dispatcher, settings)
    assert job_id_for(dispatch_key) in queued_ids(redis)


def test_an_early_dispatch_is_refused_by_the_database_clock_and_goes_back(
    pool: Pool, ledger: Ledger
) -> None:
    launch(ledger, None, spec("a", backoff=600))
    apply_ok(ledger, StartStep(run_id=RUN, step_key="a", attempt=1))
    apply_ok(ledger, FailStep(fence="f", run_id=RUN, step_key="a", attempt=1, error="x"))
    early = ledger.apply(DispatchStep(run_id=RUN, step_key="a", attempt=2))
    assert (early.reason, early.transient) == ("not_due", True)
    assert step_row(pool, "a") == {"status": "retrying", "attempt": 1}
    with pool.connection() as conn:
        row = conn.execute(
            "SELECT o.not_before = s.next_attempt_at AS on_time, count(*) OVER () AS n"
            " FROM executor.outbox o JOIN executor.steps s USING (run_id)"
            " WHERE o.idempotency_key = %s",
            (f"dispatch_step:{RUN}:a:2",),
        ).fetchone()
        receipt = conn.execute(
            "SELECT 1 FROM executor.receipts WHERE idempotency_key = %s",
            (f"dispatch_step:{RUN}:a:2",),
        ).fetchone()
    assert row == {"on_time": True, "n": 1}
    assert receipt is None  # the key is still usable
    with pool.connection() as conn:
        conn.execute("UPDATE executor.steps SET next_attempt_at = now() - interval '1 second'")
    apply_ok(ledger, DispatchStep(run_id=RUN, step_key="a", attempt=2))
    assert step_row(pool, "a") == {"status": "queued", "attempt": 2}
    assert_verified(pool)


def test_a_dispatch_refused_while_paused_keeps_its_key_and_resume_dispatches(
    pool: Pool, ledger: Ledger
) -> None:
    launch(ledger, None, spec("a"))
    apply_ok(ledger, StartStep(run_id=RUN, step_key="a", attempt=1))
    apply_ok(ledger, FailStep(fence="f", run_id=RUN, step_key="a", attempt=1, error="x"))
    apply_ok(ledger, PauseRun(run_id=RUN, idempotency_key="pause"))
    held = ledger.apply(DispatchStep(run_id=RUN, step_key="a", attempt=2))
    assert (held.reason, held.transient) == ("paused", True)
    key = f"dispatch_step:{RUN}:a:2"
    assert key in [k for k, _ in outbox(pool)]  # still undecided: the row stays
    resumed = ledger.apply(ResumeRun(run_id=RUN, idempotency_key="resume"))
    assert [e.type for e in resumed.events] == ["run_resumed", "step_queued"]
    assert key not in [k for k, _ in outbox(pool)]  # made moot by the resume
    assert step_row(pool, "a") == {"status": "queued", "attempt": 2}
    assert_verified(pool)


# --- the reaper: leases and timers -------------------------------------------------------------


@pytest.mark.parametrize(("max_attempts", "after", "late_reason"), [
    (2, "retrying", "stale_attempt"),
    (1, "failed", "terminal"),
])  # fmt: skip
def test_an_expired_lease_is_expired_once(
    pool: Pool,
    ledger: Ledger,
    dispatcher: Dispatcher,
    max_attempts: int,
    after: str,
    late_reason: str,
) -> None:
    launch(ledger, None, spec("a", max_attempts=max_attempts))
    born_expired = Ledger(pool, lease_seconds=-1)
    apply_ok(born_expired, StartStep(run_id=RUN, step_key="a", attempt=1, fence="w1"))
    assert reap(pool, ledger, dispatcher) == ReapReport(expired=1)
    assert step_row(pool, "a") == {"status": after, "attempt": 1}
    assert reap(pool, ledger, dispatcher) == ReapReport()
    late = ledger.apply(CompleteStep(fence="w1", run_id=RUN, step_key="a", attempt=1))
    assert late.reason == late_reason
    assert_verified(pool)


def test_a_heartbeat_from_another_delivery_extends_nothing(pool: Pool, ledger: Ledger) -> None:
    launch(ledger, None, spec("a"))
    apply_ok(ledger, StartStep(run_id=RUN, step_key="a", attempt=1, fence="w1"))
    assert ledger.extend_lease(RUN, "a", 1, "w1") is not None
    assert ledger.extend_lease(RUN, "a", 1, "w2") is None


def test_a_due_timer_fires_once_and_a_paused_run_holds_it(
    pool: Pool, ledger: Ledger, dispatcher: Dispatcher
) -> None:
    launch(ledger, None, spec("nap", kind="sleep"), spec("after", depends_on=("nap",)))
    apply_ok(ledger, StartStep(run_id=RUN, step_key="nap", attempt=1, fence="w1"))
    sleep = SleepFor(seconds=3600)
    apply_ok(ledger, SuspendStep(fence="w1", run_id=RUN, step_key="nap", attempt=1, until=sleep))
    assert step_row(pool, "nap") == {"status": "sleeping", "attempt": 1}
    assert fire_timers(pool, ledger, dispatcher) == 0
    with pool.connection() as conn:
        conn.execute("UPDATE executor.steps SET wake_at = now() - interval '1 second'")
    apply_ok(ledger, PauseRun(run_id=RUN, idempotency_key="pause"))
    assert fire_timers(pool, ledger, dispatcher) == 0  # held while paused
    apply_ok(ledger, ResumeRun(run_id=RUN, idempotency_key="resume"))
    assert fire_timers(pool, ledger, dispatcher) == 1
    assert fire_timers(pool, ledger, dispatcher) == 0
    assert step_row(pool, "nap") == {"status": "completed", "attempt": 1}
    assert step_row(pool, "after") == {"status": "queued", "attempt": 1}
    assert_verified(pool)


def test_a_start_run_job_lands_where_workers_listen_with_a_custom_default_queue(
    pool: Pool, redis: redis_lib.Redis, ledger: Ledger
) -> None:
    """`default_queue` names where start_run jobs go; workers listen on `queue_names` only."""
    settings = ExecutorSettings(
        queues=(QueueSettings(name="high"), QueueSettings(name="main")), default_queue="main"
    )
    dispatcher = Dispatcher(redis, settings, pool)
    created = ledger.apply(CreateRun(run_id=RUN, workflow="wf", idempotency_key=f"create:{RUN}"))
    dispatcher.push(created.followups)
    redis.flushdb()
    make_due(pool)
    relay(pool, dispatcher, settings)
    assert queued_ids(redis, "main") == [job_id_for(f"start_run:{RUN}")]
