"""The HTML pages (Starlette routes, Jinja2 templates) and the helpers they share.

pages.py      what an operator reads: runs, one run, a map's items, failed steps,
              drops, concurrency keys, queues
forms.py      the buttons' form actions: retry, bulk retry, cancel, pause, resume,
              send an event
schedules.py  the Schedules page and its buttons
login.py      log in, log out
"""

from __future__ import annotations

from starlette.routing import Route

from executor.dashboard.views import forms, login, pages, schedules


def routes() -> list[Route]:
    return [
        Route("/", pages.home, include_in_schema=False),
        Route("/login", login.login_page, methods=["GET"]),
        Route("/login", login.login_action, methods=["POST"]),
        Route("/logout", login.logout_action, methods=["POST"]),
        Route("/runs", pages.runs_page),
        Route("/runs/{run_id}", pages.run_page),
        Route("/runs/{run_id}/steps/{step_key}/retry", forms.retry_action, methods=["POST"]),
        Route("/runs/{run_id}/steps/{step_key}/items", pages.items_page, methods=["GET"]),
        Route("/runs/{run_id}/events/{event}", forms.event_action, methods=["POST"]),
        Route("/runs/{run_id}/{action}", forms.run_action, methods=["POST"]),
        Route("/failed", pages.failed_page),
        Route("/failed/retry", forms.bulk_confirm_page, methods=["GET"]),
        Route("/failed/retry", forms.bulk_retry_action, methods=["POST"]),
        Route("/drops", pages.drops_page),
        Route("/keys", pages.keys_page),
        Route("/schedules", schedules.schedules_page),
        Route("/schedules/{name}/{action}", schedules.schedule_action, methods=["POST"]),
        Route("/queues", pages.queues_page),
    ]
