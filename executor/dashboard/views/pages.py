"""Server-rendered pages: what an operator reads.

Every page has a `live` part that `app.js` re-fetches every few seconds with the header
`X-Live-Fragment: 1`; the same view then renders only that partial template. The buttons'
form actions are in `forms`.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from executor.commands.models import COMMAND_TYPES, IDENTIFIER_PATTERN, STEP_KEY_PATTERN
from executor.commands.state import DROP_REASONS, RUN_STATUSES, STEP_STATUSES
from executor.dashboard import keys, ledger_stats, queries, rundetail
from executor.dashboard.actions import new_key
from executor.dashboard.auth import Principal, Role, require
from executor.dashboard.views.common import (
    BadParameter,
    ctx,
    int_param,
    is_live,
    page_request,
    query_string,
    render,
    text_param,
)
from executor.dashboard.views.filters import (
    drop_filter,
    failed_filter,
    filters_of,
    run_filter,
)
from executor.dashboard.views.graph import layout

_RUN_ID = re.compile(IDENTIFIER_PATTERN)
_STEP_KEY = re.compile(STEP_KEY_PATTERN)


def _not_found(request: Request, title: str, message: str) -> Response:
    return render(request, "error.html", {"title": title, "message": message}, status_code=404)


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
    filters = filters_of(request, "runs")
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
        detail = rundetail.get_run(
            c.pool, run_id, events_after=events_after, events_limit=c.settings.events_page_size
        )
    if detail is None:
        return _not_found(request, "Run not found", f"There is no run {run_id}.")
    context = {
        "d": detail,
        "run": detail.run,
        "graph": layout(detail.steps, detail.items),
        "approval_payload": json.dumps(f"approved by {principal.actor}"),
        "events_after": events_after,
        "keys": _form_keys(principal, detail),
        "live_url": request.url.path + (f"?{request.url.query}" if request.url.query else ""),
        "failed_count": queries.count_failed_steps(c.pool),
    }
    return render(request, "_run_live.html" if is_live(request) else "run.html", context)


def _form_keys(principal: Principal, detail: rundetail.RunDetail) -> dict[str, str]:
    """One fresh idempotency key per action form, made when the form is rendered."""
    if not principal.can(Role.OPERATOR):
        return {}
    keys = {name: new_key(name) for name in ("cancel", "pause", "resume")}
    for step in [*detail.steps, *detail.failed_items]:
        if step.status == "failed":
            keys[f"retry:{step.step_key}"] = new_key("retry")
        if step.waits_for_event:
            keys[f"event:{step.step_key}"] = new_key("send-event")
            keys[f"approve:{step.step_key}"] = new_key("send-event")
    return keys


def failed_page(request: Request) -> Response:
    principal = require(request, Role.VIEWER)
    c = ctx(request)
    params = request.query_params
    f = failed_filter(params)
    page = queries.list_failed_steps(
        c.pool, f, page_request(params, (datetime, str, str), c.settings.page_size)
    )
    filters = filters_of(request, "failed")
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
    filters = filters_of(request, "drops")
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


def items_page(request: Request) -> Response:
    """A map's items, a page at a time in index order, filtered by status."""
    principal = require(request, Role.VIEWER)
    c = ctx(request)
    run_id = request.path_params["run_id"]
    step_key = request.path_params["step_key"]
    params = request.query_params
    status = text_param(params, "status", 40)
    if status and status not in STEP_STATUSES:
        raise BadParameter(f"unknown step status {status!r}")
    after = int_param(params, "after", -1, -1, 2**31)
    page = None
    if _RUN_ID.fullmatch(run_id) and _STEP_KEY.fullmatch(step_key):
        page = rundetail.list_items(
            c.pool, run_id, step_key, status=status, after=after, limit=c.settings.page_size
        )
    if page is None:
        return _not_found(request, "Not found", f"Run {run_id} has no map step {step_key}.")
    run = rundetail.run_status(c.pool, run_id)
    filters = {k: v for k, v in {"status": status}.items() if v}
    form_keys = (
        {f"retry:{s.step_key}": new_key("retry") for s in page.items if s.status == "failed"}
        if principal.can(Role.OPERATOR)
        else {}
    )
    context: dict[str, Any] = {
        "run_id": run_id,
        "run_status": run,
        "page": page,
        "filters": filters,
        "after": after,
        "statuses": STEP_STATUSES,
        "keys": form_keys,
        "qs": lambda **kw: query_string(filters, **kw),
        "live_url": request.url.path + (f"?{request.url.query}" if request.url.query else ""),
        "failed_count": queries.count_failed_steps(c.pool),
    }
    return render(request, "_items_live.html" if is_live(request) else "items.html", context)


def keys_page(request: Request) -> Response:
    """Concurrency keys in use: limit, holders, queue (oldest first)."""
    require(request, Role.VIEWER)
    c = ctx(request)
    params = request.query_params
    key = text_param(params, "key", 500)
    after = text_param(params, "after", 500)
    page = keys.keys_in_use(c.pool, key=key, after=after, limit=c.settings.page_size)
    context = {
        "page": page,
        "key": key or "",
        "after": after or "",
        "ledger": ledger_stats.ledger_health(c.pool),
        "live_url": "/keys" + query_string(dict(params)),
        "failed_count": queries.count_failed_steps(c.pool),
    }
    return render(request, "_keys_live.html" if is_live(request) else "keys.html", context)
