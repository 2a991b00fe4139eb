"""Counting proxies: what a client really sends to Postgres and Redis, read off the wire.

Hand-written because no library counts round trips: server-side statistics
(pg_stat_statements, INFO commandstats) are server-wide, need configuration this machine's
shared servers do not have, and cannot see where a client stops to wait. A local TCP proxy
in front of each server sees every byte of the connections routed through it and nothing
else, so other clients of a shared server do not leak into the counts.

Postgres: a round trip is each point where the client waits for the server (a Sync, a Flush
not right behind a Sync, a simple Query); a statement is an Execute or a simple Query
(tallied by its SQL text); a commit is read from the server's ReadyForQuery status: an
explicit transaction that ends with COMMIT, or an implicit one (autocommit) that ran a
command without error. Redis: a command is one RESP array from the client (tallied by name);
a round trip is a burst of client bytes after the server last answered.
"""

from __future__ import annotations

import socket
import struct
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from psycopg.conninfo import conninfo_to_dict, make_conninfo

_SSL_OR_GSS_REQUEST = (80877103, 80877104)


@dataclass(frozen=True)
class Snapshot:
    """Totals at one instant; subtract two to get what happened in between."""

    round_trips: int
    statements: int
    commits: int
    rollbacks: int
    by_statement: Counter[str]

    def __sub__(self, other: Snapshot) -> Snapshot:
        return Snapshot(
            self.round_trips - other.round_trips,
            self.statements - other.statements,
            self.commits - other.commits,
            self.rollbacks - other.rollbacks,
            self.by_statement - other.by_statement,
        )

    def total(self) -> int:
        return self.round_trips + self.statements + self.commits + self.rollbacks


def _label(query: str) -> str:
    return " ".join(query.split())[:90] or "(empty query: a pool's liveness check)"


class _PgConnection:
    """Both halves of one proxied Postgres connection, parsed message by message."""

    def __init__(self) -> None:
        self.front = b""
        self.back = b""
        self.started = False
        self.previous = ""
        self.round_trips = 0
        self.statements: Counter[str] = Counter()
        self.commits = 0
        self.rollbacks = 0
        self.prepared: dict[str, str] = {}
        self.portals: dict[str, str] = {}
        self.status = "I"
        self.commands_since_ready = 0
        self.error_since_ready = False
        self.last_tag = ""

    def feed_front(self, data: bytes) -> None:
        self.front += data
        while True:
            if not self.started:
                if len(self.front) < 8:
                    return
                length, code = struct.unpack("!ii", self.front[:8])
                if len(self.front) < length:
                    return
                self.front = self.front[length:]
                self.started = code not in _SSL_OR_GSS_REQUEST
                continue
            if len(self.front) < 5:
                return
            kind = chr(self.front[0])
            (length,) = struct.unpack("!i", self.front[1:5])
            if len(self.front) < 1 + length:
                return
            body = self.front[5 : 1 + length]
            self.front = self.front[1 + length :]
            if kind in "SQ" or (kind == "H" and self.previous != "S"):
                self.round_trips += 1
            if kind == "Q":
                self.statements[_label(_cstring(body, 0)[0])] += 1
            elif kind == "P":
                name, at = _cstring(body, 0)
                self.prepared[name] = _cstring(body, at)[0]
            elif kind == "B":
                portal, at = _cstring(body, 0)
                self.portals[portal] = self.prepared.get(_cstring(body, at)[0], "?")
            elif kind == "E":
                self.statements[_label(self.portals.get(_cstring(body, 0)[0], "?"))] += 1
            self.previous = kind

    def feed_back(self, data: bytes) -> None:
        self.back += data
        while len(self.back) >= 5:
            kind = chr(self.back[0])
            (length,) = struct.unpack("!i", self.back[1:5])
            if len(self.back) < 1 + length:
                return
            body = self.back[5 : 1 + length]
            self.back = self.back[1 + length :]
            if kind == "C":
                self.commands_since_ready += 1
                self.last_tag = _cstring(body, 0)[0]
            elif kind == "E":
                self.error_since_ready = True
            elif kind == "Z":
                self._ready(chr(body[0]))

    def _ready(self, status: str) -> None:
        if status == "I":
            if self.status in "TE":  # an explicit transaction ended
                if self.status == "T" and self.last_tag == "COMMIT":
                    self.commits += 1
                else:
                    self.rollbacks += 1
            elif self.commands_since_ready:  # implicit transaction (autocommit)
                if self.error_since_ready:
                    self.rollbacks += 1
                else:
                    self.commits += 1
        self.status = status
        self.commands_since_ready = 0
        self.error_since_ready = False


def _cstring(body: bytes, at: int) -> tuple[str, int]:
    end = body.index(b"\0", at)
    return body[at:end].decode("utf-8", "replace"), end + 1


class _RespConnection:
    """One proxied Redis connection: commands by name, and client bursts (round trips)."""

    def __init__(self) -> None:
        self.buffer = b""
        self.commands: Counter[str] = Counter()
        self.round_trips = 0
        self.answered = True

    def feed_front(self, data: bytes) -> None:
        if self.answered:
            self.round_trips += 1
            self.answered = False
        self.buffer += data
        while self.buffer:
            parsed = _resp_command(self.buffer)
            if parsed is None:
                return
            name, used = parsed
            self.buffer = self.buffer[used:]
            self.commands[name] += 1

    def feed_back(self, data: bytes) -> None:
        self.answered = True


