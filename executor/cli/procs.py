"""Start and stop real `executor worker` processes, for the demo (and `stop` for the bench)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager


def worker_env(database_url: str, redis_url: str, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["EXECUTOR_DATABASE_URL"] = database_url
    env["EXECUTOR_REDIS_URL"] = redis_url
    env.update(extra)
    return env


@contextmanager
def worker_processes(
    count: int,
    database_url: str,
    redis_url: str,
    *,
    args: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
    quiet: bool = True,
) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Run `count` workers for the duration of the block; SIGTERM then SIGKILL on exit."""
    environment = env or worker_env(database_url, redis_url)
    out = subprocess.DEVNULL if quiet else None
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "executor", "worker", *args],
            env=environment,
            stdout=out,
            stderr=out,
            stdin=subprocess.DEVNULL,
        )
        for _ in range(count)
    ]
    try:
        yield procs
    finally:
        stop(procs)


def stop(procs: Sequence[subprocess.Popen[bytes]], *, grace: float = 10.0) -> None:
    """SIGTERM every process still running (a warm shutdown), SIGKILL any left after `grace`."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
