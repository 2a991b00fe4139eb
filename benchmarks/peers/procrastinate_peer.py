"""Drive one Procrastinate round: its schema and the join table on the fresh database.

A run's latency is Procrastinate's own: from the `deferred` event of its `first` job to the
`succeeded` event of its `last` job (procrastinate_events, the database clock).
"""

from __future__ import annotations

import asyncio
import sys
import time
import uuid

import psycopg

from benchmarks.common import Round, RoundSpec, child_env, processes, wait_for


def run_round(spec: RoundSpec) -> Round:
    from procrastinate import PsycopgConnector
    from procrastinate.schema import SchemaManager

    from benchmarks.peers import procrastinate_app as peer

    with psycopg.connect(spec.url, autocommit=True) as conn:
        conn.execute(SchemaManager.get_schema())
        conn.execute(peer.JOIN_TABLE)
        commands = [[sys.executable, "-m", "benchmarks.peers.procrastinate_app"]] * spec.workers
        env = child_env(BENCH_PROCRASTINATE_URL=spec.url)
        with processes(commands, env=env, log_name=spec.label) as procs:
            wait_for(
                lambda: _workers(conn) >= spec.workers,
                timeout=60,
                what="Procrastinate workers",
                procs=procs,
                interval=0.05,
            )
            ids = [uuid.uuid4().hex for _ in range(spec.runs)]
            started = time.monotonic()

            async def produce() -> None:
                with peer.app.replace_connector(PsycopgConnector(conninfo=spec.url)):
                    async with peer.app.open_async():
                        for run_id in ids:
                            await peer.first.defer_async(run_id=run_id)

            asyncio.run(produce())
            wait_for(
                lambda: _finished(conn) >= spec.runs,
                timeout=spec.timeout,
                what="Procrastinate runs",
                procs=procs,
            )
            elapsed = time.monotonic() - started
        rows = conn.execute(
            "SELECT extract(epoch FROM "
            "max(e.at) FILTER (WHERE j.task_name = 'last' AND e.type = 'succeeded') - "
            "min(e.at) FILTER (WHERE j.task_name = 'first' AND e.type = 'deferred')) "
            "FROM procrastinate_jobs j JOIN procrastinate_events e ON e.job_id = j.id "
            "GROUP BY j.args->>'run_id'"
        ).fetchall()
    return Round("procrastinate", spec.runs, 4, elapsed, [float(r[0]) for r in rows if r[0]])


def _workers(conn: psycopg.Connection[tuple[object, ...]]) -> int:
    row = conn.execute("SELECT count(*) FROM procrastinate_workers").fetchone()
    return int(str(row[0])) if row else 0


def _finished(conn: psycopg.Connection[tuple[object, ...]]) -> int:
    row = conn.execute(
        "SELECT count(*) FILTER (WHERE task_name = 'last' AND status = 'succeeded'), "
        "count(*) FILTER (WHERE status IN ('failed', 'aborted')) FROM procrastinate_jobs"
    ).fetchone()
    assert row is not None
    if row[1]:
        raise RuntimeError(f"{row[1]} Procrastinate jobs failed")
    return int(str(row[0]))
