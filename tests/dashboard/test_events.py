"""Events sent to runs: the operator's API and form, and hook URLs a third party posts to."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import psycopg
import pytest
from starlette.testclient import TestClient

from executor.client import Client
from executor.commands.models import CancelRun
from executor.dashboard.app import create_app
from executor.dashboard.settings import DashboardSettings

from .conftest import OPERATOR, VIEWER, Seeder, csrf_of, keys_of, login
from .waits import approval_run


def _step(client: TestClient, run_id: str, key: str) -> dict[str, Any]:
    steps = client.get(f"/api/runs/{run_id}", headers={"Authorization": f"Bearer {VIEWER}"})
    return next(s for s in steps.json()["steps"] if s["step_key"] == key)


def _hook_path(client: Client, run_id: str, event: str = "approved") -> str:
    url = client.hook_url(run_id, event, base_url="http://dashboard.example")
    return url.removeprefix("http://dashboard.example")


# --- POST /api/runs/{run_id}/events/{event} -----------------------------------------------


def test_an_operator_sends_the_event_and_the_waiting_step_completes_with_its_payload(
    operator: TestClient, seed: Seeder, db_url: str
) -> None:
    run_id = approval_run(seed)
    url = f"/api/runs/{run_id}/events/approved"
    first = operator.post(url, json={"payload": {"by": "ada"}, "idempotency_key": "appr-1"})
    assert first.status_code == 200, first.text
    body = first.json()
    assert body["applied"] is True
    assert body["message"] == "sent: the event completed step approval"
    step = _step(operator, run_id, "approval")
    assert (step["status"], step["output"]) == ("completed", {"by": "ada"})
    assert _step(operator, run_id, "finish")["status"] == "queued"

    again = operator.post(url, headers={"Idempotency-Key": "appr-1"}, json={"payload": 1})
    assert again.status_code == 200
    assert (again.json()["applied"], again.json()["reason"]) == (False, "duplicate")
    with psycopg.connect(db_url) as conn:
        (n,) = conn.execute(
            "SELECT count(*) FROM executor.events WHERE run_id = %s AND type = 'event_received'",
            (run_id,),
        ).fetchone() or (0,)
    assert n == 1


def test_an_event_before_the_wait_is_kept_and_a_send_to_an_ended_run_is_terminal(
    operator: TestClient, seed: Seeder
) -> None:
    run_id = approval_run(seed, event="approved")
    early = operator.post(f"/api/runs/{run_id}/events/shipped", json={"payload": "box 7"})
    assert early.status_code == 200
    assert early.json()["message"] == "sent: the event is kept until a step of the run waits for it"

    done = seed.completed_run()
    late = operator.post(f"/api/runs/{done}/events/approved", json={})
    assert late.status_code == 409
    assert late.json()["reason"] == "terminal"

    missing = operator.post("/api/runs/no-such-run/events/approved")
    assert missing.status_code == 404
    assert missing.json()["reason"] == "unknown_entity"


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/api/runs/r1/events/not%20an%20event", {}),
        ("/api/runs/r1/events/approved", {"payload": "nul \u0000 inside"}),
        ("/api/runs/r1/events/approved", {"payload": 1, "extra": True}),
        ("/api/runs/r1/events/approved", {"idempotency_key": ""}),
    ],
)
def test_bad_sends_are_422(operator: TestClient, path: str, body: dict[str, Any]) -> None:
    response = operator.post(path, json=body)
    assert response.status_code == 422, response.text
    assert response.json()["error"] == "invalid"


@pytest.mark.parametrize(
    "raw", [b'{"payload": NaN}', b'{"payload": 1e400}', b'{"payload": -Infinity}']
)
def test_numbers_json_cannot_hold_are_422_not_a_crash(operator: TestClient, raw: bytes) -> None:
    response = operator.post(
        "/api/runs/r1/events/approved", content=raw, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 422, response.text


def test_viewers_and_forms_without_csrf_cannot_send(web: TestClient, seed: Seeder) -> None:
    run_id = approval_run(seed)
    url = f"/api/runs/{run_id}/events/approved"
    assert web.post(url).status_code == 401
    assert web.post(url, headers={"Authorization": f"Bearer {VIEWER}"}).status_code == 403
    login(web, OPERATOR)
    assert web.post(url, json={}).status_code == 403  # a session needs the CSRF token
    page = web.get(f"/runs/{run_id}").text
    sent = web.post(url, json={}, headers={"X-CSRF-Token": csrf_of(page)})
    assert sent.status_code == 200
    assert _step(web, run_id, "approval")["status"] == "completed"


# --- the run page's forms ------------------------------------------------------------------


def test_the_run_page_shows_the_wait_and_its_forms_to_operators_only(
    operator_browser: TestClient, seed: Seeder
) -> None:
    run_id = approval_run(seed, timeout=3600)
    page = operator_browser.get(f"/runs/{run_id}").text
    assert "waits for event <code>approved</code>" in page
    assert "times out" in page
    assert f'action="/runs/{run_id}/events/approved"' in page
    assert "Approve" in page
    assert 'name="payload"' in page
    seen = operator_browser.get(
        f"/runs/{run_id}", headers={"Authorization": f"Bearer {VIEWER}"}
    ).text
    assert "waits for event <code>approved</code>" in seen
    assert "/events/approved" not in seen

    no_timeout = approval_run(seed, event="go_ahead", timeout=None)
    page = operator_browser.get(f"/runs/{no_timeout}").text
    assert "no timeout" in page
    assert ">Approve<" not in page  # only events named for approval get the one-click button
    assert "Send event" in page


def test_approving_from_the_form_twice_sends_once(
    operator_browser: TestClient, seed: Seeder
) -> None:
    run_id = approval_run(seed)
    page = operator_browser.get(f"/runs/{run_id}").text
    csrf = csrf_of(page)
    event_keys = [k for k in keys_of(page) if k.startswith("dashboard:send-event:")]
    assert len(event_keys) == 2  # the Approve button and the payload form
    approve_key = event_keys[0]
    form = {
        "csrf_token": csrf,
        "idempotency_key": approve_key,
        "payload": json.dumps("approved by dashboard:operator:x"),
        "confirmed": "1",
        "next": f"/runs/{run_id}",
    }
    url = f"/runs/{run_id}/events/approved"
    first = operator_browser.post(url, data=form)
    assert first.status_code == 303
    assert "sent: the event completed step approval" in operator_browser.get(f"/runs/{run_id}").text
    second = operator_browser.post(url, data=form)
    assert second.status_code == 303
    assert "already submitted" in operator_browser.get(f"/runs/{run_id}").text
    step = _step(operator_browser, run_id, "approval")
    assert step["output"] == "approved by dashboard:operator:x"


def test_the_form_refuses_a_payload_that_is_not_json_and_asks_before_sending(
    operator_browser: TestClient, seed: Seeder
) -> None:
    run_id = approval_run(seed)
    csrf = csrf_of(operator_browser.get(f"/runs/{run_id}").text)
    url = f"/runs/{run_id}/events/approved"
    bad = operator_browser.post(
        url, data={"csrf_token": csrf, "payload": "{not json", "confirmed": "1"}
    )
    assert bad.status_code == 303
    assert "the payload is not JSON" in operator_browser.get(f"/runs/{run_id}").text
    asked = operator_browser.post(
        url, data={"csrf_token": csrf, "payload": '{"ok": true}', "confirmed": "0"}
    )
    assert asked.status_code == 200
    assert "Send event approved to run" in asked.text
    assert 'name="confirmed" value="1"' in asked.text
    no_csrf = operator_browser.post(url, data={"payload": "1", "confirmed": "1"})
    assert no_csrf.status_code == 403
    assert _step(operator_browser, run_id, "approval")["status"] == "waiting"


# --- hook URLs -------------------------------------------------------------------------------


def test_a_hook_url_used_twice_applies_once(
    web: TestClient, seed: Seeder, executor_client: Client, db_url: str
) -> None:
    run_id = approval_run(seed)
    path = _hook_path(executor_client, run_id)
    assert path.startswith(f"/hooks/{run_id}~")
    first = web.post(path, json={"approved_by": "acme"})
    assert first.status_code == 200, first.text
    assert first.json()["outcome"] == "applied"
    assert first.json()["event"] == "approved"
    assert "set-cookie" not in first.headers  # no session for a third party
    again = web.post(path, json={"approved_by": "acme"})  # redelivered byte for byte
    assert again.status_code == 200
    assert again.json()["outcome"] == "duplicate"
    assert again.json()["idempotency_key"] == first.json()["idempotency_key"]
    token = path.removeprefix("/hooks/")
    assert token not in first.json()["idempotency_key"]  # the key never carries the secret
    step = _step(web, run_id, "approval")
    assert (step["status"], step["output"]) == ("completed", {"approved_by": "acme"})
    with psycopg.connect(db_url) as conn:
        stored = conn.execute(
            "SELECT token_sha256 FROM executor.hooks WHERE run_id = %s", (run_id,)
        ).fetchone()
    assert stored == (hashlib.sha256(token.encode()).hexdigest(),)

    # Once the run has ended the hook can only say so.
    assert seed.ledger.apply(CancelRun(run_id=run_id, idempotency_key=f"cancel:{run_id}")).applied
    late = web.post(path, json={"approved_by": "someone else"})
    assert late.status_code == 410
    assert late.json()["outcome"] == "terminal"


def test_an_idempotency_key_header_decides_what_is_a_duplicate(
    web: TestClient, seed: Seeder, executor_client: Client
) -> None:
    run_id = approval_run(seed, event="shipped")
    path = _hook_path(executor_client, run_id, "shipped")
    one = web.post(path, json={"n": 1}, headers={"Idempotency-Key": "delivery-1"})
    same = web.post(path, json={"n": 2}, headers={"Idempotency-Key": "delivery-1"})
    other = web.post(path, json={"n": 1}, headers={"Idempotency-Key": "delivery-2"})
    assert [r.json()["outcome"] for r in (one, same, other)] == ["applied", "duplicate", "applied"]
    empty = web.post(path, content=b"")  # an empty body is a null payload
    assert empty.json()["outcome"] == "applied"
    bad = web.post(path, content=b"{nope", headers={"Content-Type": "application/json"})
    assert bad.status_code == 422
    long_key = web.post(path, json={}, headers={"Idempotency-Key": "k" * 201})
    assert long_key.status_code == 422


def test_a_forged_or_unknown_token_is_one_404(
    web: TestClient, seed: Seeder, executor_client: Client
) -> None:
    run_id = approval_run(seed)
    real = _hook_path(executor_client, run_id).removeprefix("/hooks/")
    other_run = approval_run(seed)
    secret = real.split("~", 1)[1]
    forged = [
        f"{run_id}~{secret[:-1]}{'A' if secret[-1] != 'A' else 'B'}",  # one character off
        f"{other_run}~{secret}",  # the right secret for another run
        f"no-such-run~{secret}",
        secret,  # no run id at all
        f"{run_id}~",
        "x" * 600,
    ]
    answers = {web.post(f"/hooks/{token}", json={}).text for token in forged}
    statuses = {web.post(f"/hooks/{token}", json={}).status_code for token in forged}
    assert statuses == {404}
    assert answers == {'{"error":"not_found","detail":"no such hook"}'}
    assert _step(web, run_id, "approval")["status"] == "waiting"
    assert _step(web, other_run, "approval")["status"] == "waiting"


def test_a_hook_is_for_its_run_and_event_only(
    web: TestClient, seed: Seeder, executor_client: Client
) -> None:
    run_id = approval_run(seed, event="approved")
    path = _hook_path(executor_client, run_id, "rejected")
    sent = web.post(path, json={"why": "no"})
    assert sent.json()["outcome"] == "applied"
    assert sent.json()["event"] == "rejected"
    assert _step(web, run_id, "approval")["status"] == "waiting"  # it waits for `approved`


def test_an_oversized_hook_body_is_413(
    web: TestClient, seed: Seeder, executor_client: Client
) -> None:
    run_id = approval_run(seed)
    path = _hook_path(executor_client, run_id)
    big = json.dumps({"blob": "x" * (64 * 1024)}).encode()
    response = web.post(path, content=big, headers={"Content-Type": "application/json"})
    assert response.status_code == 413
    assert response.json()["error"] == "too_large"

    def chunks() -> Any:  # no Content-Length: counted as it arrives
        for _ in range(70):
            yield b" " * 1024

    streamed = web.post(path, content=chunks(), headers={"Content-Type": "application/json"})
    assert streamed.status_code == 413
    fits = web.post(path, json={"blob": "x" * (60 * 1024)})
    assert fits.status_code == 200
    assert fits.json()["outcome"] == "applied"


def test_a_hook_is_rate_limited_per_token(
    settings: DashboardSettings, executor_client: Client, seed: Seeder
) -> None:
    from dataclasses import replace

    app = create_app(replace(settings, hook_requests_per_minute=3), backend=executor_client)
    run_id = approval_run(seed, event="ping")
    path = _hook_path(executor_client, run_id, "ping")
    other = _hook_path(executor_client, run_id, "ping")
    with TestClient(app, base_url="http://127.0.0.1") as web:
        codes = [web.post(path, json={"n": i}).status_code for i in range(4)]
        assert codes == [200, 200, 200, 429]
        limited = web.post(path, json={"n": 9})
        assert limited.status_code == 429
        assert 1 <= int(limited.headers["retry-after"]) <= 60
        assert limited.json()["error"] == "rate_limited"
        assert web.post(other, json={"n": 0}).status_code == 200  # another token, its own budget
        # Forged tokens are limited too, and never reach the database past the limit.
        forged = f"/hooks/{run_id}~forged"
        assert [web.post(forged).status_code for _ in range(4)] == [404, 404, 404, 429]


def test_a_hook_ignores_credentials_meant_for_someone_else(
    web: TestClient, seed: Seeder, executor_client: Client, settings: DashboardSettings
) -> None:
    run_id = approval_run(seed)
    path = _hook_path(executor_client, run_id)
    # A sender's own Authorization header is neither checked nor counted as a failure.
    for _ in range(settings.auth_failures_per_minute + 2):
        r = web.post(path, json={}, headers={"Authorization": "Bearer someone-elses-token"})
        assert r.status_code == 200
    assert web.get("/api/me", headers={"Authorization": f"Bearer {VIEWER}"}).status_code == 200
