"""End to end next to RQ alone, and the same with 1, 2 and 4 workers (scale-out).

Ours: steps/s of `noop` runs (4 no-op steps with a fan-out and a join) through N `executor
worker` processes. Next to it: RQ's own no-op jobs/s through N processes of the RQ worker
class ours extends, the same job count, no ledger at all. Rounds alternate (the order
rotates each round) and the report gives medians, so a noisy machine hurts both alike.

    python -m benchmarks.e2e [--workers 2] [--rounds 3] [--runs 40]
    python -m benchmarks.e2e --what scale
"""

from __future__ import annotations

import sys
import time
from typing import Any

import redis as redis_lib

from benchmarks.common import (
    Context,
    RedisDbs,
    ScratchDatabases,
    flush,
    median,
    rotated,
    say,
    table,
    wait_for,
)
from benchmarks.ours import ours_round, rq_base_class, rq_workers

BASELINE_QUEUE = "bench-baseline"
DEFAULT_RUNS = 40
SCALE_WORKERS = (1, 2, 4)


def rq_noop_round(redis_url: str, workers: int, jobs: int) -> float:
    """RQ alone: enqueue `jobs` no-ops while `workers` processes drain them; jobs/s."""
    from rq import Queue
    from rq.registry import FinishedJobRegistry
    from rq.serializers import JSONSerializer

    flush(redis_url)
    client: redis_lib.Redis = redis_lib.Redis.from_url(redis_url)
    queue = Queue(BASELINE_QUEUE, connection=client, serializer=JSONSerializer)
    registry = FinishedJobRegistry(queue=queue)
    try:
        with rq_workers(workers, redis_url, BASELINE_QUEUE, log_name="rq-noop"):
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
                theirs[n].append(rq_noop_round(redis_url, n, runs * 4))
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
    """`python -m benchmarks.e2e`: `executor bench --what e2e` (`--what scale` for 1, 2, 4)."""
    from benchmarks.cli import main as bench

    args = sys.argv[1:] if argv is None else argv
    what = [] if any(a.startswith("--what") for a in args) else ["--what", "e2e"]
    return bench([*what, *args], prog="python -m benchmarks.e2e")


if __name__ == "__main__":
    sys.exit(main())
