"""Who is asking: tokens, roles, signed session cookies and CSRF tokens.

- Two roles. A *viewer* reads every page and endpoint; an *operator* may also act (retry,
  bulk retry, cancel, pause, resume). Tokens come from configuration only.
- Browsers log in once with a token; the dashboard then keeps a signed, HttpOnly,
  SameSite=Strict session cookie holding a random session id, the role and a fingerprint of
  the token (never the token). Removing a token from the configuration ends its sessions.
- Scripts send `Authorization: Bearer <token>` on every request.
- Every form carries a CSRF token derived from the session id (HMAC with the server key),
  and so does every cookie-authenticated JSON POST (`X-CSRF-Token` header). Logging in
  rotates the session id, so a token planted before login is worthless after it.
- Tokens are compared with `hmac.compare_digest`, against every configured token, without
  stopping at the first match.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from http.cookies import SimpleCookie
from typing import Any

from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

SESSION_COOKIE = "executor_session"
FLASH_COOKIE = "executor_flash"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"


class Role(enum.IntEnum):
    VIEWER = 1
    OPERATOR = 2

    @property
    def label(self) -> str:
        return self.name.lower()


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


@dataclass(frozen=True)
class Session:
    sid: str
    role: Role | None
    fingerprint: str | None
    expires: int


class AuthError(Exception):
    """Base of the request-level refusals the app turns into 401/403 responses."""

    status_code = 401


class NotAuthenticated(AuthError):
    status_code = 401


class Forbidden(AuthError):
    status_code = 403


class CsrfRejected(AuthError):
    status_code = 403


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Signer:
    """HMAC-SHA256 over `purpose:payload`, so a value signed for one use fits no other."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    def mac(self, purpose: str, payload: str) -> str:
        digest = hmac.new(self._key, f"{purpose}:{payload}".encode(), hashlib.sha256).digest()
        return _b64(digest)

    def dumps(self, purpose: str, value: dict[str, Any]) -> str:
        payload = _b64(json.dumps(value, separators=(",", ":")).encode())
        return f"{payload}.{self.mac(purpose, payload)}"

    def loads(self, purpose: str, signed: str) -> dict[str, Any] | None:
        payload, _, mac = signed.partition(".")
        if not payload or not mac or not hmac.compare_digest(mac, self.mac(purpose, payload)):
            return None
        try:
            value = json.loads(_unb64(payload))
        except ValueError:
            return None
        return value if isinstance(value, dict) else None


class TokenAuthority:
    """Checks presented tokens against the configured ones and mints sessions."""

    def __init__(self, viewer: tuple[str, ...], operator: tuple[str, ...], key: bytes) -> None:
        self.signer = Signer(key)
        self._tokens: list[tuple[bytes, Role, str]] = []
        for role, tokens in ((Role.VIEWER, viewer), (Role.OPERATOR, operator)):
            for token in tokens:
                self._tokens.append((token.encode(), role, self.fingerprint(token)))

    @staticmethod
    def fingerprint(token: str) -> str:
        """A short name for a token, stable across restarts, useless for recovering it."""
        return hashlib.sha256(b"executor-dashboard-token:" + token.encode()).hexdigest()[:12]

    def authenticate(self, presented: str) -> Principal | None:
        """The principal for `presented`, checked against every token in constant time each."""
        candidate = presented.strip().encode()
        found: tuple[Role, str] | None = None
        for token, role, fp in self._tokens:
            if hmac.compare_digest(candidate, token) and found is None:
                found = (role, fp)
        return None if found is None else Principal(found[0], found[1], "bearer")

    def still_valid(self, role: Role, fingerprint: str) -> bool:
        """A session is only as good as its token: revoking the token ends the session."""
        ok = False
        for _, r, fp in self._tokens:
            if hmac.compare_digest(fp, fingerprint) and r == role:
                ok = True
        return ok

    # -- sessions --------------------------------------------------------------------------

    def new_session(self, principal: Principal | None, max_age: int) -> Session:
        return Session(
            sid=secrets.token_urlsafe(18),
            role=principal.role if principal else None,
            fingerprint=principal.fingerprint if principal else None,
            expires=int(time.time()) + max_age,
        )

    def dump_session(self, session: Session) -> str:
        return self.signer.dumps(
            "session",
            {
                "sid": session.sid,
                "role": int(session.role) if session.role else None,
                "fp": session.fingerprint,
                "exp": session.expires,
            },
        )

    def load_session(self, raw: str | None) -> Session | None:
        if not raw:
            return None
        value = self.signer.loads("session", raw)
        if value is None:
            return None
        try:
            expires = int(value["exp"])
            sid = str(value["sid"])
            role = Role(int(value["role"])) if value.get("role") else None
            fp = str(value["fp"]) if value.get("fp") else None
        except (KeyError, ValueError, TypeError):
            return None
        if expires < time.time() or not sid:
            return None
        return Session(sid=sid, role=role, fingerprint=fp, expires=expires)

    def session_principal(self, session: Session | None) -> Principal | None:
        if session is None or session.role is None or session.fingerprint is None:
            return None
        if not self.still_valid(session.role, session.fingerprint):
            return None
        return Principal(session.role, session.fingerprint, "session")

    # -- CSRF ------------------------------------------------------------------------------

    def csrf_token(self, session: Session) -> str:
        return self.signer.mac("csrf", session.sid)

    def csrf_ok(self, session: Session | None, presented: str | None) -> bool:
        if session is None or not presented:
            return False
        return hmac.compare_digest(presented, self.csrf_token(session))


