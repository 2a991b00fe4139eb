"""The JSON API: the same data and actions as the pages, for scripts and other tools.

Authenticate with `Authorization: Bearer <token>` (or the browser session plus an
`X-CSRF-Token` header on writes). Writes take an idempotency key from the JSON body
(`idempotency_key`) or the `Idempotency-Key` header; send one and a retried request applies
once. Without one, each request is its own intent and gets a fresh key.

Status codes of actions: 200 applied, or dropped as a duplicate of an earlier request
(`applied: false, reason: "duplicate"`); 404 no such run or step; 409 dropped for any other
reason (terminal, invalid transition, concurrency key taken); 422 a malformed request;
503 the ledger is busy or unreachable. The body always says what happened.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from executor.dashboard import queries
from executor.dashboard.actions import ActionResult, InvalidAction, new_key
from executor.dashboard.auth import CSRF_HEADER, Principal, Role, check_csrf, require
from executor.dashboard.views.common import (
    JSON,
    BadParameter,
    ctx,
    int_param,
    json_error,
    page_request,
)
from executor.dashboard.views.openapi import openapi_document
from executor.dashboard.views.pages import drop_filter, failed_filter, run_filter


def _page_json(name: str, page: queries.Page[Any]) -> dict[str, Any]:
    body: dict[str, Any] = {
        name: [item.model_dump(mode="json") for item in page.items],
        "next": page.next,
        "prev": page.prev,
    }
    if page.estimated_total is not None:
        body["estimated_total"] = page.estimated_total
        body["total_is_exact"] = page.total_is_exact
    return body


def me(request: Request) -> Response:
    principal = require(request, Role.VIEWER)
    return JSON(
        {"role": principal.role.label, "token": principal.fingerprint, "via": principal.via}
    )


def runs(request: Request) -> Response:
    require(request, Role.VIEWER)
    c = ctx(request)
    params = request.query_params
    page = queries.list_runs(
        c.pool, run_filter(params), page_request(params, (datetime, str), c.settings.page_size)
    )
    return JSON(_page_json("runs", page))


def run(request: Request) -> Response:
    require(request, Role.VIEWER)
    c = ctx(request)
    run_id = request.path_params["run_id"]
    detail = queries.get_run(
        c.pool,
        run_id,
        events_after=int_param(request.query_params, "events_after", 0, 0, 2**62),
        events_limit=c.settings.events_page_size,
    )
    if detail is None:
        return json_error(404, "not_found", f"no run {run_id}")
    return JSON(
        {
            "run": detail.run.model_dump(mode="json"),
            "steps": [s.model_dump(mode="json") for s in detail.steps],
            "events": [e.model_dump(mode="json") for e in detail.events],
            "events_more": detail.events_more,
            "drops": [d.model_dump(mode="json") for d in detail.drops],
            "drops_more": detail.drops_more,
        }
    )


def failed_steps(request: Request) -> Response:
    require(request, Role.VIEWER)
    c = ctx(request)
    params = request.query_params
    page = queries.list_failed_steps(
        c.pool,
        failed_filter(params),
        page_request(params, (datetime, str, str), c.settings.page_size),
    )
    return JSON(_page_json("steps", page))


def drops(request: Request) -> Response:
    require(request, Role.VIEWER)
    c = ctx(request)
    params = request.query_params
    page = queries.list_drops(
        c.pool, drop_filter(params), page_request(params, (int,), c.settings.page_size)
    )
    return JSON(_page_json("drops", page))


def queues(request: Request) -> Response:
    require(request, Role.VIEWER)
    c = ctx(request)
    return JSON(
        {
            "transport": c.transport().model_dump(mode="json"),
            "ledger": queries.ledger_health(c.pool).model_dump(mode="json"),
            "pools": c.pool_stats(),
        }
    )


def openapi(request: Request) -> Response:
    return JSON(openapi_document())


# --- actions -------------------------------------------------------------------------------


async def _operator_json(request: Request) -> tuple[Principal, dict[str, Any]]:
    principal = require(request, Role.OPERATOR)
    check_csrf(request, principal, request.headers.get(CSRF_HEADER))
    raw = await request.body()
    if not raw.strip():
        return principal, {}
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise BadParameter(f"the request body is not JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise BadParameter("the request body must be a JSON object")
    return principal, body


def _key(request: Request, body: dict[str, Any], action: str) -> str:
    key = body.get("idempotency_key") or request.headers.get("idempotency-key")
    if key is None:
        return new_key(action)
    if not isinstance(key, str) or not 1 <= len(key) <= 300:
        raise BadParameter("idempotency_key must be a string of 1..300 characters")
    return key


def _text(body: dict[str, Any], name: str) -> str:
    value = body.get(name, "")
    if not isinstance(value, str):
        raise BadParameter(f"{name} must be a string")
    return value


def _result(result: ActionResult) -> Response:
    return JSON(result.to_json(), status_code=result.http_status)


async def retry(request: Request) -> Response:
    principal, body = await _operator_json(request)
    c = ctx(request)
    attempt = body.get("attempt")
    if attempt is not None and not isinstance(attempt, int):
        raise BadParameter("attempt must be an integer")
    try:
        result = await run_in_threadpool(
            c.actions.retry,
            principal,
            request.path_params["run_id"],
            request.path_params["step_key"],
            _key(request, body, "retry"),
            seen_attempt=attempt,
        )
    except InvalidAction as exc:
        return json_error(422, "invalid", str(exc))
    return _result(result)


async def run_action(request: Request) -> Response:
    principal, body = await _operator_json(request)
    c = ctx(request)
    run_id = request.path_params["run_id"]
    action = request.path_params["action"]
    key = _key(request, body, action)
    try:
        if action == "cancel":
            result = await run_in_threadpool(
                c.actions.cancel, principal, run_id, key, _text(body, "reason")
            )
        elif action == "pause":
            result = await run_in_threadpool(
                c.actions.pause, principal, run_id, key, _text(body, "reason")
            )
        elif action == "resume":
            result = await run_in_threadpool(c.actions.resume, principal, run_id, key)
        else:
            return json_error(404, "not_found", f"no action {action!r}")
    except InvalidAction as exc:
        return json_error(422, "invalid", str(exc))
    return _result(result)


async def bulk_retry(request: Request) -> Response:
    """POST /api/retry: retry the failed steps matching `filter`, or preview with `dry_run`."""
    principal, body = await _operator_json(request)
    c = ctx(request)
    raw_filter = body.get("filter", {})
    if not isinstance(raw_filter, dict) or not all(isinstance(v, str) for v in raw_filter.values()):
        raise BadParameter("filter must be an object of strings")
    unknown = set(raw_filter) - {"workflow", "step_key", "run_id", "from", "to", "error"}
    if unknown:
        raise BadParameter(f"unknown filter field(s): {', '.join(sorted(unknown))}")
    f = failed_filter(raw_filter)
    limit = body.get("limit", c.settings.bulk_retry_limit)
    if not isinstance(limit, int) or not 1 <= limit <= c.settings.bulk_retry_limit:
        raise BadParameter(f"limit must be an integer in 1..{c.settings.bulk_retry_limit}")
    if body.get("dry_run"):
        steps = await run_in_threadpool(queries.retryable_failed_steps, c.pool, f, limit)
        return JSON(
            {
                "dry_run": True,
                "matched": len(steps),
                "limit": limit,
                "steps": [s.model_dump(mode="json") for s in steps],
            }
        )
    try:
        result = await run_in_threadpool(
            c.actions.bulk_retry, principal, f, _key(request, body, "bulk-retry"), limit
        )
    except InvalidAction as exc:
        return json_error(422, "invalid", str(exc))
    status = 200 if not result.errors else 503
    return JSON(result.to_json(), status_code=status)
