"""What the embedded default left running: `executor services status|stop`.

The servers `embedded` starts outlive the process that started them (on purpose: the
dashboard after the demo sees the demo's data), so a newcomer needs a way to see and end
them. Status only reads: the pid files, /proc, a ping. It never starts a server or takes
the start-up lock, so it answers at once even while another process is starting them.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from executor.config import DATABASE_URL_ENV, REDIS_URL_ENV
from executor.storage import embedded
from executor.storage.embedded import (
    _alive,
    _looks_like,
    _pg_version,
    _postgres_url,
    _read_pid,
    _read_postmaster,
    _redis_answers,
    _redis_version,
)


@dataclass(frozen=True)
class ServiceStatus:
    name: str  # "Postgres" or "Redis"
    running: bool
    data_dir: Path
    pid: int | None = None
    address: str | None = None  # where it listens: socket path (and port)
    url: str | None = None  # what EXECUTOR_*_URL would be to reach it
    version: str | None = None
    overridden_by: str | None = None  # the env var that makes this process use another server

    def as_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["data_dir"] = str(self.data_dir)
        return doc

    def __str__(self) -> str:
        state = (
            f"running (pid {self.pid}, {self.address}, version {self.version})"
            if self.running
            else "not running"
        )
        text = f"{self.name}: {state}; data in {self.data_dir}"
        if self.running and self.url:
            text += f"\n  url: {self.url}"
        if self.overridden_by:
            text += f"\n  note: {self.overridden_by} is set, so commands here use that instead"
        return text


def status(data_dir: str | os.PathLike[str] | None = None) -> list[ServiceStatus]:
    """The embedded Postgres and Redis of `data_dir` (default: as the embedded default finds it)."""
    root = embedded.resolve_data_dir(data_dir)
    return [_postgres(root), _redis(root)]


def stop(data_dir: str | os.PathLike[str] | None = None) -> list[str]:
    """Stop them (data stays on disk for next time); returns the names of those that ran."""
    root = embedded.resolve_data_dir(data_dir)
    if not root.is_dir():
        return []
    return embedded.stop_embedded(root)


def _override(name: str) -> str | None:
    return name if os.environ.get(name, "").strip() else None


def _postgres(root: Path) -> ServiceStatus:
    pgdata = root / "pg"
    info = _read_postmaster(pgdata)
    base = ServiceStatus(
        "Postgres", running=False, data_dir=pgdata, overridden_by=_override(DATABASE_URL_ENV)
    )
    if info is None:
        return base
    socket = info.socket_dir / f".s.PGSQL.{info.port}"
    return ServiceStatus(
        "Postgres",
        running=True,
        data_dir=pgdata,
        pid=info.pid,
        address=f"socket {socket}" + ("" if info.ready else ", still starting"),
        url=_postgres_url(info),
        version=_pg_version(pgdata),
        overridden_by=base.overridden_by,
    )


def _redis(root: Path) -> ServiceStatus:
    redis_dir = root / "redis"
    sock = embedded.redis_socket_path(root)
    pid = _read_pid(redis_dir / "redis.pid")
    alive = pid is not None and _alive(pid) and _looks_like(pid, "redis")
    answers = _redis_answers(sock)
    base = ServiceStatus(
        "Redis", running=False, data_dir=redis_dir, overridden_by=_override(REDIS_URL_ENV)
    )
    if not (alive or answers):
        return base
    return ServiceStatus(
        "Redis",
        running=True,
        data_dir=redis_dir,
        pid=pid if alive else None,
        address=f"socket {sock}" + ("" if answers else ", not answering"),
        url=f"unix://{quote(str(sock))}?db=0",
        version=_redis_version(sock) if answers else None,
        overridden_by=base.overridden_by,
    )
