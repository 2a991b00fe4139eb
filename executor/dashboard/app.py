"""The retry dashboard: the app factory and the `executor dashboard` server.

    app = create_app(DashboardSettings.from_env(database_url=..., redis_url=...))

One FastAPI app (it is Starlette): the JSON API from `api/` (its OpenAPI description at
`/api/openapi.json` comes from the same models that validate it), and the Jinja2 pages as
plain Starlette routes. `create_app` opens what it is not handed when the app starts (a
read-only pool for the pages, an `executor.Client` for the actions and Redis) and closes
what it opened when the app stops. `serve()` runs it under uvicorn, bound to 127.0.0.1
unless told otherwise.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import psycopg
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from psycopg_pool import ConnectionPool
from starlette.exceptions import HTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp

from executor.dashboard import api, views
from executor.dashboard.actions import Actions
from executor.dashboard.api.monitor import scrape
from executor.dashboard.auth import AuthError, NotAuthenticated, RateLimited, TokenAuthority
from executor.dashboard.context import Backend, DashboardContext
from executor.dashboard.metrics import DashboardMetrics
from executor.dashboard.middleware import AuthMiddleware, RequestMetrics, ResponseGuard
from executor.dashboard.ratelimit import FailureLimiter, RequestLimiter
from executor.dashboard.sessions import SessionManager, SessionStore
from executor.dashboard.settings import DashboardSettings, is_loopback
from executor.dashboard.views.common import BadParameter, is_live, json_error, render
from executor.dashboard.views.templating import configure_environment
from executor.errors import ConfigurationError

log = logging.getLogger("executor.dashboard")

HERE = Path(__file__).resolve().parent
MAX_BODY_BYTES = 1_000_000


def open_read_pool(settings: DashboardSettings, database_url: str) -> ConnectionPool[Any]:
    """The pages' own pool: read-only sessions with a statement timeout."""
    from psycopg.rows import dict_row

    pool: ConnectionPool[Any] = ConnectionPool(
        database_url,
        name="dashboard",
        min_size=1,
        max_size=settings.read_pool_size,
        timeout=10.0,
        kwargs={
            "row_factory": dict_row,
            "autocommit": True,
            "options": (
                "-c default_transaction_read_only=on "
                f"-c statement_timeout={int(settings.statement_timeout_ms)} "
                "-c application_name=executor-dashboard"
            ),
        },
        check=ConnectionPool.check_connection,
        open=False,
    )
    pool.open(wait=True, timeout=30.0)
    return pool


def _open_client(settings: DashboardSettings) -> Backend:
    from executor.client import Client

    return Client(database_url=settings.database_url, redis_url=settings.redis_url)


# --- errors ----------------------------------------------------------------------------------


def _is_api(request: Request) -> bool:
    path = request.url.path
    return (
        path.startswith(("/api/", "/hooks/"))
        or path in ("/metrics", "/healthz")
        or is_live(request)
    )


def _page_error(request: Request, title: str, message: str, status: int) -> Response:
    if not hasattr(request.app.state, "ctx"):
        return json_error(status, "error", message)
    return render(request, "error.html", {"title": title, "message": message}, status_code=status)


async def _auth_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, AuthError)
    bearer = request.headers.get("authorization", "").lower().startswith("bearer")
    headers: dict[str, str] = {}
    if isinstance(exc, RateLimited):
        headers["retry-after"] = str(exc.retry_after)
    elif exc.status_code == 401:
        headers["www-authenticate"] = 'Bearer realm="executor"'
    if _is_api(request) or bearer:
        error = {401: "unauthorized", 403: "forbidden", 429: "rate_limited"}[exc.status_code]
        response: Response = json_error(exc.status_code, error, str(exc))
    elif isinstance(exc, NotAuthenticated):
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"/login?next={_quote(target)}", status_code=303)
    else:
        response = _page_error(request, "Not allowed", str(exc), exc.status_code)
    response.headers.update(headers)
    return response


def _quote(text: str) -> str:
    from urllib.parse import quote

    return quote(text, safe="/")


