"""The DBOS peer's worker process: one workflow of four steps, served from a DBOS queue.

BENCH_DBOS_URL=postgresql://... BENCH_EXECUTOR_ID=w0 python -m benchmarks.peers.dbos_app
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

from dbos import DBOS

QUEUE = "bench"
WORKFLOW = "bench_fanout"


@DBOS.step()
def first() -> None:
    return None


@DBOS.step()
def left() -> None:
    return None


@DBOS.step()
def right() -> None:
    return None


@DBOS.step()
def last() -> None:
    return None


@DBOS.workflow(name=WORKFLOW)
def fanout() -> None:
    first()
    left()
    right()
    last()


def main() -> None:
    DBOS(
        config={
            "name": "bench",
            "system_database_url": os.environ["BENCH_DBOS_URL"],
            "executor_id": os.environ.get("BENCH_EXECUTOR_ID", f"w{os.getpid()}"),
            "application_version": "bench",
            "log_level": "WARNING",
        }
    )
    DBOS.launch()
    DBOS.register_queue(QUEUE, worker_concurrency=8, polling_interval_sec=0.05)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    ready = os.environ.get("BENCH_READY_DIR")
    if ready:
        (Path(ready) / str(os.getpid())).touch()
    stop.wait()
    DBOS.destroy()


if __name__ == "__main__":
    main()
