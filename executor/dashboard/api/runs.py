"""Runs: list and read them (a map's items a page at a time), cancel, pause, resume, and retry
one failed step.

Action status codes: 200 applied, or dropped as a duplicate of an earlier request
(`applied: false, reason: "duplicate"`); 404 no such run or step; 409 dropped for any other
reason (terminal, invalid transition, concurrency key taken); 503 the ledger is busy or
unreachable. The body always says what happened, in `message`.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import Body, Header, Query, Response
from fastapi import Path as PathParam
from starlette.concurrency import run_in_threadpool

from executor.commands.models import IDENTIFIER_PATTERN, STEP_KEY_PATTERN
from executor.commands.state import STEP_STATUSES
from executor.dashboard import queries, rundetail
from executor.dashboard.actions import ActionResult, InvalidAction, new_key
from executor.dashboard.api.routing import WRITE_RESPONSES, Context, Operator, Viewer, area_router
from executor.dashboard.api.schemas import (
    CURSOR,
    NO_NUL,
    RUN_ID_HELP,
    STEP_KEY_HELP,
    TIME,
    TIME_HELP,
    ActionResponse,
    ErrorBody,
    ItemsPage,
    ReasonRequest,
    ResumeRequest,
    RetryRequest,
    RunDetail,
    RunsPage,
    RunStatusFilter,
)
from executor.dashboard.views.common import BadParameter, page_request
from executor.dashboard.views.filters import run_filter

router = area_router(tags=["runs"])

RunId = Annotated[
    str,
    PathParam(min_length=1, max_length=200, pattern=IDENTIFIER_PATTERN, description=RUN_ID_HELP),
]
StepKey = Annotated[
    str,
    PathParam(min_length=1, max_length=200, pattern=STEP_KEY_PATTERN, description=STEP_KEY_HELP),
]
TextQuery = Annotated[str | None, Query(max_length=200, pattern=NO_NUL)]
TimeQuery = Annotated[str | None, Query(max_length=64, pattern=TIME, description=TIME_HELP)]
Limit = Annotated[int | None, Query(ge=1, le=500, description="Rows per page (default 50).")]
Cursor = Annotated[str | None, Query(max_length=1000, pattern=CURSOR)]
KeyHeader = Annotated[
    str | None,
    Header(alias="Idempotency-Key", max_length=300, pattern=NO_NUL, description="Or the body's."),
]

ACTION_RESPONSES: dict[int | str, dict[str, Any]] = {
    **WRITE_RESPONSES,
    404: {"model": ActionResponse, "description": "No such run or step."},
    409: {
        "model": ActionResponse,
        "description": "Dropped: terminal, invalid transition, key taken.",
    },
    503: {"model": ActionResponse | ErrorBody, "description": "The ledger is busy or unreachable."},
}


def paging(
    limit: int | None, after: str | None, before: str | None, default: int
) -> dict[str, str]:
    """The paging query as the pages' parser reads it (already validated here)."""
    return {"limit": str(limit or default), "after": after or "", "before": before or ""}


@router.get("/api/runs", response_model=RunsPage, summary="Runs, newest first")
def list_runs(
    ctx: Context,
    _: Viewer,
    status: Annotated[RunStatusFilter | None, Query(description="A status, or `active`.")] = None,
    workflow: TextQuery = None,
    concurrency_key: Annotated[str | None, Query(max_length=500, pattern=NO_NUL)] = None,
    from_: Annotated[
        str | None, Query(alias="from", max_length=64, pattern=TIME, description=TIME_HELP)
    ] = None,
    to: TimeQuery = None,
    q: Annotated[
        str | None, Query(max_length=200, pattern=NO_NUL, description="Run id prefix.")
    ] = None,
    limit: Limit = None,
    after: Cursor = None,
    before: Cursor = None,
) -> RunsPage:
    f = run_filter(
        {
            "status": status or "",
            "workflow": workflow or "",
            "concurrency_key": concurrency_key or "",
            "from": from_ or "",
            "to": to or "",
            "q": q or "",
        }
    )
    page = queries.list_runs(
        ctx.pool,
        f,
        page_request(paging(limit, after, before, ctx.settings.page_size), (datetime, str)),
    )
    return RunsPage(
        runs=page.items,
        next=page.next,
        prev=page.prev,
        estimated_total=page.estimated_total,
        total_is_exact=page.total_is_exact,
    )


