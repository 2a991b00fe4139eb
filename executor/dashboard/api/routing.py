"""What every API router shares: the route class, the documented error responses, and the
dependencies that carry auth and the pools (`Depends`), so each route reads as its contract.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Request, Security
from fastapi.routing import APIRoute
from fastapi.security import APIKeyCookie, HTTPBearer
from starlette.responses import Response

from executor.dashboard.api.schemas import NO_NUL, ErrorBody
from executor.dashboard.auth import Principal, Role, check_csrf, require
from executor.dashboard.context import DashboardContext
from executor.dashboard.sessions import SESSION_COOKIE
from executor.dashboard.views.common import json_error, loads


class _DepthSafeRequest(Request):
    """JSON nested past Python's recursion limit, or bytes that are not UTF-8, are malformed
    JSON like any other (422), not a crash of the decoder (500) or a vague 400."""

    async def json(self) -> Any:
        return loads(await self.body())


class DashboardRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            seen = Counter(name for name, _ in request.query_params.multi_items())
            twice = sorted(n for n, times in seen.items() if times > 1)
            if twice:
                # No parameter of the API is a list: which of two values was meant is a
                # guess FastAPI would make silently (the last), so the request is refused.
                return json_error(
                    422,
                    "invalid",
                    f"query parameter given more than once: {', '.join(twice)[:200]}",
                )
            return await handler(_DepthSafeRequest(request.scope, request.receive))

        return handle


def _error(description: str, **extra: Any) -> dict[str, Any]:
    return {"model": ErrorBody, "description": description, **extra}


RESPONSES: dict[int | str, dict[str, Any]] = {
    401: _error("No token, or one that matches no configured token."),
    403: _error("The token's role may not do this, or the CSRF token is wrong."),
    422: _error("Malformed request: the fields at fault are in `errors`."),
    429: _error(
        "Too many wrong tokens from this client.",
        headers={
            "Retry-After": {
                "description": "Seconds until the next try.",
                "schema": {"type": "integer"},
            }
        },
    ),
    503: _error("The ledger is unreachable."),
}
WRITE_RESPONSES: dict[int | str, dict[str, Any]] = {
    413: _error("The request body is larger than the dashboard accepts."),
}


def area_router(**kwargs: Any) -> APIRouter:
    """A router for one area of the API (`runs`, `retry`, …), one file each."""
    return APIRouter(route_class=DashboardRoute, responses=RESPONSES, **kwargs)


# --- dependencies -----------------------------------------------------------------------------

_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="bearer",
    description="A viewer or operator token from EXECUTOR_DASHBOARD_*_TOKENS.",
)
_cookie = APIKeyCookie(
    name=SESSION_COOKIE,
    auto_error=False,
    scheme_name="session",
    description="The browser session set by the login form; writes then need X-CSRF-Token.",
)


def context(request: Request) -> DashboardContext:
    ctx: DashboardContext = request.app.state.ctx
    return ctx


Bearer = Annotated[Any, Security(_bearer)]
Cookie = Annotated[Any, Security(_cookie)]


def _viewer(request: Request, _b: Bearer = None, _c: Cookie = None) -> Principal:
    return require(request, Role.VIEWER)


def _operator(
    request: Request,
    x_csrf_token: Annotated[
        str | None,
        Header(
            max_length=200,
            pattern=NO_NUL,
            description="The page's CSRF token; needed with a session, not with a bearer token.",
        ),
    ] = None,
    _b: Bearer = None,
    _c: Cookie = None,
) -> Principal:
    principal = require(request, Role.OPERATOR)
    check_csrf(request, principal, x_csrf_token)
    return principal


Context = Annotated[DashboardContext, Depends(context)]
Viewer = Annotated[Principal, Depends(_viewer)]
Operator = Annotated[Principal, Depends(_operator)]