SECURITY_HEADERS: list[tuple[bytes, bytes]] = [
    (
        b"content-security-policy",
        b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        b"connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),
    (b"cross-origin-opener-policy", b"same-origin"),
]


class AuthMiddleware:
    """Resolves the caller once per request and keeps the session cookie up to date.

    Sets `scope["state"]`: `session` (always; a fresh anonymous one when missing),
    `principal` (or None) and `bad_bearer` (an Authorization header was sent but matched
    no token). An endpoint that logs someone in or out stores the replacement in
    `state["set_session"]`; this middleware writes the cookie.
    """

    def __init__(
        self,
        app: ASGIApp,
        authority: TokenAuthority,
        *,
        max_age: int,
        secure: bool,
    ) -> None:
        self.app = app
        self.authority = authority
        self.max_age = max_age
        self.secure = secure

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        conn = HTTPConnection(scope)
        state = scope.setdefault("state", {})
        session = self.authority.load_session(conn.cookies.get(SESSION_COOKIE))
        fresh = session is None
        if session is None:
            session = self.authority.new_session(None, self.max_age)
        principal: Principal | None = None
        bad_bearer = False
        scheme, _, credentials = conn.headers.get("authorization", "").partition(" ")
        # Only Bearer is ours: a proxy's Basic auth in front of the dashboard must not
        # shadow the session cookie.
        bearer = scheme.lower() == "bearer"
        if bearer:
            principal = self.authority.authenticate(credentials) if credentials.strip() else None
            bad_bearer = principal is None
        else:
            principal = self.authority.session_principal(session)
        state["session"] = session
        state["principal"] = principal
        state["bad_bearer"] = bad_bearer
        secure = self.secure or scope.get("scheme") == "https"
        is_static = scope.get("path", "").startswith("/static/")

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers.extend(SECURITY_HEADERS)
                replacement: Session | None = state.get("set_session")
                if replacement is not None:
                    headers.append(self._cookie(self.authority.dump_session(replacement), secure))
                elif fresh and not bearer and not is_static:
                    headers.append(self._cookie(self.authority.dump_session(session), secure))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_wrapper)

    def _cookie(self, value: str, secure: bool) -> tuple[bytes, bytes]:
        cookie: SimpleCookie = SimpleCookie()
        cookie[SESSION_COOKIE] = value
        morsel = cookie[SESSION_COOKIE]
        morsel["path"] = "/"
        morsel["httponly"] = True
        morsel["samesite"] = "Strict"
        morsel["max-age"] = str(self.max_age)
        if secure:
            morsel["secure"] = True
        return b"set-cookie", morsel.OutputString().encode("latin-1")


def current_session(conn: HTTPConnection) -> Session:
    session: Session = conn.state.session
    return session


def current_principal(conn: HTTPConnection) -> Principal | None:
    principal: Principal | None = conn.state.principal
    return principal


def require(conn: HTTPConnection, role: Role) -> Principal:
    """The caller if it holds `role`; raises NotAuthenticated (401) or Forbidden (403)."""
    principal = current_principal(conn)
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
    authority: TokenAuthority = conn.app.state.ctx.authority
    if not authority.csrf_ok(current_session(conn), presented):
        raise CsrfRejected("missing or wrong CSRF token; reload the page and try again")
