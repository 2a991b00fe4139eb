"""A real Chromium against a real uvicorn server: log in, find a failed step, retry it, watch
it complete without reloading the page; approve a waiting step and watch the run finish.

Needs Debian's Chromium (`apt-get install chromium`) and the `playwright` package; never runs
`playwright install`. Skipped locally when either is missing, failed under CI.
Set DASHBOARD_SCREENSHOTS_DIR (e.g. `docs/screenshots`) to keep the screenshots it takes.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from executor.client import Client
from executor.commands.models import CompleteStep, StartStep
from executor.dashboard.auth import TokenAuthority
from executor.dashboard.settings import DashboardSettings

from .conftest import OPERATOR, VIEWER, Seeder, live_server
from .scenario import populate

pytestmark = pytest.mark.browser

HERE = Path(__file__).resolve().parent

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in {"", "0", "false", "no"}


def _chromium() -> str:
    for candidate in (
        "/usr/bin/chromium",
        shutil.which("chromium"),
        shutil.which("chromium-browser"),
    ):
        if candidate and Path(candidate).exists():
            return candidate
    message = "Chromium is not installed (apt-get install chromium)"
    if _in_ci():
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@pytest.fixture
def server(db_url: str, redis_url: str) -> Iterator[str]:
    """The dashboard under uvicorn on a free loopback port, refreshing every second."""
    settings = DashboardSettings(
        database_url=db_url,
        redis_url=redis_url,
        viewer_tokens=(VIEWER,),
        operator_tokens=(OPERATOR,),
        refresh_seconds=1.0,
    )
    with live_server(settings) as url:
        yield url


@pytest.fixture
def browser() -> Iterator[Any]:
    executable = _chromium()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if _in_ci():
            pytest.fail("the playwright package is not installed", pytrace=False)
        pytest.skip("the playwright package is not installed")
    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def worker(db_url: str, redis_url: str, tmp_path: Path, redis: Any) -> Iterator[Path]:
    """One real `executor worker` process that knows `dash_gate` and `t_onboard`."""
    from rq import Worker

    env = {k: v for k, v in os.environ.items() if not k.startswith("EXECUTOR_")}
    env |= {
        "EXECUTOR_DATABASE_URL": db_url,
        "EXECUTOR_REDIS_URL": redis_url,
        "EXECUTOR_WORKFLOW_MODULES": "gate_workflow,workflows_for_tests",
        "EXECUTOR_SWEEP_INTERVAL": "0.5",
        "PYTHONPATH": os.pathsep.join(
            p for p in (str(HERE), str(HERE.parent / "transport"), env.get("PYTHONPATH", "")) if p
        ),
    }
    log = tmp_path / "worker.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "executor", "worker"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        deadline = time.monotonic() + 30
        while not Worker.all(connection=redis):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the worker did not start:\n{log.read_text(errors='replace')}")
            time.sleep(0.05)
        yield log
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    target = os.environ.get("DASHBOARD_SCREENSHOTS_DIR", "").strip()
    folder = Path(target) if target else tmp_path
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _watched_page(browser: Any) -> tuple[Any, list[str]]:
    """A page whose console errors and uncaught exceptions are collected (none expected)."""
    page = browser.new_page(viewport={"width": 1440, "height": 900})
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    return page, problems


def test_retry_a_failed_step_in_the_browser_and_watch_it_complete(
    server: str, browser: Any, seed: Seeder, shots: Path
) -> None:
    scenario = populate(seed)
    page, problems = _watched_page(browser)
    page.goto(f"{server}/runs")
    assert page.url.startswith(f"{server}/login")
    page.fill("#token", OPERATOR)
    page.click("button:has-text('Log in')")
    page.wait_for_url(f"{server}/runs")
    page.wait_for_selector("#runs-table tbody tr")
    page.wait_for_selector("#live-status[data-tone=ok]")
    page.screenshot(path=str(shots / "runs.png"))

    page.click("nav >> text=Drops")
    page.wait_for_selector("#drops-table")
    page.screenshot(path=str(shots / "drops.png"))

    page.click("nav >> text=Failed steps")
    page.wait_for_selector("#failed-table")
    page.screenshot(path=str(shots / "failed-steps.png"))

    page.goto(f"{server}/queues")
    page.wait_for_selector("text=Database pools")
    page.screenshot(path=str(shots / "queues.png"))

    run_id = scenario.failed_order
    page.goto(f"{server}/runs/{run_id}")
    page.wait_for_selector("svg.graph")
    page.screenshot(path=str(shots / "run-detail.png"), full_page=True)
    row = page.locator("#step-charge_card")
    assert "failed" in row.inner_text()
    assert "PaymentDeclined" in row.inner_text()

    # Retry: a confirmation dialog first; cancelling it changes nothing.
    row.locator("button:has-text('Retry')").click()
    dialog = page.locator("#confirm-dialog")
    dialog.wait_for(state="visible")
    assert "Retry step charge_card" in dialog.inner_text()
    page.screenshot(path=str(shots / "retry-confirm.png"))
    dialog.locator("button:has-text('Cancel')").click()
    assert "failed" in page.locator("#step-charge_card").inner_text()

    page.locator("#step-charge_card button:has-text('Retry')").click()
    dialog.locator("button:has-text('Confirm')").click()
    page.wait_for_selector(".flash-ok")
    assert "retried: step charge_card queued as attempt 3" in page.locator(".flash").inner_text()
    assert "queued" in page.locator("#step-charge_card").inner_text()

    # A worker runs the new attempt (here: the same commands a worker would send).
    assert seed.ledger.apply(StartStep(run_id=run_id, step_key="charge_card", attempt=3)).applied
    assert seed.ledger.apply(
        CompleteStep(
            fence="f", run_id=run_id, step_key="charge_card", attempt=3, output={"charged": 129.5}
        )
    ).applied
    # The page notices by itself: live refresh, no reload.
    page.wait_for_selector("#step-charge_card .badge:text-is('completed')", timeout=15_000)
    assert "queued" in page.locator("#step-ship").inner_text()
    page.screenshot(path=str(shots / "run-after-retry.png"), full_page=True)
    assert problems == [], problems


def test_viewer_sees_no_buttons_and_double_submit_retries_once(
    server: str, browser: Any, seed: Seeder
) -> None:
    run_id = seed.failed_run()
    viewer = browser.new_page()
    viewer.goto(f"{server}/login")
    viewer.fill("#token", VIEWER)
    viewer.click("button:has-text('Log in')")
    viewer.wait_for_url(f"{server}/runs")
    viewer.goto(f"{server}/runs/{run_id}")
    viewer.wait_for_selector("#step-fetch")
    assert viewer.locator("button:has-text('Retry')").count() == 0
    assert viewer.locator("text=<script>").count() >= 1  # the error is text, not markup

    page = browser.new_page()
    page.goto(f"{server}/login")
    page.fill("#token", OPERATOR)
    page.click("button:has-text('Log in')")
    page.wait_for_url(f"{server}/runs")
    page.goto(f"{server}/runs/{run_id}")
    form = page.locator("#step-fetch form")
    key = form.locator("input[name=idempotency_key]").get_attribute("value")
    # Submit the same rendered form twice, as a double click on a slow network would.
    page.evaluate(
        """() => {
            const form = document.querySelector('#step-fetch form');
            form.querySelector('input[name=confirmed]').value = '1';
            const a = new FormData(form);
            return Promise.all([1, 2].map(() =>
                fetch(form.action, {method: 'POST', body: a, redirect: 'manual'})));
        }"""
    )
    detail = seed.ledger.pool
    with detail.connection() as conn:
        rows = conn.execute(
            "SELECT count(*) AS n FROM executor.events WHERE run_id = %s AND type = 'step_queued'"
            " AND step_key = 'fetch' AND attempt = 2",
            (run_id,),
        ).fetchone()
        drops = conn.execute(
            "SELECT reason FROM executor.drops WHERE idempotency_key = %s", (key,)
        ).fetchall()
    assert rows is not None
    assert rows["n"] == 1
    assert [d["reason"] for d in drops] == ["duplicate"]


def test_a_real_worker_runs_the_step_retried_from_the_browser(
    server: str, browser: Any, worker: Path, db_url: str, redis_url: str, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    with Client(database_url=db_url, redis_url=redis_url) as client:
        run_id = client.start_run("dash_gate", {"gate": str(gate)})
        failed = client.wait(run_id, timeout=30)
        assert failed.status == "failed", worker.read_text(errors="replace")

        page = browser.new_page(viewport={"width": 1440, "height": 900})
        page.goto(f"{server}/login?next=/failed")
        page.fill("#token", OPERATOR)
        page.click("button:has-text('Log in')")
        page.wait_for_url(f"{server}/failed")
        row = page.locator("#failed-table tbody tr", has_text=run_id[:20])
        assert "gate closed" in row.inner_text()
        assert "<script>alert(1)</script>" in row.inner_text()  # shown as text

        gate.write_text("fixed by the operator")  # the operator fixes the cause first
        row.locator("button:has-text('Retry')").click()
        page.locator("#confirm-dialog button:has-text('Confirm')").click()
        page.wait_for_selector(".flash-ok")
        assert "retried: step open_gate queued as attempt 2" in page.locator(".flash").inner_text()

        page.goto(f"{server}/runs/{run_id}")
        # The worker runs attempt 2 and then `finish`; the page follows without a reload.
        page.wait_for_selector(".run-title .badge:text-is('completed')", timeout=30_000)
        assert "completed" in page.locator("#step-open_gate").inner_text()
        done = client.wait(run_id, timeout=5)
        assert done.status == "completed"
        steps = {s.step_key: s for s in done.steps}
        assert steps["open_gate"].attempt == 2
        assert steps["open_gate"].output == {
            "opened_on_attempt": 2,
            "note": "fixed by the operator",
        }


def _wait_for_step(client: Client, run_id: str, key: str, status: str, log: Path) -> None:
    """Until the worker has brought `key` to `status` (bounded; every read is one query)."""
    deadline = time.monotonic() + 30
    while True:
        view = client.get_run(run_id)
        assert view is not None
        steps = {s.step_key: s for s in view.steps}
        if key in steps and steps[key].status == status:
            return
        if time.monotonic() > deadline or view.done:
            pytest.fail(f"{key} never became {status}: {view}\n{log.read_text(errors='replace')}")
        time.sleep(0.1)


def test_an_operator_approves_a_waiting_step_and_a_real_worker_finishes_the_run(
    server: str, browser: Any, worker: Path, db_url: str, redis_url: str, shots: Path
) -> None:
    with Client(database_url=db_url, redis_url=redis_url) as client:
        run_id = client.start_run("t_onboard", {"n": 3})
        _wait_for_step(client, run_id, "approval", "waiting", worker)

        page, problems = _watched_page(browser)
        page.goto(f"{server}/login?next=/runs/{run_id}")
        page.fill("#token", OPERATOR)
        page.click("button:has-text('Log in')")
        page.wait_for_url(f"{server}/runs/{run_id}")
        wait_row = page.locator("#wait-approval")
        assert "Event approved for step approval" in wait_row.inner_text()
        assert "waits for event approved" in page.locator("#step-approval").inner_text()
        assert "3 completed" in page.locator("#items-provision").inner_text()
        page.screenshot(path=str(shots / "approval.png"), full_page=True)

        wait_row.locator("button:has-text('Approve')").click()
        dialog = page.locator("#confirm-dialog")
        dialog.wait_for(state="visible")
        assert "Approve step approval" in dialog.inner_text()
        page.screenshot(path=str(shots / "approval-confirm.png"))
        dialog.locator("button:has-text('Confirm')").click()
        page.wait_for_selector(".flash-ok")
        assert "sent: the event completed step approval" in page.locator(".flash").inner_text()

        # The worker starts the child run, which bills, and then `welcome`; the page follows.
        page.wait_for_selector(".run-title .badge:text-is('completed')", timeout=30_000)
        done = client.wait(run_id, timeout=5)
        assert done.status == "completed", worker.read_text(errors="replace")
        approved_by = f"approved by dashboard:operator:{TokenAuthority.fingerprint(OPERATOR)}"
        steps = {s.step_key: s for s in done.steps}
        assert steps["approval"].output == approved_by
        invoice = {"bill": {"billed": approved_by}}  # the child run's output
        assert done.output == {"welcome": {"accounts": 3, "invoice": invoice}}
        child = steps["invoice"].child_run_id
        assert child is not None
        page.locator(f"#step-invoice a[href='/runs/{child}']").click()
        page.wait_for_selector("#parent-link")
        assert page.locator(".run-title .badge").inner_text() == "completed"
        page.screenshot(path=str(shots / "child-run.png"), full_page=True)
        assert problems == [], problems
