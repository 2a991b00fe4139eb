"""Reading what the ledger and the queues hold: failed steps, drops, queues, who am I, and
`/metrics` and `/healthz` for machines."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Annotated, Any

from fastapi import Query, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import PlainTextResponse, Response

from executor.commands.models import IDENTIFIER_PATTERN, STEP_KEY_PATTERN
from executor.dashboard import ledger_stats, queries
from executor.dashboard.api.routing import Context, Viewer, area_router
from executor.dashboard.api.runs import Cursor, Limit, TextQuery, TimeQuery, paging
from executor.dashboard.api.schemas import (
    TIME,
    TIME_HELP,
    CommandType,
    DropReason,
    DropsPage,
    FailedStepsPage,
    Me,
    QueuesBody,
)
from executor.dashboard.auth import Role, require
from executor.dashboard.metrics import CONTENT_TYPE, Scrape
from executor.dashboard.views.common import page_request
from executor.dashboard.views.filters import drop_filter, failed_filter

log = logging.getLogger("executor.dashboard")

router = area_router(tags=["monitoring"])

RunIdQuery = Annotated[str | None, Query(max_length=200, pattern=IDENTIFIER_PATTERN)]
FromQuery = Annotated[
    str | None, Query(alias="from", max_length=64, pattern=TIME, description=TIME_HELP)
]


@router.get("/api/me", response_model=Me, summary="Who the token or session is")
def me(principal: Viewer) -> Me:
    return Me.model_validate(
        {"role": principal.role.label, "token": principal.fingerprint, "via": principal.via}
    )


@router.get(
    "/api/failed-steps", response_model=FailedStepsPage, summary="Failed steps, newest first"
)
def failed_steps(
    ctx: Context,
    _: Viewer,
    workflow: TextQuery = None,
    step_key: Annotated[str | None, Query(max_length=200, pattern=STEP_KEY_PATTERN)] = None,
    run_id: RunIdQuery = None,
    from_: FromQuery = None,
    to: TimeQuery = None,
    error: TextQuery = None,
    limit: Limit = None,
    after: Cursor = None,
    before: Cursor = None,
) -> FailedStepsPage:
    params = {"workflow": workflow, "step_key": step_key, "run_id": run_id, "from": from_}
    params |= {"to": to, "error": error}
    f = failed_filter({k: v for k, v in params.items() if v})
    page = queries.list_failed_steps(
        ctx.pool,
        f,
        page_request(
            paging(limit, after, before, ctx.settings.page_size), (datetime, str, str), 50
        ),
    )
    return FailedStepsPage(steps=page.items, next=page.next, prev=page.prev)


@router.get("/api/drops", response_model=DropsPage, summary="Dropped deliveries, newest first")
def drops(
    ctx: Context,
    _: Viewer,
    reason: DropReason | None = None,
    command_type: CommandType | None = None,
    run_id: RunIdQuery = None,
    from_: FromQuery = None,
    limit: Limit = None,
    after: Cursor = None,
    before: Cursor = None,
) -> DropsPage:
    params = {"reason": reason, "command_type": command_type, "run_id": run_id, "from": from_}
    f = drop_filter({k: v for k, v in params.items() if v})
    page = queries.list_drops(
        ctx.pool, f, page_request(paging(limit, after, before, ctx.settings.page_size), (int,))
    )
    return DropsPage(drops=page.items, next=page.next, prev=page.prev)


@router.get("/api/queues", response_model=QueuesBody, summary="RQ queues and workers, backlog")
def queues(ctx: Context, _: Viewer) -> QueuesBody:
    return QueuesBody(
        transport=ctx.transport(),
        ledger=ledger_stats.ledger_health(ctx.pool),
        pools=ctx.pool_stats(),
    )


def scrape(ctx: Any) -> Scrape:
    """The numbers `/metrics` reads at scrape time; a database outage reads as `up 0`."""
    counts: ledger_stats.LedgerCounts | None = None
    try:
        value = ctx.metrics.ledger_cache.get(
            lambda: ledger_stats.ledger_counts(ctx.pool, ctx.settings.stuck_after_seconds)
        )
        assert isinstance(value, ledger_stats.LedgerCounts)
        counts = value
    except Exception as exc:
        log.warning("metrics: could not read the ledger: %s", exc)
    return Scrape(counts=counts, transport=ctx.transport(), pools=ctx.pool_stats())


@router.get(
    "/metrics",
    response_class=PlainTextResponse,
    tags=["metrics"],
    summary="Prometheus metrics: the ledger, the queues, the dashboard",
    description="Needs a viewer token unless the dashboard runs with --public-metrics.",
    responses={200: {"content": {CONTENT_TYPE.split(";")[0]: {"schema": {"type": "string"}}}}},
)
async def metrics(request: Request, ctx: Context) -> Response:
    if not ctx.settings.metrics_public:
        require(request, Role.VIEWER)
    body = await run_in_threadpool(ctx.metrics.render)
    return Response(body, media_type=CONTENT_TYPE)


@router.get(
    "/healthz",
    response_class=PlainTextResponse,
    tags=["metrics"],
    summary="Liveness for load balancers: 200 if the ledger answers (no token)",
    responses={
        200: {"content": {"text/plain": {"schema": {"type": "string"}}}},
        503: {"content": {"text/plain": {"schema": {"type": "string"}}}},
    },
)
def healthz(ctx: Context) -> Response:
    try:
        ledger_stats.ping(ctx.pool)
    except Exception as exc:
        return PlainTextResponse(f"database unavailable: {type(exc).__name__}\n", status_code=503)
    return PlainTextResponse("ok\n")
