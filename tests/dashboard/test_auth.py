"""Who may see and do what: tokens, roles, the session cookie, CSRF, headers, redirects."""

from __future__ import annotations

import io

import pytest
from starlette.testclient import TestClient

from executor.dashboard.app import create_app, prepare_settings
from executor.dashboard.auth import TokenAuthority
from executor.dashboard.sessions import SESSION_COOKIE
from executor.dashboard.settings import DashboardSettings
from executor.errors import ConfigurationError

from .conftest import OPERATOR, VIEWER, Seeder, csrf_of, keys_of, login

SECRET = "kX2v9QpL7mN4rT8wZ1yB6cD3fG5hJ0sA"


def test_no_token_gets_401_on_api_and_metrics_and_a_login_redirect_on_pages(
    web: TestClient,
) -> None:
    for path in ("/api/runs", "/api/failed-steps", "/api/drops", "/api/queues", "/metrics"):
        response = web.get(path)
        assert response.status_code == 401, path
        assert response.headers["www-authenticate"].startswith("Bearer")
        assert response.json()["error"] == "unauthorized"
    response = web.post("/api/runs/r1/cancel")
    assert response.status_code == 401
    page = web.get("/failed?workflow=orders")
    assert page.status_code == 303
    assert page.headers["location"] == "/login?next=/failed%3Fworkflow%3Dorders"


def test_a_wrong_bearer_token_is_401_even_on_pages(web: TestClient) -> None:
    web.headers["Authorization"] = "Bearer not-a-configured-token-at-all"
    assert web.get("/api/runs").status_code == 401
    assert web.get("/runs").status_code == 401


def test_viewer_reads_everything_but_cannot_act(viewer: TestClient, seed: Seeder) -> None:
    run_id = seed.failed_run()
    for path in ("/runs", f"/runs/{run_id}", "/failed", "/drops", "/queues", "/metrics"):
        assert viewer.get(path).status_code == 200, path
    assert viewer.get("/api/me").json()["role"] == "viewer"
    for path in (
        f"/api/runs/{run_id}/steps/fetch/retry",
        f"/api/runs/{run_id}/cancel",
        f"/api/runs/{run_id}/pause",
        f"/api/runs/{run_id}/resume",
        "/api/retry",
    ):
        response = viewer.post(path, json={})
        assert response.status_code == 403, path
        assert response.json()["error"] == "forbidden"
    assert viewer.get("/failed/retry").status_code == 403
    # The viewer's pages carry no action buttons at all.
    assert keys_of(viewer.get(f"/runs/{run_id}").text) == []


def test_viewer_session_cannot_post_forms(web: TestClient, seed: Seeder) -> None:
    run_id = seed.failed_run()
    login(web, VIEWER)
    page = web.get(f"/runs/{run_id}")
    response = web.post(
        f"/runs/{run_id}/steps/fetch/retry",
        data={"csrf_token": csrf_of(page.text), "idempotency_key": "k1", "confirmed": "1"},
    )
    assert response.status_code == 403
    assert seed.ledger.pool is not None


def test_login_sets_a_signed_httponly_strict_cookie_and_logout_ends_it(web: TestClient) -> None:
    page = web.get("/login")
    wrong = web.post("/login", data={"token": "x" * 20, "csrf_token": csrf_of(page.text)})
    assert wrong.status_code == 401
    assert "not a dashboard token" in wrong.text
    response = web.post(
        "/login", data={"token": OPERATOR, "csrf_token": csrf_of(page.text), "next": "/drops"}
    )
    assert response.status_code == 303
    assert response.headers["location"] == "/drops"
    cookie = response.headers["set-cookie"]
    assert cookie.startswith(f"{SESSION_COOKIE}=")
    assert "HttpOnly" in cookie
    assert "SameSite=Strict" in cookie
    assert OPERATOR not in cookie
    runs = web.get("/runs")
    assert runs.status_code == 200
    assert "operator" in runs.text
    web.post("/logout", data={"csrf_token": csrf_of(runs.text)})
    assert web.get("/runs").status_code == 303


def test_login_needs_the_csrf_token_of_its_own_session(web: TestClient) -> None:
    web.get("/login")
    assert web.post("/login", data={"token": OPERATOR}).status_code == 403
    assert web.post("/login", data={"token": OPERATOR, "csrf_token": "forged"}).status_code == 403


def test_login_rotates_the_session_so_a_planted_csrf_token_dies(web: TestClient) -> None:
    before = csrf_of(web.get("/login").text)
    login(web, OPERATOR)
    after = csrf_of(web.get("/runs").text)
    assert before != after


def test_a_tampered_session_cookie_is_anonymous(web: TestClient) -> None:
    login(web, OPERATOR)
    value = web.cookies[SESSION_COOKIE]
    payload, _, mac = value.partition(".")
    web.cookies.clear()
    web.cookies.set(SESSION_COOKIE, payload + "." + mac[::-1])
    assert web.get("/runs").status_code == 303


@pytest.mark.parametrize("token", [None, "", "wrong-token"])
def test_forms_without_the_right_csrf_token_are_rejected(
    operator_browser: TestClient, seed: Seeder, token: str | None
) -> None:
    run_id = seed.failed_run()
    data = {"idempotency_key": "csrf-test", "confirmed": "1"}
    if token is not None:
        data["csrf_token"] = token
    response = operator_browser.post(f"/runs/{run_id}/steps/fetch/retry", data=data)
    assert response.status_code == 403
    assert "CSRF" in response.text
    step = operator_browser.get(f"/api/runs/{run_id}").json()["steps"][0]
    assert (step["step_key"], step["status"], step["attempt"]) == ("fetch", "failed", 1)


