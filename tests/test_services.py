"""`executor services status|stop` against real embedded Postgres and Redis processes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis as redis_lib

from executor.config import DATABASE_URL_ENV, REDIS_URL_ENV
from executor.storage import embedded, services


def executor(data_dir: Path, *argv: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {
        k: v for k, v in os.environ.items() if k not in (DATABASE_URL_ENV, REDIS_URL_ENV)
    }
    environment[embedded.DATA_DIR_ENV] = str(data_dir)
    environment.update(env)
    return subprocess.run(
        [sys.executable, "-m", "executor", *argv],
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def status_json(data_dir: Path, **env: str) -> dict[str, dict[str, Any]]:
    done = executor(data_dir, "services", "status", "--json", **env)
    assert done.returncode == 0, done.stderr
    return {s["name"]: s for s in json.loads(done.stdout)}


def alive(pid: int) -> bool:
    return embedded._alive(pid)


def test_status_of_nothing_started_neither_starts_nor_creates_anything(tmp_path: Path) -> None:
    data_dir = tmp_path / "none"
    found = status_json(data_dir)
    assert {n: s["running"] for n, s in found.items()} == {"Postgres": False, "Redis": False}
    assert found["Postgres"]["data_dir"] == str(data_dir / "pg")
    assert not data_dir.exists()
    done = executor(data_dir, "services", "stop")
    assert (done.returncode, done.stdout) == (0, f"nothing was running in {data_dir}\n")


@pytest.fixture
def data_dir() -> Iterator[Path]:
    """A folder outside pytest's own temp root: as root, pgserver runs Postgres as another
    user and opens the folder's parents to it, and a concurrent pytest session closes
    pytest-of-<user> again (mode 0700), which would fail initdb half-way."""
    folder = Path(tempfile.mkdtemp(prefix="executor-services-"))
    try:
        yield folder / "data"
    finally:
        services.stop(folder / "data")
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
def test_status_says_what_runs_where_and_stop_stops_it(data_dir: Path) -> None:
    db_url = embedded.ensure_postgres(data_dir)
    redis_url = embedded.ensure_redis(data_dir)
    found = status_json(data_dir)
    pg, rd = found["Postgres"], found["Redis"]
    assert pg["running"]
    assert rd["running"]
    postmaster = (data_dir / "pg" / "postmaster.pid").read_text().split()
    assert pg["pid"] == int(postmaster[0])
    assert rd["pid"] == int((data_dir / "redis" / "redis.pid").read_text())
    assert (pg["url"], rd["url"]) == (db_url, redis_url)  # what the embedded default uses
    assert str(data_dir / "pg") in pg["address"]
    assert rd["address"] == f"socket {embedded.redis_socket_path(data_dir)}"
    assert pg["version"] == (data_dir / "pg" / "PG_VERSION").read_text().strip()
    assert rd["version"]
    with psycopg.connect(pg["url"]) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    client: redis_lib.Redis = redis_lib.Redis.from_url(rd["url"])
    assert client.ping()
    client.close()

    text = executor(data_dir, "services", "status", **{DATABASE_URL_ENV: "postgresql://x/y"})
    assert f"Postgres: running (pid {pg['pid']}" in text.stdout
    assert "EXECUTOR_DATABASE_URL is set" in text.stdout

    done = executor(data_dir, "services", "stop")
    assert (done.returncode, done.stdout) == (0, "stopped Redis and Postgres\n")
    assert not alive(pg["pid"])
    assert not alive(rd["pid"])
    after = status_json(data_dir)
    assert {n: s["running"] for n, s in after.items()} == {"Postgres": False, "Redis": False}
    assert (data_dir / "pg" / "PG_VERSION").exists()  # the data stays for next time
