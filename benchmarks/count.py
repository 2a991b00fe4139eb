"""Counted, not guessed: statements, round trips and commits per step, and Redis commands.

Every connection of the producer (`Client.start_run`) and of 2 `executor worker` processes
goes through the counting proxies of `benchmarks.wire`; completion is watched on a direct
connection that is not counted. Runs go one at a time; after each, the counts must stay
still for 150 ms (trailing RQ bookkeeping lands in the window), and the report takes the
median run, divided by its 4 steps. The idle rate (workers with nothing to do) is measured
first and shown, so a sweep that lands in a window can be recognised.

Side by side: the naive two-statement write (conditional UPDATE + event INSERT in autocommit,
benchmarks.ledger) running the same 4-step run through the same proxy, and a plain RQ no-op
job (RQ's SimpleWorker, same Redis proxy) for Redis.

    python -m benchmarks.count [--runs 5] [--json]
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from typing import Any

import psycopg

from benchmarks.common import (
    Context,
    median,
    say,
    table,
    wait_for,
)
from benchmarks.ours import executor_workers, fresh_ledger, rq_job_finished, rq_workers
from benchmarks.wire import PostgresCounter, RedisCounter, Snapshot, counting

STEPS = 4
DEFAULT_RUNS = 5
IDLE_SECONDS = 6.0  # longer than the default sweep interval (5 s), so one sweep lands in it


def _quiet(pg: PostgresCounter | None, rd: RedisCounter, still: float = 0.15) -> None:
    """Wait until neither counter moves for `still` seconds (at most 3 s)."""

    def totals() -> tuple[int, int]:
        return (pg.snapshot().total() if pg else 0, rd.snapshot().total())

    last, since, deadline = totals(), time.monotonic(), time.monotonic() + 3.0
    while time.monotonic() < deadline:
        time.sleep(0.02)
        now = totals()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= still:
            return


def _per_step(deltas: list[tuple[Snapshot, Snapshot]]) -> dict[str, Any]:
    """Median over runs of each count, per step; statement/command tallies averaged."""
    pg = [d[0] for d in deltas]
    rd = [d[1] for d in deltas]
    by_sql: Counter[str] = Counter()
    by_cmd: Counter[str] = Counter()
    for p, r in deltas:
        by_sql.update(p.by_statement)
        by_cmd.update(r.by_statement)
    n = len(deltas)
    return {
        "statements": median([p.statements for p in pg]) / STEPS,
        "round_trips": median([p.round_trips for p in pg]) / STEPS,
        "commits": median([p.commits for p in pg]) / STEPS,
        "rollbacks": median([p.rollbacks for p in pg]) / STEPS,
        "redis_commands": median([r.statements for r in rd]) / STEPS,
        "redis_round_trips": median([r.round_trips for r in rd]) / STEPS,
        "statements_per_run_by_sql": {k: v / n for k, v in by_sql.most_common(20)},
        "redis_commands_per_run_by_name": {k: v / n for k, v in by_cmd.most_common()},
    }


def _ours(ctx: Context, runs: int) -> dict[str, Any]:
    from executor.client import Client

    redis_url = ctx.redis_dbs.claim("count")
    db = fresh_ledger(ctx.scratch, "count")
    try:
        with (
            counting(db, redis_url) as (pg, rd),
            executor_workers(ctx.workers, pg.url, rd.url, log_name="count"),
            Client(pg.url, rd.url) as client,
            psycopg.connect(db, autocommit=True) as watcher,
        ):

            def finish(run_id: str) -> None:
                def ended() -> bool:
                    row = watcher.execute(
                        "SELECT status FROM executor.runs WHERE run_id = %s", (run_id,)
                    ).fetchone()
                    return row is not None and row[0] in ("completed", "failed", "cancelled")

                wait_for(ended, timeout=60, what="a counted run", interval=0.002)
                _quiet(pg, rd)

            for _ in range(2):  # warm up: pools filled, statements prepared
                finish(client.start_run("noop", None))
            before = (pg.snapshot(), rd.snapshot())
            time.sleep(IDLE_SECONDS)
            idle = (pg.snapshot() - before[0], rd.snapshot() - before[1])
            deltas = []
            for _ in range(runs):
                start = (pg.snapshot(), rd.snapshot())
                finish(client.start_run("noop", None))
                deltas.append((pg.snapshot() - start[0], rd.snapshot() - start[1]))
            naive = _naive(db, pg)
    finally:
        ctx.scratch.drop(db)
    result = _per_step(deltas)
    result["idle_per_s"] = {
        "statements": idle[0].statements / IDLE_SECONDS,
        "commits": idle[0].commits / IDLE_SECONDS,
        "redis_commands": idle[1].statements / IDLE_SECONDS,
    }
    return {"ours": result, "naive": naive}


def _naive(db: str, pg: PostgresCounter) -> dict[str, float]:
    """The naive write of benchmarks.ledger, one 4-step run, counted through the same proxy."""
    from benchmarks.ledger import _NaiveWriter, _scratch_schema

    schema = "bench_count_naive"
    with psycopg.connect(db, autocommit=True) as admin:
        _scratch_schema(admin, schema)  # type: ignore[arg-type]
    with psycopg.connect(pg.url, autocommit=True) as conn:
        writer = _NaiveWriter(conn, schema, "naive", STEPS)  # type: ignore[arg-type]
        writer.run_id = "naive-1"
        before = pg.snapshot()
        writer.create()
        writer.start_run()
        for i, key in enumerate(writer.step_keys):
            writer.start_step(key)
            writer.complete_step(key, last=i == STEPS - 1)
        d = pg.snapshot() - before
    return {
        "statements": d.statements / STEPS,
        "round_trips": d.round_trips / STEPS,
        "commits": d.commits / STEPS,
    }


def _rq(ctx: Context, runs: int) -> dict[str, float]:
    """A plain RQ no-op job, one at a time, through the Redis proxy: commands per job."""
    import redis as redis_lib
    from rq import Queue
    from rq.serializers import JSONSerializer

    redis_url = ctx.redis_dbs.claim("count-rq")
    rd = RedisCounter(redis_url)
    conn: redis_lib.Redis = redis_lib.Redis.from_url(rd.url)
    direct: redis_lib.Redis = redis_lib.Redis.from_url(redis_url)  # not counted
    queue = Queue("bench-count", connection=conn, serializer=JSONSerializer)
    deltas: list[Snapshot] = []
    try:
        with rq_workers(
            ctx.workers, rd.url, "bench-count", log_name="count-rq", watch_url=redis_url
        ):
            for i in range(runs + 2):
                start = rd.snapshot()
                job = queue.enqueue("benchmarks.jobs.noop", result_ttl=60)
                key = job.key
                wait_for(
                    rq_job_finished(direct, key),
                    timeout=30,
                    what="an RQ job",
                    interval=0.002,
                )
                _quiet(None, rd)
                if i >= 2:  # the first two warm up
                    deltas.append(rd.snapshot() - start)
    finally:
        conn.close()
        direct.close()
        rd.close()
    return {
        "redis_commands_per_job": median([d.statements for d in deltas]),
        "redis_round_trips_per_job": median([d.round_trips for d in deltas]),
    }


def run(ctx: Context) -> dict[str, Any]:
    runs = ctx.runs or DEFAULT_RUNS
    out = _ours(ctx, runs)
    say("  counted our runs")
    out["rq"] = _rq(ctx, runs)
    out["runs"] = runs
    out["workers"] = ctx.workers
    return out


def report(result: dict[str, Any]) -> str:
    o, n, q = result["ours"], result["naive"], result["rq"]
    lines = [
        f"counting: one noop run at a time ({result['runs']} runs, median), "
        f"{result['workers']} workers, per step",
        table(
            ["", "ours", "naive UPDATE + INSERT"],
            [
                ["Postgres statements", o["statements"], n["statements"]],
                ["Postgres round trips", o["round_trips"], n["round_trips"]],
                ["Postgres commits", o["commits"], n["commits"]],
            ],
        ),
        table(
            ["", "ours per step", "RQ no-op job"],
            [
                ["Redis commands", o["redis_commands"], q["redis_commands_per_job"]],
                ["Redis round trips", o["redis_round_trips"], q["redis_round_trips_per_job"]],
            ],
        ),
        f"  idle workers: {o['idle_per_s']['statements']:.1f} statements/s, "
        f"{o['idle_per_s']['commits']:.1f} commits/s, "
        f"{o['idle_per_s']['redis_commands']:.1f} Redis commands/s",
        "  statements per run, by SQL (mean over runs):",
    ]
    lines += [f"    {v:5.1f}  {k}" for k, v in o["statements_per_run_by_sql"].items()]
    lines.append(
        "  Redis commands per run, by name: "
        + ", ".join(f"{k} {v:.1f}" for k, v in o["redis_commands_per_run_by_name"].items())
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`python -m benchmarks.count`: `executor bench --what count` with the same options."""
    from benchmarks.cli import main as bench

    args = sys.argv[1:] if argv is None else argv
    return bench(["--what", "count", *args], prog="python -m benchmarks.count")


if __name__ == "__main__":
    sys.exit(main())
