"""Who is asking: tokens, roles, and the checks every request and write goes through.

- Two roles. A *viewer* reads every page and endpoint; an *operator* may also act (retry,
  bulk retry, cancel, pause, resume, log everyone out). Tokens come from configuration only.
- Scripts send `Authorization: Bearer <token>` on every request; browsers log in once and
  then hold a session (see `sessions`), which is only as good as its token: removing the
  token from the configuration ends its sessions.
- Presented tokens are compared as bytes with `hmac.compare_digest`, against every
  configured token, without stopping at the first match. So are CSRF tokens: text that is
  not ASCII is compared like any other, never raised on.
- Wrong tokens (bearer or login form) are counted per client address; past the limit the
  client gets 429 with `Retry-After` until its window frees up (see `ratelimit`).
"""

from __future__ import annotations

import enum
import hashlib
import hmac
from dataclasses import dataclass

from starlette.requests import HTTPConnection

CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"


class Role(enum.IntEnum):
    VIEWER = 1
    OPERATOR = 2

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def from_label(cls, label: str) -> Role:
        return cls[label.upper()]


@dataclass(frozen=True)
class Principal:
    """An authenticated caller; `fingerprint` names the token in logs and receipts."""

    role: Role
    fingerprint: str
    via: str  # "session" or "bearer"

    def can(self, role: Role) -> bool:
        return self.role >= role

    @property
    def actor(self) -> str:
        return f"dashboard:{self.role.label}:{self.fingerprint}"


class AuthError(Exception):
    """Base of the request-level refusals the app turns into 401/403/429 responses."""

    status_code = 401


class NotAuthenticated(AuthError):
    status_code = 401


class Forbidden(AuthError):
    status_code = 403


class CsrfRejected(AuthError):
    status_code = 403


class RateLimited(AuthError):
    """Too many wrong tokens from this client; `retry_after` seconds until the next try."""

    status_code = 429

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"too many failed logins or tokens; try again in {retry_after} s")
        self.retry_after = retry_after


def as_bytes(text: str) -> bytes:
    """Any text as bytes for a constant-time comparison (lone surrogates included)."""
    return text.encode("utf-8", "surrogatepass")


def same_secret(a: str, b: str) -> bool:
    return hmac.compare_digest(as_bytes(a), as_bytes(b))


class TokenAuthority:
    """Checks presented tokens against the configured ones."""

    def __init__(self, viewer: tuple[str, ...], operator: tuple[str, ...]) -> None:
        self._tokens: list[tuple[bytes, Role, str]] = []
        for role, tokens in ((Role.VIEWER, viewer), (Role.OPERATOR, operator)):
            for token in tokens:
                self._tokens.append((as_bytes(token), role, self.fingerprint(token)))

    @staticmethod
    def fingerprint(token: str) -> str:
        """A short name for a token, stable across restarts, useless for recovering it."""
        return hashlib.sha256(b"executor-dashboard-token:" + as_bytes(token)).hexdigest()[:12]

    def authenticate(self, presented: str) -> Principal | None:
        """The principal for `presented`, checked against every token in constant time each."""
        candidate = as_bytes(presented.strip())
        found: tuple[Role, str] | None = None
        for token, role, fp in self._tokens:
            if hmac.compare_digest(candidate, token) and found is None:
                found = (role, fp)
        return None if found is None else Principal(found[0], found[1], "bearer")

    def still_valid(self, role: Role, fingerprint: str) -> bool:
        """A session is only as good as its token: revoking the token ends the session."""
        ok = False
        for _, r, fp in self._tokens:
            if same_secret(fp, fingerprint) and r == role:
                ok = True
        return ok


def current_principal(conn: HTTPConnection) -> Principal | None:
    principal: Principal | None = conn.state.principal
    return principal


def require(conn: HTTPConnection, role: Role) -> Principal:
    """The caller if it holds `role`; raises NotAuthenticated (401), Forbidden (403),
    RateLimited (429), or the database error that kept the session from being read."""
    principal = current_principal(conn)
    if principal is None and conn.state.retry_after is not None:
        raise RateLimited(conn.state.retry_after)
    if principal is None and conn.state.auth_error is not None:
        raise conn.state.auth_error
    if principal is None:
        if conn.state.bad_bearer:
            raise NotAuthenticated("the bearer token matches no configured dashboard token")
        raise NotAuthenticated("log in or send Authorization: Bearer <token>")
    if not principal.can(role):
        raise Forbidden(f"this needs the {role.label} role; you are a {principal.role.label}")
    return principal


def check_csrf(conn: HTTPConnection, principal: Principal, presented: str | None) -> None:
    """Cookie-authenticated writes must prove they come from our own pages."""
    if principal.via == "bearer":
        return
    if not conn.app.state.ctx.sessions.csrf_ok(conn.state.session, presented):
        raise CsrfRejected("missing or wrong CSRF token; reload the page and try again")
