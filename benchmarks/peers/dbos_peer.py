"""Drive one DBOS round: 2 worker processes, DBOSClient.enqueue from one producer.

A run's latency is DBOS's own: workflow_status.created_at (set at enqueue) to completed_at
(set when the workflow's result is recorded), both epoch milliseconds in its system database.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import psycopg

from benchmarks.common import Round, RoundSpec, child_env, processes, ready_files, wait_for

QUEUE = "bench"
WORKFLOW = "bench_fanout"


def run_round(spec: RoundSpec) -> Round:
    from dbos import DBOSClient

    with tempfile.TemporaryDirectory(prefix="bench-ready-") as ready:
        commands = [[sys.executable, "-m", "benchmarks.peers.dbos_app"]] * spec.workers
        envs = child_env(BENCH_DBOS_URL=spec.url, BENCH_READY_DIR=ready)
        with processes(
            commands,
            env=envs,
            log_name=spec.label,
            per_process_env={"BENCH_EXECUTOR_ID": [f"w{i}" for i in range(spec.workers)]},
        ) as procs:
            wait_for(
                ready_files(Path(ready), spec.workers),
                timeout=120,
                what="DBOS workers to launch",
                procs=procs,
                interval=0.05,
            )
            client = DBOSClient(system_database_url=spec.url)
            try:
                started = time.monotonic()
                ids = [
                    client.enqueue(
                        {"queue_name": QUEUE, "workflow_name": WORKFLOW}
                    ).get_workflow_id()
                    for _ in range(spec.runs)
                ]
                with psycopg.connect(spec.url, autocommit=True) as conn:
                    wait_for(
                        lambda: _finished(conn, ids) >= len(ids),
                        timeout=spec.timeout,
                        what="DBOS workflows",
                        procs=procs,
                    )
                    elapsed = time.monotonic() - started
                    rows = conn.execute(
                        "SELECT (coalesce(completed_at, updated_at) - created_at) / 1000.0 "
                        "FROM dbos.workflow_status WHERE workflow_uuid = ANY(%s)",
                        (ids,),
                    ).fetchall()
            finally:
                client.destroy()
    return Round("dbos", spec.runs, 4, elapsed, [float(r[0]) for r in rows])


def _finished(conn: psycopg.Connection[tuple[object, ...]], ids: list[str]) -> int:
    row = conn.execute(
        "SELECT count(*) FILTER (WHERE status = 'SUCCESS'), "
        "count(*) FILTER (WHERE status NOT IN ('SUCCESS', 'ENQUEUED', 'PENDING', 'DELAYED')) "
        "FROM dbos.workflow_status WHERE workflow_uuid = ANY(%s)",
        (ids,),
    ).fetchone()
    assert row is not None
    if row[1]:
        raise RuntimeError(f"{row[1]} DBOS workflows ended other than SUCCESS")
    return int(str(row[0]))
