"""Browser sessions that can be ended: a signed cookie naming a row in Postgres.

The cookie holds a random session id and whether it was logged in, signed and timestamped
with itsdangerous (so a forged or garbled cookie costs no database query and a stale one
expires by itself). A logged-in session also has a row in `executor.dashboard_sessions`,
keyed by the SHA-256 of its id, holding the role and the token's fingerprint. Logging out
deletes the row, and an operator's "log out everywhere" deletes them all, so a copied cookie
stops working the moment either happens; removing a token from the configuration ends its
sessions at their next request. Before login a session is only the signed id: enough to
bind the login form's CSRF token, with nothing stored for anonymous visitors.

CSRF tokens are an itsdangerous signature of the session id (a different salt from the
cookie's), compared as bytes. Logging in draws a new session id, so a CSRF token planted
before login is worthless after it. Flash messages are signed the same way.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from typing import Any

from itsdangerous import BadData, Signer, URLSafeSerializer, URLSafeTimedSerializer
from psycopg_pool import ConnectionPool

from executor.dashboard.auth import Principal, Role, TokenAuthority, same_secret

SESSION_COOKIE = "executor_session"
FLASH_COOKIE = "executor_flash"
MAX_COOKIE_LENGTH = 4096

Pool = ConnectionPool[Any]


@dataclass(frozen=True)
class Session:
    sid: str
    logged_in: bool


def _hash(sid: str) -> str:
    return hashlib.sha256(sid.encode()).hexdigest()


class SessionStore:
    """The logged-in sessions, in Postgres: readable by any replica, revocable by any."""

    def __init__(self, read_pool: Pool, write_pool: Pool) -> None:
        self.read_pool = read_pool
        self.write_pool = write_pool

    def create(self, principal: Principal, max_age: int) -> str:
        sid = secrets.token_urlsafe(32)
        with self.write_pool.connection() as conn:
            conn.execute(
                "DELETE FROM executor.dashboard_sessions WHERE expires_at < now()"
            )  # keeps the table small; the index makes it cheap
            conn.execute(
                "INSERT INTO executor.dashboard_sessions"
                " (session_hash, role, token_fingerprint, expires_at)"
                " VALUES (%s, %s, %s, now() + make_interval(secs => %s))",
                (_hash(sid), principal.role.label, principal.fingerprint, max_age),
            )
        return sid

    def lookup(self, sid: str) -> tuple[Role, str] | None:
        with self.read_pool.connection() as conn:
            row = conn.execute(
                "SELECT role, token_fingerprint FROM executor.dashboard_sessions"
                " WHERE session_hash = %s AND expires_at > now()",
                (_hash(sid),),
            ).fetchone()
        if row is None:
            return None
        return Role.from_label(row["role"]), str(row["token_fingerprint"])

    def delete(self, sid: str) -> None:
        with self.write_pool.connection() as conn:
            conn.execute(
                "DELETE FROM executor.dashboard_sessions WHERE session_hash = %s", (_hash(sid),)
            )

    def delete_all(self) -> int:
        with self.write_pool.connection() as conn:
            cur = conn.execute("DELETE FROM executor.dashboard_sessions")
            return int(cur.rowcount)


class SessionManager:
    """Cookies, CSRF tokens and flash messages, all signed with the dashboard's key."""

    def __init__(self, key: bytes, authority: TokenAuthority, max_age: int) -> None:
        self.authority = authority
        self.max_age = max_age
        self._cookies = URLSafeTimedSerializer(key, salt="executor-dashboard-session")
        self._csrf = Signer(key, salt="executor-dashboard-csrf")
        self._flash = URLSafeSerializer(key, salt="executor-dashboard-flash")
        self.store: SessionStore | None = None

    # -- cookies ---------------------------------------------------------------------------

    @staticmethod
    def anonymous() -> Session:
        return Session(sid=secrets.token_urlsafe(32), logged_in=False)

    def dump(self, session: Session) -> str:
        return self._cookies.dumps({"sid": session.sid, "in": session.logged_in})

    def load(self, raw: str | None) -> Session | None:
        """The session a cookie names, or None for a missing, forged, garbled or old one."""
        if not raw or len(raw) > MAX_COOKIE_LENGTH:
            return None
        try:
            value = self._cookies.loads(raw, max_age=self.max_age)
        except (BadData, UnicodeError, ValueError):
            return None
        if not isinstance(value, dict):
            return None
        sid, logged_in = value.get("sid"), value.get("in")
        if not isinstance(sid, str) or not sid or not isinstance(logged_in, bool):
            return None
        return Session(sid=sid, logged_in=logged_in)

    def principal(self, session: Session) -> Principal | None:
        """The caller a logged-in session stands for, if its row and its token still exist."""
        if not session.logged_in or self.store is None:
            return None
        found = self.store.lookup(session.sid)
        if found is None:
            return None
        role, fingerprint = found
        if not self.authority.still_valid(role, fingerprint):
            return None
        return Principal(role, fingerprint, "session")

    def log_in(self, principal: Principal) -> Session:
        assert self.store is not None
        return Session(sid=self.store.create(principal, self.max_age), logged_in=True)

    def log_out(self, session: Session) -> Session:
        if session.logged_in and self.store is not None:
            self.store.delete(session.sid)
        return self.anonymous()

    # -- CSRF ------------------------------------------------------------------------------

    def csrf_token(self, session: Session) -> str:
        return self._csrf.get_signature(session.sid).decode("ascii")

    def csrf_ok(self, session: Session | None, presented: str | None) -> bool:
        if session is None or not presented:
            return False
        return same_secret(presented, self.csrf_token(session))

    # -- flash -----------------------------------------------------------------------------

    def dump_flash(self, value: dict[str, Any]) -> str:
        return self._flash.dumps(value)

    def load_flash(self, raw: str) -> dict[str, Any] | None:
        try:
            value = self._flash.loads(raw)
        except (BadData, UnicodeError, ValueError):
            return None
        return value if isinstance(value, dict) else None
