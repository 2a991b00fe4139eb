"""The probe findings of issue 11, one test each: what an attacker or a careless script sent,
and what the dashboard must answer instead of a 500, a 503 or a silent yes."""

from __future__ import annotations

import base64
import json
from dataclasses import replace
from typing import Any

import pytest
from starlette.routing import Route
from starlette.testclient import TestClient

from executor.cli.main import build_parser
from executor.client import Client
from executor.dashboard.app import create_app
from executor.dashboard.sessions import SESSION_COOKIE
from executor.dashboard.settings import DashboardSettings
from executor.errors import ConfigurationError

from .conftest import OPERATOR, VIEWER, Seeder, csrf_of, login

SECURITY = ("content-security-policy", "x-frame-options", "x-content-type-options")


def _client(app: Any, **kwargs: Any) -> TestClient:
    return TestClient(app, base_url="http://127.0.0.1", follow_redirects=False, **kwargs)


# 1 ------------------------------------------------------------------------------------------


def test_a_non_ascii_cookie_or_csrf_value_is_anonymous_not_a_500(web: TestClient) -> None:
    planted = {"cookie": f"{SESSION_COOKIE}=x.é".encode()}
    assert web.get("/login", headers=planted).status_code == 200
    assert web.get("/runs", headers=planted).status_code == 303
    assert web.get("/api/runs", headers=planted).status_code == 401
    page = web.get("/login")
    response = web.post("/login", data={"token": OPERATOR, "csrf_token": "é" * 20})
    assert response.status_code == 403
    assert csrf_of(page.text)  # the form still works afterwards
    login(web, OPERATOR)
    bad = web.post("/api/runs/r1/pause", headers={"X-CSRF-Token": "é".encode()})
    assert bad.status_code == 403


# 2 ------------------------------------------------------------------------------------------


def test_made_up_http_methods_share_one_metric_series(viewer: TestClient) -> None:
    for i in range(5):
        viewer.request(f"PROBE{i}", "/healthz")
    viewer.get("/no/such/path")
    text = viewer.get("/metrics").text
    assert "PROBE" not in text
    assert 'method="other",route="/healthz"' in text
    assert 'route="unmatched"' in text


# 3 ------------------------------------------------------------------------------------------


def test_logout_ends_the_session_even_for_a_copied_cookie(app: Any, web: TestClient) -> None:
    login(web, OPERATOR)
    copied = web.cookies[SESSION_COOKIE]
    page = web.get("/runs")
    assert web.post("/logout", data={}).status_code == 403  # no CSRF: refused, not a fake 303
    with _client(app) as thief:
        thief.cookies.set(SESSION_COOKIE, copied)
        assert thief.get("/runs").status_code == 200
        assert web.post("/logout", data={"csrf_token": csrf_of(page.text)}).status_code == 303
        assert thief.get("/runs").status_code == 303
        assert thief.get("/api/me").status_code == 401


def test_an_operator_logs_everyone_out(app: Any, web: TestClient) -> None:
    with _client(app) as other:
        login(other, VIEWER)
        login(web, OPERATOR)
        assert other.get("/runs").status_code == 200
        csrf = csrf_of(web.get("/runs").text)
        ended = web.delete("/api/sessions", headers={"X-CSRF-Token": csrf})
        assert ended.status_code == 200
        assert ended.json() == {"ended": 2}
        assert other.get("/runs").status_code == 303
        assert web.get("/runs").status_code == 303


# 4 ------------------------------------------------------------------------------------------


def test_deeply_nested_json_is_a_422(operator: TestClient) -> None:
    response = operator.post(
        "/api/retry", content=b"[" * 100_000, headers={"content-type": "application/json"}
    )
    assert response.status_code == 422
    assert response.json()["error"] == "invalid"


def test_413_and_500_carry_the_security_headers(settings: Any, executor_client: Any) -> None:
    app = create_app(settings, backend=executor_client)

    def boom(request: Any) -> Any:
        raise RuntimeError("a bug")

    app.router.routes.insert(0, Route("/api/boom", boom))
    with _client(app, raise_server_exceptions=False) as client:
        client.headers["Authorization"] = f"Bearer {OPERATOR}"
        big = client.post(
            "/api/retry", content=b"x" * 2_000_000, headers={"content-type": "application/json"}
        )
        crash = client.get("/api/boom")
        for response in (big, crash):
            for header in SECURITY:
                assert header in response.headers, (response.status_code, header)
            assert response.headers["cache-control"] == "no-store"
        assert (big.status_code, crash.status_code) == (413, 500)


