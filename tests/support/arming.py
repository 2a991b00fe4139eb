"""What the test proxy (`pgproxy`) is armed with and what it reports: the public API.

arming = pg_proxy.arm(match=lambda c: c.mentions("start_step"))  # LOSE_ANSWER, 1 shot
...                                       # the client gets psycopg.OperationalError
(firing,) = arming.wait()                 # waits on arming.fired, an Event
assert firing.committed                   # the server said COMMIT; the client never saw it
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

log = logging.getLogger("tests.pgproxy")

Mode = Literal["lose_answer", "drop_before"]
LOSE_ANSWER: Mode = "lose_answer"
DROP_BEFORE: Mode = "drop_before"


@dataclass(frozen=True)
class Statement:
    """One executed statement as the proxy saw it: text, and bound parameters as sent."""

    query: str
    params: tuple[bytes | None, ...] = ()


@dataclass(frozen=True)
class Commit:
    """A COMMIT the proxy recognised: what a `match` predicate sees, and a Firing reports."""

    connection: int  # the proxy's ordinal for the client connection, from 1
    backend_pid: int | None  # the server process (psycopg: conn.info.backend_pid)
    application_name: str
    user: str
    database: str
    query: str
    protocol: Literal["simple", "extended"]
    # What this connection executed since its last BEGIN, COMMIT or ROLLBACK (the last
    # statements of the transaction this COMMIT ends), the COMMIT itself last.
    statements: tuple[Statement, ...]

    def mentions(self, text: str) -> bool:
        """True if `text` occurs in a statement or a bound parameter of this transaction."""
        raw = text.encode()
        return any(
            text in s.query or any(p is not None and raw in p for p in s.params)
            for s in self.statements
        )


@dataclass(frozen=True)
class Firing:
    """One shot: what was cut, and what the server answered (lost on the way back)."""

    commit: Commit
    mode: Mode
    # LOSE_ANSWER: the CommandComplete tag ("COMMIT", or "ROLLBACK" for an aborted
    # transaction) or "ERROR <sqlstate>: <message>"; DROP_BEFORE: None (never sent).
    server_reply: str | None

    @property
    def committed(self) -> bool:
        return self.server_reply == "COMMIT"


class Arming:
    """An armed fault: fires on the next `shots` COMMITs that `match` accepts."""

    def __init__(self, mode: Mode, shots: int, match: Callable[[Commit], bool] | None) -> None:
        if mode not in (LOSE_ANSWER, DROP_BEFORE) or shots < 1:
            raise ValueError(f"bad arming: mode={mode!r} shots={shots}")
        self.mode = mode
        self.shots = shots
        self.match = match
        self.firings: list[Firing] = []
        self.fired = threading.Event()  # set when every shot has fired
        self._reserved = 0
        self._lock = threading.Lock()

    def wait(self, timeout: float = 30.0) -> list[Firing]:
        """The firings, once every shot has fired; AssertionError after `timeout` seconds."""
        if not self.fired.wait(timeout):
            raise AssertionError(
                f"the proxy fired {len(self.firings)} of {self.shots} {self.mode} shot(s) "
                f"within {timeout}s"
            )
        return list(self.firings)

    def disarm(self) -> None:
        """Fire no more (a shot already in flight still fires)."""
        with self._lock:
            self.shots = self._reserved

    # --- called by the proxy ----------------------------------------------------------------

    def take(self, commit: Commit) -> bool:
        """Reserve a shot for `commit` if one is left and `match` accepts it."""
        with self._lock:
            if self._reserved >= self.shots:
                return False
            try:
                if self.match is not None and not self.match(commit):
                    return False
            except Exception:
                log.exception("pgproxy: the match predicate raised; not firing on %s", commit)
                return False
            self._reserved += 1
            return True

    def release(self) -> None:
        """An armed COMMIT the server skipped (an earlier error in its pipeline): re-arm."""
        with self._lock:
            self._reserved -= 1

    def record(self, firing: Firing) -> None:
        """A reserved shot fired."""
        with self._lock:
            self.firings.append(firing)
            if len(self.firings) >= self.shots:
                self.fired.set()
