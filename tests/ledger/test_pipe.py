"""The handler's pipeline below psycopg (executor/ledger/pipe.py), on a real server.

What it must get right is the state it leaves a pooled connection in: committed and idle;
rolled back and idle, its prepared statements kept, after a server error; closed after an
interruption half-way through an exchange; and able to prepare again when something else
on the connection deallocated its statements.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from types import FrameType
from typing import Any

import psycopg
import pytest
from psycopg import errors as pg_errors
from psycopg.rows import dict_row

from executor.commands.models import CreateRun
from executor.ledger import pipe
from executor.ledger.handler import Ledger
from executor.storage.db import Pool, open_pool

Conn = psycopg.Connection[dict[str, Any]]


@pytest.fixture
def conn(db_url: str) -> Iterator[Conn]:
    c = psycopg.connect(db_url, autocommit=True, row_factory=dict_row)
    c.execute("CREATE TEMP TABLE t (x int PRIMARY KEY)")
    try:
        yield c
    finally:
        c.close()


def _ours(conn: Conn) -> set[str]:
    rows = conn.execute(
        "SELECT name FROM pg_prepared_statements WHERE name LIKE '\\_executor\\_%'"
    ).fetchall()
    return {r["name"] for r in rows}


def test_placeholders_become_numbered_parameters() -> None:
    s = pipe._Statement("SELECT %s, '100%%', %s")
    assert (s.sql, s.count) == (b"SELECT $1, '100%', $2", 2)
    named = pipe._Statement("SELECT %(a)s, %(b)s, %(a)s")
    assert (named.sql, named.names) == (b"SELECT $1, $2, $1", ("a", "b"))
    assert list(named.values({"b": 2, "a": 1, "unused": 3})) == [1, 2]
    with pytest.raises(ValueError, match="mixes"):
        pipe._Statement("SELECT %s, %(a)s")
    with pytest.raises(TypeError, match="takes 2 parameters, got 1"):
        s.values((1,))


def test_a_transaction_commits_and_reads_its_results_in_order(conn: Conn, db_url: str) -> None:
    with pipe.transaction(conn) as p:
        first = p.execute("INSERT INTO t VALUES (%s), (%s) RETURNING x", (1, 2))
        assert p.execute("SELECT count(*) AS n FROM t").fetchone() == {"n": 2}
        second = p.execute("SELECT %(a)s::jsonb AS j, %(b)s::text[] AS k", {"a": "[1]", "b": ["x"]})
    assert [r["x"] for r in first] == [1, 2]
    assert second.fetchall() == [{"j": [1], "k": ["x"]}]
    assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    assert conn.pgconn.pipeline_status == psycopg.pq.PipelineStatus.OFF
    assert conn.execute("SELECT count(*) AS n FROM t").fetchone() == {"n": 2}


def test_a_server_error_rolls_back_and_keeps_the_prepared_statements(conn: Conn) -> None:
    with pipe.transaction(conn) as p:
        p.execute("INSERT INTO t VALUES (%s)", (1,))
    prepared = _ours(conn)
    assert prepared  # BEGIN, the INSERT, COMMIT
    for _ in range(6):  # psycopg prepares a statement of its own on its fifth execution
        conn.execute("SELECT 1 AS one")
    assert conn.execute(
        "SELECT count(*) AS n FROM pg_prepared_statements WHERE name LIKE '\\_pg3%'"
    ).fetchone() == {"n": 1}

    def clash() -> None:
        with pipe.transaction(conn) as p:
            p.execute("INSERT INTO t VALUES (%s)", (2,))
            p.execute("INSERT INTO t VALUES (%s)", (1,))
            after = p.execute("SELECT 1 AS one")  # skipped by the server: the pipeline aborted
            after.fetchone()

    with pytest.raises(pg_errors.UniqueViolation):
        clash()

    assert not conn.closed
    assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    assert conn.pgconn.pipeline_status == psycopg.pq.PipelineStatus.OFF
    assert conn.execute("SELECT array_agg(x) AS xs FROM t").fetchone() == {"xs": [1]}
    assert prepared <= _ours(conn)  # rolled back without psycopg's DEALLOCATE ALL


def test_a_server_error_of_the_operational_kind_also_keeps_the_connection(conn: Conn) -> None:
    """A statement timeout is an OperationalError in psycopg's hierarchy, like a lost
    connection, but the server sent it: the protocol is intact and the connection stays."""

    def time_out() -> None:
        with pipe.transaction(conn) as p:
            p.execute("SELECT set_config('statement_timeout', '10ms', true)")
            p.execute("SELECT pg_sleep(5)").fetchall()

    with pytest.raises(pg_errors.QueryCanceled):
        time_out()
    assert not conn.closed
    assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE


def test_an_exception_between_round_trips_closes_the_connection(conn: Conn) -> None:
    def fail() -> None:
        with pipe.transaction(conn) as p:
            p.execute("INSERT INTO t VALUES (%s)", (1,)).fetchall()
            raise RuntimeError("the caller failed with the row written and the transaction open")

    with pytest.raises(RuntimeError):
        fail()
    assert conn.closed  # never handed back mid-transaction


class _Interrupted(Exception):
    pass


def test_an_interruption_while_waiting_closes_the_connection(conn: Conn) -> None:
    """A job timeout (SIGALRM) raised while the pipeline waits for the server: the protocol
    state is unknown, so the connection must not go back to the pool."""

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise _Interrupted

    def wait() -> None:
        with pipe.transaction(conn) as p:
            slow = p.execute("SELECT pg_sleep(5)")
            signal.setitimer(signal.ITIMER_REAL, 0.05)
            slow.fetchall()  # blocks in poll() until the signal handler raises

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        with pytest.raises(_Interrupted):
            wait()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert conn.closed


def test_statements_deallocated_behind_its_back_are_prepared_again(conn: Conn) -> None:
    with pipe.transaction(conn) as p:
        p.execute("INSERT INTO t VALUES (%s)", (1,))
    conn.execute("DEALLOCATE ALL")  # what psycopg runs after a ROLLBACK of its own

    with pytest.raises(pg_errors.InvalidSqlStatementName), pipe.transaction(conn):
        pass
    assert not conn.closed

    with pipe.transaction(conn) as p:
        p.execute("INSERT INTO t VALUES (%s)", (2,))
    assert conn.execute("SELECT array_agg(x ORDER BY x) AS xs FROM t").fetchone() == {"xs": [1, 2]}


def test_the_handler_retries_a_command_whose_statements_were_deallocated(db_url: str) -> None:
    one: Pool = open_pool(db_url, name="test-pipe", min_size=1, max_size=1)
    try:
        ledger = Ledger(one)
        assert ledger.apply(CreateRun(run_id="r1", workflow="w", idempotency_key="c1")).applied
        with one.connection() as c:
            c.execute("DEALLOCATE ALL")
        outcome = ledger.apply(CreateRun(run_id="r2", workflow="w", idempotency_key="c2"))
        assert outcome.applied
        assert ledger.retries == 1
    finally:
        one.close()


@pytest.mark.parametrize(
    "text",
    [
        '{"run" : {"a": [1, 2.5, null, true]}, "now" : "2026-12-07T10:00:00+00:00"}',
        '"ünïcødé ☃ \\u0000-free"',
        "[]",
        "12",
        ' {"padded": 1} ',
    ],
)
def test_json_is_read_as_json_loads_reads_it(text: str) -> None:
    assert pipe._loads(text.encode()) == json.loads(text)


@pytest.mark.parametrize("text", ['{"a": 1} trailing', "", "{", "nul"])
def test_malformed_json_is_refused_as_json_loads_refuses_it(text: str) -> None:
    with pytest.raises(json.JSONDecodeError):
        pipe._loads(text.encode())


def test_a_connection_reads_json_columns_through_the_pipes_loader(conn: Conn) -> None:
    """The loader is the connection's: the rows the pipeline reads and plain queries agree."""
    with pipe.transaction(conn) as p:
        row = p.execute("SELECT %s::json AS j, %s::jsonb AS b", ('{"x": [1]}', '{"y": 2}'))
        assert row.fetchone() == {"j": {"x": [1]}, "b": {"y": 2}}
    again = conn.execute("SELECT '{\"x\": [1]}'::json AS j").fetchone()
    assert again == {"j": {"x": [1]}}