async def _bad_parameter(request: Request, exc: Exception) -> Response:
    if _is_api(request):
        return json_error(422, "invalid", str(exc))
    return _page_error(request, "Bad request", str(exc), 400)


async def _invalid_request(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = [
        {
            "loc": [p if isinstance(p, int) else str(p) for p in e.get("loc", ())],
            "msg": str(e.get("msg", "")),
            "type": str(e.get("type", "")),
        }
        for e in exc.errors()[:20]
    ]
    detail = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in errors[:3])
    return json_error(422, "invalid", detail or "invalid request", errors=errors)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    names = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}
    if _is_api(request) or exc.status_code != 404:
        response: Response = json_error(
            exc.status_code, names.get(exc.status_code, "error"), str(exc.detail)
        )
    else:
        response = _page_error(request, "Not found", "There is no such page.", 404)
    response.headers.update(exc.headers or {})
    return response


async def _database_error(request: Request, exc: Exception) -> Response:
    if isinstance(exc, psycopg.DataError):
        # A value the database refused (out of range, a character it cannot store): the
        # request is at fault, not the ledger.
        return await _bad_parameter(request, BadParameter(f"{type(exc).__name__}: {exc}"))
    log.warning("dashboard request failed on the database: %s", exc)
    if _is_api(request):
        return json_error(
            503, "database_unavailable", f"the ledger is unreachable: {type(exc).__name__}"
        )
    return _page_error(
        request,
        "Database unavailable",
        f"The ledger database is unavailable: {type(exc).__name__}",
        503,
    )


# --- the app ---------------------------------------------------------------------------------


class DashboardApp(FastAPI):
    def build_middleware_stack(self) -> ASGIApp:
        # Outside Starlette's ServerErrorMiddleware, so a 500 gets the headers too.
        return ResponseGuard(super().build_middleware_stack())


def create_app(
    settings: DashboardSettings,
    *,
    backend: Backend | None = None,
    pool: ConnectionPool[Any] | None = None,
    backend_factory: Callable[[DashboardSettings], Backend] | None = None,
) -> FastAPI:
    """The dashboard app. `backend` (an `executor.Client`) commits actions and reaches Redis;
    `pool` serves the pages. Either is opened at startup from `settings` when not given."""
    if not settings.has_tokens:
        raise ConfigurationError(
            "no dashboard tokens: set EXECUTOR_DASHBOARD_VIEWER_TOKENS and/or "
            "EXECUTOR_DASHBOARD_OPERATOR_TOKENS"
        )
    authority = TokenAuthority(settings.viewer_tokens, settings.operator_tokens)
    sessions = SessionManager(settings.secret_key, authority, settings.session_max_age)
    limiter = FailureLimiter(settings.auth_failures_per_minute)
    metrics = DashboardMetrics(settings.metrics_cache_seconds)
    templates = Jinja2Templates(directory=HERE / "templates")
    configure_environment(templates.env)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        opened: list[Callable[[], None]] = []
        try:
            the_backend = backend or (backend_factory or _open_client)(settings)
            if backend is None:
                close = getattr(the_backend, "close", None)
                if callable(close):
                    opened.append(close)
            url = settings.database_url or getattr(the_backend, "database_url", None)
            the_pool = pool
            if the_pool is None:
                if not url:
                    raise ConfigurationError("the dashboard needs a database URL")
                the_pool = open_read_pool(settings, url)
                opened.append(the_pool.close)
            extra: dict[str, ConnectionPool[Any]] = {}
            write_pool = getattr(the_backend, "pool", None)
            if isinstance(write_pool, ConnectionPool) and write_pool is not the_pool:
                extra["client"] = write_pool
            else:
                from executor.storage.db import open_pool

                if not url:
                    raise ConfigurationError("the dashboard needs a database URL")
                write_pool = open_pool(url, name="dashboard-sessions", max_size=2)
                opened.append(write_pool.close)
                extra["sessions"] = write_pool
            sessions.store = SessionStore(the_pool, write_pool)
            ctx = DashboardContext(
                settings=settings,
                authority=authority,
                sessions=sessions,
                limiter=limiter,
                metrics=metrics,
                templates=templates,
                pool=the_pool,
                backend=the_backend,
                actions=Actions(the_backend.apply, the_pool, metrics),
                extra_pools=extra,
                write_pool=write_pool,
                hook_limiter=RequestLimiter(settings.hook_requests_per_minute, "hooks"),
            )
            app.state.ctx = ctx
            metrics.bind(lambda: scrape(ctx))
            yield
        finally:
            for close_one in reversed(opened):
                try:
                    close_one()
                except Exception:  # pragma: no cover - best effort at shutdown
                    log.exception("closing a dashboard resource failed")

    app = DashboardApp(
        title="executor dashboard",
        summary="Runs, steps, drops and queues of the step executor; retry, cancel, pause.",
        version="1",
        openapi_url="/api/openapi.json",
        docs_url=None,  # the docs pages load scripts from a CDN, which the CSP forbids
        redoc_url=None,
        lifespan=lifespan,
        max_body_size=MAX_BODY_BYTES,
        exception_handlers={
            AuthError: _auth_error,
            BadParameter: _bad_parameter,
            RequestValidationError: _invalid_request,
            HTTPException: _http_error,
            psycopg.Error: _database_error,
        },
    )
    for router in api.ROUTERS:
        app.include_router(router)
    app.router.routes.extend(views.routes())
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    # Added innermost first: the host check runs first, then timing, then auth.
    app.add_middleware(
        AuthMiddleware,
        authority=authority,
        sessions=sessions,
        limiter=limiter,
        secure=settings.secure_cookies,
    )
    app.add_middleware(RequestMetrics, metrics=metrics)
    if "*" not in settings.allowed_hosts:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(settings.hosts))
    return app


