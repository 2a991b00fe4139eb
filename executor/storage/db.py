"""Connection pools: one per process, opened once and kept across jobs."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool


def _configure(conn: psycopg.Connection[dict[str, Any]]) -> None:
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
        configure=_configure,
        check=ConnectionPool.check_connection,
        open=False,
    )
    pool.open(wait=True, timeout=timeout)
    return pool


def connect(url: str) -> psycopg.Connection[dict[str, Any]]:
    """A single autocommit connection, for CLI commands and tests."""
    return psycopg.connect(url, row_factory=dict_row, autocommit=True)