# 5 ------------------------------------------------------------------------------------------


def _cursor(values: list[Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(values).encode()).rstrip(b"=").decode()


@pytest.mark.parametrize(
    "path",
    [
        "/api/runs?workflow=a%00b",
        "/api/runs?q=%00",
        "/api/runs/a%00b",
        "/api/failed-steps?error=%00",
        "/api/drops?run_id=%00",
        f"/api/runs?after={_cursor(['2024-01-01T00:00:00+00:00', 'a' + chr(0)])}",
        f"/api/drops?after={_cursor([2**70])}",
    ],
)
def test_nul_and_unstorable_values_are_422_not_503(viewer: TestClient, path: str) -> None:
    response = viewer.get(path)
    assert response.status_code == 422, response.text


def test_a_nul_in_a_page_parameter_is_a_400_page(viewer: TestClient) -> None:
    assert viewer.get("/runs?workflow=%00").status_code == 400
    assert viewer.get("/failed?error=%00").status_code == 400


# 6 ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/api/retry", {"all": True, "limit": True}),
        ("/api/retry", {"all": True, "dry_run": "false"}),
        ("/api/retry", {"all": 1}),
        ("/api/retry", {"all": True, "limit": 501}),
        ("/api/runs/r1/steps/fetch/retry", {"attempt": True}),
        ("/api/runs/r1/steps/fetch/retry", {"attempt": "2"}),
        ("/api/runs/r1/cancel", {"reason": 5}),
    ],
)
def test_booleans_are_not_integers_and_ranges_are_not_clamped(
    operator: TestClient, seed: Seeder, path: str, body: dict[str, Any]
) -> None:
    seed.failed_run()
    response = operator.post(path, json=body)
    assert response.status_code == 422, response.text
    assert response.json()["errors"], response.json()


def test_the_api_does_not_clamp_paging(viewer: TestClient) -> None:
    assert viewer.get("/api/runs?limit=501").status_code == 422
    assert viewer.get("/api/runs?limit=0").status_code == 422
    assert viewer.get("/api/runs?limit=true").status_code == 422
    assert viewer.get("/api/runs/r1?events_after=-1").status_code == 422


# 7 ------------------------------------------------------------------------------------------


def test_wrong_logins_are_rate_limited_with_retry_after(web: TestClient) -> None:
    csrf = csrf_of(web.get("/login").text)
    codes = [
        web.post("/login", data={"token": f"wrong-{i}" * 4, "csrf_token": csrf}).status_code
        for i in range(25)
    ]
    assert codes[:20] == [401] * 20
    assert codes[20:] == [429] * 5
    right = web.post("/login", data={"token": OPERATOR, "csrf_token": csrf})
    assert right.status_code == 429  # the right token is not even checked while limited
    assert 1 <= int(right.headers["retry-after"]) <= 60


def test_wrong_bearer_tokens_are_rate_limited(web: TestClient) -> None:
    codes = []
    for i in range(22):
        web.headers["Authorization"] = f"Bearer wrong-token-{i:04d}-abcdefghij"
        codes.append(web.get("/api/runs").status_code)
    assert codes[:20] == [401] * 20
    assert codes[20:] == [429, 429]
    web.headers["Authorization"] = f"Bearer {VIEWER}"
    limited = web.get("/api/runs")
    assert limited.status_code == 429
    assert int(limited.headers["retry-after"]) >= 1


@pytest.mark.parametrize(
    "token",
    ["aaaaaaaaaaaaaaaaaaaaaaaa", "abababababababababababab", "short-but-random-x1", "é" * 30],
)
def test_weak_configured_tokens_are_refused(token: str) -> None:
    with pytest.raises(ConfigurationError):
        DashboardSettings(operator_tokens=(token,))


# 8 ------------------------------------------------------------------------------------------


