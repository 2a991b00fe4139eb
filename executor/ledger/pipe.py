"""The handler's transactions on libpq's pipeline mode, below psycopg's cursors.

Why by hand: psycopg's `Connection.execute` and `Pipeline` objects cost about 25 µs of client
CPU a statement and 45 µs a pipeline, in Python, before anything reaches the server. The
handler's hot path is four statements in two round trips (BEGIN and the lock; the write and
COMMIT), and psycopg's layer was 207 µs of its ~470 µs of client CPU a command; the same
exchange through `psycopg.pq` directly costs 79 µs. Nothing else here is new: `psycopg.pq`
speaks the protocol, `psycopg.adapt.Transformer` dumps parameters and loads rows with the
connection's own adapters, and `psycopg.errors.error_from_result` raises what psycopg raises.

Statements are prepared once per connection and parameter types (psycopg's, but integers
left for the server to infer) and executed by name. A `Result` is filled when a round trip
brings it: reading one that has not arrived flushes the pipeline and waits, as psycopg's
pipeline does.

After a server error the transaction is rolled back here and the connection left idle; after
anything else that interrupts an exchange half-way (a lost connection, a job timeout raised
mid-wait, an exception in the caller between round trips), the connection is closed so the
pool replaces it. Psycopg deallocates every prepared statement of a connection after some of
its own commands (a ROLLBACK, when it has prepared statements of its own there); a statement
found missing empties this module's record for the connection, and the error
(`InvalidSqlStatementName`) is one the handler retries.
"""

from __future__ import annotations

import functools
import itertools
import json
import re
import select
import weakref
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import abc, pq
from psycopg import errors as pg_errors
from psycopg.adapt import PyFormat, Transformer
from psycopg.pq.abc import PGresult
from psycopg.types.json import set_json_loads

Conn = psycopg.Connection[dict[str, Any]]
Row = dict[str, Any]

_PLACEHOLDER = re.compile(r"%(?:\((\w+)\))?s|%%")
_OK = (pq.ExecStatus.COMMAND_OK, pq.ExecStatus.TUPLES_OK, pq.ExecStatus.EMPTY_QUERY)
_POLL_IN = select.POLLIN | select.POLLERR | select.POLLHUP
_POLL_OUT = select.POLLOUT | _POLL_IN
# int2, int4, int8: psycopg picks the smallest type that holds the value; left to the server
# to infer instead, so that one statement is prepared once whatever its numbers.
_INTEGERS = frozenset({20, 21, 23})
_SYNC, _FATAL, _ABORTED = (
    pq.ExecStatus.PIPELINE_SYNC,
    pq.ExecStatus.FATAL_ERROR,
    pq.ExecStatus.PIPELINE_ABORTED,
)
_COMMAND_OK, _TUPLES_OK = pq.ExecStatus.COMMAND_OK, pq.ExecStatus.TUPLES_OK


_scan = json.scanner.make_scanner(json.JSONDecoder())  # type: ignore[attr-defined]


def _loads(data: str | bytes) -> Any:
    """`json.loads` for the server's own output: UTF-8 (the connection's encoding) and no
    whitespace around it, so neither the encoding sniffing nor the two whitespace matches
    `json.loads` makes around a document are needed; anything else goes to `json.loads`."""
    text = data if isinstance(data, str) else data.decode()
    try:
        value, end = _scan(text, 0)
    except StopIteration:
        return json.loads(text)
    if end != len(text):
        return json.loads(text)
    return value


@functools.cache
def _formats(count: int) -> tuple[PyFormat, ...]:
    return (PyFormat.TEXT,) * count


@functools.cache
def _server_types(dumped: tuple[int, ...]) -> tuple[int, ...]:
    """The parameter types a statement is prepared with: psycopg's, integers left out."""
    return tuple(0 if oid in _INTEGERS else oid for oid in dumped)


