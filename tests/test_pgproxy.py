"""The lost-answer proxy (support/pgproxy.py) against a real Postgres, through psycopg.

Armed, the client must see OperationalError while a fresh direct connection sees the row
committed (LOSE_ANSWER) or absent (DROP_BEFORE), whichever way psycopg sends the COMMIT.
Unarmed, every kind of traffic the executor produces must pass untouched.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import psycopg
import pytest
from psycopg import sql
from support.pgproxy import DROP_BEFORE, LOSE_ANSWER, Commit, Mode, PgProxy, is_commit

from executor.storage.migrate import migrate

Conn = psycopg.Connection[Any]


@pytest.fixture
def table(db_url: str) -> Iterator[sql.Identifier]:
    """A scratch table of this test's own, dropped after it."""
    ident = sql.Identifier("public", f"pgproxy_probe_{uuid.uuid4().hex[:12]}")
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE TABLE {} (v text PRIMARY KEY, n int)").format(ident))
    try:
        yield ident
    finally:
        with psycopg.connect(db_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(ident))


def rows(db_url: str, table: sql.Identifier) -> list[str]:
    """What a fresh direct connection (not through the proxy) sees."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        query = sql.SQL("SELECT v FROM {} ORDER BY v").format(table)
        return [r[0] for r in conn.execute(query)]


# --- the ways psycopg sends a COMMIT ---------------------------------------------------------


@dataclass(frozen=True)
class Style:
    name: str
    protocol: Literal["simple", "extended"]
    autocommit: bool
    prepare_threshold: int | None = 5  # psycopg's default

    def connect(self, url: str) -> Conn:
        return psycopg.connect(
            url, autocommit=self.autocommit, prepare_threshold=self.prepare_threshold
        )

    def transact(self, conn: Conn, table: sql.Identifier, value: str) -> None:
        insert = sql.SQL("INSERT INTO {} (v) VALUES (%s)").format(table)
        if self.name == "autocommit, BEGIN/COMMIT statements":
            conn.execute("BEGIN")
            conn.execute(insert, (value,))
            conn.execute("COMMIT")  # no parameters: psycopg sends a simple Query
        elif self.name == "autocommit, prepared COMMIT":
            conn.execute("BEGIN")
            conn.execute(insert, (value,))
            conn.execute("COMMIT", prepare=True)  # the second time: Bind by name, no Parse
        elif self.name == "autocommit, transaction() block":
            with conn.transaction():
                conn.execute(insert, (value,))
        elif self.name == "explicit transaction, commit()":
            conn.execute(insert, (value,))
            conn.commit()
        elif self.name in ("pipeline, as the ledger's handler", "pipeline, prepared COMMIT"):
            with conn.pipeline():
                conn.execute("BEGIN")
                conn.execute(insert, (value,))
                conn.execute("SELECT 1").fetchone()  # a flush mid-pipeline, like the handler
                conn.execute(sql.SQL("UPDATE {} SET n = 1 WHERE v = %s").format(table), (value,))
                conn.execute("COMMIT")
        else:
            raise AssertionError(self.name)


STYLES = [
    Style("autocommit, BEGIN/COMMIT statements", "simple", autocommit=True),
    Style("autocommit, prepared COMMIT", "extended", autocommit=True),
    Style("autocommit, transaction() block", "simple", autocommit=True),
    Style("explicit transaction, commit()", "simple", autocommit=False),
    Style("pipeline, as the ledger's handler", "extended", autocommit=True),
    # Prepared on first use: the second COMMIT is a Bind by statement name, with no Parse.
    Style("pipeline, prepared COMMIT", "extended", autocommit=True, prepare_threshold=0),
]


@pytest.mark.parametrize("style", STYLES, ids=[s.name for s in STYLES])
@pytest.mark.parametrize("mode", [LOSE_ANSWER, DROP_BEFORE])
def test_an_armed_commit_breaks_the_client_and_commits_or_not(
    pg_proxy: PgProxy,
    proxy_db_url: str,
    db_url: str,
    table: sql.Identifier,
    style: Style,
    mode: Mode,
) -> None:
    conn = style.connect(proxy_db_url)
    try:
        style.transact(conn, table, "before")  # unarmed, on the same connection
        arming = pg_proxy.arm(mode)
        with pytest.raises(psycopg.OperationalError):
            style.transact(conn, table, "armed")
        (firing,) = arming.wait()
        assert conn.broken
    finally:
        conn.close()

    assert firing.mode == mode
    assert firing.commit.protocol == style.protocol
    assert firing.commit.mentions("armed")
    assert not firing.commit.mentions("before")  # statements are this transaction's only
    assert firing.commit.backend_pid is not None
    if mode == LOSE_ANSWER:
        assert firing.server_reply == "COMMIT"
        assert firing.committed
        assert rows(db_url, table) == ["armed", "before"]
    else:
        assert firing.server_reply is None
        assert rows(db_url, table) == ["before"]
    assert pg_proxy.commits == 2

    # The proxy itself carries on: a new connection commits normally.
    with style.connect(proxy_db_url) as again:
        style.transact(again, table, "after")
    assert "after" in rows(db_url, table)
    assert pg_proxy.commits == 3


def test_shots_and_a_predicate_choose_which_commits_are_cut(
    pg_proxy: PgProxy, proxy_db_url: str, db_url: str, table: sql.Identifier
) -> None:
    victim = psycopg.conninfo.make_conninfo(proxy_db_url, application_name="victim")
    bystander = psycopg.conninfo.make_conninfo(proxy_db_url, application_name="bystander")
    insert = sql.SQL("INSERT INTO {} (v) VALUES (%s)").format(table)
    arming = pg_proxy.arm(shots=2, match=lambda c: c.application_name == "victim")

    def commit(url: str, value: str) -> bool:
        """True if the client saw its commit succeed."""
        try:
            with psycopg.connect(url) as conn:
                conn.execute(insert, (value,))
                conn.commit()
        except psycopg.OperationalError:
            return False
        return True

    assert commit(bystander, "b1")
    assert not commit(victim, "v1")
    assert not arming.fired.is_set()
    assert commit(bystander, "b2")
    assert not commit(victim, "v2")
    assert arming.fired.is_set()
    assert commit(victim, "v3")  # both shots spent
    assert [f.commit.application_name for f in arming.wait()] == ["victim", "victim"]
    assert rows(db_url, table) == ["b1", "b2", "v1", "v2", "v3"]
    assert pg_proxy.commits == 5


def test_a_commit_skipped_after_an_error_in_its_pipeline_keeps_the_shot(
    pg_proxy: PgProxy, proxy_db_url: str, db_url: str, table: sql.Identifier
) -> None:
    """The server never executes that COMMIT, so there is no answer to lose."""
    arming = pg_proxy.arm()
    insert = sql.SQL("INSERT INTO {} (v) VALUES (%s)").format(table)

    def pipeline(conn: Conn, *statements: sql.Composed | str) -> None:
        with conn.pipeline():
            for statement in statements:
                conn.execute(statement, ("x",) if statement is insert else None)

    with psycopg.connect(proxy_db_url, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.DivisionByZero):
            pipeline(conn, "BEGIN", "SELECT 1 / 0", "COMMIT")
        assert not arming.fired.is_set()
        assert not conn.broken
        conn.execute("ROLLBACK")
        with pytest.raises(psycopg.OperationalError):
            pipeline(conn, "BEGIN", insert, "COMMIT")
    assert arming.wait()[0].committed
    assert rows(db_url, table) == ["x"]


def test_disarm_stops_further_shots(
    pg_proxy: PgProxy, proxy_db_url: str, table: sql.Identifier
) -> None:
    arming = pg_proxy.arm(shots=3)
    pg_proxy.disarm()
    with psycopg.connect(proxy_db_url) as conn:
        conn.execute(sql.SQL("INSERT INTO {} (v) VALUES ('x')").format(table))
        conn.commit()
    assert arming.firings == []
    assert pg_proxy.commits == 1


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("COMMIT", True),
        ("commit;", True),
        ("  End  ", True),
        ("COMMIT WORK", True),
        ("commit transaction;;", True),
        ("COMMIT AND NO CHAIN", True),
        ("COMMIT PREPARED 'gid'", False),
        ("SELECT 1; COMMIT", False),
        ("committed", False),
        ("ROLLBACK", False),
    ],
)
def test_which_statements_count_as_a_commit(query: str, expected: bool) -> None:
    assert is_commit(query) is expected


# --- unarmed traffic passes untouched ----------------------------------------------------------


def test_a_whole_migrate_passes(pg_proxy: PgProxy, database_server_url: str, db_url: str) -> None:
    name = f"pgproxy_migrate_{uuid.uuid4().hex[:8]}"
    ident = sql.Identifier(name)
    with psycopg.connect(database_server_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(ident))
    try:
        target = psycopg.conninfo.make_conninfo(database_server_url, dbname=name)
        applied = migrate(pg_proxy.url(target))
        assert applied
        schema = (
            "SELECT name, checksum FROM executor.schema_migrations ORDER BY name",
            "SELECT table_name, column_name, data_type FROM information_schema.columns"
            " WHERE table_schema = 'executor' ORDER BY 1, 2",
            "SELECT proname FROM pg_proc WHERE pronamespace = 'executor'::regnamespace ORDER BY 1",
        )
        with (
            psycopg.connect(target) as migrated,
            psycopg.connect(db_url) as direct,
        ):
            for query in schema:
                assert migrated.execute(query).fetchall() == direct.execute(query).fetchall()
        assert pg_proxy.commits >= len(applied)
        assert pg_proxy.firings == []
    finally:
        with psycopg.connect(database_server_url, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(ident))


def test_copy_in_and_out_and_large_values_pass(
    pg_proxy: PgProxy, proxy_db_url: str, db_url: str, table: sql.Identifier
) -> None:
    sent = [(f"row-{i:05d}-" + "x" * 200, i) for i in range(5000)]
    with psycopg.connect(proxy_db_url) as conn:
        with conn.cursor() as cur:
            with cur.copy(sql.SQL("COPY {} (v, n) FROM STDIN").format(table)) as copy:
                for row in sent:
                    copy.write_row(row)
            with cur.copy(sql.SQL("COPY {} (v, n) TO STDOUT").format(table)) as copy:
                received = sorted((v, int(n)) for v, n in copy.rows())
            big = cur.execute("SELECT repeat('ab', 2000000)").fetchone()
        conn.commit()
    assert received == sent
    assert big == ("ab" * 2_000_000,)
    assert len(rows(db_url, table)) == len(sent)
    assert pg_proxy.commits == 1


def test_listen_notify_passes(pg_proxy: PgProxy, proxy_db_url: str) -> None:
    with (
        psycopg.connect(proxy_db_url, autocommit=True) as listener,
        psycopg.connect(proxy_db_url, autocommit=True) as notifier,
    ):
        listener.execute("LISTEN pgproxy_test")
        notifier.execute("SELECT pg_notify('pgproxy_test', 'hello')")
        received = next(listener.notifies(timeout=30))
    assert (received.channel, received.payload) == ("pgproxy_test", "hello")


def test_a_cancel_request_passes(pg_proxy: PgProxy, proxy_db_url: str, db_url: str) -> None:
    with psycopg.connect(proxy_db_url, autocommit=True) as conn:
        pid = conn.info.backend_pid
        sleeping = threading.Event()

        def watch() -> None:
            with psycopg.connect(db_url, autocommit=True) as probe:
                while not probe.execute(
                    "SELECT 1 FROM pg_stat_activity WHERE pid = %s"
                    " AND query LIKE 'SELECT pg_sleep%%' AND state = 'active'",
                    (pid,),
                ).fetchone():
                    time.sleep(0.01)  # polling for a state, not waiting on luck
            sleeping.set()
            conn.cancel_safe()

        watcher = threading.Thread(target=watch)
        watcher.start()
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("SELECT pg_sleep(60)")
        watcher.join(timeout=30)
        assert sleeping.is_set()
        assert conn.execute("SELECT 1").fetchone() == (1,)


@pytest.mark.parametrize(("code", "name"), [(80877103, "SSLRequest"), (80877104, "GSSENCRequest")])
def test_ssl_and_gss_encryption_requests_are_declined(
    pg_proxy: PgProxy, code: int, name: str
) -> None:
    with socket.create_connection((pg_proxy.host, pg_proxy.port), timeout=10) as sock:
        sock.sendall(struct.pack("!ii", 8, code))
        assert sock.recv(1) == b"N", name


def test_a_client_requiring_ssl_fails_as_against_a_server_without_it(proxy_db_url: str) -> None:
    with pytest.raises(psycopg.OperationalError, match="SSL"):
        psycopg.connect(psycopg.conninfo.make_conninfo(proxy_db_url, sslmode="require"))


def test_the_commit_a_predicate_sees(
    pg_proxy: PgProxy, proxy_db_url: str, table: sql.Identifier
) -> None:
    seen: list[Commit] = []

    def record(commit: Commit) -> bool:
        seen.append(commit)
        return False  # never fires

    pg_proxy.arm(match=record)
    with psycopg.connect(proxy_db_url, application_name="probe") as conn:
        conn.execute(sql.SQL("INSERT INTO {} (v, n) VALUES (%s, %s)").format(table), ("x", 7))
        conn.commit()
        who = (1, conn.info.backend_pid, "probe", conn.info.user, conn.info.dbname)
    (commit,) = seen
    got = (
        commit.connection,
        commit.backend_pid,
        commit.application_name,
        commit.user,
        commit.database,
    )
    assert got == who
    assert [s.query.split()[0] for s in commit.statements] == ["BEGIN", "INSERT", "COMMIT"]
    assert commit.statements[1].params == (b"x", b"\x00\x07")  # as sent: 7 in binary, int2
    assert commit.mentions("x")
    assert not commit.mentions("nothing like this")
