"""Latency, each figure next to the floor it is measured against.

1. `Client.start_run` per call from one producer (no workers running, so only the producer's
   cost is timed), next to a one-row INSERT + COMMIT on the same server (the floor for any
   durable enqueue) and an RQ enqueue of a no-op job on the same Redis (the floor for a
   queue push). Calls of the three alternate in rounds.
2. One run at a time, `noop` start -> completed (run_created -> run_completed in the ledger),
   2 workers, next to one RQ no-op job at a time (RQ's enqueued_at -> ended_at) with 2 RQ
   workers of the class ours extends.
3. A retry with a fixed 50 ms backoff (`bench_retry`): from the failing attempt's outcome
   (step_retrying) to the next attempt's start (step_started), next to the backoff itself.
4. A durable sleep of 200 ms (`bench_sleep`): how late the timer fires, from the wake_at
   its step_sleeping event names to the step_completed of the wake (the sweep leader's
   timers, every 250 ms), next to the 1 s DESIGN allows.
5. `Client.wait`'s return delay after the terminal commit, next to a 2 ms poll of the same
   row. The commit time is pg_xact_commit_timestamp of the run row when the server tracks
   commit timestamps, else the terminal event's time (its transaction's start, which makes
   the delay look longer by that transaction's length); the report says which.

    python -m benchmarks.latency [--rounds 3]
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

import psycopg
import redis as redis_lib

from benchmarks.common import (
    Context,
    flush,
    pct,
    rotated,
    say,
    table,
    wait_for,
)
from benchmarks.ours import (
    executor_workers,
    fresh_ledger,
    rq_job_finished,
    rq_workers,
    run_latencies,
    wait_terminal,
)
from benchmarks.workflows import RETRY_BACKOFF_S, SLEEP_S

START_CALLS = 100
SINGLE_RUNS = 20
RETRY_RUNS = 5
TIMER_RUNS = 10
WAIT_RUNS = 20


def run(ctx: Context) -> dict[str, Any]:
    from executor.client import Client

    redis_url = ctx.redis_dbs.claim("latency")
    db = fresh_ledger(ctx.scratch, "latency")
    out: dict[str, Any] = {"rounds": ctx.rounds, "workers": ctx.workers}
    try:
        with Client(db, redis_url) as client:
            out["start_run"] = _start_run_cost(client, ctx.rounds)
            say(f"  start_run: p50 {out['start_run']['start_run_ms']['p50']:.2f} ms")
            with executor_workers(ctx.workers, db, redis_url):
                out["single_run"] = _single_runs(client, ctx.rounds)
                say(f"  single run: p50 {out['single_run']['ours_ms']['p50']:.1f} ms")
                out["retry"] = _retries(client)
                say(f"  retry gap: p50 {out['retry']['gap_ms']['p50']:.0f} ms")
                out["timer"] = _timers(client)
                say(f"  timer lateness: p50 {out['timer']['late_ms']['p50']:.0f} ms")
                out["wait"] = _wait_delay(client, ctx.rounds)
                say(f"  wait delay: p50 {out['wait']['wait_ms']['p50']:.1f} ms")
        rq_url = ctx.redis_dbs.claim("latency-rq")
        out["single_run"]["rq_job_ms"] = _rq_single_jobs(
            rq_url, ctx.workers, SINGLE_RUNS * ctx.rounds
        )
    finally:
        ctx.scratch.drop(db)
    return out


def _dist(values_s: list[float]) -> dict[str, float]:
    ms = [v * 1000 for v in values_s]
    return {"p50": pct(ms, 0.5), "p99": pct(ms, 0.99), "mean": sum(ms) / len(ms), "n": len(ms)}


def _start_run_cost(client: Any, rounds: int) -> dict[str, Any]:
    from rq import Queue
    from rq.serializers import JSONSerializer

    samples: dict[str, list[float]] = {"start_run": [], "insert_commit": [], "rq_enqueue": []}
    queue = Queue("bench-enqueue", connection=client.redis, serializer=JSONSerializer)
    with psycopg.connect(client.database_url, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS bench_enqueue (id bigserial PRIMARY KEY, "
            "payload jsonb, created_at timestamptz DEFAULT now())"
        )
        actions: dict[str, Callable[[], object]] = {
            "start_run": lambda: client.start_run("noop", None),
            "insert_commit": lambda: conn.execute(
                "INSERT INTO bench_enqueue (payload) VALUES ('{}')"
            ),
            "rq_enqueue": lambda: _enqueue_noop(queue),
        }
        for name in actions:  # warm up connections and plans
            for _ in range(5):
                actions[name]()
        for r in range(rounds):
            for name in rotated(list(actions), r):
                for _ in range(START_CALLS):
                    t = time.perf_counter()
                    actions[name]()
                    samples[name].append(time.perf_counter() - t)
    return {
        "calls_per_round": START_CALLS,
        "start_run_ms": _dist(samples["start_run"]),
        "insert_commit_ms": _dist(samples["insert_commit"]),
        "rq_enqueue_ms": _dist(samples["rq_enqueue"]),
    }


def _enqueue_noop(queue: Any) -> None:
    queue.enqueue("benchmarks.jobs.noop", result_ttl=60)


def _await_run(client: Any, run_id: str, timeout: float = 60.0) -> None:
    wait_terminal(client, [run_id], timeout=timeout, interval=0.002)


def _single_runs(client: Any, rounds: int) -> dict[str, Any]:
    for _ in range(3):  # warm up: the workers' first jobs import and connect
        _await_run(client, client.start_run("noop", None))
    ids = []
    for _ in range(rounds * SINGLE_RUNS):
        ids.append(client.start_run("noop", None))
        _await_run(client, ids[-1])
    return {"runs": len(ids), "ours_ms": _dist(run_latencies(client, ids))}


def _rq_single_jobs(redis_url: str, workers: int, count: int) -> dict[str, float]:
    """One RQ no-op job at a time: RQ's own enqueued_at -> ended_at."""
    from rq import Queue
    from rq.job import Job
    from rq.serializers import JSONSerializer

    flush(redis_url)
    conn: redis_lib.Redis = redis_lib.Redis.from_url(redis_url)
    queue = Queue("bench-single", connection=conn, serializer=JSONSerializer)
    samples: list[float] = []
    try:
        with rq_workers(workers, redis_url, "bench-single", log_name="rq-single"):
            for _ in range(count):
                job = queue.enqueue("benchmarks.jobs.noop", result_ttl=60)
                key = job.key
                wait_for(
                    rq_job_finished(conn, key),
                    timeout=30,
                    what="an RQ job",
                    interval=0.002,
                )
                done = Job.fetch(job.id, connection=conn, serializer=JSONSerializer)
                if done.enqueued_at and done.ended_at:
                    samples.append((done.ended_at - done.enqueued_at).total_seconds())
    finally:
        conn.close()
    return _dist(samples)


