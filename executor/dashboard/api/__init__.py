"""The dashboard's JSON API on FastAPI: one router per area, one file each.

    runs.py       GET /api/runs, GET /api/runs/{run_id}, POST …/cancel|pause|resume,
                  POST /api/runs/{run_id}/steps/{step_key}/retry,
                  GET /api/runs/{run_id}/steps/{step_key}/items (a map's items)
    events.py     POST /api/runs/{run_id}/events/{event}; POST /hooks/{token} (no token
                  or session: the hook's own token is its credential)
    schedules.py  GET|POST /api/schedules, GET|DELETE /api/schedules/{name},
                  POST /api/schedules/{name}/pause|resume|trigger
    keys.py       GET /api/concurrency-keys
    bulk.py       POST /api/retry
    monitor.py    GET /api/failed-steps, /api/drops, /api/queues, /api/me, /metrics, /healthz
    sessions.py   DELETE /api/sessions ("log out everywhere")

A new area is a new file with `router = area_router(tags=[...])` and routes taking
`Viewer`/`Operator` (auth, CSRF) and `Context` (pools, actions) from `routing`, added to
`ROUTERS` below; the OpenAPI description at /api/openapi.json picks it up from its models.
"""

from __future__ import annotations

from fastapi import APIRouter

from executor.dashboard.api import bulk, events, keys, monitor, runs, schedules, sessions

ROUTERS: tuple[APIRouter, ...] = (
    runs.router,
    events.router,
    events.hooks_router,
    schedules.router,
    keys.router,
    bulk.router,
    monitor.router,
    sessions.router,
)
