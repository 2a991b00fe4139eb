"""Filters from query strings, shared by the pages and the JSON API."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request

from executor.commands.state import DROP_REASONS, RUN_STATUSES, RUN_TERMINAL
from executor.dashboard import queries
from executor.dashboard.views.common import BadParameter, text_param, time_param

RUN_STATUS_GROUPS = {"active": tuple(s for s in RUN_STATUSES if s not in RUN_TERMINAL)}
"""`active`: every run not yet ended, queued ones (waiting for a key's slot) included."""


def run_filter(params: Any) -> queries.RunFilter:
    status = text_param(params, "status", 40)
    statuses: tuple[str, ...] = ()
    if status:
        statuses = RUN_STATUS_GROUPS.get(status, (status,))
        if any(s not in RUN_STATUSES for s in statuses):
            raise BadParameter(f"unknown run status {status!r}")
    return queries.RunFilter(
        statuses=statuses,
        workflow=text_param(params, "workflow", 200),
        concurrency_key=text_param(params, "concurrency_key", 500),
        created_from=time_param(params, "from"),
        created_to=time_param(params, "to"),
        run_id_prefix=text_param(params, "q", 200),
    )


def failed_filter(params: Any) -> queries.FailedFilter:
    return queries.FailedFilter(
        workflow=text_param(params, "workflow", 200),
        step_key=text_param(params, "step_key", 200),
        run_id=text_param(params, "run_id", 200),
        failed_from=time_param(params, "from"),
        failed_to=time_param(params, "to"),
        error_contains=text_param(params, "error", 200),
    )


def drop_filter(params: Any) -> queries.DropFilter:
    reason = text_param(params, "reason", 40)
    if reason and reason not in DROP_REASONS:
        raise BadParameter(f"unknown drop reason {reason!r}")
    return queries.DropFilter(
        reason=reason,
        command_type=text_param(params, "command_type", 40),
        run_id=text_param(params, "run_id", 200),
        received_from=time_param(params, "from"),
    )


FILTER_KEYS = {
    "runs": ("status", "workflow", "concurrency_key", "from", "to", "q", "limit"),
    "failed": ("workflow", "step_key", "run_id", "from", "to", "error", "limit"),
    "drops": ("reason", "command_type", "run_id", "from", "limit"),
}


def filters_of(request: Request, page: str) -> dict[str, str]:
    return {k: request.query_params[k] for k in FILTER_KEYS[page] if request.query_params.get(k)}
