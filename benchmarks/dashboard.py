"""Is the dashboard still fast with 100,000 runs? Seed a scratch database and time the pages.

    python -m benchmarks.dashboard --runs 100000 --requests 200

1. Creates a scratch database (`executor_dashboard_bench` on the server of
   EXECUTOR_DATABASE_URL, or --database-url), applies the migrations and seeds it with one
   `INSERT … SELECT generate_series` per table: N runs over a few days, 3 steps per run (2% of
   runs failed, 1% cancelled, the newest 200 running), and N/2 drops. Then ANALYZE, as
   autovacuum would.
2. Serves the dashboard under uvicorn on a free 127.0.0.1 port and times real HTTP requests
   (HTML rendering included): the first page and a deep keyset page (~90% of the way down)
   of the runs list, filtered variants, the JSON API, failed steps and drops.
3. Prints p50/p95/max in ms per page against the target (200 ms p95) and drops the scratch
   database unless --keep.
"""

from __future__ import annotations

import argparse
import os
import secrets
import socket
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from executor.commands.models import Command
from executor.dashboard.queries import Cursor
from executor.dashboard.settings import DashboardSettings
from executor.ledger.outcome import Outcome
from executor.storage.urls import with_database

SCRATCH_DB = "executor_dashboard_bench"
TARGET_MS = 200.0
_TOKEN = secrets.token_urlsafe(24)  # a viewer token for this process only

SEED_RUNS = """
INSERT INTO executor.runs
    (run_id, workflow, status, concurrency_key, input, output, error, last_seq, created_at,
     updated_at)
SELECT 'bench-' || lpad(g::text, 8, '0'),
       (ARRAY['orders', 'billing', 'reports', 'emails', 'etl'])[1 + g %% 5],
       CASE WHEN g > %(n)s - 200 THEN 'running'
            WHEN g %% 50 = 0 THEN 'failed'
            WHEN g %% 97 = 0 THEN 'cancelled'
            ELSE 'completed' END,
       CASE WHEN g <= %(n)s - 200 AND g %% 3 = 0 THEN 'customer-' || (g %% 5000) END,
       jsonb_build_object('order', g),
       CASE WHEN g <= %(n)s - 200 AND g %% 50 <> 0 AND g %% 97 <> 0
            THEN jsonb_build_object('shipped', true) END,
       CASE WHEN g <= %(n)s - 200 AND g %% 50 = 0
            THEN jsonb_build_object('message', 'step charge failed', 'step_key', 'charge') END,
       12,
       now() - (%(n)s - g) * interval '3 seconds',
       now() - (%(n)s - g) * interval '3 seconds' + interval '40 seconds'
FROM generate_series(1, %(n)s) AS g
"""

SEED_STEPS = """
INSERT INTO executor.steps
    (run_id, step_key, status, attempt, max_attempts, depends_on, error, created_at, updated_at)
SELECT r.run_id, s.key,
       CASE r.status
           WHEN 'completed' THEN 'completed'
           WHEN 'cancelled' THEN CASE WHEN s.pos = 1 THEN 'completed' ELSE 'cancelled' END
           WHEN 'failed' THEN (ARRAY['completed', 'failed', 'pending'])[s.pos]
           ELSE (ARRAY['completed', 'running', 'pending'])[s.pos] END,
       CASE WHEN r.status IN ('failed', 'running') AND s.pos = 3 THEN 0
            WHEN r.status = 'failed' AND s.pos = 2 THEN 3 ELSE 1 END,
       3,
       s.deps,
       CASE WHEN r.status = 'failed' AND s.pos = 2 THEN jsonb_build_object(
           'message', 'card declined', 'type', 'PaymentDeclined',
           'traceback', 'Traceback (most recent call last):\n  ...\nPaymentDeclined') END,
       r.created_at,
       r.updated_at
FROM executor.runs AS r
CROSS JOIN (VALUES ('fetch', 1, '{}'::text[]), ('charge', 2, '{fetch}'), ('ship', 3, '{charge}'))
    AS s(key, pos, deps)
"""

SEED_DROPS = """
INSERT INTO executor.drops
    (idempotency_key, run_id, step_key, attempt, command_type, reason, detail, received_at)
SELECT 'start_step:bench-' || lpad((g * 2)::text, 8, '0') || ':fetch:1',
       'bench-' || lpad((g * 2)::text, 8, '0'), 'fetch', 1, 'start_step',
       (ARRAY['duplicate', 'stale_attempt', 'terminal'])[1 + g %% 3],
       'redelivered job', now() - (%(n)s - g) * interval '6 seconds'
FROM generate_series(1, %(n)s / 2) AS g
"""


def seed(admin_url: str, runs: int) -> str:
    """A fresh scratch database with `runs` runs; returns its URL."""
    from executor.storage.migrate import migrate

    ident = sql.Identifier(SCRATCH_DB)
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(ident))
        admin.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(ident))
    url = with_database(admin_url, SCRATCH_DB)
    migrate(url)
    started = time.perf_counter()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(SEED_RUNS, {"n": runs})
        conn.execute(SEED_STEPS)
        conn.execute(SEED_DROPS, {"n": runs})
        conn.execute("ANALYZE executor.runs, executor.steps, executor.drops")
    print(
        f"seeded {runs:,} runs, {3 * runs:,} steps, {runs // 2:,} drops in "
        f"{time.perf_counter() - started:.1f} s",
        file=sys.stderr,
    )
    return url


