"""A TCP proxy in front of Postgres that can lose the answer to a COMMIT, for tests.

The executor must stay correct when a COMMIT goes through but its answer never reaches the
sender: the sender sees a broken connection and cannot tell whether its transaction
committed. Nothing short of the wire produces that deterministically, and byte-level fault
proxies (toxiproxy and the like) cannot tell a COMMIT's reply from any other bytes. So this
proxy parses just enough of the protocol: the frontend side (client -> server) to recognise
a COMMIT, sent as a simple Query or through the extended protocol (Parse/Bind/Execute, also
by prepared-statement name, as psycopg's pipeline mode and auto-prepare send it), and the
backend side to find the server's reply to that COMMIT.

Armed (`PgProxy.arm`), it does one of two things to the next COMMIT(s) matching a predicate:

- `LOSE_ANSWER`: forward the COMMIT, wait until the server's CommandComplete for it has
  arrived at the proxy (the transaction is committed and visible by then), drop that reply
  and whatever follows, and close both sockets;
- `DROP_BEFORE`: forward everything before the COMMIT, then close both sockets without
  forwarding it; the server rolls the transaction back.

Either way the client sees a broken connection (psycopg.OperationalError). `Arming.fired`
is set once every shot has fired, so tests wait on an Event, never on a sleep. Everything
else passes through byte for byte: startup and authentication, COPY, notifications, cancel
requests. SSLRequest and GSSENCRequest are answered 'N' by the proxy itself (the test server
uses neither); a client requiring SSL fails as against a server without it.

Only a message whose whole text is one COMMIT statement counts (`COMMIT`, `commit;`,
`END`, `COMMIT WORK`, `COMMIT AND NO CHAIN`...); a COMMIT inside a multi-statement simple
Query and `COMMIT PREPARED` pass through unrecognised.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg

from .arming import (
    DROP_BEFORE,
    LOSE_ANSWER,
    Arming,
    Commit,
    Firing,
    Mode,
    Statement,
)
from .pgwire import (
    CANCEL_REQUEST,
    GSSENC_REQUEST,
    SSL_REQUEST,
    bind_params,
    command_tag,
    cstring,
    ends_transaction_scope,
    error_text,
    frame_size,
    is_commit,
)

__all__ = [
    "DROP_BEFORE",
    "LOSE_ANSWER",
    "Arming",
    "Commit",
    "Firing",
    "Mode",
    "PgProxy",
    "Statement",
    "is_commit",
]

log = logging.getLogger("tests.pgproxy")

_TXN_STATEMENTS_KEPT = 500


@dataclass
class _Unit:
    """Frontend messages answered by one ReadyForQuery: a simple Query, a function call,
    the startup, or extended-protocol messages up to a Sync."""

    kind: Literal["simple", "extended", "other"]
    executes: int = 0  # statements sent (Execute messages, or 1 for a Query)
    done: int = 0  # their completions seen (CommandComplete, EmptyQuery, PortalSuspended)
    failed: bool = False  # an extended-protocol error: the server skips to the Sync
    armed_at: int | None = None  # index of the armed COMMIT among `executes`
    arming: Arming | None = None
    commit: Commit | None = None


@dataclass
class _Link:
    """One client connection and its server connection, with the protocol state of both."""

    ordinal: int
    client: socket.socket
    server: socket.socket
    params: dict[str, str] = field(default_factory=dict)
    backend_pid: int | None = None
    prepared: dict[bytes, str] = field(default_factory=dict)
    portals: dict[bytes, Statement] = field(default_factory=dict)
    txn: deque[Statement] = field(default_factory=lambda: deque(maxlen=_TXN_STATEMENTS_KEPT))
    units: deque[_Unit] = field(default_factory=deque)
    open_unit: _Unit | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def close(self) -> None:
        for sock in (self.client, self.server):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


class PgProxy:
    """Listens on 127.0.0.1 (a free port) and forwards each connection to `upstream`.

    `upstream` is (host, port) for TCP or a Unix socket path. Use `url()` to point a
    database URL at the proxy and `arm()` to cut a COMMIT; `commits` counts the COMMITs
    seen, armed or not.
    """

    def __init__(self, upstream: tuple[str, int] | str, host: str = "127.0.0.1") -> None:
        self.upstream = upstream
        self._listener = socket.create_server((host, 0))
        self.host, self.port = self._listener.getsockname()[:2]
        self.commits = 0
        self.connections = 0
        self.firings: list[Firing] = []
        self._armings: list[Arming] = []
        self._links: list[_Link] = []
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._closed = False
        self._spawn(self._accept_loop, "pgproxy-accept")

    @classmethod
    def for_url(cls, database_url: str) -> PgProxy:
        """A proxy in front of the server `database_url` names (TCP or Unix socket)."""
        info = psycopg.conninfo.conninfo_to_dict(database_url)
        host = str(info.get("host") or "/var/run/postgresql").split(",")[0]
        port = int(str(info.get("port") or 5432).split(",")[0])
        return cls(f"{host}/.s.PGSQL.{port}" if host.startswith("/") else (host, port))

    def url(self, database_url: str) -> str:
        """`database_url` with its host and port replaced by the proxy's."""
        parts = urlsplit(database_url)
        if parts.scheme not in ("postgres", "postgresql"):
            info = psycopg.conninfo.conninfo_to_dict(database_url)
            info.pop("hostaddr", None)
            info.update(host=self.host, port=str(self.port))
            return psycopg.conninfo.make_conninfo("", **info)
        userinfo = parts.netloc.rpartition("@")[0]
        netloc = f"{userinfo}@" if userinfo else ""
        query = [
            (k, v)
            for k, v in parse_qsl(parts.query, keep_blank_values=True)
            if k not in ("host", "hostaddr", "port")
        ]
        netloc += f"{self.host}:{self.port}"
        return urlunsplit((parts.scheme, netloc, parts.path, urlencode(query), parts.fragment))

    def arm(
        self,
        mode: Mode = LOSE_ANSWER,
        *,
        shots: int = 1,
        match: Callable[[Commit], bool] | None = None,
    ) -> Arming:
        """Cut the next `shots` COMMITs `match` accepts (every COMMIT if None)."""
        arming = Arming(mode, shots, match)
        with self._lock:
            self._armings.append(arming)
        return arming

    def disarm(self) -> None:
        with self._lock:
            for arming in self._armings:
                arming.disarm()
            self._armings.clear()

    def close(self) -> None:
        """Stop listening and close every connection; joins the proxy's threads."""
        with self._lock:
            self._closed = True
            links = list(self._links)
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        for link in links:
            link.close()
        for thread in self._threads:
            thread.join(timeout=10)

    def __enter__(self) -> PgProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- plumbing -----------------------------------------------------------------------------

    def _spawn(self, target: Callable[..., None], name: str, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        with self._lock:
            self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                if isinstance(self.upstream, str):
                    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    server.connect(self.upstream)
                else:
                    server = socket.create_connection(self.upstream)
            except OSError:
                log.exception("pgproxy: cannot reach %s", self.upstream)
                client.close()
                continue
            with self._lock:
                if self._closed:
                    client.close()
                    server.close()
                    return
                self.connections += 1
                link = _Link(self.connections, client, server)
                self._links.append(link)
            self._spawn(self._pump_frontend, f"pgproxy-{link.ordinal}-fe", link)
            self._spawn(self._pump_backend, f"pgproxy-{link.ordinal}-be", link)

    def _fire(self, link: _Link, arming: Arming, firing: Firing) -> None:
        """Record, then cut: a client that sees its connection break finds `fired` set."""
        log.info("pgproxy: %s on connection %d (%s)", firing.mode, link.ordinal, firing)
        with self._lock:
            self.firings.append(firing)
        arming.record(firing)
        link.close()

    def _take_shot(self, commit: Commit) -> Arming | None:
        with self._lock:
            self.commits += 1
            armings = list(self._armings)
        for arming in armings:
            if arming.take(commit):
                return arming
        return None

    # --- client -> server ---------------------------------------------------------------------

    def _pump_frontend(self, link: _Link) -> None:
        buf = bytearray()
        startup, raw = True, False
        try:
            while data := link.client.recv(65536):
                buf += data
                out = bytearray()
                while True:
                    if raw:
                        out += buf
                        buf.clear()
                        break
                    size = frame_size(buf, startup)
                    if size is None:
                        break
                    msg = bytes(buf[:size])
                    del buf[:size]
                    if startup:
                        code = struct.unpack_from("!i", msg, 4)[0]
                        if code in (SSL_REQUEST, GSSENC_REQUEST):
                            link.client.sendall(b"N")
                            continue
                        startup, raw = False, code == CANCEL_REQUEST
                        if not raw:
                            self._on_startup(link, msg)
                        out += msg
                        continue
                    cut = self._on_frontend(link, msg)
                    if cut is not None:
                        link.server.sendall(out)
                        self._fire(link, cut[0], Firing(cut[1], DROP_BEFORE, None))
                        return
                    out += msg
                if out:
                    link.server.sendall(out)
        except OSError:
            pass
        finally:
            link.close()

    def _on_startup(self, link: _Link, msg: bytes) -> None:
        fields = msg[8:].split(b"\x00")
        link.params = {
            k.decode(errors="replace"): v.decode(errors="replace")
            for k, v in zip(fields[::2], fields[1::2], strict=False)
            if k
        }
        with link.lock:
            link.units.append(_Unit("other"))

    def _on_frontend(self, link: _Link, msg: bytes) -> tuple[Arming, Commit] | None:
        """Track one client message; returns (arming, commit) to cut the connection before it."""
        kind, body = msg[:1], msg[5:]
        with link.lock:
            if kind == b"P":
                name, rest = cstring(body)
                link.prepared[name] = cstring(rest)[0].decode(errors="replace")
            elif kind == b"B":
                portal, rest = cstring(body)
                name, rest = cstring(rest)
                link.portals[portal] = Statement(link.prepared.get(name, ""), bind_params(rest))
            elif kind == b"C" and body[:1] == b"S":
                link.prepared.pop(cstring(body[1:])[0], None)
            elif kind == b"C" and body[:1] == b"P":
                link.portals.pop(cstring(body[1:])[0], None)
            elif kind == b"Q":
                link.open_unit = None
                unit = _Unit("simple")
                link.units.append(unit)
                query = cstring(body)[0].decode(errors="replace")
                return self._on_statement(link, unit, Statement(query))
            elif kind == b"E":
                if link.open_unit is None:
                    link.open_unit = _Unit("extended")
                    link.units.append(link.open_unit)
                statement = link.portals.get(cstring(body)[0], Statement(""))
                return self._on_statement(link, link.open_unit, statement)
            elif kind == b"S":
                if link.open_unit is None:
                    link.units.append(_Unit("extended"))
                link.open_unit = None
            elif kind == b"F":
                link.units.append(_Unit("other"))
        return None

    def _on_statement(
        self, link: _Link, unit: _Unit, statement: Statement
    ) -> tuple[Arming, Commit] | None:
        index = unit.executes
        unit.executes += 1
        if ends_transaction_scope(statement.query):
            link.txn.clear()
        link.txn.append(statement)
        if not is_commit(statement.query):
            return None
        commit = Commit(
            connection=link.ordinal,
            backend_pid=link.backend_pid,
            application_name=link.params.get("application_name", ""),
            user=link.params.get("user", ""),
            database=link.params.get("database", ""),
            query=statement.query,
            protocol="simple" if unit.kind == "simple" else "extended",
            statements=tuple(link.txn),
        )
        link.txn.clear()
        arming = self._take_shot(commit)
        if arming is None:
            return None
        if arming.mode == DROP_BEFORE:
            return arming, commit
        unit.armed_at, unit.arming, unit.commit = index, arming, commit
        return None

    # --- server -> client ---------------------------------------------------------------------

    def _pump_backend(self, link: _Link) -> None:
        buf = bytearray()
        try:
            while data := link.server.recv(65536):
                buf += data
                out = bytearray()
                while (size := frame_size(buf, False)) is not None:
                    msg = bytes(buf[:size])
                    del buf[:size]
                    fire = self._on_backend(link, msg)
                    if fire is not None:
                        link.client.sendall(out)  # answers to earlier statements
                        self._fire(link, *fire)
                        return
                    out += msg
                if out:
                    link.client.sendall(out)
        except OSError:
            pass
        finally:
            link.close()

    def _on_backend(self, link: _Link, msg: bytes) -> tuple[Arming, Firing] | None:
        """Track one server message; returns what to fire if it answers the armed COMMIT."""
        kind, body = msg[:1], msg[5:]
        released: Arming | None = None
        with link.lock:
            if kind == b"K" and len(body) >= 4:
                link.backend_pid = struct.unpack_from("!i", body)[0]
            unit = link.units[0] if link.units else None
            if unit is None or unit.kind == "other":
                pass
            elif kind in (b"C", b"I", b"s", b"E") and not unit.failed:
                index = unit.done
                unit.done += 1
                if kind == b"E" and unit.kind == "extended":
                    unit.failed = True  # the server skips the rest of the unit
                if unit.arming is not None and unit.armed_at == index:
                    assert unit.commit is not None
                    reply = (
                        command_tag(body)
                        if kind == b"C"
                        else error_text(body)
                        if kind == b"E"
                        else None
                    )
                    firing = Firing(unit.commit, LOSE_ANSWER, reply or f"message {kind!r}")
                    return unit.arming, firing
            if kind == b"Z" and link.units:
                done = link.units.popleft()
                released = done.arming
        if released is not None:
            released.release()  # its COMMIT was skipped, never answered
        return None
