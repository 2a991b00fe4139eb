"""Real worker processes for transport tests: short leases and sweeps, killed by pid after.

Workers are started the way an operator would: `rq worker -w <our class>` (proving RQ's CLI
works with our class) or `python -m executor worker`. Settings reach them through EXECUTOR_*
variables, the documented override path. `workflows_for_tests` is importable in the
workers through PYTHONPATH.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis as redis_lib
from psycopg.rows import dict_row
from rq.worker import BaseWorker

from executor.client import Client
from executor.ledger.verify import verify

HERE = Path(__file__).resolve().parent
RQ_SERIALIZER = "executor.transport.serializer.JSONCommandSerializer"

FAST = {
    "EXECUTOR_LEASE_SECONDS": "2",
    "EXECUTOR_HEARTBEAT_INTERVAL": "0.3",
    "EXECUTOR_SWEEP_INTERVAL": "0.3",
    "EXECUTOR_OUTBOX_GRACE_SECONDS": "1",
    "EXECUTOR_WORKFLOW_MODULES": "executor.workflows.sample,workflows_for_tests",
}


def worker_env(database_url: str, redis_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXECUTOR_")}
    env.update(FAST)
    env["EXECUTOR_DATABASE_URL"] = database_url
    env["EXECUTOR_REDIS_URL"] = redis_url
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), env.get("PYTHONPATH", "")) if p)
    env.update(extra)
    return env


class Workers:
    """Starts worker processes and, at teardown, SIGKILLs the ones still alive (by pid)."""

    def __init__(self, database_url: str, redis_url: str, logs: Path) -> None:
        self.database_url = database_url
        self.redis_url = redis_url
        self.logs = logs
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(
        self,
        *,
        via: str = "rq",
        worker_class: str = "executor.transport.worker.ExecutorWorker",
        env: dict[str, str] | None = None,
        database_url: str | None = None,
        args: Sequence[str] = (),
        **extra: str,
    ) -> subprocess.Popen[bytes]:
        """`args` go to `executor worker` (e.g. queue names), or replace rq's queue list."""
        environment = env or worker_env(database_url or self.database_url, self.redis_url, **extra)
        if via == "rq":
            argv = [sys.executable, "-m", "rq.cli", "worker", "-w", worker_class]
            argv += ["-u", self.redis_url, "--serializer", RQ_SERIALIZER]
            argv += list(args or ("high", "default", "low"))
        else:
            argv = [sys.executable, "-m", "executor", "worker", *args]
        log = (self.logs / f"worker-{len(self.procs)}.log").open("wb")
        proc = subprocess.Popen(
            argv, env=environment, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        log.close()
        self.procs.append(proc)
        return proc

    def wait_registered(self, client: redis_lib.Redis, count: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while BaseWorker.count(connection=client) < count:
            for p in self.procs:
                if p.poll() is not None:
                    pytest.fail(f"worker {p.pid} exited with {p.returncode}:\n{self.output()}")
            if time.monotonic() > deadline:
                pytest.fail(f"{count} worker(s) did not register in {timeout}s:\n{self.output()}")
            time.sleep(0.05)

    def output(self) -> str:
        return "\n".join(
            f"--- {p.name} ---\n{p.read_text(errors='replace')[-4000:]}"
            for p in sorted(self.logs.glob("worker-*.log"))
        )

    def kill_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
        for p in self.procs:
            p.wait(timeout=10)


@pytest.fixture
def workers(db_url: str, redis_url: str, tmp_path: Path) -> Iterator[Workers]:
    pool = Workers(db_url, redis_url, tmp_path)
    try:
        yield pool
    finally:
        pool.kill_all()


@pytest.fixture
def client(db_url: str, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Client]:
    for name, value in FAST.items():
        monkeypatch.setenv(name, value)
    with Client(db_url, redis_url) as opened:
        yield opened


def rows(database_url: str, sql: str, *params: Any) -> list[dict[str, Any]]:
    with psycopg.connect(database_url, row_factory=dict_row) as conn:
        return conn.execute(sql, params).fetchall()


def assert_verified(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True, row_factory=dict_row) as conn:
        report = verify(conn)
    assert report.ok, report.violations[:3]