def _resp_command(buf: bytes) -> tuple[str, int] | None:
    """The command name and the bytes it used, or None while the frame is incomplete."""
    if not buf.startswith(b"*"):
        end = buf.find(b"\r\n")  # an inline command
        if end < 0:
            return None
        words = buf[:end].split()
        return (words[0].decode().upper() if words else "", end + 2)
    end = buf.find(b"\r\n")
    if end < 0:
        return None
    count = int(buf[1:end])
    at = end + 2
    name = ""
    for i in range(count):
        end = buf.find(b"\r\n", at)
        if end < 0:
            return None
        size = int(buf[at + 1 : end])
        start = end + 2
        if len(buf) < start + size + 2:
            return None
        if i == 0:
            name = buf[start : start + size].decode("utf-8", "replace").upper()
        at = start + size + 2
    return name, at


class _Proxy:
    """A local TCP proxy; each accepted connection gets a parser fed by both pumps."""

    def __init__(self, family: int, address: Any, parser: type[Any]) -> None:
        self.family = family
        self.address = address
        self.parser = parser
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port: int = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = [self.listener]
        self.connections: list[Any] = []
        self.lock = threading.Lock()
        self.closed = False
        threading.Thread(target=self._accept, name="bench-proxy", daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.socket(self.family, socket.SOCK_STREAM)
            try:
                upstream.connect(self.address)
            except OSError:
                _quiet_close(client)
                continue
            for s in (client, upstream):
                if s.family == socket.AF_INET:
                    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = self.parser()
            with self.lock:
                self.connections.append(conn)
                self.sockets += [client, upstream]
            for src, dst, feed in (
                (client, upstream, conn.feed_front),
                (upstream, client, conn.feed_back),
            ):
                threading.Thread(target=self._pump, args=(src, dst, feed), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, feed: Any) -> None:
        try:
            while data := src.recv(65536):
                with self.lock:
                    feed(data)  # counted before the other side can answer it
                dst.sendall(data)
        except OSError:
            pass
        finally:
            _quiet_close(dst)

    def close(self) -> None:
        self.closed = True
        for s in self.sockets:
            _quiet_close(s)


class PostgresCounter(_Proxy):
    def __init__(self, database_url: str) -> None:
        params = conninfo_to_dict(database_url)
        host = str(params.get("hostaddr") or params.get("host") or "/var/run/postgresql")
        host = host.split(",")[0]
        port = int(str(params.get("port") or "5432").split(",")[0])
        if host.startswith("/"):
            super().__init__(socket.AF_UNIX, f"{host}/.s.PGSQL.{port}", _PgConnection)
        else:
            super().__init__(socket.AF_INET, (socket.gethostbyname(host), port), _PgConnection)
        self.url = make_conninfo(
            database_url,
            host="127.0.0.1",
            hostaddr="127.0.0.1",
            port=str(self.port),
            sslmode="disable",
            gssencmode="disable",
        )

    def snapshot(self) -> Snapshot:
        with self.lock:
            conns: list[_PgConnection] = list(self.connections)
            by: Counter[str] = Counter()
            for c in conns:
                by.update(c.statements)
            return Snapshot(
                sum(c.round_trips for c in conns),
                sum(by.values()),
                sum(c.commits for c in conns),
                sum(c.rollbacks for c in conns),
                by,
            )


class RedisCounter(_Proxy):
    def __init__(self, redis_url: str) -> None:
        parts = urlsplit(redis_url)
        if parts.scheme == "unix":
            super().__init__(socket.AF_UNIX, unquote(parts.path), _RespConnection)
        else:
            address = (socket.gethostbyname(parts.hostname or "127.0.0.1"), parts.port or 6379)
            super().__init__(socket.AF_INET, address, _RespConnection)
        db = _redis_db(redis_url)
        auth = f"{parts.username or ''}:{parts.password}@" if parts.password else ""
        self.url = f"redis://{auth}127.0.0.1:{self.port}/{db}"

    def snapshot(self) -> Snapshot:
        with self.lock:
            conns: list[_RespConnection] = list(self.connections)
            by: Counter[str] = Counter()
            for c in conns:
                by.update(c.commands)
            return Snapshot(sum(c.round_trips for c in conns), sum(by.values()), 0, 0, by)


def _redis_db(url: str) -> int:
    parts = urlsplit(url)
    for pair in parts.query.split("&"):
        if pair.startswith("db="):
            return int(pair[3:])
    path = parts.path.strip("/")
    return int(path) if parts.scheme != "unix" and path.isdigit() else 0


def _quiet_close(s: socket.socket) -> None:
    with suppress(OSError):
        s.close()


@contextmanager
def counting(database_url: str, redis_url: str) -> Iterator[tuple[PostgresCounter, RedisCounter]]:
    """Both proxies for the block; route clients through `.url` of each."""
    pg, rd = PostgresCounter(database_url), RedisCounter(redis_url)
    try:
        yield pg, rd
    finally:
        pg.close()
        rd.close()
