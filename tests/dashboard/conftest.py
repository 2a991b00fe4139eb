"""The dashboard against the real ledger: a real Postgres, Redis and `executor.Client`.

Data is made through the committing handler (`Ledger.apply`), never by INSERT, so every page
shows states the executor can really reach.
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from support.web import TestClient

from executor.client import Client
from executor.commands.models import (
    CompleteStep,
    CreateRun,
    FailStep,
    StartRun,
    StartStep,
    StepSpec,
)
from executor.dashboard.app import create_app
from executor.dashboard.settings import DashboardSettings
from executor.ledger.handler import Ledger

VIEWER = "viewer-token-0123456789abcdef"
OPERATOR = "operator-token-0123456789abcdef"
XSS = '<script>alert("pwned")</script>'
TRACEBACK = f'Traceback (most recent call last):\n  File "flow.py", line 3\nValueError: {XSS}'


@dataclass
class Seeder:
    """Makes runs in given states through the handler."""

    ledger: Ledger

    def run(
        self,
        workflow: str = "orders",
        *,
        steps: tuple[StepSpec, ...] | None = None,
        concurrency_key: str | None = None,
        run_id: str | None = None,
    ) -> str:
        """A running run whose root steps are queued."""
        run_id = run_id or f"run-{uuid.uuid4().hex[:12]}"
        steps = steps or (
            StepSpec(step_key="fetch", max_attempts=1),
            StepSpec(step_key="charge", depends_on=("fetch",), max_attempts=2),
            StepSpec(step_key="ship", depends_on=("charge",)),
        )
        self.ledger.apply(
            CreateRun(
                run_id=run_id,
                workflow=workflow,
                input={"order": 42},
                concurrency_key=concurrency_key,
                idempotency_key=f"create:{run_id}",
            )
        )
        out = self.ledger.apply(StartRun(run_id=run_id, workflow=workflow, steps=steps))
        assert out.applied, out
        return run_id

    def start(self, run_id: str, step_key: str, attempt: int) -> None:
        out = self.ledger.apply(StartStep(run_id=run_id, step_key=step_key, attempt=attempt))
        assert out.applied, out

    def complete(self, run_id: str, step_key: str, attempt: int, output: Any = None) -> None:
        self.start(run_id, step_key, attempt)
        out = self.ledger.apply(
            CompleteStep(
                fence="f",
                run_id=run_id,
                step_key=step_key,
                attempt=attempt,
                output=output or {"ok": True},
            )
        )
        assert out.applied, out

    def fail(
        self,
        run_id: str,
        step_key: str,
        attempt: int,
        error: str = XSS,
        traceback: str | None = TRACEBACK,
    ) -> None:
        self.start(run_id, step_key, attempt)
        out = self.ledger.apply(
            FailStep(
                fence="f",
                run_id=run_id,
                step_key=step_key,
                attempt=attempt,
                error=error,
                error_type="ValueError",
                traceback=traceback,
                retryable=False,
            )
        )
        assert out.applied, out

    def failed_run(self, workflow: str = "orders", **kwargs: Any) -> str:
        """A failed run: `fetch` failed terminally with an error that contains `<script>`."""
        run_id = self.run(workflow, **kwargs)
        self.fail(run_id, "fetch", 1)
        return run_id

    def completed_run(self, workflow: str = "orders") -> str:
        run_id = self.run(workflow)
        for key in ("fetch", "charge", "ship"):
            self.complete(run_id, key, 1)
        return run_id


@pytest.fixture
def seed(pool: Any) -> Seeder:
    return Seeder(Ledger(pool))


@pytest.fixture
def settings(db_url: str, redis_url: str) -> DashboardSettings:
    return DashboardSettings(
        database_url=db_url,
        redis_url=redis_url,
        viewer_tokens=(VIEWER,),
        operator_tokens=(OPERATOR,),
        page_size=50,
        metrics_cache_seconds=0.0,
    )


@pytest.fixture
def executor_client(db_url: str, redis_url: str) -> Iterator[Client]:
    client = Client(database_url=db_url, redis_url=redis_url)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def app(settings: DashboardSettings, executor_client: Client) -> Any:
    return create_app(settings, backend=executor_client)


@pytest.fixture
def web(app: Any) -> Iterator[TestClient]:
    """An anonymous browser (cookies kept between requests)."""
    with TestClient(app, base_url="http://127.0.0.1", follow_redirects=False) as client:
        yield client


@pytest.fixture
def viewer(web: TestClient) -> TestClient:
    web.headers["Authorization"] = f"Bearer {VIEWER}"
    return web


@pytest.fixture
def operator(web: TestClient) -> TestClient:
    web.headers["Authorization"] = f"Bearer {OPERATOR}"
    return web


_CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')
_KEY = re.compile(r'name="idempotency_key" value="([^"]+)"')


def csrf_of(html: str) -> str:
    match = _CSRF.search(html)
    assert match, "no CSRF token in the page"
    return match.group(1)


def keys_of(html: str) -> list[str]:
    return _KEY.findall(html)


def login(client: TestClient, token: str) -> None:
    page = client.get("/login")
    assert page.status_code == 200
    response = client.post(
        "/login", data={"token": token, "csrf_token": csrf_of(page.text), "next": "/runs"}
    )
    assert response.status_code == 303, response.text
    assert response.headers["location"] == "/runs"


@pytest.fixture
def operator_browser(web: TestClient) -> TestClient:
    """Logged in with the operator token through the login form (session cookie)."""
    login(web, OPERATOR)
    return web


@contextlib.contextmanager
def live_server(settings: DashboardSettings) -> Iterator[str]:
    """The dashboard under a real uvicorn on a free loopback port, stopped on exit."""
    import uvicorn

    client = Client(database_url=settings.database_url, redis_url=settings.redis_url)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    config = uvicorn.Config(
        create_app(settings, backend=client),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        lifespan="on",
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)
        client.close()