def drop(admin_url: str) -> None:
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(SCRATCH_DB))
        )


class _ReadOnlyBackend:
    """The pages need no actions and no Redis; the queues page then says Redis is absent."""

    redis = None

    def apply(self, command: Command) -> Outcome:
        raise RuntimeError("the bench does not apply commands")


@contextmanager
def running_server(url: str) -> Iterator[str]:
    import uvicorn

    from executor.dashboard.app import create_app

    settings = DashboardSettings(database_url=url, viewer_tokens=(_TOKEN,))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(settings, backend=_ReadOnlyBackend()),
            host="127.0.0.1",
            port=port,
            log_level="warning",
            access_log=False,
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the dashboard did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def _cursor_at(url: str, offset: int, where: str = "", params: tuple[Any, ...] = ()) -> str:
    """The keyset cursor of the row `offset` rows down the list: a deep page."""
    with psycopg.connect(url) as conn:
        row = conn.execute(
            f"SELECT created_at, run_id FROM executor.runs {where}"
            " ORDER BY created_at DESC, run_id DESC OFFSET %s LIMIT 1",
            (*params, offset),
        ).fetchone()
    assert row is not None
    return Cursor((row[0], row[1])).encode()


@dataclass
class Result:
    name: str
    path: str
    timings_ms: list[float]

    @property
    def p50(self) -> float:
        return statistics.median(self.timings_ms)

    @property
    def p95(self) -> float:
        ordered = sorted(self.timings_ms)
        return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


def time_pages(base: str, url: str, runs: int, requests: int) -> list[Result]:
    import httpx

    deep = int(runs * 0.9)
    pages = [
        ("runs, first page", "/runs"),
        ("runs, deep keyset page", f"/runs?after={_cursor_at(url, deep)}"),
        ("runs, status=failed, first page", "/runs?status=failed"),
        (
            "runs, workflow=orders, deep page",
            "/runs?workflow=orders&after="
            + _cursor_at(url, deep // 5, "WHERE workflow = %s", ("orders",)),
        ),
        ("runs, created in the last hour", "/runs?from=1h"),
        ("runs, concurrency_key=customer-4242", "/runs?concurrency_key=customer-4242"),
        ("runs, run id prefix search", "/runs?q=bench-0009999"),
        ("runs, live fragment", "/runs"),
        ("api: GET /api/runs", "/api/runs"),
        ("api: GET /api/runs deep", f"/api/runs?after={_cursor_at(url, deep)}"),
        ("failed steps, first page", "/failed"),
        ("drops, first page", "/drops"),
        ("run detail", f"/runs/bench-{runs // 2:08d}"),
    ]
    results = []
    headers = {"Authorization": f"Bearer {_TOKEN}"}
    with httpx.Client(base_url=base, headers=headers, timeout=30) as client:
        for name, path in pages:
            extra = {"X-Live-Fragment": "1"} if "fragment" in name else {}
            for _ in range(5):  # warm the pool, the plan cache and the page cache
                client.get(path, headers=extra).raise_for_status()
            timings = []
            for _ in range(requests):
                start = time.perf_counter()
                response = client.get(path, headers=extra)
                timings.append((time.perf_counter() - start) * 1000)
                response.raise_for_status()
            results.append(Result(name, path, timings))
    return results


def report(results: list[Result], runs: int, requests: int, target: float) -> bool:
    print(
        f"\ndashboard pages over real HTTP, {runs:,} runs, {requests} requests each "
        f"(target p95 < {target:.0f} ms)\n"
    )
    print(f"{'page':40} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8}")
    ok = True
    for r in results:
        flag = "" if r.p95 < target else "  over target"
        ok = ok and not flag
        print(f"{r.name:40} {r.p50:8.1f} {r.p95:8.1f} {max(r.timings_ms):8.1f}{flag}")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.dashboard")
    parser.add_argument(
        "--database-url",
        default=os.environ.get("EXECUTOR_DATABASE_URL"),
        help="a Postgres server to create the scratch database on (default: "
        "EXECUTOR_DATABASE_URL, else the embedded server)",
    )
    parser.add_argument("--runs", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--target-ms", type=float, default=TARGET_MS)
    parser.add_argument("--keep", action="store_true", help="keep the scratch database")
    args = parser.parse_args(argv)
    admin_url = args.database_url
    if not admin_url:
        from executor.config import resolve_database_url

        admin_url = resolve_database_url()
    url = seed(admin_url, args.runs)
    try:
        with running_server(url) as base:
            results = time_pages(base, url, args.runs, args.requests)
    finally:
        if not args.keep:
            drop(admin_url)
    return 0 if report(results, args.runs, args.requests, args.target_ms) else 1


if __name__ == "__main__":
    sys.exit(main())