def _gaps(client: Any, run_ids: Iterable[str], sql: str) -> tuple[list[float], int]:
    """Each run's gap `s` (seconds) read by `sql` once it ended, and how many were `early`.
    `run_ids` may be lazy: a generator starts each run only after the last one ended."""
    gaps: list[float] = []
    early = 0
    for run_id in run_ids:
        _await_run(client, run_id, timeout=120)
        with client.pool.connection() as conn:
            row = conn.execute(sql, (run_id,)).fetchone()
        if row["s"] is not None:
            gaps.append(float(row["s"]))
            early += bool(row["early"])
    return gaps, early


def _retries(client: Any) -> dict[str, Any]:
    gaps, early = _gaps(
        client,
        (client.start_run("bench_retry", None) for _ in range(RETRY_RUNS)),
        "SELECT extract(epoch FROM "
        "min(created_at) FILTER (WHERE type = 'step_started' AND attempt = 2) - "
        "min(created_at) FILTER (WHERE type = 'step_retrying' AND attempt = 1)) AS s, "
        "min(created_at) FILTER (WHERE type = 'step_started' AND attempt = 2) < "
        "min((payload->>'next_attempt_at')::timestamptz) "
        "FILTER (WHERE type = 'step_retrying' AND attempt = 1) AS early "
        "FROM executor.events WHERE run_id = %s",
    )
    return {
        "runs": len(gaps),
        "backoff_ms": RETRY_BACKOFF_S * 1000,
        "gap_ms": _dist(gaps),
        "started_before_next_attempt_at": early,
        "target_ms": RETRY_BACKOFF_S * 1000 + 100,
    }


def _timers(client: Any) -> dict[str, Any]:
    """Runs started together, so their timers fall due at different points of the sweep."""
    late, early = _gaps(
        client,
        [client.start_run("bench_sleep", None) for _ in range(TIMER_RUNS)],
        "SELECT s, s < 0 AS early FROM (SELECT extract(epoch FROM "
        "min(created_at) FILTER (WHERE type = 'step_completed' AND step_key = 'nap') - "
        "min((payload->>'wake_at')::timestamptz) FILTER (WHERE type = 'step_sleeping'))"
        " AS s FROM executor.events WHERE run_id = %s) AS g",
    )
    return {
        "runs": len(late),
        "sleep_ms": SLEEP_S * 1000,
        "late_ms": _dist(late),
        "fired_early": early,
        "target_ms": 1000.0,
    }