class _Statement:
    """A query converted to `$n` placeholders, and the order its named parameters go in."""

    __slots__ = ("count", "names", "sql")

    def __init__(self, query: str) -> None:
        names: list[str] = []
        positional = 0

        def number(match: re.Match[str]) -> str:
            nonlocal positional
            if match.group(0) == "%%":
                return "%"
            if match.group(1) is None:
                positional += 1
                return f"${positional}"
            if match.group(1) not in names:
                names.append(match.group(1))
            return f"${names.index(match.group(1)) + 1}"

        self.sql = _PLACEHOLDER.sub(number, query).encode()
        if names and positional:
            raise ValueError("a query mixes %s and %(name)s placeholders")
        self.names = tuple(names)
        self.count = len(names) or positional

    def values(self, params: Sequence[Any] | Mapping[str, Any] | None) -> Sequence[Any]:
        if params is None:
            params = ()
        if type(params) is dict or isinstance(params, Mapping):
            return [params[n] for n in self.names]
        if self.names or len(params) != self.count:
            raise TypeError(f"the query takes {self.count} parameters, got {len(params)}")
        return params


_statements: dict[str, _Statement] = {}
# Per connection: (statement, parameter types) -> its prepared name. Protocol-level prepared
# statements outlive transactions, so only a Parse the server answered is remembered.
_Key = tuple[bytes, tuple[int, ...]]
_prepared: weakref.WeakKeyDictionary[Conn, dict[_Key, bytes]] = weakref.WeakKeyDictionary()
_names = itertools.count()
# Per connection: a poll object on its socket, which lives as long as the connection does,
# and a Transformer, which keeps the dumpers and loaders it has looked up (a new one per
# transaction looked every parameter's type up again). One thread uses a connection at a
# time, as psycopg's cursors use theirs. The connection's json loaders become `_loads`, for
# every query on it, the pipeline's or not.
_polls: weakref.WeakKeyDictionary[Conn, select.poll] = weakref.WeakKeyDictionary()
_transformers: weakref.WeakKeyDictionary[Conn, abc.Transformer] = weakref.WeakKeyDictionary()


class Result:
    """The rows of one queued statement, once its round trip has brought them."""

    __slots__ = ("_pipe", "_rows")

    def __init__(self, pipe: Pipe) -> None:
        self._pipe = pipe
        self._rows: list[Row] | None = None

    def _arrived(self) -> list[Row]:
        if self._rows is None:
            self._pipe.fetch()
        assert self._rows is not None
        return self._rows

    def fetchone(self) -> Row | None:
        rows = self._arrived()
        return rows[0] if rows else None

    def fetchall(self) -> list[Row]:
        return self._arrived()

    def __iter__(self) -> Iterator[Row]:
        return iter(self._arrived())


