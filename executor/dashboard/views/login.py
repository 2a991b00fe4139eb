"""Logging in with a token, and out (here, or everywhere)."""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from executor.dashboard.auth import CSRF_FIELD, RateLimited, Role, require
from executor.dashboard.views.common import ctx, current_session, render, safe_next
from executor.dashboard.views.forms import field


def login_page(request: Request) -> Response:
    return render(
        request,
        "login.html",
        {"next": safe_next(request.query_params.get("next"), "/runs"), "error": None},
    )


async def login_action(request: Request) -> Response:
    c = ctx(request)
    client = request.state.client
    wait = c.limiter.blocked_for(client)
    if wait is not None:
        raise RateLimited(wait)
    form = await request.form()
    token = field(form, "token", 500)
    nxt = safe_next(field(form, "next"), "/runs")
    csrf = form.get(CSRF_FIELD)
    if not c.sessions.csrf_ok(current_session(request), csrf if isinstance(csrf, str) else None):
        return render(
            request,
            "login.html",
            {"next": nxt, "error": "Your login form expired. Please try again."},
            status_code=403,
        )
    principal = c.authority.authenticate(token) if token else None
    if principal is None:
        c.limiter.failed(client)
        return render(
            request,
            "login.html",
            {"next": nxt, "error": "That token is not a dashboard token."},
            status_code=401,
        )
    # A new session id on login: a CSRF token planted before login is useless after it.
    request.state.set_session = await run_in_threadpool(c.sessions.log_in, principal)
    return RedirectResponse(nxt, status_code=303)


async def logout_action(request: Request) -> Response:
    """End this session (its row goes, so a copied cookie dies with it); with
    `everywhere=1`, an operator ends every browser session."""
    c = ctx(request)
    form = await request.form()
    csrf = form.get(CSRF_FIELD)
    session = current_session(request)
    if not c.sessions.csrf_ok(session, csrf if isinstance(csrf, str) else None):
        return render(
            request,
            "error.html",
            {"title": "Not logged out", "message": "The form expired; reload and try again."},
            status_code=403,
        )
    if field(form, "everywhere") == "1":
        require(request, Role.OPERATOR)
        assert c.sessions.store is not None
        await run_in_threadpool(c.sessions.store.delete_all)
    request.state.set_session = await run_in_threadpool(c.sessions.log_out, session)
    return RedirectResponse("/login", status_code=303)