def test_cookie_authenticated_api_writes_need_the_csrf_header(
    operator_browser: TestClient, seed: Seeder
) -> None:
    run_id = seed.run()
    assert operator_browser.post(f"/api/runs/{run_id}/pause").status_code == 403
    csrf = csrf_of(operator_browser.get("/runs").text)
    response = operator_browser.post(f"/api/runs/{run_id}/pause", headers={"X-CSRF-Token": csrf})
    assert response.status_code == 200
    assert response.json()["applied"] is True


def test_security_headers_on_every_response(viewer: TestClient) -> None:
    for path in ("/runs", "/api/runs", "/login", "/static/app.js"):
        headers = viewer.get(path).headers
        assert "script-src 'self'" in headers["content-security-policy"], path
        assert headers["x-frame-options"] == "DENY"
        assert headers["x-content-type-options"] == "nosniff"


def test_login_redirect_is_never_off_site(web: TestClient) -> None:
    page = web.get("/login?next=//evil.example/x")
    assert 'name="next" value="/runs"' in page.text
    response = web.post(
        "/login",
        data={"token": OPERATOR, "csrf_token": csrf_of(page.text), "next": "https://evil.example"},
    )
    assert response.headers["location"] == "/runs"


def test_openapi_and_healthz_need_no_token(web: TestClient) -> None:
    assert web.get("/healthz").text == "ok\n"
    doc = web.get("/api/openapi.json").json()
    assert doc["openapi"].startswith("3.")
    for path in (
        "/api/runs",
        "/api/runs/{run_id}",
        "/api/runs/{run_id}/cancel",
        "/api/runs/{run_id}/pause",
        "/api/runs/{run_id}/resume",
        "/api/runs/{run_id}/steps/{step_key}/retry",
        "/api/retry",
        "/api/failed-steps",
        "/api/drops",
        "/metrics",
    ):
        assert path in doc["paths"], path


# --- configuration ---------------------------------------------------------------------------


def test_tokens_come_from_the_environment() -> None:
    settings = DashboardSettings.from_env(
        {
            "EXECUTOR_DASHBOARD_VIEWER_TOKENS": f" {VIEWER} , {VIEWER}x,",
            "EXECUTOR_DASHBOARD_OPERATOR_TOKENS": OPERATOR,
            "EXECUTOR_DASHBOARD_SECRET_KEY": SECRET,
        }
    )
    assert settings.viewer_tokens == (VIEWER, VIEWER + "x")
    assert settings.operator_tokens == (OPERATOR,)
    assert settings.secret_key == SECRET.encode()


@pytest.mark.parametrize(
    ("viewer", "operator"),
    [(("short",), ()), ((), ("has space in it 12345",)), ((VIEWER,), (VIEWER,))],
)
def test_weak_or_ambiguous_tokens_are_refused(
    viewer: tuple[str, ...], operator: tuple[str, ...]
) -> None:
    with pytest.raises(ConfigurationError):
        DashboardSettings(viewer_tokens=viewer, operator_tokens=operator)


def test_without_tokens_the_app_refuses_and_serve_mints_one_only_on_loopback() -> None:
    with pytest.raises(ConfigurationError):
        create_app(DashboardSettings())
    with pytest.raises(ConfigurationError, match="refusing"):
        prepare_settings("0.0.0.0", DashboardSettings())
    out = io.StringIO()
    settings = prepare_settings("127.0.0.1", DashboardSettings(), out=out)
    (token,) = settings.operator_tokens
    assert token in out.getvalue()
    assert len(token) >= 32
    configured = DashboardSettings(viewer_tokens=(VIEWER,))
    assert prepare_settings("0.0.0.0", configured) is configured


def test_removing_a_token_ends_its_sessions(
    settings: DashboardSettings, executor_client: object
) -> None:
    from dataclasses import replace

    with TestClient(
        create_app(settings, backend=executor_client),  # type: ignore[arg-type]
        base_url="http://127.0.0.1",
        follow_redirects=False,
    ) as before:
        login(before, OPERATOR)
        cookie = before.cookies[SESSION_COOKIE]
        assert before.get("/runs").status_code == 200
    # The same key and the same session row, but the operator token is gone.
    fewer = replace(settings, operator_tokens=(), viewer_tokens=settings.viewer_tokens)
    with TestClient(
        create_app(fewer, backend=executor_client),  # type: ignore[arg-type]
        base_url="http://127.0.0.1",
        follow_redirects=False,
    ) as after:
        after.cookies.set(SESSION_COOKIE, cookie)
        assert after.get("/runs").status_code == 303


def test_a_proxys_basic_auth_header_does_not_hide_the_session(web: TestClient) -> None:
    login(web, OPERATOR)
    web.headers["Authorization"] = "Basic dXNlcjpwYXNz"
    assert web.get("/runs").status_code == 200
    assert web.get("/api/me").json() == {
        "role": "operator",
        "token": TokenAuthority.fingerprint(OPERATOR),
        "via": "session",
    }