@router.get(
    "/api/runs/{run_id}",
    response_model=RunDetail,
    summary="One run: steps, events in seq order, drops",
    responses={404: {"model": ErrorBody, "description": "No such run."}},
)
def get_run(
    ctx: Context,
    _: Viewer,
    run_id: RunId,
    events_after: Annotated[
        int, Query(ge=0, le=2**62, description="Only events after this seq (to tail a run).")
    ] = 0,
) -> Any:
    detail = rundetail.get_run(
        ctx.pool, run_id, events_after=events_after, events_limit=ctx.settings.events_page_size
    )
    if detail is None:
        return _not_found(f"no run {run_id}")
    return RunDetail(
        run=detail.run,
        steps=detail.steps,
        items=detail.items,
        failed_items=detail.failed_items,
        children=detail.children,
        children_more=detail.children_more,
        events=detail.events,
        events_more=detail.events_more,
        drops=detail.drops,
        drops_more=detail.drops_more,
    )


if TYPE_CHECKING:
    StepStatus = str
else:
    StepStatus = Literal[STEP_STATUSES]


@router.get(
    "/api/runs/{run_id}/steps/{step_key}/items",
    response_model=ItemsPage,
    summary="A map's items in index order, a page at a time",
    responses={404: {"model": ErrorBody, "description": "No such run, or no such map step."}},
)
def list_items(
    ctx: Context,
    _: Viewer,
    run_id: RunId,
    step_key: StepKey,
    status: Annotated[StepStatus | None, Query(description="Only items in this status.")] = None,
    after: Annotated[int, Query(ge=-1, le=2**31, description="Items after this index.")] = -1,
    limit: Annotated[int, Query(ge=1, le=500, description="Items per page.")] = 100,
) -> Any:
    page = rundetail.list_items(ctx.pool, run_id, step_key, status=status, after=after, limit=limit)
    if page is None:
        return _not_found(f"run {run_id} has no map step {step_key}")
    return ItemsPage(
        map_step=page.map_step, counts=page.counts, items=page.items, next_after=page.next_after
    )


def _not_found(detail: str) -> Response:
    from executor.dashboard.views.common import json_error

    return json_error(404, "not_found", detail)


def _key(body_key: str | None, header_key: str | None, action: str) -> str:
    return body_key or header_key or new_key(action)


def _respond(response: Response, result: ActionResult) -> ActionResponse:
    response.status_code = result.http_status
    return ActionResponse.model_validate(result.to_json())


async def _act(call: Any, *args: Any) -> ActionResult:
    try:
        result: ActionResult = await run_in_threadpool(call, *args)
    except InvalidAction as exc:
        raise BadParameter(str(exc)) from exc
    return result


def _reason_action(action: str, summary: str) -> None:
    """Cancel and pause: the same request (a key and a reason), another command."""

    async def endpoint(
        ctx: Context,
        principal: Operator,
        response: Response,
        run_id: RunId,
        idempotency_key: KeyHeader = None,
        body: Annotated[ReasonRequest | None, Body()] = None,
    ) -> ActionResponse:
        body = body or ReasonRequest()
        key = _key(body.idempotency_key, idempotency_key, action)
        call = getattr(ctx.actions, action)
        return _respond(response, await _act(call, principal, run_id, key, body.reason))

    endpoint.__name__ = f"{action}_run"
    router.post(
        f"/api/runs/{{run_id}}/{action}",
        response_model=ActionResponse,
        responses=ACTION_RESPONSES,
        summary=summary,
    )(endpoint)


_reason_action("cancel", "Cancel a run and its unfinished steps")
_reason_action("pause", "Pause a run: nothing more is dispatched until it is resumed")


@router.post(
    "/api/runs/{run_id}/resume",
    response_model=ActionResponse,
    responses=ACTION_RESPONSES,
    summary="Resume a paused run",
)
async def resume_run(
    ctx: Context,
    principal: Operator,
    response: Response,
    run_id: RunId,
    idempotency_key: KeyHeader = None,
    body: Annotated[ResumeRequest | None, Body()] = None,
) -> ActionResponse:
    body = body or ResumeRequest()
    key = _key(body.idempotency_key, idempotency_key, "resume")
    result = await _act(ctx.actions.resume, principal, run_id, key)
    return _respond(response, result)


@router.post(
    "/api/runs/{run_id}/steps/{step_key}/retry",
    response_model=ActionResponse,
    responses=ACTION_RESPONSES,
    summary="Retry a failed step as a new attempt (reopens a failed run)",
)
async def retry_step(
    ctx: Context,
    principal: Operator,
    response: Response,
    run_id: RunId,
    step_key: StepKey,
    idempotency_key: KeyHeader = None,
    body: Annotated[RetryRequest | None, Body()] = None,
) -> ActionResponse:
    body = body or RetryRequest()
    key = _key(body.idempotency_key, idempotency_key, "retry")
    try:
        result = await run_in_threadpool(
            lambda: ctx.actions.retry(principal, run_id, step_key, key, seen_attempt=body.attempt)
        )
    except InvalidAction as exc:
        raise BadParameter(str(exc)) from exc
    return _respond(response, result)
