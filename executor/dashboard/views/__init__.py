"""The HTML pages (Starlette routes, Jinja2 templates) and the helpers they share."""

from __future__ import annotations

from starlette.routing import Route

from executor.dashboard.views import pages


def routes() -> list[Route]:
    return [
        Route("/", pages.home, include_in_schema=False),
        Route("/login", pages.login_page, methods=["GET"]),
        Route("/login", pages.login_action, methods=["POST"]),
        Route("/logout", pages.logout_action, methods=["POST"]),
        Route("/runs", pages.runs_page),
        Route("/runs/{run_id}", pages.run_page),
        Route("/runs/{run_id}/steps/{step_key}/retry", pages.retry_action, methods=["POST"]),
        Route("/runs/{run_id}/{action}", pages.run_action, methods=["POST"]),
        Route("/failed", pages.failed_page),
        Route("/failed/retry", pages.bulk_confirm_page, methods=["GET"]),
        Route("/failed/retry", pages.bulk_retry_action, methods=["POST"]),
        Route("/drops", pages.drops_page),
        Route("/queues", pages.queues_page),
    ]
