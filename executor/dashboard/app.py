"""The retry dashboard: a Starlette app factory and the `executor dashboard` server.

    app = create_app(DashboardSettings.from_env(database_url=..., redis_url=...))

`create_app` opens what it is not handed when the app starts (a read-only pool for the
pages, an `executor.Client` for the actions and Redis) and closes what it opened when the app
stops. `serve()` runs it under uvicorn, bound to 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from psycopg_pool import ConnectionPool
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from executor.dashboard import queries
from executor.dashboard.actions import Actions
from executor.dashboard.auth import (
    AuthError,
    AuthMiddleware,
    NotAuthenticated,
    Role,
    TokenAuthority,
    require,
)
from executor.dashboard.context import Backend, DashboardContext
from executor.dashboard.metrics import CONTENT_TYPE, DashboardMetrics
from executor.dashboard.settings import DashboardSettings, is_loopback
from executor.dashboard.views import api, pages
from executor.dashboard.views.common import (
    BadParameter,
    ctx,
    is_live,
    json_error,
    render,
)
from executor.dashboard.views.templating import configure_environment
from executor.errors import ConfigurationError

log = logging.getLogger("executor.dashboard")

HERE = Path(__file__).resolve().parent


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


def _is_api(request: Request) -> bool:
    path = request.url.path
    return path.startswith("/api/") or path == "/metrics" or is_live(request)


async def _auth_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, AuthError)
    bearer = request.headers.get("authorization", "").lower().startswith("bearer")
    if _is_api(request) or bearer:
        headers = {"www-authenticate": 'Bearer realm="executor"'} if exc.status_code == 401 else {}
        error = "unauthorized" if exc.status_code == 401 else "forbidden"
        response: Response = json_error(exc.status_code, error, str(exc))
        response.headers.update(headers)
        return response
    if isinstance(exc, NotAuthenticated):
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"/login?next={_quote(target)}", status_code=303)
    return render(
        request,
        "error.html",
        {"title": "Not allowed", "message": str(exc)},
        status_code=exc.status_code,
    )


def _quote(text: str) -> str:
    from urllib.parse import quote

    return quote(text, safe="/")


async def _bad_parameter(request: Request, exc: Exception) -> Response:
    if _is_api(request):
        return json_error(422, "invalid", str(exc))
    return render(
        request, "error.html", {"title": "Bad request", "message": str(exc)}, status_code=400
    )


async def _database_error(request: Request, exc: Exception) -> Response:
    log.warning("dashboard request failed on the database: %s", exc)
    message = f"The ledger database is unavailable: {type(exc).__name__}"
    if _is_api(request):
        return json_error(503, "database_unavailable", f"{type(exc).__name__}: {exc}")
    return render(
        request,
        "error.html",
        {"title": "Database unavailable", "message": message},
        status_code=503,
    )


# --- endpoints that are not pages or API -----------------------------------------------------


def metrics_endpoint(request: Request) -> Response:
    c = ctx(request)
    if not c.settings.metrics_public:
        require(request, Role.VIEWER)
    counts: queries.LedgerCounts | None = None
    error = None
    try:
        value = c.metrics.ledger_cache.get(lambda: queries.ledger_counts(c.pool))
        assert isinstance(value, queries.LedgerCounts)
        counts = value
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
    body = c.metrics.render(counts, c.transport(), c.pool_stats(), error)
    return PlainTextResponse(body, media_type=CONTENT_TYPE)


def healthz(request: Request) -> Response:
    """Unauthenticated liveness for load balancers: 200 if the ledger answers."""
    try:
        queries.ping(ctx(request).pool)
    except Exception as exc:
        return PlainTextResponse(f"database unavailable: {type(exc).__name__}\n", status_code=503)
    return PlainTextResponse("ok\n")


class TimingMiddleware:
    """Request latency by route template (bounded label set) into the metrics histogram."""

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
            if template.startswith("/static"):
                template = "/static"
            self.metrics.requests.observe(
                time.perf_counter() - start,
                route=template,
                method=scope.get("method", "GET"),
                status=f"{status[0] // 100}xx",
            )


# --- the app -------------------------------------------------------------------------------


def routes() -> list[Route | Mount]:
    return [
        Route("/", pages.home),
        Route("/login", pages.login_page, methods=["GET"]),
        Route("/login", pages.login_action, methods=["POST"]),
        Route("/logout", pages.logout_action, methods=["POST"]),
        Route("/runs", pages.runs_page),
        Route("/runs/{run_id}", pages.run_page),
        Route("/runs/{run_id}/steps/{step_key}/retry", pages.retry_action, methods=["POST"]),
        Route("/runs/{run_id}/{action}", pages.run_action, methods=["POST"]),
        Route("/failed", pages.failed_page),
        Route("/failed/retry", pages.bulk_confirm_page, methods=["GET"]),
        Route("/failed/retry", pages.bulk_retry_action, methods=["POST"]),
        Route("/drops", pages.drops_page),
        Route("/queues", pages.queues_page),
        Route("/metrics", metrics_endpoint),
        Route("/healthz", healthz),
        Route("/api/openapi.json", api.openapi),
        Route("/api/me", api.me),
        Route("/api/runs", api.runs),
        Route("/api/runs/{run_id}", api.run),
        Route("/api/runs/{run_id}/steps/{step_key}/retry", api.retry, methods=["POST"]),
        Route("/api/runs/{run_id}/{action}", api.run_action, methods=["POST"]),
        Route("/api/retry", api.bulk_retry, methods=["POST"]),
        Route("/api/failed-steps", api.failed_steps),
        Route("/api/drops", api.drops),
        Route("/api/queues", api.queues),
        Mount("/static", app=StaticFiles(directory=HERE / "static"), name="static"),
    ]


def create_app(
    settings: DashboardSettings,
    *,
    backend: Backend | None = None,
    pool: ConnectionPool[Any] | None = None,
    backend_factory: Callable[[DashboardSettings], Backend] | None = None,
) -> Starlette:
    """The dashboard app. `backend` (an `executor.Client`) commits actions and reaches Redis;
    `pool` serves the pages. Either is opened at startup from `settings` when not given."""
    if not settings.has_tokens:
        raise ConfigurationError(
            "no dashboard tokens: set EXECUTOR_DASHBOARD_VIEWER_TOKENS and/or "
            "EXECUTOR_DASHBOARD_OPERATOR_TOKENS"
        )
    authority = TokenAuthority(
        settings.viewer_tokens, settings.operator_tokens, settings.secret_key
    )
    metrics = DashboardMetrics(settings.metrics_cache_seconds)
    templates = Jinja2Templates(directory=HERE / "templates")
    configure_environment(templates.env)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        opened: list[Callable[[], None]] = []
        try:
            the_backend = backend or (backend_factory or _open_client)(settings)
            if backend is None:
                close = getattr(the_backend, "close", None)
                if callable(close):
                    opened.append(close)
            the_pool = pool
            if the_pool is None:
                url = settings.database_url or getattr(the_backend, "database_url", None)
                if not url:
                    raise ConfigurationError("the dashboard needs a database URL")
                the_pool = open_read_pool(settings, url)
                opened.append(the_pool.close)
            extra: dict[str, ConnectionPool[Any]] = {}
            client_pool = getattr(the_backend, "pool", None)
            if isinstance(client_pool, ConnectionPool) and client_pool is not the_pool:
                extra["client"] = client_pool
            app.state.ctx = DashboardContext(
                settings=settings,
                authority=authority,
                metrics=metrics,
                templates=templates,
                pool=the_pool,
                backend=the_backend,
                actions=Actions(the_backend.apply, the_pool, metrics),
                extra_pools=extra,
            )
            yield
        finally:
            for close_one in reversed(opened):
                try:
                    close_one()
                except Exception:  # pragma: no cover - best effort at shutdown
                    log.exception("closing a dashboard resource failed")

    import psycopg

    return Starlette(
        routes=routes(),
        middleware=[
            Middleware(TimingMiddleware, metrics=metrics),
            Middleware(
                AuthMiddleware,
                authority=authority,
                max_age=settings.session_max_age,
                secure=settings.secure_cookies,
            ),
        ],
        exception_handlers={
            AuthError: _auth_error,
            BadParameter: _bad_parameter,
            psycopg.Error: _database_error,
        },
        lifespan=lifespan,
        max_body_size=1_000_000,
    )


def prepare_settings(
    host: str, settings: DashboardSettings, *, out: Any = None
) -> DashboardSettings:
    """Refuse to expose a tokenless dashboard; on loopback, mint a one-time operator token.

    With no tokens configured and a loopback bind, a random operator token is generated for
    this process and printed once (like Jupyter's); it is never stored. Any other bind
    address without tokens is refused: a dashboard that can cancel runs is not left open.
    """
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
    uvicorn.run(app, host=host, port=port, log_level=log_level, proxy_headers=False)
