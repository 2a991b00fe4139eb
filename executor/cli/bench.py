"""`executor bench`: ratios measured side by side in one run, never one absolute number.

End to end: steps/s of the `noop` workflow (4 no-op steps with a fan-out and a join) through
our workers, next to RQ's own no-op jobs/s with the worker class ours extends and the same
number of worker processes, alternating rounds and reporting medians. Ledger: commands/s
through the handler next to a naive two-statement write (see executor.ledger.bench).
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
import uuid
from typing import Any

from redis import Redis
from rq import Queue, Worker
from rq.registry import FinishedJobRegistry
from rq.serializers import JSONSerializer

from executor.cli.procs import worker_env, worker_processes
from executor.client import Client

BASELINE_QUEUE = "bench-baseline"


def _wait_workers(redis: Redis, count: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while len(Worker.all(connection=redis)) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"only {len(Worker.all(connection=redis))} of {count} workers came up"
            )
        time.sleep(0.05)


def baseline_round(redis_url: str, workers: int, jobs: int, worker_class: str) -> float:
    """RQ alone: enqueue `jobs` no-ops while `workers` processes drain them; jobs/s."""
    redis = Redis.from_url(redis_url)
    queue = Queue(BASELINE_QUEUE, connection=redis, serializer=JSONSerializer)
    queue.empty()  # type: ignore[no-untyped-call]
    registry = FinishedJobRegistry(queue=queue)
    before = registry.count
    env = worker_env("", redis_url)
    ps = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "rq.cli",
                "worker",
                "-w",
                worker_class,
                "-u",
                redis_url,
                "-S",
                "rq.serializers.JSONSerializer",
                "-q",
                BASELINE_QUEUE,
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(workers)
    ]
    try:
        _wait_workers(redis, workers)
        start = time.monotonic()
        for _ in range(jobs):
            queue.enqueue("executor.cli.bench_jobs.noop", result_ttl=600)
        while registry.count - before < jobs:
            time.sleep(0.01)
        return jobs / (time.monotonic() - start)
    finally:
        for p in ps:
            p.terminate()
        for p in ps:
            p.wait(timeout=10)
        redis.close()


def e2e_round(client: Client, runs: int, timeout: float = 300.0) -> tuple[float, list[float]]:
    """Start `runs` noop runs against already-running workers; steps/s and latencies (s)."""
    tag = uuid.uuid4().hex[:8]
    start = time.monotonic()
    ids = [client.start_run("noop", None, run_id=f"bench-{tag}-{i}") for i in range(runs)]
    deadline = start + timeout
    while True:
        if client.status_counts(ids).get("completed", 0) == runs:
            break
        if time.monotonic() > deadline:
            raise RuntimeError("benchmark runs did not complete in time")
        time.sleep(0.01)
    elapsed = time.monotonic() - start
    with client.pool.connection() as conn:
        lat = [
            float(r["s"])
            for r in conn.execute(
                "SELECT extract(epoch FROM updated_at - created_at) AS s FROM executor.runs "
                "WHERE run_id = ANY(%s)",
                (ids,),
            )
        ]
    return 4 * runs / elapsed, lat


def latency_samples(client: Client, count: int) -> list[float]:
    """start_run → run_completed for runs started one at a time, from the ledger's clock.

    Throughput rounds start every run at once, so their per-run times measure the queue, not
    the executor; these runs have the workers to themselves.
    """
    out: list[float] = []
    for _ in range(count):
        run_id = client.start_run("noop", None)
        client.wait(run_id, timeout=60)
        with client.pool.connection() as conn:
            row = conn.execute(
                "SELECT extract(epoch FROM updated_at - created_at) AS s FROM executor.runs "
                "WHERE run_id = %s",
                (run_id,),
            ).fetchone()
        assert row is not None
        out.append(float(row["s"]))
    return out


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]


def run_bench(*, what: str = "all", seconds: float = 5.0, workers: int = 2, rounds: int = 3) -> int:
    from executor.config import resolve_urls
    from executor.storage.migrate import migrate

    db, redis_url = resolve_urls()
    migrate(db)
    results: dict[str, Any] = {}
    if what in ("all", "e2e"):
        from executor.transport.worker import ExecutorWorker

        base_class = next(
            f"{c.__module__}.{c.__qualname__}"
            for c in ExecutorWorker.__mro__[1:]
            if c.__module__.startswith("rq.")
        )
        runs = max(20, int(40 * seconds / 5))
        ours: list[float] = []
        theirs: list[float] = []
        latencies: list[float] = []
        with Client(db, redis_url) as client:
            for _ in range(rounds):
                theirs.append(baseline_round(redis_url, workers, runs * 4, base_class))
                with worker_processes(workers, db, redis_url):
                    _wait_workers(client.redis, workers)
                    rate, _ = e2e_round(client, runs)
                    latencies.extend(latency_samples(client, 20))
                ours.append(rate)
        results["e2e"] = {
            "workers": workers,
            "worker_class": f"executor.transport.worker.ExecutorWorker (extends {base_class})",
            "steps_per_s": statistics.median(ours),
            "rq_noop_jobs_per_s": statistics.median(theirs),
            "ratio": statistics.median(ours) / statistics.median(theirs),
            "p50_run_s": _pct(latencies, 0.50),
            "p99_run_s": _pct(latencies, 0.99),
            "rounds": rounds,
        }
        e = results["e2e"]
        print(f"end to end, {workers} workers, {rounds} alternating rounds (medians)")
        print(f"  executor steps/s            {e['steps_per_s']:8.1f}")
        print(
            f"  RQ no-op jobs/s ({base_class.rsplit('.', 1)[-1]})  {e['rq_noop_jobs_per_s']:8.1f}"
        )
        print(f"  ratio                       {e['ratio']:8.2f}x")
        p50, p99 = e["p50_run_s"] * 1000, e["p99_run_s"] * 1000
        print(
            f"  start_run → completed, one run at a time ({len(latencies)} runs): "
            f"p50 {p50:.1f} ms, p99 {p99:.1f} ms"
        )
    if what in ("all", "ledger"):
        from executor.ledger.bench import run_bench as ledger_bench

        results["ledger"] = ledger_bench(db, seconds=seconds)
    return 0
