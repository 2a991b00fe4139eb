"""Connection pools: one per process, opened once and kept across jobs."""

from __future__ import annotations

import time
import weakref
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

# A connection handed out less than this long ago is handed out again unchecked; older
# ones get a round trip to prove they survived (a Postgres restart, an idle timeout).
CHECK_AFTER_IDLE_SECONDS = 2.0


def _check_if_idle(conn: psycopg.Connection[dict[str, Any]]) -> None:
    """Skip the pool's liveness round trip for connections in steady use (hot path).

    Keyed on when the connection was last handed out, not on when it came back: a `reset`
    callback would have told us that, but it makes psycopg_pool return every connection
    through a worker thread, which cost more than the check it saved.
    """
    now = time.monotonic()
    last = _handed_out_at.get(conn)
    if last is None or now - last > CHECK_AFTER_IDLE_SECONDS:
        ConnectionPool.check_connection(conn)
    _handed_out_at[conn] = now


_handed_out_at: weakref.WeakKeyDictionary[psycopg.Connection[dict[str, Any]], float] = (
    weakref.WeakKeyDictionary()
)


def configure_connection(conn: psycopg.Connection[dict[str, Any]]) -> None:
    # Autocommit: the handler opens its own explicit transactions, and readers must never
    # sit idle in a transaction holding a snapshot.
    conn.autocommit = True


def open_pool(
    url: str, *, name: str = "executor", min_size: int = 1, max_size: int = 8, timeout: float = 30.0
) -> ConnectionPool[psycopg.Connection[dict[str, Any]]]:
    """Open a named pool whose connections return rows as dicts."""
    pool: ConnectionPool[psycopg.Connection[dict[str, Any]]] = ConnectionPool(
        url,
        name=name,
        min_size=min_size,
        max_size=max_size,
        timeout=timeout,
        kwargs={"row_factory": dict_row, "autocommit": True},
        configure=configure_connection,
        check=_check_if_idle,
        open=False,
    )
    pool.open(wait=True, timeout=timeout)
    return pool


def connect(url: str) -> psycopg.Connection[dict[str, Any]]:
    """A single autocommit connection, for CLI commands and tests."""
    return psycopg.connect(url, row_factory=dict_row, autocommit=True)


Pool = ConnectionPool[psycopg.Connection[dict[str, Any]]]
"""The pool type every module shares."""


def db_now(conn: psycopg.Connection[dict[str, Any]]) -> datetime:
    """The database's clock: the one every process agrees on (schedules, retention)."""
    row = conn.execute("SELECT now() AS now").fetchone()
    assert row is not None
    moment: datetime = row["now"]
    return moment