def prepare_settings(
    host: str, settings: DashboardSettings, *, out: Any = None
) -> DashboardSettings:
    """Refuse to expose a tokenless dashboard; on loopback, mint a one-time operator token.

    With no tokens configured and a loopback bind, a random operator token is generated for
    this process and printed once (like Jupyter's); it is never stored. Any other bind
    address without tokens is refused: a dashboard that can cancel runs is not left open.
    """
    if not is_loopback(host) and not settings.allowed_hosts:
        print(
            f"executor dashboard: bound to {host}, but only loopback Host names are answered; "
            "set EXECUTOR_DASHBOARD_ALLOWED_HOSTS to the names clients use",
            file=out or sys.stderr,
            flush=True,
        )
    if settings.has_tokens:
        return settings
    if not is_loopback(host):
        raise ConfigurationError(
            f"refusing to serve the dashboard on {host} without tokens: set "
            "EXECUTOR_DASHBOARD_OPERATOR_TOKENS (and EXECUTOR_DASHBOARD_VIEWER_TOKENS)"
        )
    settings, token = settings.with_generated_operator_token()
    print(
        "executor dashboard: no tokens configured (EXECUTOR_DASHBOARD_OPERATOR_TOKENS / "
        "EXECUTOR_DASHBOARD_VIEWER_TOKENS);\n"
        f"  one-time operator token for this process: {token}\n"
        "  it is shown only now and stops working when the dashboard stops.",
        file=out or sys.stderr,
        flush=True,
    )
    return settings


def serve(
    host: str = "127.0.0.1",
    port: int = 8080,
    database_url: str | None = None,
    redis_url: str | None = None,
    *,
    public_metrics: bool = False,
    log_level: str = "info",
    settings: DashboardSettings | None = None,
) -> None:
    """Run the dashboard until interrupted (`executor dashboard`).

    Tokens and the cookie key come from the environment (see `DashboardSettings.from_env`);
    `public_metrics` serves /metrics without a token (for a scraper on a private network).
    """
    import uvicorn

    settings = settings or DashboardSettings.from_env(
        database_url=database_url, redis_url=redis_url, metrics_public=public_metrics
    )
    settings = prepare_settings(host, settings)
    app = create_app(settings)
    print(f"executor dashboard on http://{host}:{port}/", file=sys.stderr, flush=True)
    uvicorn.run(
        app, host=host, port=port, log_level=log_level, proxy_headers=False, server_header=False
    )
