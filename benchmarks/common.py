"""What the benchmarks share: scratch databases, leased Redis dbs, processes, rounds, stats.

Every round gets a database of its own (created here, dropped after) and a Redis db index
flushed before it starts, so no round inherits another's rows, indexes, bloat or queues.
Redis db indexes are leased in the same registry the test suite uses (keys
`executor-test:claim:<db>` in the server's last db), so a benchmark and test sessions sharing
one Redis never flush each other's data; tests lease from the top, benchmarks from db 1 up.
"""

from __future__ import annotations

import math
import os
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import redis as redis_lib
from psycopg import sql

from executor.storage.urls import with_database, with_redis_db

_CLAIM_TTL_SECONDS = 3600


def say(message: str) -> None:
    """Progress goes to stderr, so `--json` keeps stdout for the document alone."""
    print(message, file=sys.stderr, flush=True)


def pct(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile; `p` in [0, 1]."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(p * len(ordered)) - 1))]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def rotated(items: Sequence[str], round_index: int) -> list[str]:
    """Round r runs the systems in an order shifted by r, so none always goes first."""
    k = round_index % len(items) if items else 0
    return [*items[k:], *items[:k]]


def load_average() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def bench_dir() -> Path:
    """Scratch space under the project's data folder (virtualenvs, worker logs)."""
    from executor.storage.embedded import resolve_data_dir

    path = resolve_data_dir() / "bench"
    path.mkdir(parents=True, exist_ok=True)
    return path


# --- scratch databases ---------------------------------------------------------------------


class ScratchDatabases:
    """Databases named `bench_<tag>_<label>` on one server, dropped on close unless kept."""

    def __init__(self, server_url: str, *, keep: bool = False) -> None:
        self.server_url = server_url
        self.tag = uuid.uuid4().hex[:6]
        self.keep = keep
        self.names: list[str] = []

    def create(self, label: str) -> str:
        name = f"bench_{self.tag}_{label}"[:63]
        ident = sql.Identifier(name)
        with psycopg.connect(self.server_url, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(ident))
            admin.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(ident))
        self.names.append(name)
        return with_database(self.server_url, name)

    def drop(self, url: str) -> None:
        name = str(psycopg.conninfo.conninfo_to_dict(url).get("dbname"))
        if self.keep or name not in self.names:
            return
        with psycopg.connect(self.server_url, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
        self.names.remove(name)

    def close(self) -> None:
        if self.keep:
            if self.names:
                say(f"kept scratch databases: {', '.join(self.names)}")
            return
        for name in list(self.names):
            self.drop(with_database(self.server_url, name))


# --- Redis db leases -----------------------------------------------------------------------


class RedisDbs:
    """Db indexes leased on one Redis server for the length of a benchmark."""

    _REFRESH = (
        "if redis.call('GET', KEYS[1]) == ARGV[1] then "
        "return redis.call('EXPIRE', KEYS[1], ARGV[2]) else return 0 end"
    )
    _RELEASE = (
        "if redis.call('GET', KEYS[1]) == ARGV[1] then "
        "return redis.call('DEL', KEYS[1]) else return 0 end"
    )

    def __init__(self, server_url: str) -> None:
        self.server_url = server_url
        self.token = f"bench:{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        probe: redis_lib.Redis = redis_lib.Redis.from_url(server_url)
        try:
            databases = int(str(probe.config_get("databases").get("databases", 16)))
        except redis_lib.RedisError:
            databases = 16
        finally:
            probe.close()
        self.registry: redis_lib.Redis = redis_lib.Redis.from_url(
            with_redis_db(server_url, databases - 1)
        )
        self.candidates = range(1, databases - 1)
        self.held: list[int] = []

    def claim(self, label: str = "") -> str:
        """Lease a free db, flush it, and return its URL."""
        for db in self.candidates:
            if db in self.held:
                continue
            if self.registry.set(
                f"executor-test:claim:{db}", self.token, nx=True, ex=_CLAIM_TTL_SECONDS
            ):
                self.held.append(db)
                url = with_redis_db(self.server_url, db)
                flush(url)
                return url
        raise RuntimeError(f"no free Redis db for {label or 'the benchmark'}")

    def refresh(self) -> None:
        for db in self.held:
            self.registry.eval(
                self._REFRESH, 1, f"executor-test:claim:{db}", self.token, _CLAIM_TTL_SECONDS
            )

    def release(self) -> None:
        try:
            for db in self.held:
                flush(with_redis_db(self.server_url, db))
                self.registry.eval(self._RELEASE, 1, f"executor-test:claim:{db}", self.token)
        finally:
            self.held.clear()
            self.registry.close()


def flush(redis_url: str) -> None:
    client: redis_lib.Redis = redis_lib.Redis.from_url(redis_url)
    try:
        client.flushdb()
    finally:
        client.close()


# --- processes -----------------------------------------------------------------------------


def wait_for(
    predicate: Callable[[], bool],
    *,
    timeout: float,
    what: str,
    procs: Sequence[subprocess.Popen[bytes]] = (),
    interval: float = 0.01,
) -> None:
    """Poll until `predicate` holds; fail early, naming the log, if a process died."""
    deadline = time.monotonic() + timeout
    while not predicate():
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(
                    f"a process exited with {p.returncode} while waiting for {what}; "
                    f"its output is in {bench_dir() / 'logs'}"
                )
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


@contextmanager
def processes(
    commands: Sequence[Sequence[str]],
    *,
    env: dict[str, str],
    log_name: str,
    per_process_env: dict[str, list[str]] | None = None,
) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Run each command for the block; stopped on the way out as `executor.cli.procs.stop` does.

    Output goes to `<data>/bench/logs/<log_name>-<i>.log` (overwritten by the next run), the
    first place to look when a round fails.
    """
    from executor.cli.procs import stop

    logs = bench_dir() / "logs"
    logs.mkdir(exist_ok=True)
    files = []
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for i, cmd in enumerate(commands):
            f = (logs / f"{log_name}-{i}.log").open("wb")
            files.append(f)
            own = {k: v[i] for k, v in (per_process_env or {}).items()}
            procs.append(
                subprocess.Popen(
                    list(cmd), env={**env, **own}, stdout=f, stderr=f, stdin=subprocess.DEVNULL
                )
            )
        yield procs
    finally:
        stop(procs)
        for f in files:
            f.close()


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(extra)
    return env


# --- results -------------------------------------------------------------------------------


@dataclass
class Round:
    """One system's round: how long `runs` runs took and each run's own latency."""

    system: str
    runs: int
    steps_per_run: int
    elapsed_s: float
    latencies_s: list[float] = field(default_factory=list)
    note: str = ""

    @property
    def runs_per_s(self) -> float:
        return self.runs / self.elapsed_s

    @property
    def steps_per_s(self) -> float:
        return self.runs * self.steps_per_run / self.elapsed_s

    def as_json(self) -> dict[str, Any]:
        return {
            "runs": self.runs,
            "steps_per_run": self.steps_per_run,
            "elapsed_s": self.elapsed_s,
            "runs_per_s": self.runs_per_s,
            "steps_per_s": self.steps_per_s,
            "p50_ms": pct(self.latencies_s, 0.5) * 1000,
            "p99_ms": pct(self.latencies_s, 0.99) * 1000,
        }


def summarize(rounds: Sequence[Round]) -> dict[str, Any]:
    """Medians over rounds; latency percentiles over every run of every round."""
    latencies = [x for r in rounds for x in r.latencies_s]
    return {
        "rounds": len(rounds),
        "runs_per_s": median([r.runs_per_s for r in rounds]),
        "steps_per_s": median([r.steps_per_s for r in rounds]),
        "p50_ms": pct(latencies, 0.5) * 1000,
        "p99_ms": pct(latencies, 0.99) * 1000,
        "per_round_runs_per_s": [r.runs_per_s for r in rounds],
    }


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[_cell(c) for c in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    lines = [
        "  "
        + "  ".join(
            h.rjust(w) if i else h.ljust(w)
            for i, (h, w) in enumerate(zip(headers, widths, strict=True))
        )
    ]
    for r in cells:
        lines.append(
            "  "
            + "  ".join(
                c.rjust(w) if i else c.ljust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if value != value:  # NaN
            return "n/a"
        return f"{value:.2f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


@dataclass
class Context:
    """What one `executor bench` invocation hands every sub-bench."""

    database_url: str  # a server to create scratch databases on
    redis_url: str  # a server to lease db indexes on
    scratch: ScratchDatabases
    redis_dbs: RedisDbs
    rounds: int = 3
    workers: int = 2
    runs: int | None = None  # None: each sub-bench's own default
    seconds: float = 5.0
    timeout: float = 1800.0
    systems: tuple[str, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RoundSpec:
    """One peer round: its fresh database or flushed Redis db, and the workload."""

    url: str
    workers: int
    runs: int
    timeout: float
    label: str
    options: dict[str, Any] = field(default_factory=dict)


def ready_files(directory: Path, count: int) -> Callable[[], bool]:
    """A predicate: have `count` worker processes each dropped a file in `directory`?"""
    return lambda: len(list(directory.iterdir())) >= count
