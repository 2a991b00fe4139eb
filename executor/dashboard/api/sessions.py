"""Browser sessions: an operator ends all of them at once ("log out everywhere").

For a leaked cookie or a departing colleague: every logged-in browser, this one included,
must log in again; bearer tokens are unaffected (remove a token from the configuration for
that).
"""

from __future__ import annotations

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from executor.dashboard.api.routing import WRITE_RESPONSES, Context, Operator, area_router
from executor.dashboard.api.schemas import SessionsEnded

router = area_router(tags=["sessions"])


@router.delete(
    "/api/sessions",
    response_model=SessionsEnded,
    responses=WRITE_RESPONSES,
    summary="Log out everywhere: end every browser session",
)
async def end_all_sessions(request: Request, ctx: Context, _: Operator) -> SessionsEnded:
    store = ctx.sessions.store
    ended = 0 if store is None else await run_in_threadpool(store.delete_all)
    request.state.set_session = ctx.sessions.anonymous()
    return SessionsEnded(ended=ended)
