"""Schedules through the dashboard: the API (viewer reads, operator changes) and the page."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from starlette.testclient import TestClient

from executor.client import Client

from .conftest import OPERATOR, VIEWER, csrf_of, keys_of

AS_VIEWER = {"Authorization": f"Bearer {VIEWER}"}
AS_OPERATOR = {"Authorization": f"Bearer {OPERATOR}"}


def _runs_of(db_url: str, name: str) -> list[str]:
    with psycopg.connect(db_url) as conn:
        rows = conn.execute(
            "SELECT run_id FROM executor.runs WHERE input->'_schedule'->>'name' = %s", (name,)
        ).fetchall()
    return [r[0] for r in rows]


def test_create_list_pause_resume_trigger_delete(web: TestClient, db_url: str) -> None:
    created = web.post(
        "/api/schedules",
        headers=AS_OPERATOR,
        json={
            "name": "nightly",
            "cron": "0 3 * * *",
            "workflow": "reports",
            "input": {"region": "eu"},
            "timezone": "Europe/Berlin",
            "catchup": "none",
        },
    )
    assert created.status_code == 201, created.text
    assert created.json()["name"] == "nightly"
    assert created.json()["paused"] is False
    listed = web.get("/api/schedules", headers=AS_VIEWER).json()["schedules"]
    assert [s["name"] for s in listed] == ["nightly"]
    assert listed[0]["next_tick"] is not None
    assert web.get("/api/schedules/nightly", headers=AS_VIEWER).json()["catchup"] == "none"

    paused = web.post("/api/schedules/nightly/pause", headers=AS_OPERATOR)
    assert paused.status_code == 200
    assert paused.json()["schedule"]["paused"] is True
    assert paused.json()["message"].startswith("paused:")
    resumed = web.post("/api/schedules/nightly/resume", headers=AS_OPERATOR)
    assert resumed.json()["schedule"]["paused"] is False

    one = web.post(
        "/api/schedules/nightly/trigger", headers=AS_OPERATOR, json={"idempotency_key": "t-1"}
    )
    assert one.status_code == 200, one.text
    assert one.json()["started"] is True
    again = web.post(
        "/api/schedules/nightly/trigger", headers={**AS_OPERATOR, "Idempotency-Key": "t-1"}
    )
    assert again.json()["started"] is False
    assert again.json()["run_id"] == one.json()["run_id"]
    assert "already triggered" in again.json()["message"]
    assert _runs_of(db_url, "nightly") == [one.json()["run_id"]]
    run = web.get(f"/api/runs/{one.json()['run_id']}", headers=AS_VIEWER).json()["run"]
    assert run["workflow"] == "reports"
    assert run["input"]["region"] == "eu"

    deleted = web.delete("/api/schedules/nightly", headers=AS_OPERATOR)
    assert deleted.status_code == 200
    assert web.get("/api/schedules", headers=AS_VIEWER).json()["schedules"] == []
    assert _runs_of(db_url, "nightly") == [one.json()["run_id"]]  # its runs stay


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"name": "x", "cron": "not cron", "workflow": "w"}, 422),
        ({"name": "x", "cron": "0 0 30 2 *", "workflow": "w"}, 422),  # February 30th
        ({"name": "x", "cron": "* * * * *", "workflow": "w", "timezone": "America"}, 422),
        ({"name": "x", "cron": "* * * * *", "workflow": "w", "timezone": "Mars/Olympus"}, 422),
        ({"name": "x", "cron": "* * * * *", "workflow": "w", "catchup": "some"}, 422),
        ({"name": "x", "cron": "* * * * *", "workflow": "w", "input": [1]}, 422),
        ({"name": "x", "cron": "* * * * *", "workflow": "w", "input": {"_schedule": 1}}, 422),
        ({"name": "../x", "cron": "* * * * *", "workflow": "w"}, 422),
        ({"name": "x", "cron": "* * * * *", "workflow": "w", "input": {"s": "\u0000"}}, 422),
        ({"name": "x", "cron": "* * * * *"}, 422),
    ],
)
def test_bad_schedules_are_422(web: TestClient, body: dict[str, Any], status: int) -> None:
    response = web.post("/api/schedules", headers=AS_OPERATOR, json=body)
    assert response.status_code == status, response.text
    assert response.json()["error"] == "invalid"


def test_a_taken_name_is_409_and_unknown_names_404(web: TestClient) -> None:
    body = {"name": "dup", "cron": "* * * * *", "workflow": "w"}
    assert web.post("/api/schedules", headers=AS_OPERATOR, json=body).status_code == 201
    taken = web.post("/api/schedules", headers=AS_OPERATOR, json=body)
    assert taken.status_code == 409
    assert "exists already" in taken.json()["detail"]
    for action in ("pause", "resume", "trigger"):
        assert web.post(f"/api/schedules/nope/{action}", headers=AS_OPERATOR).status_code == 404
    assert web.delete("/api/schedules/nope", headers=AS_OPERATOR).status_code == 404
    assert web.get("/api/schedules/nope", headers=AS_VIEWER).status_code == 404


def test_only_operators_change_schedules(web: TestClient, executor_client: Client) -> None:
    executor_client.create_schedule("guarded", "* * * * *", "w")
    assert web.get("/api/schedules").status_code == 401
    for method, path in (
        ("POST", "/api/schedules"),
        ("POST", "/api/schedules/guarded/pause"),
        ("POST", "/api/schedules/guarded/trigger"),
        ("DELETE", "/api/schedules/guarded"),
    ):
        response = web.request(method, path, headers=AS_VIEWER, json={})
        assert response.status_code == 403, (method, path)
    assert executor_client.get_schedule("guarded") is not None


def test_the_schedules_page_and_its_buttons(
    operator_browser: TestClient, executor_client: Client, db_url: str
) -> None:
    executor_client.create_schedule("hourly", "0 * * * *", "reports", catchup="all")
    executor_client.create_schedule("held", "*/5 * * * *", "emails", paused=True)
    page = operator_browser.get("/schedules").text
    for shown in ("hourly", "0 * * * *", "reports", "all", "held", "paused", "none yet"):
        assert shown in page
    assert 'action="/schedules/hourly/pause"' in page
    assert 'action="/schedules/held/resume"' in page
    assert 'action="/schedules/hourly/trigger"' in page

    csrf = csrf_of(page)
    no_csrf = operator_browser.post("/schedules/hourly/pause", data={"confirmed": "1"})
    assert no_csrf.status_code == 403
    asked = operator_browser.post("/schedules/hourly/pause", data={"csrf_token": csrf})
    assert asked.status_code == 200
    assert "Pause schedule hourly?" in asked.text
    done = operator_browser.post(
        "/schedules/hourly/pause", data={"csrf_token": csrf, "confirmed": "1"}
    )
    assert done.status_code == 303
    shown = operator_browser.get("/schedules").text
    assert "paused: schedule hourly starts no tick until resumed" in shown
    assert executor_client.get_schedule("hourly").paused  # type: ignore[union-attr]

    key = next(k for k in keys_of(shown) if k.startswith("dashboard:trigger:"))
    form = {"csrf_token": csrf_of(shown), "idempotency_key": key, "confirmed": "1"}
    assert operator_browser.post("/schedules/held/trigger", data=form).status_code == 303
    assert "triggered: schedule held started run" in operator_browser.get("/schedules").text
    assert operator_browser.post("/schedules/held/trigger", data=form).status_code == 303
    assert "already triggered" in operator_browser.get("/schedules").text
    assert len(_runs_of(db_url, "held")) == 1

    gone = operator_browser.post(
        "/schedules/nope/resume", data={"csrf_token": csrf, "confirmed": "1"}
    )
    assert gone.status_code == 303
    assert "no schedule named &#39;nope&#39;" in operator_browser.get("/schedules").text
    assert operator_browser.post("/schedules/held/explode", data=form).status_code == 404


def test_viewers_see_schedules_without_buttons(viewer: TestClient, executor_client: Client) -> None:
    executor_client.create_schedule("seen", "0 3 * * *", "reports")
    page = viewer.get("/schedules").text
    assert "seen" in page
    assert "/schedules/seen/" not in page
    assert "No schedules" not in page
