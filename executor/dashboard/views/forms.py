"""The form actions behind the pages' buttons.

Every form POST checks the CSRF token, asks for confirmation (a dialog in the browser, or a
confirmation page without JavaScript), applies one command and redirects back with the
outcome as a one-shot flash message. The idempotency key was minted when the form was
rendered, so a double click or a resubmitted form applies once.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from executor.dashboard import hooks, queries
from executor.dashboard.actions import ActionResult, InvalidAction, new_key
from executor.dashboard.auth import CSRF_FIELD, Principal, Role, check_csrf, require
from executor.dashboard.views.common import (
    BadParameter,
    ctx,
    loads,
    query_string,
    render,
    safe_next,
    set_flash,
)
from executor.dashboard.views.filters import FILTER_KEYS, failed_filter


async def operator_form(request: Request) -> tuple[Principal, FormData]:
    principal = require(request, Role.OPERATOR)
    form = await request.form()
    token = form.get(CSRF_FIELD)
    check_csrf(request, principal, token if isinstance(token, str) else None)
    return principal, form


def field(form: FormData, name: str, limit: int = 2000) -> str:
    value = form.get(name)
    return value.strip()[:limit] if isinstance(value, str) else ""


def confirm(request: Request, form: FormData, title: str, message: str, danger: bool) -> Response:
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
            "back": safe_next(field(form, "next"), "/runs"),
        },
    )


def back_with(request: Request, form: FormData, result: ActionResult, default: str) -> Response:
    target = safe_next(field(form, "next"), default)
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


def form_key(form: FormData, action: str) -> str:
    return field(form, "idempotency_key", 300) or new_key(action)


async def retry_action(request: Request) -> Response:
    principal, form = await operator_form(request)
    run_id = request.path_params["run_id"]
    step_key = request.path_params["step_key"]
    if field(form, "confirmed") != "1":
        return confirm(
            request,
            form,
            "Retry step",
            f"Retry step {step_key} of run {run_id} as a new attempt?",
            danger=False,
        )
    seen = field(form, "attempt")
    c = ctx(request)
    try:
        result = await run_in_threadpool(
            c.actions.retry,
            principal,
            run_id,
            step_key,
            form_key(form, "retry"),
            seen_attempt=int(seen) if seen.isdigit() else None,
        )
    except InvalidAction as exc:
        return invalid(request, form, str(exc), f"/runs/{run_id}")
    return back_with(request, form, result, f"/runs/{run_id}")


async def run_action(request: Request) -> Response:
    principal, form = await operator_form(request)
    run_id = request.path_params["run_id"]
    action = request.path_params["action"]
    if action not in ("cancel", "pause", "resume"):
        return render(
            request, "error.html", {"title": "Not found", "message": action}, status_code=404
        )
    if field(form, "confirmed") != "1":
        verbs = {
            "cancel": "Cancel run {} and all its unfinished steps? This cannot be undone.",
            "pause": "Pause run {}? Running attempts finish; nothing new is dispatched.",
            "resume": "Resume run {}?",
        }
        return confirm(
            request,
            form,
            f"{action.capitalize()} run",
            verbs[action].format(run_id),
            danger=action == "cancel",
        )
    c = ctx(request)
    key = form_key(form, action)
    reason = field(form, "reason", 1500)
    try:
        if action == "cancel":
            result = await run_in_threadpool(c.actions.cancel, principal, run_id, key, reason)
        elif action == "pause":
            result = await run_in_threadpool(c.actions.pause, principal, run_id, key, reason)
        else:
            result = await run_in_threadpool(c.actions.resume, principal, run_id, key)
    except InvalidAction as exc:
        return invalid(request, form, str(exc), f"/runs/{run_id}")
    return back_with(request, form, result, f"/runs/{run_id}")


def invalid(request: Request, form: FormData, message: str, default: str) -> Response:
    response = RedirectResponse(safe_next(field(form, "next"), default), status_code=303)
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
    principal, form = await operator_form(request)
    c = ctx(request)
    params = {k: field(form, k, 500) for k in FILTER_KEYS["failed"] if field(form, k, 500)}
    back = "/failed" + query_string({k: v for k, v in params.items() if k != "to"})
    if field(form, "confirmed") != "1":
        return RedirectResponse("/failed/retry" + query_string(params), status_code=303)
    try:
        f = failed_filter(params)
        result = await run_in_threadpool(
            c.actions.bulk_retry,
            principal,
            f,
            form_key(form, "bulk-retry"),
            c.settings.bulk_retry_limit,
        )
    except (InvalidAction, BadParameter) as exc:
        return invalid(request, form, str(exc), back)
    response = RedirectResponse(back, status_code=303)
    set_flash(request, response, result.level, result.message, key=result.idempotency_key)
    return response


def _payload(form: FormData) -> Any:
    """The form's JSON payload (empty means null); ValueError says what is wrong with it."""
    raw = form.get("payload")
    text = raw.strip() if isinstance(raw, str) else ""
    if len(text.encode()) > hooks.MAX_BODY_BYTES:
        raise ValueError(f"the payload is larger than {hooks.MAX_BODY_BYTES // 1024} KiB")
    if not text:
        return None
    try:
        return loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"the payload is not JSON: {exc}") from exc


async def event_action(request: Request) -> Response:
    """Send an event to a run from its page: the "Send event" form and the Approve button."""
    _, form = await operator_form(request)
    run_id = request.path_params["run_id"]
    event = request.path_params["event"]
    back = f"/runs/{run_id}"
    try:
        payload = _payload(form)
    except ValueError as exc:
        return invalid(request, form, str(exc), back)
    if field(form, "confirmed") != "1":
        shown = json.dumps(payload, ensure_ascii=False)
        return confirm(
            request,
            form,
            "Send event",
            f"Send event {event} to run {run_id} with payload {shown[:300]}?",
            danger=False,
        )
    c = ctx(request)
    try:
        result = await run_in_threadpool(
            c.actions.send_event, run_id, event, payload, form_key(form, "send-event")
        )
    except InvalidAction as exc:
        return invalid(request, form, str(exc), back)
    return back_with(request, form, result, back)
