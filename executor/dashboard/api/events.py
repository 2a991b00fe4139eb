"""External events: an operator's send, and a hook URL a third party posts to.

`POST /api/runs/{run_id}/events/{event}` is an action like cancel or retry (operator, CSRF
for sessions, 200 applied or duplicate, 404 no such run, 409 terminal).

`POST /hooks/{token}` has no other credential than its token (see `dashboard.hooks`) and no
other power than sending its one event to its one run. It is limited per token (429 with
`Retry-After`) before anything is read, and to 64 KiB of body (413); a token that opens no
hook is 404, one answer for every way of being wrong. The JSON body (empty means null) is
the payload. The answer names the outcome: 200 `applied` or `duplicate`, 410 `terminal`.
"""

from __future__ import annotations

import functools
import json
import logging
from typing import Annotated, Any

from fastapi import APIRouter, Body, Header, Request, Response
from fastapi import Path as PathParam
from starlette.concurrency import run_in_threadpool

from executor.commands.models import IDENTIFIER_PATTERN
from executor.dashboard import hooks
from executor.dashboard.api.routing import Context, DashboardRoute, Operator, _error, area_router
from executor.dashboard.api.runs import ACTION_RESPONSES, KeyHeader, RunId, _act, _key, _respond
from executor.dashboard.api.schemas import (
    ActionResponse,
    ErrorBody,
    HookResponse,
    SendEventRequest,
)
from executor.dashboard.views.common import JSON, json_error, loads

log = logging.getLogger("executor.dashboard")

router = area_router(tags=["events"])
hooks_router = APIRouter(route_class=DashboardRoute, tags=["hooks"])
"""Not an `area_router`: no token or session is asked for, so none of their refusals apply."""

EventName = Annotated[
    str,
    PathParam(
        min_length=1,
        max_length=200,
        pattern=IDENTIFIER_PATTERN,
        description="The event's name, as the waiting step names it (`wf.wait_for(event=…)`).",
    ),
]


@router.post(
    "/api/runs/{run_id}/events/{event}",
    response_model=ActionResponse,
    responses=ACTION_RESPONSES,
    summary="Send an external event to a run (a step waiting for it completes with the payload)",
)
async def send_event(
    ctx: Context,
    principal: Operator,
    response: Response,
    run_id: RunId,
    event: EventName,
    idempotency_key: KeyHeader = None,
    body: Annotated[SendEventRequest | None, Body()] = None,
) -> ActionResponse:
    body = body or SendEventRequest()
    key = _key(body.idempotency_key, idempotency_key, "send-event")
    log.info("event %s for run %s sent by %s", event, run_id, principal.actor)
    result = await _act(ctx.actions.send_event, run_id, event, body.payload, key)
    return _respond(response, result)


async def _body(request: Request, limit: int) -> bytes | None:
    """The body, or None past `limit` bytes (declared or counted as it arrives).

    Not Starlette's body limit: once a declared Content-Length is over it, that answers with
    plain text of its own, and a hook's sender gets the same JSON refusal as for the rest.
    """
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


HOOK_STATUS = {"applied": 200, "duplicate": 200, "terminal": 410, "unknown_entity": 404}


@hooks_router.post(
    "/hooks/{token}",
    response_model=HookResponse,
    summary="A hook URL: a third party sends the hook's one event to its one run",
    description="No credential but the token. The JSON body (up to 64 KiB; empty means "
    "null) becomes the event's payload. `Idempotency-Key` makes a resend a duplicate; "
    "without it, the same body sent again is one.",
    responses={
        404: _error("No hook has this token (whatever part of it is wrong)."),
        409: {"model": HookResponse, "description": "Dropped for another reason (see message)."},
        410: {"model": HookResponse, "description": "The run has ended: `terminal`."},
        413: _error("The body is larger than 64 KiB."),
        422: _error("The body is not JSON, or the Idempotency-Key header is unusable."),
        429: _error(
            "Too many requests with this token; wait `Retry-After` seconds.",
            headers={"Retry-After": {"schema": {"type": "integer"}}},
        ),
        503: {
            "model": HookResponse | ErrorBody,
            "description": "The ledger is busy or unreachable; send again later.",
        },
    },
    openapi_extra={
        "requestBody": {"required": False, "content": {"application/json": {"schema": {}}}}
    },
)
async def hook(
    ctx: Context,
    request: Request,
    token: Annotated[str, PathParam(description="The last part of the hook URL.")],
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
) -> Any:
    wait = ctx.hook_limiter.admit(hooks.digest(token))
    if wait is not None:
        response = json_error(429, "rate_limited", f"too many requests; retry in {wait} s")
        response.headers["retry-after"] = str(wait)
        return response
    raw = await _body(request, hooks.MAX_BODY_BYTES)
    if raw is None:
        return json_error(413, "too_large", f"the body is larger than {hooks.MAX_BODY_BYTES} bytes")
    found = await run_in_threadpool(hooks.find, ctx.pool, token)
    if found is None:
        return json_error(404, "not_found", "no such hook")
    try:
        payload = loads(raw) if raw.strip() else None
        key = hooks.idempotency_key(found, idempotency_key, raw)
    except (json.JSONDecodeError, hooks.BadKey) as exc:
        return json_error(422, "invalid", str(exc))
    send = functools.partial(ctx.actions.send_event, action="hook")
    result = await _act(send, found.run_id, found.event, payload, key)
    outcome = "applied" if result.applied else (result.reason or "dropped")
    status = HOOK_STATUS.get(outcome, 503 if result.http_status == 503 else 409)
    log.info("hook %s of run %s: %s", found.name, found.run_id, outcome)
    answer = HookResponse(
        outcome=outcome, event=found.event, idempotency_key=key, message=result.message
    )
    response = JSON(answer.model_dump(), status_code=status)
    if status == 503:
        response.headers["retry-after"] = "1"
    return response