class Pipe:
    """Statements queued on one connection in pipeline mode; a round trip reads them all."""

    def __init__(self, conn: Conn) -> None:
        self.conn = conn
        self._pg = conn.pgconn
        tx = _transformers.get(conn)
        if tx is None:
            set_json_loads(_loads, conn)
            tx = _transformers[conn] = Transformer.from_context(conn)
        self._tx = tx
        self._prepared = _prepared.setdefault(conn, {})
        # What the server will answer, in order: a Result, or the Parse of a statement.
        self._expected: deque[Result | tuple[_Key, bytes]] = deque()
        self._syncs = 0
        self.error: psycopg.Error | None = None
        poll = _polls.get(conn)
        if poll is None:
            poll = _polls[conn] = select.poll()
            poll.register(self._pg.socket, _POLL_IN)
        self._poll = poll

    def execute(
        self, query: str, params: Sequence[Any] | Mapping[str, Any] | None = None
    ) -> Result:
        """Queue `query`; nothing is sent until a round trip (a read, `fetch`, `sync`)."""
        statement = _statements.get(query)
        if statement is None:
            statement = _statements[query] = _Statement(query)
        values = statement.values(params)
        dumped = None
        types: tuple[int, ...] = ()
        if values:
            dumped = self._tx.dump_sequence(values, _formats(len(values)))
            types = _server_types(self._tx.types or ())
        key = (statement.sql, types)
        name = self._prepared.get(key)
        if name is None:
            name = f"_executor_{next(_names)}".encode()
            self._pg.send_prepare(name, statement.sql, types or None)
            self._expected.append((key, name))
        self._pg.send_query_prepared(name, dumped)
        result = Result(self)
        self._expected.append(result)
        return result

    def fetch(self) -> None:
        """One round trip: every queued statement is answered; raises the first error."""
        if self._expected:
            self._pg.send_flush_request()
            self._read(sync=False)
        self._raise()

    def sync(self) -> None:
        """End the pipeline's batch of messages (COMMIT has happened if one was queued)."""
        self._pg.pipeline_sync()
        self._syncs += 1
        self._read(sync=True)
        self._raise()

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def _read(self, *, sync: bool) -> None:
        pg = self._pg
        while pg.flush():
            self._wait(_POLL_OUT)
        while self._expected or (sync and self._syncs):
            while pg.is_busy():
                self._wait(_POLL_IN)
            self._take(pg.get_result())

    def _wait(self, events: int) -> None:
        self._poll.modify(self._pg.socket, events)
        self._poll.poll()
        self._pg.consume_input()

    def _take(self, res: PGresult | None) -> None:
        if res is None:
            return  # the end of one statement's results
        status = res.status
        if status == _SYNC:
            self._syncs -= 1
            return
        expected = self._expected.popleft()
        if status == _FATAL:
            if self.error is None:
                self.error = pg_errors.error_from_result(res, encoding=self.conn.info.encoding)
            if isinstance(self.error, pg_errors.InvalidSqlStatementName):
                self._prepared.clear()  # deallocated behind our back (see module doc)
        elif status == _ABORTED:
            pass
        elif status not in _OK:
            raise psycopg.InterfaceError(
                f"unexpected result in a pipeline: {pq.ExecStatus(status).name}"
            )
        if isinstance(expected, tuple):
            if status == _COMMAND_OK:
                key, name = expected
                self._prepared[key] = name
            return
        expected._rows = self._load(res) if status == _TUPLES_OK else []

    def _load(self, res: PGresult) -> list[Row]:
        count = res.ntuples
        if not count:
            return []
        names = [(res.fname(i) or b"").decode() for i in range(res.nfields)]
        self._tx.set_pgresult(res)
        rows: list[Row] = self._tx.load_rows(
            0, count, lambda values: dict(zip(names, values, strict=True))
        )
        return rows

    @contextmanager
    def paused(self) -> Iterator[Conn]:
        """Everything queued answered, and the plain connection lent out in the same
        transaction (for test hooks that query it), then back to pipeline mode."""
        self.sync()
        self._pg.exit_pipeline_mode()
        try:
            yield self.conn
        finally:
            self._pg.enter_pipeline_mode()


@contextmanager
def transaction(conn: Conn) -> Iterator[Pipe]:
    """BEGIN … COMMIT on `conn` in pipeline mode; the COMMIT's round trip is the last."""
    pipe = Pipe(conn)
    pg = conn.pgconn
    pg.enter_pipeline_mode()
    try:
        pipe.execute("BEGIN")
        yield pipe
        pipe.execute("COMMIT")
        pipe.sync()
    except BaseException as exc:
        if exc is not pipe.error or not _roll_back(pipe):
            conn.close()
        raise
    finally:
        if not conn.closed and pg.pipeline_status != pq.PipelineStatus.OFF:
            pg.exit_pipeline_mode()


def _roll_back(pipe: Pipe) -> bool:
    """After a server error: read up to a Sync and roll back, leaving the connection idle.

    Done here rather than by `Connection.rollback`: psycopg follows its own ROLLBACK with
    DEALLOCATE ALL whenever it has prepared statements of its own on the connection.
    """
    try:
        pipe.sync()
    except psycopg.Error as exc:
        if exc is not pipe.error:  # not the server's error again: the connection failed
            return False
    if pipe._expected:
        return False
    pipe.error = None
    try:
        pipe.execute("ROLLBACK")
        pipe.sync()
    except psycopg.Error:
        return False
    return pipe.conn.info.transaction_status == pq.TransactionStatus.IDLE
