"""Server-rendered pages and the form actions behind their buttons.

Every page has a `live` part that `app.js` re-fetches every few seconds with the header
`X-Live-Fragment: 1`; the same view then renders only that partial template.
Every form POST checks the CSRF token, asks for confirmation (a dialog in the browser, or a
confirmation page without JavaScript), applies one command and redirects back with the
outcome as a one-shot flash message.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from executor.commands.models import COMMAND_TYPES, IDENTIFIER_PATTERN
from executor.commands.state import DROP_REASONS, RUN_STATUSES
from executor.dashboard import ledger_stats, queries
from executor.dashboard.actions import ActionResult, InvalidAction, new_key
from executor.dashboard.auth import (
    CSRF_FIELD,
    Principal,
    RateLimited,
    Role,
    check_csrf,
    require,
)
from executor.dashboard.views.common import (
    BadParameter,
    ctx,
    current_session,
    int_param,
    is_live,
    page_request,
    query_string,
    render,
    safe_next,
    set_flash,
    text_param,
    time_param,
)
from executor.dashboard.views.graph import layout

RUN_STATUS_GROUPS = {"active": ("pending", "running", "paused")}
_RUN_ID = re.compile(IDENTIFIER_PATTERN)


# --- filters from query strings -------------------------------------------------------------


def run_filter(params: Any) -> queries.RunFilter:
    status = text_param(params, "status", 40)
    statuses: tuple[str, ...] = ()
    if status:
        statuses = RUN_STATUS_GROUPS.get(status, (status,))
        if any(s not in RUN_STATUSES for s in statuses):
            raise BadParameter(f"unknown run status {status!r}")
    return queries.RunFilter(
        statuses=statuses,
        workflow=text_param(params, "workflow", 200),
        concurrency_key=text_param(params, "concurrency_key", 500),
        created_from=time_param(params, "from"),
        created_to=time_param(params, "to"),
        run_id_prefix=text_param(params, "q", 200),
    )


def failed_filter(params: Any) -> queries.FailedFilter:
    return queries.FailedFilter(
        workflow=text_param(params, "workflow", 200),
        step_key=text_param(params, "step_key", 200),
        run_id=text_param(params, "run_id", 200),
        failed_from=time_param(params, "from"),
        failed_to=time_param(params, "to"),
        error_contains=text_param(params, "error", 200),
    )


def drop_filter(params: Any) -> queries.DropFilter:
    reason = text_param(params, "reason", 40)
    if reason and reason not in DROP_REASONS:
        raise BadParameter(f"unknown drop reason {reason!r}")
    return queries.DropFilter(
        reason=reason,
        command_type=text_param(params, "command_type", 40),
        run_id=text_param(params, "run_id", 200),
        received_from=time_param(params, "from"),
    )


FILTER_KEYS = {
    "runs": ("status", "workflow", "concurrency_key", "from", "to", "q", "limit"),
    "failed": ("workflow", "step_key", "run_id", "from", "to", "error", "limit"),
    "drops": ("reason", "command_type", "run_id", "from", "limit"),
}


def _filters(request: Request, page: str) -> dict[str, str]:
    return {k: request.query_params[k] for k in FILTER_KEYS[page] if request.query_params.get(k)}


# --- pages ---------------------------------------------------------------------------------


def home(request: Request) -> Response:
    return RedirectResponse("/runs", status_code=303)


def runs_page(request: Request) -> Response:
    require(request, Role.VIEWER)
    c = ctx(request)
    params = request.query_params
    f = run_filter(params)
    search = f.run_id_prefix
    if search and not is_live(request) and queries.run_exists(c.pool, search):
        return RedirectResponse(f"/runs/{search}", status_code=303)
    page = queries.list_runs(c.pool, f, page_request(params, (datetime, str), c.settings.page_size))
    filters = _filters(request, "runs")
    context = {
        "page": page,
        "filters": filters,
        "qs": lambda **kw: query_string(filters, **kw),
        "live_url": "/runs" + query_string(dict(params)),
    }
    if is_live(request):
        return render(request, "_runs_live.html", context)
    context |= {
        "statuses": RUN_STATUSES,
        "workflows": queries.workflows(c.pool),
        "failed_count": queries.count_failed_steps(c.pool),
    }
    return render(request, "runs.html", context)


def run_page(request: Request) -> Response:
    principal = require(request, Role.VIEWER)
    c = ctx(request)
    run_id = request.path_params["run_id"]
    events_after = int_param(request.query_params, "events_after", 0, 0, 2**62)
    detail = None
    if _RUN_ID.fullmatch(run_id):  # no run can have another id, so none is looked up
        detail = queries.get_run(
            c.pool, run_id, events_after=events_after, events_limit=c.settings.events_page_size
        )
    if detail is None:
        return render(
            request,
            "error.html",
            {"title": "Run not found", "message": f"There is no run {run_id}."},
            status_code=404,
        )
    context = {
        "d": detail,
        "run": detail.run,
        "graph": layout(detail.steps),
        "events_after": events_after,
        "keys": _form_keys(principal, detail),
        "live_url": request.url.path + (f"?{request.url.query}" if request.url.query else ""),
        "failed_count": queries.count_failed_steps(c.pool),
    }
    return render(request, "_run_live.html" if is_live(request) else "run.html", context)


def _form_keys(principal: Principal, detail: queries.RunDetail) -> dict[str, str]:
    """One fresh idempotency key per action form, made when the form is rendered."""
    if not principal.can(Role.OPERATOR):
        return {}
    keys = {name: new_key(name) for name in ("cancel", "pause", "resume")}
    for step in detail.steps:
        if step.status == "failed":
            keys[f"retry:{step.step_key}"] = new_key("retry")
    return keys


def failed_page(request: Request) -> Response:
    principal = require(request, Role.VIEWER)
    c = ctx(request)
    params = request.query_params
    f = failed_filter(params)
    page = queries.list_failed_steps(
        c.pool, f, page_request(params, (datetime, str, str), c.settings.page_size)
    )
    filters = _filters(request, "failed")
    keys = (
        {f"{s.run_id}:{s.step_key}": new_key("retry") for s in page.items}
        if principal.can(Role.OPERATOR)
        else {}
    )
    context = {
        "page": page,
        "filters": filters,
        "keys": keys,
        "qs": lambda **kw: query_string(filters, **kw),
        "live_url": "/failed" + query_string(dict(params)),
        "failed_count": queries.count_failed_steps(c.pool),
    }
    if is_live(request):
        return render(request, "_failed_live.html", context)
    context["workflows"] = queries.workflows(c.pool)
    return render(request, "failed.html", context)


def drops_page(request: Request) -> Response:
    require(request, Role.VIEWER)
    c = ctx(request)
    params = request.query_params
    page = queries.list_drops(
        c.pool, drop_filter(params), page_request(params, (int,), c.settings.page_size)
    )
    filters = _filters(request, "drops")
    context = {
        "page": page,
        "filters": filters,
        "qs": lambda **kw: query_string(filters, **kw),
        "live_url": "/drops" + query_string(dict(params)),
        "failed_count": queries.count_failed_steps(c.pool),
    }
    if is_live(request):
        return render(request, "_drops_live.html", context)
    context |= {"reasons": DROP_REASONS, "command_types": COMMAND_TYPES}
    return render(request, "drops.html", context)


def queues_page(request: Request) -> Response:
    require(request, Role.VIEWER)
    c = ctx(request)
    context = {
        "transport": c.transport(),
        "ledger": ledger_stats.ledger_health(c.pool),
        "pools": c.pool_stats(),
        "live_url": "/queues",
        "failed_count": queries.count_failed_steps(c.pool),
    }
    return render(request, "_queues_live.html" if is_live(request) else "queues.html", context)


# --- actions -------------------------------------------------------------------------------


async def _operator_form(request: Request) -> tuple[Principal, FormData]:
    principal = require(request, Role.OPERATOR)
    form = await request.form()
    token = form.get(CSRF_FIELD)
    check_csrf(request, principal, token if isinstance(token, str) else None)
    return principal, form


def _field(form: FormData, name: str, limit: int = 2000) -> str:
    value = form.get(name)
    return value.strip()[:limit] if isinstance(value, str) else ""


def _confirm(request: Request, form: FormData, title: str, message: str, danger: bool) -> Response:
    """The no-JavaScript confirmation step: the same form again, with `confirmed=1`."""
    fields = {k: v for k, v in form.items() if isinstance(v, str) and k not in ("confirmed",)}
    return render(
        request,
        "confirm.html",
        {
            "title": title,
            "message": message,
            "action": request.url.path,
            "fields": fields,
            "danger": danger,
            "back": safe_next(_field(form, "next"), "/runs"),
        },
    )


def _after(request: Request, form: FormData, result: ActionResult, default: str) -> Response:
    target = safe_next(_field(form, "next"), default)
    response = RedirectResponse(target, status_code=303)
    set_flash(
        request,
        response,
        result.level,
        result.message,
        detail=(result.detail or "")[:500],
        key=result.idempotency_key,
    )
    return response


def _form_key(form: FormData, action: str) -> str:
    return _field(form, "idempotency_key", 300) or new_key(action)


async def retry_action(request: Request) -> Response:
    principal, form = await _operator_form(request)
    run_id = request.path_params["run_id"]
    step_key = request.path_params["step_key"]
    if _field(form, "confirmed") != "1":
        return _confirm(
            request,
            form,
            "Retry step",
            f"Retry step {step_key} of run {run_id} as a new attempt?",
            danger=False,
        )
    seen = _field(form, "attempt")
    c = ctx(request)
    try:
        result = await run_in_threadpool(
            c.actions.retry,
            principal,
            run_id,
            step_key,
            _form_key(form, "retry"),
            seen_attempt=int(seen) if seen.isdigit() else None,
        )
    except InvalidAction as exc:
        return _invalid(request, form, str(exc), f"/runs/{run_id}")
    return _after(request, form, result, f"/runs/{run_id}")


async def run_action(request: Request) -> Response:
    principal, form = await _operator_form(request)
    run_id = request.path_params["run_id"]
    action = request.path_params["action"]
    if action not in ("cancel", "pause", "resume"):
        return render(
            request, "error.html", {"title": "Not found", "message": action}, status_code=404
        )
    if _field(form, "confirmed") != "1":
        verbs = {
            "cancel": "Cancel run {} and all its unfinished steps? This cannot be undone.",
            "pause": "Pause run {}? Running attempts finish; nothing new is dispatched.",
            "resume": "Resume run {}?",
        }
        return _confirm(
            request,
            form,
            f"{action.capitalize()} run",
            verbs[action].format(run_id),
            danger=action == "cancel",
        )
    c = ctx(request)
    key = _form_key(form, action)
    reason = _field(form, "reason", 1500)
    try:
        if action == "cancel":
            result = await run_in_threadpool(c.actions.cancel, principal, run_id, key, reason)
        elif action == "pause":
            result = await run_in_threadpool(c.actions.pause, principal, run_id, key, reason)
        else:
            result = await run_in_threadpool(c.actions.resume, principal, run_id, key)
    except InvalidAction as exc:
        return _invalid(request, form, str(exc), f"/runs/{run_id}")
    return _after(request, form, result, f"/runs/{run_id}")


def _invalid(request: Request, form: FormData, message: str, default: str) -> Response:
    response = RedirectResponse(safe_next(_field(form, "next"), default), status_code=303)
    set_flash(request, response, "error", f"not applied: {message}")
    return response


def bulk_confirm_page(request: Request) -> Response:
    """GET /failed/retry: what a bulk retry of this filter would touch, and the button."""
    require(request, Role.OPERATOR)
    c = ctx(request)
    params = dict(request.query_params)
    now = datetime.now(UTC)
    if not params.get("to"):
        # Freeze the set at what the operator is looking at: later failures are not included.
        params["to"] = now.isoformat(timespec="microseconds")
    f = failed_filter(params)
    steps = queries.retryable_failed_steps(c.pool, f, c.settings.bulk_retry_limit)
    filters = {k: params[k] for k in FILTER_KEYS["failed"] if params.get(k) and k != "limit"}
    return render(
        request,
        "bulk_confirm.html",
        {
            "steps": steps,
            "filters": filters,
            "limit": c.settings.bulk_retry_limit,
            "key": new_key("bulk-retry"),
            "back": "/failed" + query_string({k: v for k, v in filters.items() if k != "to"}),
            "failed_count": queries.count_failed_steps(c.pool),
        },
    )


async def bulk_retry_action(request: Request) -> Response:
    principal, form = await _operator_form(request)
    c = ctx(request)
    params = {k: _field(form, k, 500) for k in FILTER_KEYS["failed"] if _field(form, k, 500)}
    back = "/failed" + query_string({k: v for k, v in params.items() if k != "to"})
    if _field(form, "confirmed") != "1":
        return RedirectResponse("/failed/retry" + query_string(params), status_code=303)
    try:
        f = failed_filter(params)
        result = await run_in_threadpool(
            c.actions.bulk_retry,
            principal,
            f,
            _form_key(form, "bulk-retry"),
            c.settings.bulk_retry_limit,
        )
    except (InvalidAction, BadParameter) as exc:
        return _invalid(request, form, str(exc), back)
    response = RedirectResponse(back, status_code=303)
    set_flash(request, response, result.level, result.message, key=result.idempotency_key)
    return response


# --- login ---------------------------------------------------------------------------------


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
    token = _field(form, "token", 500)
    nxt = safe_next(_field(form, "next"), "/runs")
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
    if _field(form, "everywhere") == "1":
        require(request, Role.OPERATOR)
        assert c.sessions.store is not None
        await run_in_threadpool(c.sessions.store.delete_all)
    request.state.set_session = await run_in_threadpool(c.sessions.log_out, session)
    return RedirectResponse("/login", status_code=303)
