"""Build a large valid ledger with generate_series, then time `verify` over it.

    python benchmarks/verify_ledger.py build   --database-url URL [--events 1000000]
    python benchmarks/verify_ledger.py measure --database-url URL [--verify-file FILE]

`build` creates (or recreates) the database URL names, migrates it and fills it in a few
INSERT ... SELECT statements: every run is a diamond (a -> b, c -> d) that completed, with
fencing tokens, one duplicate delivery and one late start per run, like a busy production
ledger. The logs are valid, so verify must find nothing.

`measure` runs verify in this process and prints wall time and peak RSS (the process's
high-water mark, minus what it was before verify ran). `--verify-file` loads `verify` from
another file instead, e.g. an older executor/ledger/verify.py taken from git, so two
implementations are measured on the same data.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import sys
import time
import tracemalloc
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from executor.storage.migrate import migrate

EVENTS_PER_RUN = 19

# seq, type, step, attempt, key prefix, key tail. The key is prefix:run_id tail.
TEMPLATE = [
    (1, "run_created", None, None, "create", ""),
    (2, "run_started", None, None, "start_run", ""),
    (3, "step_created", "a", 0, "start_run", ""),
    (4, "step_created", "b", 0, "start_run", ""),
    (5, "step_created", "c", 0, "start_run", ""),
    (6, "step_created", "d", 0, "start_run", ""),
    (7, "step_queued", "a", 1, "start_run", ""),
    (8, "step_started", "a", 1, "start_step", ":a:1"),
    (9, "step_completed", "a", 1, "complete_step", ":a:1"),
    (10, "step_queued", "b", 1, "complete_step", ":a:1"),
    (11, "step_queued", "c", 1, "complete_step", ":a:1"),
    (12, "step_started", "b", 1, "start_step", ":b:1"),
    (13, "step_completed", "b", 1, "complete_step", ":b:1"),
    (14, "step_started", "c", 1, "start_step", ":c:1"),
    (15, "step_completed", "c", 1, "complete_step", ":c:1"),
    (16, "step_queued", "d", 1, "complete_step", ":c:1"),
    (17, "step_started", "d", 1, "start_step", ":d:1"),
    (18, "step_completed", "d", 1, "complete_step", ":d:1"),
    (19, "run_completed", None, None, "complete_step", ":d:1"),
]
DEPENDS = {"a": [], "b": ["a"], "c": ["a"], "d": ["b", "c"]}

_RUNS = """
INSERT INTO executor.runs (run_id, workflow, status, input, output, last_seq)
SELECT 'bench-' || lpad(i::text, 8, '0'), 'bench', 'completed', to_jsonb(i),
       jsonb_build_object('d', jsonb_build_object('step', 'd', 'n', i)), 19
FROM generate_series(1, %(runs)s) AS i
"""

_STEPS = """
INSERT INTO executor.steps (run_id, step_key, status, attempt, max_attempts, depends_on, output)
SELECT 'bench-' || lpad(i::text, 8, '0'), s.key, 'completed', 1, 3, s.deps,
       jsonb_build_object('step', s.key, 'n', i)
FROM generate_series(1, %(runs)s) AS i
CROSS JOIN (SELECT key, deps
            FROM jsonb_to_recordset(%(steps)s::jsonb) AS x(key text, deps text[])) AS s
"""

_EVENTS = """
INSERT INTO executor.events (run_id, seq, type, step_key, attempt, idempotency_key, payload)
SELECT r.run_id, t.seq, t.type, t.step, t.attempt, t.prefix || ':' || r.run_id || t.tail,
       CASE t.type
         WHEN 'run_created' THEN jsonb_build_object(
             'workflow', 'bench', 'input', r.i, 'concurrency_key', NULL)
         WHEN 'run_started' THEN '{"workflow": "bench"}'::jsonb
         WHEN 'step_created' THEN jsonb_build_object(
             'depends_on', %(depends)s::jsonb -> t.step, 'max_attempts', 3, 'queue', 'default')
         WHEN 'step_started' THEN jsonb_build_object(
             'fence', 'job-' || r.run_id || t.tail, 'lease_expires_at', '2030-01-01T00:00:00Z')
         WHEN 'step_completed' THEN jsonb_build_object(
             'fence', 'job-' || r.run_id || t.tail,
             'output', jsonb_build_object('step', t.step, 'n', r.i))
         WHEN 'run_completed' THEN jsonb_build_object(
             'output', jsonb_build_object('d', jsonb_build_object('step', 'd', 'n', r.i)))
         ELSE '{}'::jsonb
       END
FROM (SELECT 'bench-' || lpad(i::text, 8, '0') AS run_id, i
      FROM generate_series(1, %(runs)s) AS i) AS r
CROSS JOIN (
    SELECT * FROM jsonb_to_recordset(%(template)s::jsonb)
        AS x(seq int, type text, step text, attempt int, prefix text, tail text)
) AS t
"""

# One applied receipt per key, spanning the seqs that key produced; plus a late start
# refused as terminal (its receipt and its drop), and a duplicate of the first completion.
_RECEIPTS = """
INSERT INTO executor.receipts (idempotency_key, run_id, step_key, attempt, command_type,
                               command, outcome, first_seq, last_seq)
