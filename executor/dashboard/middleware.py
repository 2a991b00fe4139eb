"""What wraps every request: response headers, the caller's identity, request timing.

`ResponseGuard` sits outside everything else (outside Starlette's own error handling, see
`app.DashboardApp`), so the security headers and `Cache-Control: no-store` are on every
response the dashboard sends: pages, JSON, `/metrics`, and also the 400 of a wrong `Host`,
the 413 of an oversized body and the 500 of a crash. Only `/static/` may be cached.
"""

from __future__ import annotations

import time
from http.cookies import SimpleCookie

import psycopg
from starlette.concurrency import run_in_threadpool
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from executor.dashboard.auth import Principal, TokenAuthority
from executor.dashboard.metrics import DashboardMetrics
from executor.dashboard.ratelimit import FailureLimiter
from executor.dashboard.sessions import SESSION_COOKIE, Session, SessionManager

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

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class ResponseGuard:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        cacheable = scope.get("path", "").startswith("/static/")

        async def guarded(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [h for h in message.get("headers", []) if h[0].lower() != b"server"]
                headers.extend(SECURITY_HEADERS)
                if not cacheable and not any(h[0].lower() == b"cache-control" for h in headers):
                    headers.append((b"cache-control", b"no-store"))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, guarded)


class AuthMiddleware:
    """Resolves the caller once per request and keeps the session cookie up to date.

    Sets `scope["state"]`: `session` (always; a fresh anonymous one when missing or ended),
    `principal` (or None), `bad_bearer` (an Authorization header matched no token),
    `retry_after` (this client sent too many wrong tokens; its token was not even checked)
    and `auth_error` (the session could not be read: the database is down). An endpoint
    that logs someone in or out stores the replacement in `state["set_session"]`.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        authority: TokenAuthority,
        sessions: SessionManager,
        limiter: FailureLimiter,
        secure: bool,
    ) -> None:
        self.app = app
        self.authority = authority
        self.sessions = sessions
        self.limiter = limiter
        self.secure = secure

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        conn = HTTPConnection(scope)
        state = scope.setdefault("state", {})
        client = str((scope.get("client") or ("unknown",))[0])
        # A hook URL's token is its only credential: a sender's cookies or Authorization
        # header (meant for someone else) are neither read nor counted as failures.
        bare = scope.get("path", "").startswith(("/static/", "/hooks/"))
        session = None if bare else self.sessions.load(conn.cookies.get(SESSION_COOKIE))
        fresh = session is None
        principal: Principal | None = None
        state.update(client=client, bad_bearer=False, retry_after=None, auth_error=None)
        scheme, _, credentials = conn.headers.get("authorization", "").partition(" ")
        # Only Bearer is ours: a proxy's Basic auth in front of the dashboard must not
        # shadow the session cookie.
        bearer = scheme.lower() == "bearer" and not bare
        if bearer:
            state["retry_after"] = self.limiter.blocked_for(client)
            if state["retry_after"] is None:
                principal = self.authority.authenticate(credentials)
                if principal is None:
                    state["bad_bearer"] = True
                    self.limiter.failed(client)
        elif session is not None and session.logged_in and not bare:
            try:
                principal = await run_in_threadpool(self.sessions.principal, session)
            except psycopg.Error as exc:
                state["auth_error"] = exc
            else:
                if principal is None:  # logged out, expired, or its token was removed
                    session, fresh = None, True
        if session is None:
            session = self.sessions.anonymous()
        state["session"] = session
        state["principal"] = principal
        secure = self.secure or scope.get("scheme") == "https"

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                replacement: Session | None = state.get("set_session")
                cookie = None
                if replacement is not None:
                    cookie = replacement
                elif fresh and not bearer and not bare:
                    cookie = session
                if cookie is not None:
                    headers = list(message.get("headers", []))
                    headers.append(self._cookie(self.sessions.dump(cookie), secure))
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
        morsel["max-age"] = str(self.sessions.max_age)
        if secure:
            morsel["secure"] = True
        return b"set-cookie", morsel.OutputString().encode("latin-1")


class RequestMetrics:
    """Request latency by route template and method: both from fixed sets, whatever a client
    sends (an unknown method is `other`, an unknown path `unmatched`)."""

    def __init__(self, app: ASGIApp, metrics: DashboardMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = [500]

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = str(scope.get("method", "GET")).upper()
            self.metrics.observe_request(
                template if isinstance(template, str) else "unmatched",
                method if method in METHODS else "other",
                f"{status[0] // 100}xx",
                time.perf_counter() - start,
            )
