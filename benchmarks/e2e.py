"""End to end next to RQ alone, and the same with 1, 2 and 4 workers (scale-out).

Ours: steps/s of `noop` runs (4 no-op steps with a fan-out and a join) through N `executor
worker` processes. Next to it: RQ's own no-op jobs/s through N processes of the RQ worker
class ours extends, the same job count, no ledger at all. Rounds alternate (the order
rotates each round) and the report gives medians, so a noisy machine hurts both alike.

    python -m benchmarks.e2e [--workers 2] [--rounds 3] [--runs 40]
    python -m benchmarks.e2e --scale 1,2,4
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import redis as redis_lib

from benchmarks.common import (
    Context,
    RedisDbs,
    ScratchDatabases,
    child_env,
    flush,
    median,
    processes,
    rotated,
    say,
    table,
    wait_for,
)
from benchmarks.ours import ours_round, registered_workers

BASELINE_QUEUE = "bench-baseline"
DEFAULT_RUNS = 40
SCALE_WORKERS = (1, 2, 4)


def rq_base_class() -> str:
    """The RQ worker class `executor worker` extends, as a dotted path."""
    from executor.transport.worker import ExecutorWorker

    return next(
        f"{c.__module__}.{c.__qualname__}"
        for c in ExecutorWorker.__mro__[1:]
        if c.__module__.startswith("rq.")
    )


def rq_noop_round(redis_url: str, workers: int, jobs: int, worker_class: str) -> float:
    """RQ alone: enqueue `jobs` no-ops while `workers` processes drain them; jobs/s."""
    from rq import Queue
    from rq.registry import FinishedJobRegistry
    from rq.serializers import JSONSerializer

    flush(redis_url)
    client: redis_lib.Redis = redis_lib.Redis.from_url(redis_url)
    queue = Queue(BASELINE_QUEUE, connection=client, serializer=JSONSerializer)
    registry = FinishedJobRegistry(queue=queue)
    command = [
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
    ]
    try:
        with processes([command] * workers, env=child_env(), log_name="rq-noop") as procs:
            wait_for(
                lambda: registered_workers(redis_url) >= workers,
                timeout=60,
                what="RQ workers to register",
                procs=procs,
                interval=0.05,
            )
            start = time.monotonic()
            for _ in range(jobs):
                queue.enqueue("benchmarks.jobs.noop", result_ttl=600)
            wait_for(lambda: registry.count >= jobs, timeout=300, what="RQ no-op jobs")
            return jobs / (time.monotonic() - start)
    finally:
        client.close()


def side_by_side(
    scratch: ScratchDatabases,
    redis_dbs: RedisDbs,
    *,
    worker_counts: tuple[int, ...],
    rounds: int,
    runs: int,
) -> dict[str, Any]:
    """For each worker count: our noop steps/s next to RQ no-op jobs/s, alternating."""
    base = rq_base_class()
    redis_url = redis_dbs.claim("e2e")
    ours: dict[int, list[float]] = {n: [] for n in worker_counts}
    theirs: dict[int, list[float]] = {n: [] for n in worker_counts}
    latencies: dict[int, list[float]] = {n: [] for n in worker_counts}
    slots = [f"{side}:{n}" for n in worker_counts for side in ("ours", "rq")]
    for r in range(rounds):
        for slot in rotated(slots, r):
            side, n = slot.split(":")[0], int(slot.split(":")[1])
            if side == "ours":
                result = ours_round(
                    scratch, redis_url, workers=n, runs=runs, label=f"e2e_r{r}_w{n}"
                )
                ours[n].append(result.steps_per_s)
                latencies[n].extend(result.latencies_s)
            else:
                theirs[n].append(rq_noop_round(redis_url, n, runs * 4, base))
            redis_dbs.refresh()
        say(f"  round {r + 1}/{rounds} done")
    by_workers: dict[int, dict[str, Any]] = {}
    for n in worker_counts:
        o, t = median(ours[n]), median(theirs[n])
        by_workers[n] = {
            "steps_per_s": o,
            "rq_noop_jobs_per_s": t,
            "ratio": o / t,
            "per_round": ours[n],
            "rq_per_round": theirs[n],
        }
    first = worker_counts[0]
    for n in worker_counts:
        by_workers[n]["scaling_vs_first"] = (
            by_workers[n]["steps_per_s"] / by_workers[first]["steps_per_s"]
        )
        by_workers[n]["rq_scaling_vs_first"] = (
            by_workers[n]["rq_noop_jobs_per_s"] / by_workers[first]["rq_noop_jobs_per_s"]
        )
    return {
        "workflow": "noop (first -> left, right -> last)",
        "runs_per_round": runs,
        "rounds": rounds,
        "rq_worker_class": base,
        "by_workers": by_workers,
    }


def format_side_by_side(result: dict[str, Any], title: str) -> str:
    base = result["rq_worker_class"].rsplit(".", 1)[-1]
    headers = ["workers", "ours steps/s", f"RQ {base} no-op jobs/s", "ratio"]
    scaling = len(result["by_workers"]) > 1
    if scaling:
        headers += ["ours vs first row", "RQ vs first row"]
    rows = []
    for n, v in result["by_workers"].items():
        row = [n, v["steps_per_s"], v["rq_noop_jobs_per_s"], f"{v['ratio']:.2f}x"]
        if scaling:
            row += [f"{v['scaling_vs_first']:.2f}x", f"{v['rq_scaling_vs_first']:.2f}x"]
        rows.append(row)
    return (
        f"{title}: {result['runs_per_round']} noop runs a round, {result['rounds']} alternating "
        "rounds (medians)\n" + table(headers, rows)
    )


def run_e2e(ctx: Context) -> dict[str, Any]:
    return side_by_side(
        ctx.scratch,
        ctx.redis_dbs,
        worker_counts=(ctx.workers,),
        rounds=ctx.rounds,
        runs=ctx.runs or DEFAULT_RUNS,
    )


def run_scale(ctx: Context) -> dict[str, Any]:
    return side_by_side(
        ctx.scratch,
        ctx.redis_dbs,
        worker_counts=SCALE_WORKERS,
        rounds=ctx.rounds,
        runs=ctx.runs or DEFAULT_RUNS,
    )


def report_e2e(result: dict[str, Any]) -> str:
    return format_side_by_side(result, "end to end")


def report_scale(result: dict[str, Any]) -> str:
    return format_side_by_side(result, "scale-out, one machine")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.e2e", description=__doc__)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--scale", help="worker counts, e.g. 1,2,4 (overrides --workers)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    from executor.config import resolve_urls

    db, redis_url = resolve_urls()
    counts = tuple(int(x) for x in args.scale.split(",")) if args.scale else (args.workers,)
    scratch, dbs = ScratchDatabases(db), RedisDbs(redis_url)
    try:
        result = side_by_side(
            scratch, dbs, worker_counts=counts, rounds=args.rounds, runs=args.runs
        )
    finally:
        scratch.close()
        dbs.release()
    print(json.dumps(result, indent=2) if args.json else format_side_by_side(result, "end to end"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