def _commit_time(client: Any, run_id: str, tracked: bool) -> datetime:
    with client.pool.connection() as conn:
        if tracked:
            row = conn.execute(
                "SELECT pg_xact_commit_timestamp(xmin) AS t FROM executor.runs WHERE run_id = %s",
                (run_id,),
            ).fetchone()
            if row is not None and row["t"] is not None:
                return row["t"]  # type: ignore[no-any-return]
        row = conn.execute(
            "SELECT max(created_at) AS t FROM executor.events WHERE run_id = %s "
            "AND type IN ('run_completed', 'run_failed', 'run_cancelled')",
            (run_id,),
        ).fetchone()
    return row["t"]  # type: ignore[no-any-return]


def _wait_delay(client: Any, rounds: int) -> dict[str, Any]:
    with client.pool.connection() as conn:
        row = conn.execute("SHOW track_commit_timestamp").fetchone()
        tracked = row is not None and row["track_commit_timestamp"] == "on"
    samples: dict[str, list[float]] = {"wait": [], "poll_2ms": []}
    for r in range(rounds):
        for name in rotated(list(samples), r):
            for _ in range(WAIT_RUNS):
                run_id = client.start_run("noop", None)
                if name == "wait":
                    client.wait(run_id, timeout=60)
                else:
                    _await_run(client, run_id)  # polls every 2 ms, worst case 1 ms + a query
                returned = time.time()
                committed = _commit_time(client, run_id, tracked).timestamp()
                samples[name].append(returned - committed)
    return {
        "runs_per_round": WAIT_RUNS,
        "commit_time_from": "pg_xact_commit_timestamp"
        if tracked
        else "terminal event created_at (transaction start; overstates the delay slightly)",
        "wait_ms": _dist(samples["wait"]),
        "poll_ms": _dist(samples["poll_2ms"]),
        "target_ms": 10.0,
    }


def report(result: dict[str, Any]) -> str:
    s, one, rt, w = result["start_run"], result["single_run"], result["retry"], result["wait"]
    tm = result["timer"]

    def row(name: str, d: dict[str, float]) -> list[Any]:
        return [name, d["p50"], d["p99"], d["mean"], int(d["n"])]

    lines = [
        f"latency ({result['rounds']} alternating rounds; ms)",
        table(
            ["what", "p50", "p99", "mean", "n"],
            [
                row("Client.start_run, per call (no workers)", s["start_run_ms"]),
                row("  floor: INSERT one row + COMMIT", s["insert_commit_ms"]),
                row("  floor: RQ enqueue of a no-op job", s["rq_enqueue_ms"]),
                row(
                    f"noop run, start -> completed, one at a time, {result['workers']} workers",
                    one["ours_ms"],
                ),
                row("  next to: one RQ no-op job, enqueued -> ended", one["rq_job_ms"]),
                row(
                    f"retry gap (attempt 1 end -> attempt 2 start), backoff "
                    f"{rt['backoff_ms']:.0f} ms",
                    rt["gap_ms"],
                ),
                row(
                    f"timer lateness (fired - wake_at), sleep {tm['sleep_ms']:.0f} ms",
                    tm["late_ms"],
                ),
                row("Client.wait return after the terminal commit", w["wait_ms"]),
                row("  next to: a 2 ms poll of the same row", w["poll_ms"]),
            ],
        ),
        f"  targets: start_run <= 2 ms; retry gap <= {rt['target_ms']:.0f} ms; timer <= "
        f"{tm['target_ms']:.0f} ms late; wait <= "
        f"{w['target_ms']:.0f} ms. Commit time from {w['commit_time_from']}.",
    ]
    if rt["started_before_next_attempt_at"]:
        lines.append(
            f"  NOTE: {rt['started_before_next_attempt_at']} of {rt['runs']} retries started "
            "before their step_retrying payload's next_attempt_at"
        )
    if tm["fired_early"]:
        lines.append(f"  NOTE: {tm['fired_early']} of {tm['runs']} timers fired before wake_at")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`python -m benchmarks.latency`: `executor bench --what latency` with the same options."""
    from benchmarks.cli import main as bench

    args = sys.argv[1:] if argv is None else argv
    return bench(["--what", "latency", *args], prog="python -m benchmarks.latency")


if __name__ == "__main__":
    sys.exit(main())