SELECT e.idempotency_key, e.run_id, min(e.step_key), max(e.attempt),
       split_part(e.idempotency_key, ':', 1), '{}'::jsonb, 'applied', min(e.seq), max(e.seq)
FROM executor.events AS e
GROUP BY e.run_id, e.idempotency_key
UNION ALL
SELECT 'start_step:' || run_id || ':d:1:late', run_id, 'd', 1, 'start_step', '{}'::jsonb,
       'terminal', NULL, NULL
FROM executor.runs
"""

_DROPS = """
INSERT INTO executor.drops (idempotency_key, run_id, step_key, attempt, command_type, reason,
                            detail)
SELECT k.key, r.run_id, k.step, 1, k.type, k.reason, k.reason
FROM executor.runs AS r
CROSS JOIN (VALUES (':d:1:late', 'start_step', 'terminal', 'd'),
                   (':a:1', 'complete_step', 'duplicate', 'a')) AS v(tail, type, reason, step)
CROSS JOIN LATERAL (
    SELECT v.type || ':' || r.run_id || v.tail AS key, v.step AS step, v.type AS type,
           v.reason AS reason
) AS k
"""


def _server_url(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    name = parts.path.lstrip("/")
    if not name:
        raise SystemExit("--database-url must name a database (it is dropped and recreated)")
    return urlunsplit(parts._replace(path="/postgres")), name


def build(url: str, events: int) -> None:
    server, name = _server_url(url)
    ident = sql.Identifier(name)
    with psycopg.connect(server, autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(ident))
        admin.execute(sql.SQL("CREATE DATABASE {}").format(ident))
    migrate(url)
    runs = max(1, -(-events // EVENTS_PER_RUN))
    params: dict[str, Any] = {
        "runs": runs,
        "depends": json.dumps(DEPENDS),
        "steps": json.dumps([{"key": k, "deps": v} for k, v in DEPENDS.items()]),
        "template": json.dumps(
            [
                {"seq": s, "type": t, "step": k, "attempt": a, "prefix": p, "tail": tail}
                for s, t, k, a, p, tail in TEMPLATE
            ]
        ),
    }
    started = time.perf_counter()
    with psycopg.connect(url) as conn:
        for label, statement in (
            ("runs", _RUNS),
            ("steps", _STEPS),
            ("events", _EVENTS),
            ("receipts", _RECEIPTS),
            ("drops", _DROPS),
        ):
            count = conn.execute(statement, params).rowcount
            print(f"{label:9} {count:>9} rows  ({time.perf_counter() - started:.1f}s)")
        has_counters = conn.execute(
            "SELECT 1 FROM information_schema.columns WHERE table_schema = 'executor' "
            "AND table_name = 'runs' AND column_name = 'steps_total'"
        ).fetchone()
        if has_counters:  # the core's incremental counters (sql/005): what the steps say
            conn.execute("UPDATE executor.runs SET steps_total = 4, steps_completed = 4")
        conn.commit()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")
    print(
        f"built {runs} runs, {runs * EVENTS_PER_RUN} events in {time.perf_counter() - started:.1f}s"
    )


def _load_verify(path: str | None) -> Any:
    if path is None:
        from executor.ledger.verify import verify

        return verify
    spec = importlib.util.spec_from_file_location("verify_under_test", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.verify


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure(url: str, verify_file: str | None, trace: bool) -> None:
    verify = _load_verify(verify_file)
    with psycopg.connect(url, row_factory=dict_row, autocommit=True) as conn:
        conn.execute("SELECT 1")
        before = _rss_mib()
        if trace:
            tracemalloc.start()
        started = time.perf_counter()
        report = verify(conn)
        elapsed = time.perf_counter() - started
        traced = tracemalloc.get_traced_memory()[1] / 2**20 if trace else None
    after = _rss_mib()
    print(
        f"{verify_file or 'executor.ledger.verify'}: {elapsed:.1f}s wall, peak RSS "
        f"{after:.0f} MiB ({after - before:+.0f} MiB during verify)"
        + (f", tracemalloc peak {traced:.0f} MiB" if traced is not None else "")
    )
    print(
        f"  runs={report.runs} events={report.events} receipts={report.receipts} "
        f"drops={report.drops} violations={len(report.violations)} "
        f"stuck={len(getattr(report, 'stuck', []))}"
    )
    for violation in report.violations[:5]:
        print(f"  {violation}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("build", "measure"))
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--verify-file", help="load verify() from this file instead")
    parser.add_argument("--tracemalloc", action="store_true", help="also trace Python heap")
    args = parser.parse_args()
    if args.what == "build":
        build(args.database_url, args.events)
    else:
        measure(args.database_url, args.verify_file, args.tracemalloc)


if __name__ == "__main__":
    main()
