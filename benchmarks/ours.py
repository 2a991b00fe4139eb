"""Our side of a round: a fresh ledger, N `executor worker` processes, runs from one producer.

Only the public surface is used: `Client.start_run` to launch, and the contract tables
(`executor.runs`, `executor.events`) to see completion and each run's own timestamps, so the
instrument keeps working while the core behind them changes.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import redis as redis_lib

from benchmarks.common import Round, ScratchDatabases, child_env, flush, processes, wait_for

# Every bench worker knows the sample workflows (`noop`) and the benchmark's own.
WORKFLOW_MODULES = "executor.workflows.sample,benchmarks.workflows"
TERMINAL = ("completed", "failed", "cancelled")


def fresh_ledger(scratch: ScratchDatabases, label: str) -> str:
    from executor.storage.migrate import migrate

    url = scratch.create(label)
    migrate(url)
    return url


def registered_workers(redis_url: str) -> int:
    from rq import Worker

    client: redis_lib.Redis = redis_lib.Redis.from_url(redis_url)
    try:
        return len(Worker.all(connection=client))
    finally:
        client.close()


def rq_job_finished(client: redis_lib.Redis, key: str) -> Callable[[], bool]:
    """A predicate on one RQ job's status, read straight from its hash."""
    return lambda: client.hget(key, "status") == b"finished"


@contextmanager
def executor_workers(
    count: int, database_url: str, redis_url: str, *, log_name: str = "executor", **env: str
) -> Iterator[None]:
    """`count` real `executor worker` processes, registered with RQ before the block starts."""
    environment = child_env(
        EXECUTOR_DATABASE_URL=database_url,
        EXECUTOR_REDIS_URL=redis_url,
        EXECUTOR_WORKFLOW_MODULES=WORKFLOW_MODULES,
        **env,
    )
    command = [sys.executable, "-m", "executor", "worker"]
    with _registered([command] * count, environment, log_name, redis_url):
        yield


def rq_base_class() -> str:
    """The RQ worker class `executor worker` extends, as a dotted path."""
    from executor.transport.worker import ExecutorWorker

    return next(
        f"{c.__module__}.{c.__qualname__}"
        for c in ExecutorWorker.__mro__[1:]
        if c.__module__.startswith("rq.")
    )


@contextmanager
def rq_workers(
    count: int, redis_url: str, queue: str, *, log_name: str, watch_url: str | None = None
) -> Iterator[None]:
    """`count` plain RQ workers of the class ours extends, JSON serializer, on `queue`.

    `watch_url` is where to see them register when `redis_url` is a counting proxy.
    """
    command = [
        sys.executable, "-m", "rq.cli", "worker", "-w", rq_base_class(), "-u", redis_url,
        "-S", "rq.serializers.JSONSerializer", "-q", queue,
    ]  # fmt: skip
    with _registered([command] * count, child_env(), log_name, watch_url or redis_url):
        yield


@contextmanager
def _registered(
    commands: list[list[str]], env: dict[str, str], log_name: str, redis_url: str
) -> Iterator[None]:
    with processes(commands, env=env, log_name=log_name) as procs:
        wait_for(
            lambda: registered_workers(redis_url) >= len(commands),
            timeout=60,
            what=f"{len(commands)} workers ({log_name}) to register",
            procs=procs,
            interval=0.05,
        )
        yield


def start_runs(client: Any, workflow: str, runs: int, input: Any = None) -> list[str]:
    return [client.start_run(workflow, input) for _ in range(runs)]


def wait_terminal(
    client: Any, run_ids: list[str], *, timeout: float, interval: float, alone: bool = False
) -> None:
    """Block until every run is terminal; raise if any ended other than completed.

    `alone`: the ledger holds these runs and no others (a fresh database per batch), so one
    count over the table answers, as each peer's own poll does; asking for thousands of
    ids by key cost several times more, taken from the workers being measured."""
    where, params = ("", []) if alone else ("WHERE run_id = ANY(%s)", [run_ids])

    def done() -> bool:
        with client.pool.connection() as conn:
            row = conn.execute(
                "SELECT count(*) AS runs, count(*) FILTER (WHERE status = ANY(%s)) AS ended, "
                "count(*) FILTER (WHERE status = ANY(%s) AND status <> 'completed') AS bad "
                f"FROM executor.runs {where}",
                (list(TERMINAL), list(TERMINAL), *params),
            ).fetchone()
        if row["runs"] != len(run_ids):
            raise RuntimeError(f"{row['runs']} runs in the ledger, {len(run_ids)} expected")
        if row["bad"]:
            raise RuntimeError(f"{row['bad']} of {len(run_ids)} runs did not complete")
        return int(row["ended"]) == len(run_ids)

    wait_for(done, timeout=timeout, what=f"{len(run_ids)} runs to complete", interval=interval)


def run_latencies(client: Any, run_ids: list[str]) -> list[float]:
    """Each run's run_created → run_completed, from the ledger's own event times."""
    with client.pool.connection() as conn:
        rows = conn.execute(
            "SELECT extract(epoch FROM max(created_at) FILTER (WHERE type = 'run_completed') "
            "- min(created_at) FILTER (WHERE type = 'run_created')) AS s "
            "FROM executor.events WHERE run_id = ANY(%s) GROUP BY run_id",
            (run_ids,),
        ).fetchall()
    return [float(r["s"]) for r in rows if r["s"] is not None]


def timed_batch(
    client: Any,
    workflow: str,
    runs: int,
    steps_per_run: int,
    *,
    system: str = "ours",
    timeout: float = 600.0,
    interval: float = 0.05,
) -> Round:
    """Start `runs` runs as fast as one producer can, wait for all; the round's numbers.

    The ledger is a fresh one holding only this batch. Polled as often as every peer's
    batch is (50 ms), and as cheaply (one count over the table): each poll takes the
    database from the system under test."""
    started = time.monotonic()
    ids = start_runs(client, workflow, runs)
    wait_terminal(client, ids, timeout=timeout, interval=interval, alone=True)
    elapsed = time.monotonic() - started
    return Round(system, runs, steps_per_run, elapsed, run_latencies(client, ids))


def ours_round(
    scratch: ScratchDatabases,
    redis_url: str,
    *,
    workers: int,
    runs: int,
    workflow: str = "noop",
    steps_per_run: int = 4,
    label: str = "ours",
    timeout: float = 600.0,
) -> Round:
    """One round on a fresh database and a flushed Redis db; dropped afterwards."""
    from executor.client import Client

    flush(redis_url)
    db = fresh_ledger(scratch, label)
    try:
        with executor_workers(workers, db, redis_url), Client(db, redis_url) as client:
            return timed_batch(client, workflow, runs, steps_per_run, timeout=timeout)
    finally:
        scratch.drop(db)
