"""Drive one Celery round: 2 solo workers, the canvas applied from one producer.

Celery records no start time of its own for a chain, so a run's latency is from the
producer's clock just before apply_async to the `date_done` its result backend stores for
the chord's body (`last`); both clocks are this machine's.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import redis as redis_lib

from benchmarks.common import Round, RoundSpec, child_env, processes, ready_files, wait_for


def run_round(spec: RoundSpec) -> Round:
    from benchmarks.peers import celery_app as peer

    celery = peer.make_app(spec.url)
    command = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "benchmarks.peers.celery_app",
        "worker",
        "-P",
        "solo",
        "-c",
        "1",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
        "-Q",
        peer.QUEUE,
        "-l",
        "WARNING",
    ]
    with tempfile.TemporaryDirectory(prefix="bench-ready-") as ready:
        env = child_env(BENCH_CELERY_URL=spec.url, BENCH_READY_DIR=ready)
        commands = [[*command, "-n", f"w{i}@%h"] for i in range(spec.workers)]
        client: redis_lib.Redis = redis_lib.Redis.from_url(spec.url)
        try:
            with processes(commands, env=env, log_name=spec.label) as procs:
                wait_for(
                    ready_files(Path(ready), spec.workers),
                    timeout=60,
                    what="Celery workers",
                    procs=procs,
                    interval=0.05,
                )
                started = time.monotonic()
                sent: dict[str, float] = {}
                for i in range(spec.runs):
                    at = time.time()
                    result = peer.workflow(celery, f"run-{i}").apply_async()
                    sent[result.id] = at
                    del result  # its __del__ unsubscribes from the backend now, not at exit
                keys = [f"celery-task-meta-{task_id}" for task_id in sent]
                metas: list[dict[str, object]] = []

                def done() -> bool:
                    metas[:] = [json.loads(m) for m in client.mget(keys) if m]
                    failed = [m for m in metas if m.get("status") not in ("SUCCESS", None)]
                    if failed:
                        raise RuntimeError(f"{len(failed)} Celery runs failed: {failed[0]}")
                    return len(metas) == len(keys)

                wait_for(done, timeout=spec.timeout, what="Celery runs", procs=procs)
                elapsed = time.monotonic() - started
        finally:
            client.close()
            _forget_pending(celery)
            celery.close()
    latencies = [_epoch(str(m["date_done"])) - sent[str(m["task_id"])] for m in metas]
    return Round("celery", spec.runs, 4, elapsed, latencies)


def _epoch(iso: str) -> float:
    at = datetime.fromisoformat(iso)
    return (at if at.tzinfo else at.replace(tzinfo=UTC)).timestamp()


def _forget_pending(celery: object) -> None:
    """Release the results the canvas registered as pending on the producer's backend, now.

    The backend holds them until interpreter exit otherwise, where their __del__ tries to
    unsubscribe from Redis too late and prints tracebacks.
    """
    backend = getattr(celery, "backend", None)
    pending = getattr(backend, "_pending_results", None)
    if backend is None or pending is None:
        return
    for mapping in pending:  # task id -> {id(result): result}
        for waiters in list(mapping.values()):
            for result in list(waiters.values()):
                backend.remove_pending_result(result)
