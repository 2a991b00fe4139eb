"""Migrations and embedded servers, against real Postgres and Redis processes."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
import redis as redis_lib
from psycopg import sql
from psycopg_pool import ConnectionPool

from executor.config import DATABASE_URL_ENV, REDIS_URL_ENV, resolve_urls
from executor.errors import ConfigurationError
from executor.storage import embedded
from executor.storage.migrate import (
    MIGRATION_LOCK_KEY,
    SQL_DIR_ENV,
    migrate,
    migration_files,
    reset,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
SQL_NAMES = [p.name for p in migration_files()]

MIGRATE_CODE = (
    "import json, sys\n"
    "from executor.storage.migrate import migrate\n"
    "print(json.dumps(migrate(sys.argv[1])))\n"
)


def _wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def _url_for(server_url: str, dbname: str) -> str:
    conninfo = psycopg.conninfo.conninfo_to_dict(server_url)
    conninfo["dbname"] = dbname
    return psycopg.conninfo.make_conninfo(**{k: str(v) for k, v in conninfo.items()})


@pytest.fixture
def scratch_db_url(database_server_url: str) -> Iterator[str]:
    """An empty database of its own, so migrate tests never disturb the session database."""
    name = f"executor_scratch_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    ident = sql.Identifier(name)
    with psycopg.connect(database_server_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(ident))
    try:
        yield _url_for(database_server_url, name)
    finally:
        with psycopg.connect(database_server_url, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(ident))


@pytest.fixture
def sql_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private copy of the migrations folder that a test may edit."""
    folder = tmp_path / "sql"
    folder.mkdir()
    for name in SQL_NAMES:
        shutil.copy(REPO_ROOT / "sql" / name, folder / name)
    monkeypatch.setenv(SQL_DIR_ENV, str(folder))
    return folder


def _recorded(url: str) -> list[tuple[str, int]]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT name, count(*) FROM executor.schema_migrations GROUP BY name ORDER BY name"
        ).fetchall()
    return [(name, int(n)) for name, n in rows]


def _subprocess_env(**overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (DATABASE_URL_ENV, REDIS_URL_ENV)}
    env.update(overrides)
    return env


def test_migrate_applies_each_file_once(scratch_db_url: str) -> None:
    assert migrate(scratch_db_url) == SQL_NAMES
    assert migrate(scratch_db_url) == []
    assert _recorded(scratch_db_url) == [(name, 1) for name in SQL_NAMES]
    with psycopg.connect(scratch_db_url) as conn:
        tables = {
            row[0]
            for row in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname='executor'")
        }
    assert {"runs", "steps", "events", "receipts", "outbox", "schema_migrations"} <= tables


def test_migrate_applies_only_new_files_in_order(scratch_db_url: str, sql_copy: Path) -> None:
    migrate(scratch_db_url)
    (sql_copy / "901_b.sql").write_text("CREATE TABLE executor.b (a_id int REFERENCES executor.a);")
    (sql_copy / "900_a.sql").write_text("CREATE TABLE executor.a (id int PRIMARY KEY);")
    assert migrate(scratch_db_url) == ["900_a.sql", "901_b.sql"]
    assert migrate(scratch_db_url) == []


def test_changed_applied_file_is_refused(scratch_db_url: str, sql_copy: Path) -> None:
    migrate(scratch_db_url)
    first = sql_copy / SQL_NAMES[0]
    first.write_text(first.read_text() + "\n-- edited after release\n")
    (sql_copy / "999_new.sql").write_text("CREATE TABLE executor.never (id int);")
    with pytest.raises(ConfigurationError, match=re.escape(SQL_NAMES[0])):
        migrate(scratch_db_url)
    assert "999_new.sql" not in dict(_recorded(scratch_db_url))


def test_line_endings_do_not_count_as_a_change(scratch_db_url: str, sql_copy: Path) -> None:
    migrate(scratch_db_url)
    first = sql_copy / SQL_NAMES[0]
    first.write_bytes(first.read_bytes().replace(b"\n", b"\r\n"))
    assert migrate(scratch_db_url) == []


def test_failing_file_is_rolled_back_and_not_recorded(scratch_db_url: str, sql_copy: Path) -> None:
    (sql_copy / "998_bad.sql").write_text(
        "CREATE TABLE executor.half (id int);\nSELECT no_such_function();\n"
    )
    with pytest.raises(ConfigurationError, match=re.escape("998_bad.sql")):
        migrate(scratch_db_url)
    assert dict(_recorded(scratch_db_url)) == {name: 1 for name in SQL_NAMES}
    with psycopg.connect(scratch_db_url) as conn:
        half = conn.execute("SELECT to_regclass('executor.half')").fetchone()
    assert half == (None,)


def test_reset_drops_data_and_reapplies(scratch_db_url: str) -> None:
    migrate(scratch_db_url)
    with psycopg.connect(scratch_db_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO executor.runs (run_id, workflow, status) VALUES ('r', 'w', 'pending')"
        )
    assert reset(scratch_db_url) == SQL_NAMES
    with psycopg.connect(scratch_db_url) as conn:
        assert conn.execute("SELECT count(*) FROM executor.runs").fetchone() == (0,)


