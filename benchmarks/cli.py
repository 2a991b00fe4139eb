"""`executor bench` (also `python -m benchmarks`): chosen sub-benches, one report.

Every figure is printed next to the baseline it was measured against in the same run
(alternating rounds, medians): only ratios mean anything on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from benchmarks.common import Context, RedisDbs, ScratchDatabases, load_average, say


@dataclass(frozen=True)
class SubBench:
    help: str
    run: Callable[[Context], dict[str, Any]]
    report: Callable[[dict[str, Any]], str]


def _sub_benches() -> dict[str, SubBench]:
    from benchmarks import count, e2e, latency, ledger, width
    from benchmarks.peers import compare

    return {
        "e2e": SubBench("noop end to end next to RQ no-op jobs", e2e.run_e2e, e2e.report_e2e),
        "ledger": SubBench(
            "Ledger.apply next to the naive two-statement write",
            ledger.run_scratch,
            ledger.format_report,
        ),
        "width": SubBench(
            "steps/s for W = 10, 100, 400, 1000 parallel steps", width.run, width.report
        ),
        "latency": SubBench(
            "start_run cost, run latency, retry gap, wait delay", latency.run, latency.report
        ),
        "scale": SubBench(
            "noop end to end with 1, 2 and 4 workers", e2e.run_scale, e2e.report_scale
        ),
        "count": SubBench(
            "statements, round trips, commits, Redis commands per step", count.run, count.report
        ),
        "peers": SubBench(
            "the same workflow in DBOS, Procrastinate, RQ and Celery", compare.run, compare.report
        ),
    }


DEFAULT_SET = ("e2e", "ledger", "width", "latency", "scale", "count")
NAMES = (*DEFAULT_SET, "peers")


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Measure the executor next to baselines and peers, side by side. "
        "See docs/benchmarks.md.",
    )
    p.add_argument(
        "--what",
        default=None,
        help=f"comma-separated sub-benches: {', '.join(NAMES)}, or 'all' (everything but "
        "peers; the default unless --peers or --width is given)",
    )
    p.add_argument(
        "--peers",
        action="store_true",
        help="compare with DBOS, Procrastinate, RQ and Celery (pip install -e '.[bench]')",
    )
    p.add_argument(
        "--systems",
        default="ours,dbos,procrastinate,rq,celery",
        help="which systems --peers runs (default: all five)",
    )
    p.add_argument(
        "--width",
        type=int,
        choices=(10_000,),
        help="only check that one run of this many parallel steps completes, and report its time",
    )
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    p.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    p.add_argument("--runs", type=int, help="runs a round (default: each sub-bench's own)")
    p.add_argument("--seconds", type=float, default=5.0, help="ledger bench duration")
    p.add_argument("--timeout", type=float, default=1800.0, help="per batch of runs, seconds")
    p.add_argument(
        "--rq-python",
        help="an interpreter with RQ 2.x for the RQ peer (default: a "
        "virtualenv the bench creates under the data folder)",
    )
    p.add_argument("--keep-databases", action="store_true", help="do not drop scratch databases")
    p.add_argument("--json", action="store_true", help="one JSON document on stdout")
    return p


def selected(args: argparse.Namespace) -> list[str]:
    if args.what is None:
        if args.peers or args.width:
            return ["peers"] if args.peers else []
        return list(DEFAULT_SET)
    names = [n.strip() for n in args.what.split(",") if n.strip()]
    out: list[str] = []
    for n in names:
        if n == "all":
            out += [x for x in DEFAULT_SET if x not in out]
        elif n in NAMES:
            out += [n] if n not in out else []
        else:
            raise SystemExit(f"unknown sub-bench {n!r}; choose from {', '.join(NAMES)} or all")
    if args.peers and "peers" not in out:
        out.append("peers")
    return out


def main(argv: Sequence[str] | None = None, *, prog: str = "python -m benchmarks") -> int:
    args = build_parser(prog).parse_args(argv)
    names = selected(args)
    from executor.config import resolve_urls

    db, redis_url = resolve_urls()
    ctx = Context(
        database_url=db,
        redis_url=redis_url,
        scratch=ScratchDatabases(db, keep=args.keep_databases),
        redis_dbs=RedisDbs(redis_url),
        rounds=args.rounds,
        workers=args.workers,
        runs=args.runs,
        seconds=args.seconds,
        timeout=args.timeout,
        systems=tuple(s.strip() for s in args.systems.split(",") if s.strip()),
        options={"rq_python": args.rq_python},
    )
    benches = _sub_benches()
    doc: dict[str, Any] = {
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {
            "cpus": _cpus(),
            "python": platform.python_version(),
            "load_average_1m_before": load_average(),
        },
        "results": {},
    }
    failed = False
    try:
        for name in names:
            say(f"== {name}: {benches[name].help}")
            started = time.monotonic()
            result = benches[name].run(ctx)
            result["duration_s"] = time.monotonic() - started
            doc["results"][name] = result
            if not args.json:
                print(benches[name].report(result) + "\n", flush=True)
        if args.width:
            from benchmarks import width

            say(f"== width check: one run of {args.width:,} parallel steps")
            result = width.check(ctx, args.width)
            doc["results"]["width_check"] = result
            failed = not result["completed"]
            if not args.json:
                print(width.report_check(result) + "\n", flush=True)
    finally:
        ctx.scratch.close()
        ctx.redis_dbs.release()
    doc["machine"]["load_average_1m_after"] = load_average()
    if args.json:
        print(json.dumps(doc, indent=2, default=str))
    else:
        la = doc["machine"]
        print(
            f"load average (1 min) before/after: {la['load_average_1m_before']:.2f} / "
            f"{la['load_average_1m_after']:.2f} on {la['cpus']} CPUs"
        )
    return 1 if failed else 0


def _cpus() -> int:
    import os

    return os.cpu_count() or 0


if __name__ == "__main__":
    sys.exit(main())
