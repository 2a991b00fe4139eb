"""The retry dashboard: find what failed and why, retry it, watch queues and workers.

`executor dashboard` calls `serve()`; tests and embedders call `create_app(settings)`.
See docs/dashboard.md for the pages, the API, the auth model and the metrics.
"""

from executor.dashboard.settings import DashboardSettings

__all__ = ["DashboardSettings", "create_app", "serve"]


def __getattr__(name: str) -> object:
    # Starlette, Jinja2 and uvicorn are the optional `dashboard` extra: import them only
    # when the dashboard is actually used.
    if name in ("create_app", "serve"):
        from executor.dashboard import app

        return getattr(app, name)
    raise AttributeError(name)
