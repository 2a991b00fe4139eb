"""Concurrency keys in use: each key's limit, holders and queue (oldest first)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Query
from pydantic import BaseModel, Field

from executor.dashboard.api.routing import Context, Viewer, area_router
from executor.dashboard.api.schemas import NO_NUL
from executor.dashboard.keys import HOLDERS_SHOWN, QUEUED_SHOWN, ConcurrencyKey, keys_in_use

router = area_router(tags=["runs"])


class KeysBody(BaseModel):
    keys: list[ConcurrencyKey] = Field(
        description=f"By key. At most {HOLDERS_SHOWN} holders (by slot) and the "
        f"{QUEUED_SHOWN} oldest queued runs of each; `holding` and `queued_total` count all."
    )
    next: str | None = Field(description="Pass as `after` for the next page of keys.")


@router.get(
    "/api/concurrency-keys",
    response_model=KeysBody,
    summary="Concurrency keys some run holds or waits for",
)
def concurrency_keys(
    ctx: Context,
    _: Viewer,
    key: Annotated[
        str | None, Query(max_length=500, pattern=NO_NUL, description="Only this key.")
    ] = None,
    after: Annotated[
        str | None, Query(max_length=500, pattern=NO_NUL, description="Keys after this one.")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=200, description="Keys per page.")] = 50,
) -> KeysBody:
    page = keys_in_use(ctx.pool, key=key or None, after=after or None, limit=limit)
    return KeysBody(keys=page.keys, next=page.next)
