"""The dashboard's JSON API on FastAPI: one router per area, one file each.

    runs.py      GET /api/runs, GET /api/runs/{run_id}, POST …/cancel|pause|resume,
                 POST /api/runs/{run_id}/steps/{step_key}/retry
    bulk.py      POST /api/retry
    monitor.py   GET /api/failed-steps, /api/drops, /api/queues, /api/me, /metrics, /healthz
    sessions.py  DELETE /api/sessions ("log out everywhere")

A new area (events sent to runs, hook URLs, schedules) is a new file with
`router = area_router(tags=[...])` and routes taking `Viewer`/`Operator` (auth, CSRF) and
`Context` (pools, actions) from `routing`, added to `ROUTERS` below; the OpenAPI description
at /api/openapi.json picks it up from its models.
"""

from __future__ import annotations

from fastapi import APIRouter

from executor.dashboard.api import bulk, monitor, runs, sessions

ROUTERS: tuple[APIRouter, ...] = (runs.router, bulk.router, monitor.router, sessions.router)
