"""The Schedules page, and its operator buttons: pause, resume, trigger, delete."""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from executor.dashboard import queries, schedules
from executor.dashboard.actions import new_key
from executor.dashboard.auth import Role, require
from executor.dashboard.views.common import ctx, is_live, render, safe_next, set_flash
from executor.dashboard.views.forms import confirm, field, form_key, operator_form
from executor.schedules import store

_QUESTIONS = {
    "pause": ("Pause schedule {}? No tick starts until it is resumed.", False),
    "resume": ("Resume schedule {}? It ticks again from its next tick.", False),
    "trigger": ("Start one run of schedule {} now, outside its ticks?", False),
    "delete": ("Delete schedule {}? The runs it started stay. This cannot be undone.", True),
}


def schedules_page(request: Request) -> Response:
    principal = require(request, Role.VIEWER)
    c = ctx(request)
    found = store.list_all(c.pool)
    keys = {s.name: new_key("trigger") for s in found} if principal.can(Role.OPERATOR) else {}
    context = {
        "schedules": found,
        "keys": keys,
        "live_url": "/schedules",
        "failed_count": queries.count_failed_steps(c.pool),
    }
    return render(
        request, "_schedules_live.html" if is_live(request) else "schedules.html", context
    )


async def schedule_action(request: Request) -> Response:
    _, form = await operator_form(request)
    name = request.path_params["name"]
    action = request.path_params["action"]
    if action not in schedules.ACTIONS:
        return render(
            request, "error.html", {"title": "Not found", "message": action}, status_code=404
        )
    if field(form, "confirmed") != "1":
        question, danger = _QUESTIONS[action]
        return confirm(
            request,
            form,
            f"{action.capitalize()} schedule",
            question.format(name),
            danger=danger,
        )
    key = form_key(form, "trigger") if action == "trigger" else None
    result = await run_in_threadpool(schedules.act, ctx(request), action, name, key)
    response = RedirectResponse(safe_next(field(form, "next"), "/schedules"), status_code=303)
    set_flash(request, response, result.level, result.message, key=result.idempotency_key or "")
    return response