def test_bulk_retry_needs_an_explicit_filter_and_can_say_how_many_first(
    operator: TestClient, seed: Seeder
) -> None:
    runs = [seed.failed_run() for _ in range(3)]
    assert operator.post("/api/retry").status_code == 422
    assert operator.post("/api/retry", json={}).status_code == 422
    assert operator.post("/api/retry", json={"filter": {}}).status_code == 422
    both = {"all": True, "filter": {"workflow": "orders"}}
    assert operator.post("/api/retry", json=both).status_code == 422
    preview = operator.post("/api/retry", json={"all": True, "dry_run": True}).json()
    assert (preview["dry_run"], preview["matched"]) == (True, 3)
    changed = operator.post("/api/retry", json={"all": True, "expect": 2})
    assert changed.status_code == 409
    assert changed.json()["matched"] == 3
    assert all(
        operator.get(f"/api/runs/{r}").json()["steps"][0]["status"] == "failed" for r in runs
    )
    done = operator.post("/api/retry", json={"all": True, "expect": 3}).json()
    assert (done["dry_run"], done["applied"]) == (False, 3)


# 9 ------------------------------------------------------------------------------------------


def test_dot_run_ids_cannot_be_made_and_are_refused_in_urls(
    viewer: TestClient, executor_client: Client
) -> None:
    for bad in (".", ".."):
        with pytest.raises(ValueError):
            executor_client.start_run("orders", None, run_id=bad)
    assert viewer.get("/api/runs/%2E").status_code == 422
    assert viewer.get("/api/runs/x/steps/%2E%2E/retry").status_code == 405
    assert viewer.get("/runs/%2E").status_code == 404


def test_step_keys_with_brackets_are_linked_escaped(operator: TestClient, seed: Seeder) -> None:
    from executor.commands.models import StepSpec

    run_id = seed.run(
        steps=(
            StepSpec(step_key="images"),
            StepSpec(
                step_key="resize",
                depends_on=("images",),
                kind="map",
                map_over="images",
                max_attempts=1,
            ),
        )
    )
    seed.complete(run_id, "images", 1, output=["a", "b", "c", "d"])  # items resize[0]..[3]
    seed.fail(run_id, "resize[3]", 1)
    page = operator.get(f"/runs/{run_id}").text
    assert f'action="/runs/{run_id}/steps/resize%5B3%5D/retry"' in page
    response = operator.post(f"/api/runs/{run_id}/steps/resize%5B3%5D/retry", json={})
    assert response.json()["applied"] is True


# also ---------------------------------------------------------------------------------------


def test_executor_dashboard_has_public_metrics(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}
    monkeypatch.setattr("executor.dashboard.app.serve", lambda **kw: seen.update(kw))
    monkeypatch.setattr("executor.config.resolve_urls", lambda: ("postgresql://x", "redis://x"))
    args = build_parser().parse_args(["dashboard", "--public-metrics"])
    assert args.func(args) == 0
    assert seen["public_metrics"] is True


def test_a_host_not_on_the_allow_list_is_refused(settings: Any, executor_client: Any) -> None:
    app = create_app(settings, backend=executor_client)
    with TestClient(app, base_url="http://rebound.example") as client:
        response = client.get("/login")
        assert response.status_code == 400
        assert "x-frame-options" in response.headers
    allowed = replace(settings, allowed_hosts=("dash.internal",))
    with TestClient(
        create_app(allowed, backend=executor_client), base_url="http://dash.internal"
    ) as c:
        assert c.get("/login").status_code == 200


def test_json_and_metrics_are_never_cached(viewer: TestClient) -> None:
    for path in ("/api/runs", "/metrics", "/api/openapi.json", "/healthz"):
        assert viewer.get(path).headers["cache-control"] == "no-store", path
    assert "no-store" not in viewer.get("/static/app.css").headers.get("cache-control", "")


def test_bidi_controls_are_shown_not_obeyed(viewer: TestClient, seed: Seeder) -> None:
    run_id = seed.run()
    seed.fail(run_id, "fetch", 1, error="invoice\u202egpj.exe", traceback=None)
    page = viewer.get(f"/runs/{run_id}").text
    assert "\u202e" not in page
    assert "invoice[U+202E]gpj.exe" in page
    assert viewer.get(f"/api/runs/{run_id}").json()["steps"][0]["error"]["message"] == (
        "invoice\u202egpj.exe"
    )