@pytest.mark.slow
def test_two_migrate_processes_started_at_once_both_succeed(scratch_db_url: str) -> None:
    # The test holds the migration lock itself, so both processes are provably inside
    # migrate() and waiting at the same point before either may proceed.
    with psycopg.connect(scratch_db_url, autocommit=True) as gate:
        gate.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK_KEY,))
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", MIGRATE_CODE, scratch_db_url],
                cwd=REPO_ROOT,
                env=_subprocess_env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(2)
        ]
        try:

            def both_waiting() -> bool:
                for p in procs:
                    if p.poll() is not None:
                        _, err = p.communicate()
                        raise AssertionError(f"a migrate process exited early: {err}")
                row = gate.execute(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                    " AND database = (SELECT oid FROM pg_database"
                    "                 WHERE datname = current_database())"
                ).fetchone()
                return row is not None and row[0] == 2

            _wait_for(both_waiting, 20, "both migrate processes to wait on the lock")
        except BaseException:
            for p in procs:
                p.kill()
            raise
        finally:
            gate.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK_KEY,))
    results = [p.communicate(timeout=60) for p in procs]
    for p, (_, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err
    assert sorted(json.loads(out) for out, _ in results) == [[], SQL_NAMES]
    assert _recorded(scratch_db_url) == [(name, 1) for name in SQL_NAMES]


@pytest.mark.slow
def test_embedded_servers_start_once_are_shared_and_stop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir = tmp_path / "data"
    env = _subprocess_env(**{embedded.DATA_DIR_ENV: str(data_dir)})
    code = (
        "import json\nfrom executor.config import resolve_urls\nprint(json.dumps(resolve_urls()))"
    )
    starters = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        outputs = [p.communicate(timeout=120) for p in starters]
        for p, (_, err) in zip(starters, outputs, strict=True):
            assert p.returncode == 0, err
        stderr = "".join(err for _, err in outputs)
        assert stderr.count("started embedded Postgres") == 1, stderr
        assert stderr.count("started embedded Redis") == 1, stderr
        urls = {tuple(json.loads(out)) for out, _ in outputs}
        assert len(urls) == 1

        monkeypatch.delenv(DATABASE_URL_ENV, raising=False)
        monkeypatch.delenv(REDIS_URL_ENV, raising=False)
        db_url, r_url = resolve_urls(data_dir=str(data_dir))
        assert (db_url, r_url) in urls
        with psycopg.connect(db_url, autocommit=True) as conn:
            conn.execute("CREATE TABLE marker (v text)")
            conn.execute("INSERT INTO marker VALUES ('from the test process')")
        writer: redis_lib.Redis = redis_lib.Redis.from_url(r_url)
        writer.set("marker", "from the test process")
        writer.close()

        reader_code = (
            "import psycopg, redis\n"
            "from executor.config import resolve_urls\n"
            "d, r = resolve_urls()\n"
            "print(psycopg.connect(d).execute('SELECT v FROM marker').fetchone()[0])\n"
            "print(redis.Redis.from_url(r).get('marker').decode())\n"
        )
        reader = subprocess.run(
            [sys.executable, "-c", reader_code],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert reader.returncode == 0, reader.stderr
        assert reader.stdout.splitlines() == ["from the test process"] * 2
        assert "started" not in reader.stderr
        assert "using embedded Postgres" in reader.stderr
    finally:
        stopped = embedded.stop_embedded(data_dir)
    assert stopped == ["Redis", "Postgres"]
    assert not (data_dir / "pg" / "postmaster.pid").exists()
    assert not embedded.redis_socket_path(data_dir).exists()
    assert embedded.stop_embedded(data_dir) == []


def test_embedded_redis_with_too_long_a_path_uses_a_short_socket(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = tmp_path / ("long-folder-name-" * 6)
    url = embedded.ensure_redis(data_dir)
    try:
        sock = embedded.redis_socket_path(data_dir)
        assert len(os.fsencode(data_dir / "redis" / "redis.sock")) > 107
        assert len(os.fsencode(sock)) <= 107
        assert sock.is_socket()
        client: redis_lib.Redis = redis_lib.Redis.from_url(url)
        assert client.ping()
        client.close()
        assert "too long" in capsys.readouterr().err
    finally:
        assert embedded.stop_embedded(data_dir) == ["Redis"]


def test_embedded_redis_ignores_a_stale_pidfile(tmp_path: Path) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / "redis").mkdir()
    (tmp_path / "redis" / "redis.pid").write_text(f"{dead.pid}\n")
    url = embedded.ensure_redis(tmp_path)
    try:
        client: redis_lib.Redis = redis_lib.Redis.from_url(url)
        assert client.ping()
        client.close()
    finally:
        embedded.stop_embedded(tmp_path)


@pytest.mark.parametrize("round_", [1, 2])
def test_each_test_starts_with_an_empty_ledger(
    pool: ConnectionPool[psycopg.Connection[dict[str, object]]], round_: int
) -> None:
    with pool.connection() as conn:
        assert conn.execute("SELECT count(*) AS n FROM executor.runs").fetchone() == {"n": 0}
        row = conn.execute(
            "INSERT INTO executor.drops (reason, detail) VALUES ('duplicate', 'x')"
            " RETURNING drop_id"
        ).fetchone()
        conn.execute(
            "INSERT INTO executor.runs (run_id, workflow, status) VALUES ('r', 'w', 'pending')"
        )
    assert row == {"drop_id": 1}


@pytest.mark.parametrize("round_", [1, 2])
def test_each_test_gets_an_empty_private_redis_db(
    redis: redis_lib.Redis, redis_url: str, round_: int
) -> None:
    assert redis.dbsize() == 0
    assert redis.connection_pool.connection_kwargs.get("db", 0) != 0
    redis.set("left-behind", "by this test")
