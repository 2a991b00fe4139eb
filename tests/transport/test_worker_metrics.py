"""`executor worker --metrics-port`: real worker processes, scraped over HTTP.

Two workers on one machine each serve their own numbers (neither wipes the other's), and the
forking worker's job children count into their parent's numbers.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from redis import Redis

from executor.client import Client

from .conftest import Workers, worker_env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _start(workers: Workers, port: int, *extra: str) -> None:
    argv = [sys.executable, "-m", "executor", "worker", "--metrics-port", str(port), *extra]
    env = worker_env(workers.database_url, workers.redis_url)
    env["TMPDIR"] = str(workers.logs)  # the private multiprocess folders of killed workers
    log = (workers.logs / f"worker-{len(workers.procs)}.log").open("wb")
    proc = subprocess.Popen(
        argv, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
    )
    log.close()
    workers.procs.append(proc)


def _scrape(port: int, workers: Workers) -> str:
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                return str(r.read().decode())
        except (urllib.error.URLError, ConnectionError):
            if time.monotonic() > deadline:
                pytest.fail(f"no metrics on port {port}:\n{workers.output()}")
            time.sleep(0.1)


def _completed_steps(text: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("executor_step_duration_seconds_count{")
        and 'outcome="completed"' in line
        and 'workflow="noop"' in line
    )


def _run_noop(db_url: str, redis_url: str, runs: int) -> None:
    with Client(db_url, redis_url) as client:
        ids = [client.start_run("noop", {}) for _ in range(runs)]
        for run_id in ids:
            assert client.wait(run_id, timeout=60).status == "completed"


def test_two_workers_on_one_machine_keep_their_own_counts(
    workers: Workers, db_url: str, redis_url: str, redis: Redis
) -> None:
    ports = [_free_port(), _free_port()]
    for port in ports:
        _start(workers, port)
    workers.wait_registered(redis, 2)
    _run_noop(db_url, redis_url, 10)
    scraped = [_scrape(port, workers) for port in ports]
    # 10 runs of 4 steps: every completed attempt is counted once, by the worker that ran it.
    assert sum(_completed_steps(text) for text in scraped) == 40
    assert all("executor_outbox_backlog" in text for text in scraped)
    assert all(
        'executor_commands_total{outcome="applied",type="complete_step"}' in t for t in scraped
    )


def test_the_forking_workers_children_count_into_the_parent(
    workers: Workers, db_url: str, redis_url: str, redis: Redis, tmp_path: Path
) -> None:
    port = _free_port()
    _start(workers, port, "--worker-class", "fork")
    workers.wait_registered(redis, 1)
    _run_noop(db_url, redis_url, 3)
    text = _scrape(port, workers)
    assert _completed_steps(text) == 12
    assert "executor_step_queue_wait_seconds_count" in text
