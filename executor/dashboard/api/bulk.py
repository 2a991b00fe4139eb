"""`POST /api/retry`: bulk retry of failed steps, by an explicit filter or `"all": true`.

A body is required, and so is a filter or `all` (an empty request retries nothing). Say
`"dry_run": true` first to learn how many steps it would retry and which; then send the same
filter with `"expect": <that count>` and nothing is retried if the set changed meanwhile.
Each step is retried with a key derived from the request's `idempotency_key`, so sending the
same request twice retries each step once.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Body, Response
from starlette.concurrency import run_in_threadpool

from executor.dashboard import queries
from executor.dashboard.actions import CountChanged, InvalidAction, new_key
from executor.dashboard.api.routing import WRITE_RESPONSES, Context, Operator, area_router
from executor.dashboard.api.schemas import (
    BulkPreview,
    BulkResult,
    BulkRetryRequest,
    ErrorBody,
)
from executor.dashboard.views.common import BadParameter, json_error
from executor.dashboard.views.filters import failed_filter

router = area_router(tags=["retry"])


@router.post(
    "/api/retry",
    response_model=BulkPreview | BulkResult,
    responses={
        **WRITE_RESPONSES,
        409: {"model": ErrorBody, "description": "`expect` differs from what the filter matches."},
        503: {"model": BulkResult | ErrorBody, "description": "Some retries failed on the ledger."},
    },
    summary="Retry every failed step a filter matches (preview with dry_run)",
)
async def bulk_retry(
    ctx: Context,
    principal: Operator,
    response: Response,
    body: Annotated[BulkRetryRequest, Body()],
) -> Any:
    cap = ctx.settings.bulk_retry_limit
    limit = body.limit or cap
    if limit > cap:
        raise BadParameter(f"limit must be at most {cap}")
    f = (
        queries.FailedFilter()
        if body.all
        else failed_filter(body.filter.as_params() if body.filter else {})
    )
    if body.dry_run:
        steps = await run_in_threadpool(queries.retryable_failed_steps, ctx.pool, f, limit)
        return BulkPreview(
            matched=len(steps), limit=limit, truncated=len(steps) >= limit, steps=steps
        )
    key = body.idempotency_key or new_key("bulk-retry")
    try:
        result = await run_in_threadpool(
            lambda: ctx.actions.bulk_retry(principal, f, key, limit, expect=body.expect)
        )
    except CountChanged as exc:
        return json_error(409, "count_changed", str(exc), matched=exc.matched)
    except InvalidAction as exc:
        raise BadParameter(str(exc)) from exc
    response.status_code = 200 if not result.errors else 503
    return BulkResult.model_validate(result.to_json())
