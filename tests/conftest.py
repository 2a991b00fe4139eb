"""A real Postgres and Redis for every test, each test starting from a clean slate.

Servers come from EXECUTOR_DATABASE_URL / EXECUTOR_REDIS_URL, else embedded ones under
EXECUTOR_TEST_DATA_DIR (default `.executor-test` at the repository root, reused across
sessions so startup stays fast). Several sessions may share a server at once (several
developers, or CI next to a developer): each session creates its own database and claims its
own Redis db index, so one session's cleanup never wipes another's data.

An unreachable service skips the tests that need it locally and fails them under CI.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import psycopg
import pytest
import redis as redis_lib
from psycopg import sql
from psycopg_pool import ConnectionPool
from support.pgproxy import PgProxy

from executor.errors import ExecutorError
from executor.storage import embedded
from executor.storage.db import open_pool
from executor.storage.migrate import migrate
from executor.storage.urls import with_database, with_redis_db

REPO_ROOT = Path(__file__).resolve().parent.parent
TEST_DATA_DIR_ENV = "EXECUTOR_TEST_DATA_DIR"
_CLAIM_TTL_SECONDS = 1800


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in {"", "0", "false", "no"}


def _unavailable(what: str, exc: BaseException) -> NoReturn:
    message = f"{what} is unavailable: {type(exc).__name__}: {exc}"
    if _in_ci():
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def _test_data_dir() -> Path:
    return Path(os.environ.get(TEST_DATA_DIR_ENV) or REPO_ROOT / ".executor-test")


# --- Postgres ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def database_server_url() -> str:
    """A Postgres server; tests never write to the database this URL names."""
    url = os.environ.get("EXECUTOR_DATABASE_URL", "").strip()
    try:
        if not url:
            url = embedded.ensure_postgres(_test_data_dir())
        with psycopg.connect(url, connect_timeout=5) as conn:
            conn.execute("SELECT 1")
    except (ExecutorError, psycopg.Error, OSError) as exc:
        _unavailable("Postgres", exc)
    return url


@pytest.fixture(scope="session")
def database_url(database_server_url: str) -> Iterator[str]:
    """A database of this session's own on that server, migrated once."""
    name = f"executor_test_{os.getpid()}"
    ident = sql.Identifier(name)
    with psycopg.connect(database_server_url, autocommit=True) as admin:
        # Same pid means an earlier session that died without cleaning up.
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(ident))
        admin.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(ident))
    url = with_database(database_server_url, name)
    try:
        migrate(url)
        yield url
    finally:
        with psycopg.connect(database_server_url, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(ident))


@pytest.fixture
def db_url(database_url: str) -> str:
    """The session database with every executor table emptied and sequences restarted."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        tables = [
            row[0]
            for row in conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'executor'"
                " AND tablename <> 'schema_migrations' ORDER BY tablename"
            )
        ]
        if not tables:
            return database_url
        conn.execute("SET lock_timeout = '15s'")
        try:
            conn.execute(
                sql.SQL("TRUNCATE {} RESTART IDENTITY CASCADE").format(
                    sql.SQL(", ").join(sql.Identifier("executor", t) for t in tables)
                )
            )
        except psycopg.errors.LockNotAvailable:
            holders = conn.execute(
                "SELECT pid, application_name, state, left(query, 120) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            ).fetchall()
            pytest.fail(
                "could not empty the test database: connections left open by an earlier test "
                f"hold locks: {holders}",
                pytrace=False,
            )
    return database_url


@pytest.fixture
def pool(db_url: str) -> Iterator[ConnectionPool[psycopg.Connection[dict[str, object]]]]:
    """A pool on the clean database, closed after the test."""
    opened = open_pool(db_url, name="test", max_size=40)
    try:
        yield opened
    finally:
        opened.close()


# --- Redis ---------------------------------------------------------------------------------


class _RedisDbClaim:
    """This session's Redis db index, leased in a registry db so sessions never share one.

    The lease is refreshed whenever a test asks for `redis_url`; if a long stretch without
    Redis tests let it lapse and another session took the index, a free one is claimed.
    """

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
        self.token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex}"
        self.db: int | None = None
        probe: redis_lib.Redis = redis_lib.Redis.from_url(server_url)
        try:
            databases = int(probe.config_get("databases").get("databases", 16))
        except redis_lib.RedisError:
            databases = 16
        finally:
            probe.close()
        if databases < 3:
            raise RuntimeError(f"Redis at {server_url} has {databases} dbs; tests need 3 or more")
        self.registry_db = databases - 1
        self.candidates = range(databases - 2, 0, -1)
        self.registry: redis_lib.Redis = redis_lib.Redis.from_url(
            with_redis_db(server_url, self.registry_db)
        )

    @staticmethod
    def _key(db: int) -> str:
        return f"executor-test:claim:{db}"

    def ensure(self) -> int:
        if self.db is not None and self.registry.eval(
            self._REFRESH, 1, self._key(self.db), self.token, _CLAIM_TTL_SECONDS
        ):
            return self.db
        for db in self.candidates:
            if self.registry.set(self._key(db), self.token, nx=True, ex=_CLAIM_TTL_SECONDS):
                self.db = db
                return db
        pytest.fail(
            f"every Redis test db (1..{self.candidates.start}) is claimed by another session; "
            f"see keys executor-test:claim:* in db {self.registry_db}",
            pytrace=False,
        )

    def release(self) -> None:
        try:
            if self.db is not None:
                self.registry.eval(self._RELEASE, 1, self._key(self.db), self.token)
        finally:
            self.registry.close()


@pytest.fixture(scope="session")
def redis_server_url() -> str:
    """A Redis server; tests use only the db index `redis_url` claims on it."""
    url = os.environ.get("EXECUTOR_REDIS_URL", "").strip()
    try:
        if not url:
            url = embedded.ensure_redis(_test_data_dir())
        client: redis_lib.Redis = redis_lib.Redis.from_url(url, socket_connect_timeout=5)
        try:
            client.ping()
        finally:
            client.close()
    except (ExecutorError, redis_lib.RedisError, OSError) as exc:
        _unavailable("Redis", exc)
    return url


@pytest.fixture(scope="session")
def _redis_db_claim(redis_server_url: str) -> Iterator[_RedisDbClaim]:
    claim = _RedisDbClaim(redis_server_url)
    try:
        yield claim
    finally:
        claim.release()


@pytest.fixture
def redis_url(redis_server_url: str, _redis_db_claim: _RedisDbClaim) -> str:
    """A Redis URL on this session's own db index, flushed before the test."""
    url = with_redis_db(redis_server_url, _redis_db_claim.ensure())
    client: redis_lib.Redis = redis_lib.Redis.from_url(url)
    try:
        client.flushdb()
    finally:
        client.close()
    return url


@pytest.fixture
def redis(redis_url: str) -> Iterator[redis_lib.Redis]:
    """A client (bytes responses, as RQ needs) on the clean test db."""
    client: redis_lib.Redis = redis_lib.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        client.close()


# --- a Postgres proxy that can lose the answer to a COMMIT (support/pgproxy.py) -----------


@pytest.fixture
def pg_proxy(database_server_url: str) -> Iterator[PgProxy]:
    """A proxy in front of the test server; arm it with `pg_proxy.arm(...)`."""
    with PgProxy.for_url(database_server_url) as proxy:
        yield proxy


@pytest.fixture
def proxy_db_url(pg_proxy: PgProxy, db_url: str) -> str:
    """`db_url` (clean, migrated) through `pg_proxy`."""
    return pg_proxy.url(db_url)
