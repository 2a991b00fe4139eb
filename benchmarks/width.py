"""Is a step's cost flat in the width of its run? root -> W parallel no-op steps -> join.

For W = 10 (40 runs a round), 100 (4 runs), 400 and 1,000 (one run each), with 2 workers,
on a fresh database per (round, W), W order rotated each round: steps/s per W (every step
counted, root and join included), and the ratio W=1000 / W=10 (1.0 is perfectly flat; the
issue's goal is >= 0.8). `--width 10000` instead checks that one run of 10,000 parallel
steps completes, and reports how long it took.

    python -m benchmarks.width [--rounds 3] [--width 10000] [--timeout 1800]
"""

from __future__ import annotations

import sys
import time
from typing import Any

from benchmarks.common import (
    Context,
    bench_dir,
    flush,
    median,
    rotated,
    say,
    table,
)
from benchmarks.ours import executor_workers, fresh_ledger, timed_batch
from benchmarks.workflows import width_workflow_name

RUNS_PER_WIDTH = {10: 40, 100: 4, 400: 1, 1000: 1}
NARROW, WIDE = 10, 1000
PLAN_GRACE_S = 120.0


def run(ctx: Context) -> dict[str, Any]:
    redis_url = ctx.redis_dbs.claim("width")
    per_width: dict[int, list[float]] = {w: [] for w in RUNS_PER_WIDTH}
    for r in range(ctx.rounds):
        for key in rotated([str(w) for w in RUNS_PER_WIDTH], r):
            w = int(key)
            rate = _round(ctx, redis_url, w, RUNS_PER_WIDTH[w], label=f"width_r{r}_w{w}")[
                "steps_per_s"
            ]
            per_width[w].append(rate)
            say(f"  round {r + 1}: W={w}: {rate:.1f} steps/s")
            ctx.redis_dbs.refresh()
    by_width: dict[int, dict[str, Any]] = {
        w: {"runs": RUNS_PER_WIDTH[w], "steps_per_s": median(v), "per_round": v}
        for w, v in per_width.items()
    }
    return {
        "workers": ctx.workers,
        "rounds": ctx.rounds,
        "by_width": by_width,
        "ratio_wide_to_narrow": by_width[WIDE]["steps_per_s"] / by_width[NARROW]["steps_per_s"],
    }


def _round(ctx: Context, redis_url: str, width: int, runs: int, *, label: str) -> dict[str, Any]:
    flush(redis_url)
    db = fresh_ledger(ctx.scratch, label)
    try:
        from executor.client import Client

        with executor_workers(ctx.workers, db, redis_url), Client(db, redis_url) as client:
            result = timed_batch(
                client,
                width_workflow_name(width),
                runs,
                width + 2,
                timeout=ctx.timeout,
                interval=0.02,
            )
        return {"steps_per_s": result.steps_per_s, "elapsed_s": result.elapsed_s}
    finally:
        ctx.scratch.drop(db)


def check(ctx: Context, width: int) -> dict[str, Any]:
    """One run of `width` parallel steps: did it complete, and in what time.

    A run no worker plans (still `pending` after PLAN_GRACE_S) fails the check early rather
    than after the whole timeout; the workers' logs say why.
    """
    from executor.client import Client

    redis_url = ctx.redis_dbs.claim("width-check")
    db = fresh_ledger(ctx.scratch, f"width_check_{width}")
    outcome: dict[str, Any] = {"width": width, "workers": ctx.workers, "timeout_s": ctx.timeout}
    try:
        with executor_workers(ctx.workers, db, redis_url), Client(db, redis_url) as client:
            started = time.monotonic()
            run_id = client.start_run(width_workflow_name(width), None)
            error = _await_wide_run(client, run_id, started, ctx.timeout)
            elapsed = time.monotonic() - started
            outcome.update(completed=error is None, elapsed_s=elapsed)
            if error is None:
                outcome["steps_per_s"] = (width + 2) / elapsed
            else:
                with client.pool.connection() as conn:
                    rows = conn.execute(
                        "SELECT status, count(*) AS n FROM executor.steps GROUP BY status"
                    ).fetchall()
                outcome.update(
                    error=error, steps_by_status={r["status"]: int(r["n"]) for r in rows}
                )
    finally:
        ctx.scratch.drop(db)
    return outcome


def _await_wide_run(client: Any, run_id: str, started: float, timeout: float) -> str | None:
    """None once the run completed, else why it did not."""
    while True:
        with client.pool.connection() as conn:
            row = conn.execute(
                "SELECT status FROM executor.runs WHERE run_id = %s", (run_id,)
            ).fetchone()
        status, waited = row["status"], time.monotonic() - started
        if status == "completed":
            return None
        if status in ("failed", "cancelled"):
            return f"the run ended {status}"
        if status == "pending" and waited > PLAN_GRACE_S:
            return (
                f"no worker planned the run in {PLAN_GRACE_S:.0f} s (it is still pending; "
                f"see {bench_dir() / 'logs'})"
            )
        if waited > timeout:
            return f"still {status} after {timeout:.0f} s"
        time.sleep(0.2)


def report(result: dict[str, Any]) -> str:
    rows = [[w, v["runs"], v["steps_per_s"]] for w, v in result["by_width"].items()]
    return (
        f"width: root -> W parallel no-op steps -> join, {result['workers']} workers, "
        f"{result['rounds']} alternating rounds (medians)\n"
        + table(["W", "runs/round", "steps/s"], rows)
        + f"\n  ratio W={WIDE} / W={NARROW}: {result['ratio_wide_to_narrow']:.2f}x"
        " (1.00x = flat; goal >= 0.80x)"
    )


def report_check(result: dict[str, Any]) -> str:
    head = (
        f"width check: one run of {result['width']:,} parallel steps, {result['workers']} workers"
    )
    if result["completed"]:
        return (
            f"{head}\n  completed in {result['elapsed_s']:.1f} s "
            f"({result['steps_per_s']:.1f} steps/s; W={NARROW} above is the baseline)"
        )
    return (
        f"{head}\n  NOT completed after {result['elapsed_s']:.0f} s: {result['error']}; "
        f"steps by status: {result['steps_by_status']}"
    )


def main(argv: list[str] | None = None) -> int:
    """`python -m benchmarks.width`: `executor bench --what width`, or the `--width` check."""
    from benchmarks.cli import main as bench

    args = sys.argv[1:] if argv is None else argv
    what = [] if any(a.startswith("--width") for a in args) else ["--what", "width"]
    return bench([*what, *args], prog="python -m benchmarks.width")


if __name__ == "__main__":
    sys.exit(main())
