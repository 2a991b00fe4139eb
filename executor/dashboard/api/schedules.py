"""Cron schedules: list and read them (viewer); create, pause, resume, trigger and delete
them (operator). Over `executor.schedules`, the same functions the CLI uses.

`POST /api/schedules` answers 201 with the schedule, 409 if the name is taken, 422 for a
cron expression, time zone or input it refuses. The actions answer 200 with the schedule
(or, for trigger, the run it started), 404 for an unknown name. Trigger takes an
idempotency key like every action: the same key again starts no second run
(`started: false`).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Body, Response
from fastapi import Path as PathParam
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from executor.commands.models import IDENTIFIER_PATTERN
from executor.dashboard import schedules
from executor.dashboard.actions import new_key
from executor.dashboard.api.routing import WRITE_RESPONSES, Context, Operator, Viewer, area_router
from executor.dashboard.api.runs import KeyHeader
from executor.dashboard.api.schemas import ErrorBody, IdempotencyKey, _Body
from executor.dashboard.views.common import json_error
from executor.schedules.model import Schedule, ScheduleSpec

router = area_router(tags=["schedules"])

Name = Annotated[
    str,
    PathParam(min_length=1, max_length=200, pattern=IDENTIFIER_PATTERN, description="Its name."),
]


class SchedulesBody(BaseModel):
    schedules: list[Schedule]


class ScheduleCreate(ScheduleSpec):
    """A new schedule; its first tick is the first after now (the database clock)."""

    paused: bool = Field(default=False, description="Create it paused.")


class TriggerRequest(_Body):
    idempotency_key: IdempotencyKey | None = None


class ScheduleActionResponse(BaseModel):
    action: str
    name: str
    ok: bool
    message: str
    schedule: Schedule | None
    run_id: str | None = Field(description="The run a trigger started (or had started).")
    started: bool | None = Field(description="False: this key had started the run before.")
    idempotency_key: str | None


_NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorBody, "description": "No schedule of that name."}
}
_ACTION_RESPONSES: dict[int | str, dict[str, Any]] = {
    **WRITE_RESPONSES,
    **_NOT_FOUND,
    503: {"model": ErrorBody, "description": "The ledger is busy or unreachable."},
}


@router.get("/api/schedules", response_model=SchedulesBody, summary="Every schedule, by name")
def list_schedules(ctx: Context, _: Viewer) -> SchedulesBody:
    from executor.schedules import store

    return SchedulesBody(schedules=store.list_all(ctx.pool))


@router.post(
    "/api/schedules",
    status_code=201,
    response_model=Schedule,
    summary="Create a schedule",
    responses={
        **WRITE_RESPONSES,
        409: {"model": ErrorBody, "description": "A schedule of that name exists."},
    },
)
async def create_schedule(
    ctx: Context, _: Operator, body: Annotated[ScheduleCreate, Body()]
) -> Any:
    fields = body.model_dump()
    result = await run_in_threadpool(schedules.create, ctx, fields)
    if not result.ok:
        name = "conflict" if result.http_status == 409 else "invalid"
        return json_error(result.http_status, name, result.message)
    return result.schedule


@router.get(
    "/api/schedules/{name}", response_model=Schedule, summary="One schedule", responses=_NOT_FOUND
)
def get_schedule(ctx: Context, _: Viewer, name: Name) -> Any:
    from executor.schedules import store

    found = store.get(ctx.pool, name)
    return found if found is not None else json_error(404, "not_found", f"no schedule {name!r}")


async def _respond(ctx: Any, response: Response, action: str, name: str, key: str | None) -> Any:
    result = await run_in_threadpool(schedules.act, ctx, action, name, key)
    if result.http_status == 404:
        return json_error(404, "not_found", result.message)
    if result.http_status == 503:
        return json_error(503, "unavailable", result.message)
    response.status_code = result.http_status
    return ScheduleActionResponse.model_validate(result.to_json())


def _simple_action(action: str, summary: str) -> None:
    async def endpoint(ctx: Context, _: Operator, response: Response, name: Name) -> Any:
        return await _respond(ctx, response, action, name, None)

    endpoint.__name__ = f"{action}_schedule"
    router.post(
        f"/api/schedules/{{name}}/{action}",
        response_model=ScheduleActionResponse,
        responses=_ACTION_RESPONSES,
        summary=summary,
    )(endpoint)


_simple_action("pause", "Pause a schedule: no tick starts until it is resumed")
_simple_action("resume", "Resume a schedule from its next tick (ticks while paused are skipped)")


@router.post(
    "/api/schedules/{name}/trigger",
    response_model=ScheduleActionResponse,
    responses=_ACTION_RESPONSES,
    summary="Start one run of a schedule now, outside its ticks",
)
async def trigger_schedule(
    ctx: Context,
    _: Operator,
    response: Response,
    name: Name,
    idempotency_key: KeyHeader = None,
    body: Annotated[TriggerRequest | None, Body()] = None,
) -> Any:
    key = (body and body.idempotency_key) or idempotency_key or new_key("trigger")
    return await _respond(ctx, response, "trigger", name, key)


@router.delete(
    "/api/schedules/{name}",
    response_model=ScheduleActionResponse,
    responses=_ACTION_RESPONSES,
    summary="Delete a schedule (the runs it started stay)",
)
async def delete_schedule(ctx: Context, _: Operator, response: Response, name: Name) -> Any:
    return await _respond(ctx, response, "delete", name, None)
