"""Retry, bulk retry, cancel, pause and resume: one command each, through the one handler."""

from __future__ import annotations

from typing import Any

import psycopg
from prometheus_client import CONTENT_TYPE_LATEST
from redis import Redis
from starlette.testclient import TestClient

from executor.dashboard.sessions import FLASH_COOKIE

from .conftest import OPERATOR, Seeder, csrf_of, keys_of


def _step(client: TestClient, run_id: str, key: str) -> dict[str, Any]:
    steps = client.get(f"/api/runs/{run_id}").json()["steps"]
    return next(s for s in steps if s["step_key"] == key)


def _events(db_url: str, run_id: str, type_: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(db_url) as conn:
        return conn.execute(
            "SELECT seq, step_key, attempt, idempotency_key FROM executor.events"
            " WHERE run_id = %s AND type = %s ORDER BY seq",
            (run_id, type_),
        ).fetchall()


def test_api_retry_with_the_same_key_twice_applies_once(
    operator: TestClient, seed: Seeder, db_url: str, redis: Redis
) -> None:
    run_id = seed.failed_run()
    url = f"/api/runs/{run_id}/steps/fetch/retry"
    first = operator.post(url, json={"idempotency_key": "ops-retry-1"})
    again = operator.post(url, headers={"Idempotency-Key": "ops-retry-1"})
    assert first.status_code == 200
    assert first.json()["applied"] is True
    assert first.json()["run_status"] == "running"
    assert "queued as attempt 2" in first.json()["message"]
    assert again.status_code == 200
    assert again.json()["applied"] is False
    assert again.json()["reason"] == "duplicate"
    assert again.json()["message"].startswith("dropped: already submitted")
    step = _step(operator, run_id, "fetch")
    assert (step["status"], step["attempt"]) == ("queued", 2)
    queued = _events(db_url, run_id, "step_queued")
    assert [(q[1], q[2], q[3]) for q in queued if q[2] == 2] == [("fetch", 2, "ops-retry-1")]
    assert len(_events(db_url, run_id, "run_resumed")) == 1
    # The follow-up StartStep went to Redis, so a worker would really run attempt 2.
    assert redis.llen("rq:queue:default") == 1
    # The retry is recorded with who asked for it.
    with psycopg.connect(db_url) as conn:
        row = conn.execute(
            "SELECT command->>'requested_by' FROM executor.receipts WHERE idempotency_key = %s",
            ("ops-retry-1",),
        ).fetchone()
    assert row is not None
    assert row[0].startswith("dashboard:operator:")


def test_a_second_retry_with_a_new_key_says_already_retried(
    operator: TestClient, seed: Seeder
) -> None:
    run_id = seed.failed_run()
    url = f"/api/runs/{run_id}/steps/fetch/retry"
    assert operator.post(url, json={"attempt": 1}).json()["applied"] is True
    late = operator.post(url, json={"attempt": 1})
    assert late.status_code == 409
    body = late.json()
    assert body["reason"] == "invalid_transition"
    assert body["message"] == "dropped: already retried — step fetch is queued at attempt 2"


def test_double_clicking_the_retry_form_retries_once(
    operator_browser: TestClient, seed: Seeder, db_url: str
) -> None:
    run_id = seed.failed_run()
    page = operator_browser.get(f"/runs/{run_id}").text
    csrf = csrf_of(page)
    (retry_key,) = [k for k in keys_of(page) if k.startswith("dashboard:retry:")]
    form = {
        "csrf_token": csrf,
        "idempotency_key": retry_key,
        "attempt": "1",
        "confirmed": "1",
        "next": f"/runs/{run_id}",
    }
    url = f"/runs/{run_id}/steps/fetch/retry"
    first = operator_browser.post(url, data=form)
    assert first.status_code == 303
    assert first.headers["location"] == f"/runs/{run_id}"
    shown = operator_browser.get(f"/runs/{run_id}").text
    assert "retried: step fetch queued as attempt 2" in shown
    assert FLASH_COOKIE not in operator_browser.cookies  # one-shot
    second = operator_browser.post(url, data=form)
    assert second.status_code == 303
    assert "dropped: already submitted" in operator_browser.get(f"/runs/{run_id}").text
    assert len([e for e in _events(db_url, run_id, "step_queued") if e[2] == 2]) == 1


def test_an_unconfirmed_form_asks_first_and_changes_nothing(
    operator_browser: TestClient, seed: Seeder
) -> None:
    run_id = seed.failed_run()
    page = operator_browser.get(f"/runs/{run_id}").text
    response = operator_browser.post(
        f"/runs/{run_id}/steps/fetch/retry",
        data={"csrf_token": csrf_of(page), "idempotency_key": "k-unconfirmed", "confirmed": "0"},
    )
    assert response.status_code == 200
    assert "Retry step fetch of run" in response.text
    assert 'name="confirmed" value="1"' in response.text
    assert 'value="k-unconfirmed"' in response.text
    assert _step(operator_browser, run_id, "fetch")["status"] == "failed"


def test_retry_is_refused_when_another_run_took_the_concurrency_key(
    operator: TestClient, seed: Seeder
) -> None:
    failed = seed.failed_run(concurrency_key="workdir-1")
    holder = seed.run(concurrency_key="workdir-1")
    response = operator.post(f"/api/runs/{failed}/steps/fetch/retry", json={})
    assert response.status_code == 409
    body = response.json()
    assert body["reason"] == "concurrency_key_taken"
    assert body["holder_run_id"] == holder
    assert holder in body["message"]
    assert _step(operator, failed, "fetch")["status"] == "failed"


def test_pause_resume_cancel_through_the_api(operator: TestClient, seed: Seeder) -> None:
    run_id = seed.run()
    base = f"/api/runs/{run_id}"
    paused = operator.post(f"{base}/pause", json={"reason": "deploy"})
    assert paused.status_code == 200
    assert paused.json()["run_status"] == "paused"
    assert operator.post(f"{base}/pause", json={}).status_code == 409
    resumed = operator.post(f"{base}/resume", json={})
    assert resumed.json()["run_status"] == "running"
    cancelled = operator.post(f"{base}/cancel", json={"reason": "bad input"})
    assert cancelled.status_code == 200
    assert cancelled.json()["run_status"] == "cancelled"
    again = operator.post(f"{base}/cancel", json={})
    assert again.status_code == 409
    assert again.json()["reason"] == "terminal"
    run = operator.get(base).json()
    assert run["run"]["status"] == "cancelled"
    assert {s["status"] for s in run["steps"]} == {"cancelled"}
    event = next(e for e in run["events"] if e["type"] == "run_cancelled")
    assert event["payload"]["reason"].startswith("bad input (by dashboard:operator:")


def test_cancel_pause_resume_through_the_forms(operator_browser: TestClient, seed: Seeder) -> None:
    run_id = seed.run()

    def act(action: str, reason: str = "") -> str:
        page = operator_browser.get(f"/runs/{run_id}").text
        key = next(k for k in keys_of(page) if k.startswith(f"dashboard:{action}:"))
        response = operator_browser.post(
            f"/runs/{run_id}/{action}",
            data={
                "csrf_token": csrf_of(page),
                "idempotency_key": key,
                "confirmed": "1",
                "reason": reason,
            },
        )
        assert response.status_code == 303
        return operator_browser.get(f"/runs/{run_id}").text

    assert "paused: nothing more of this run is dispatched" in act("pause", "maintenance")
    assert "resumed: the run is running again" in act("resume")
    page = act("cancel", "<b>wrong</b> order")
    assert "cancelled: the run and its unfinished steps are cancelled" in page
    assert "&lt;b&gt;wrong&lt;/b&gt; order" in page
    assert "Cancel run" not in page.split("Step graph")[0]


def test_actions_on_unknown_runs_and_bad_ids(operator: TestClient) -> None:
    missing = operator.post("/api/runs/no-such-run/cancel", json={})
    assert missing.status_code == 404
    assert missing.json()["reason"] == "unknown_entity"
    bad = operator.post("/api/runs/bad%20id/cancel", json={})
    assert bad.status_code == 422
    assert operator.post("/api/runs/x/explode", json={}).status_code == 404
    assert operator.post("/api/runs/x/cancel", content=b"[1]").status_code == 422
    assert operator.post("/api/runs/x/cancel", content=b"{nope").status_code == 422


def test_bulk_retry_by_filter_applies_each_step_once(
    operator: TestClient, seed: Seeder, db_url: str
) -> None:
    orders = [seed.failed_run("orders") for _ in range(3)]
    billing = seed.failed_run("billing")
    preview = operator.post(
        "/api/retry", json={"filter": {"workflow": "orders"}, "dry_run": True}
    ).json()
    assert preview["matched"] == 3
    body = {"filter": {"workflow": "orders"}, "idempotency_key": "bulk-1"}
    first = operator.post("/api/retry", json=body).json()
    assert (first["matched"], first["applied"], first["dropped"]) == (3, 3, {})
    # The same request again: every step is already retried, and nothing is applied twice.
    second = operator.post("/api/retry", json=body).json()
    assert second["applied"] == 0
    assert second["matched"] == 0
    for run_id in orders:
        assert _step(operator, run_id, "fetch")["attempt"] == 2
    assert _step(operator, billing, "fetch")["status"] == "failed"
    assert operator.post("/api/retry", json={"filter": {"nope": "x"}}).status_code == 422
    assert operator.post("/api/retry", json={"limit": 0}).status_code == 422


def test_bulk_retry_replayed_while_steps_are_failed_again_is_dropped_as_duplicate(
    operator: TestClient, seed: Seeder
) -> None:
    run_id = seed.failed_run()
    body = {"filter": {"run_id": run_id}, "idempotency_key": "bulk-2"}
    assert operator.post("/api/retry", json=body).json()["applied"] == 1
    seed.fail(run_id, "fetch", 2)
    replay = operator.post("/api/retry", json=body).json()
    assert replay["applied"] == 0
    assert replay["dropped"] == {"duplicate": 1}
    assert _step(operator, run_id, "fetch")["attempt"] == 2


def test_bulk_retry_through_the_confirmation_page(
    operator_browser: TestClient, seed: Seeder
) -> None:
    runs = [seed.failed_run("orders") for _ in range(2)]
    failed = operator_browser.get("/failed?workflow=orders").text
    assert "/failed/retry?workflow=orders" in failed
    confirm = operator_browser.get("/failed/retry?workflow=orders")
    assert confirm.status_code == 200
    assert "Retry 2 failed steps?" in confirm.text
    form = {
        "csrf_token": csrf_of(confirm.text),
        "idempotency_key": next(k for k in keys_of(confirm.text) if "bulk-retry" in k),
        "confirmed": "1",
        "workflow": "orders",
    }
    done = operator_browser.post("/failed/retry", data=form)
    assert done.status_code == 303
    assert done.headers["location"] == "/failed?workflow=orders"
    page = operator_browser.get("/failed?workflow=orders").text
    assert "Bulk retry of 2 failed step(s): 2 retried" in page
    for run_id in runs:
        assert _step(operator_browser, run_id, "fetch")["status"] == "queued"


def test_a_bulk_confirmation_freezes_the_set_it_showed(
    operator_browser: TestClient, seed: Seeder
) -> None:
    seed.failed_run("orders")
    confirm = operator_browser.get("/failed/retry?workflow=orders").text
    later = seed.failed_run("orders")  # fails after the operator looked
    form = {
        "csrf_token": csrf_of(confirm),
        "idempotency_key": next(k for k in keys_of(confirm) if "bulk-retry" in k),
        "confirmed": "1",
        "workflow": "orders",
        "to": confirm.split('name="to" value="')[1].split('"')[0],
    }
    operator_browser.post("/failed/retry", data=form)
    assert _step(operator_browser, later, "fetch")["status"] == "failed"


def test_metrics_cover_ledger_queues_actions_and_pools(operator: TestClient, seed: Seeder) -> None:
    run_id = seed.failed_run()
    seed.completed_run()
    operator.post(f"/api/runs/{run_id}/steps/fetch/retry", json={"idempotency_key": "m-1"})
    operator.post(f"/api/runs/{run_id}/steps/fetch/retry", json={"idempotency_key": "m-1"})
    response = operator.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"] == CONTENT_TYPE_LATEST
    text = response.text
    for line in (
        'executor_runs{status="running"} 1',
        'executor_runs{status="completed"} 1',
        'executor_steps{status="queued"} 1',
        'executor_drops_total{reason="duplicate"} 1',
        'executor_queue_jobs{queue="default",state="queued"} 1',
        "executor_redis_up 1",
        "executor_database_up 1",
        'executor_dashboard_action_duration_seconds_count{action="retry",outcome="applied"} 1',
        'executor_dashboard_action_duration_seconds_count{action="retry",outcome="duplicate"} 1',
        'executor_db_pool_size{pool="dashboard"}',
        'executor_db_pool_size{pool="client"}',
        "# TYPE executor_dashboard_request_duration_seconds histogram",
    ):
        assert line in text, line
    assert 'route="/api/runs/{run_id}/steps/{step_key}/retry"' in text
    viewer_token_free = TestClient(operator.app, base_url="http://127.0.0.1")
    assert viewer_token_free.get("/metrics").status_code == 401
    assert OPERATOR not in text
