"""The deployment files hold together: services, order, health checks, and no baked secrets.

No Docker here: the structure is checked with PyYAML, which is what can break silently
(a renamed service, a lost health check, a password typed in "just for now").
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parent.parent
SECRETISH = re.compile(r"PASSWORD|TOKEN|SECRET", re.IGNORECASE)
# ${VAR:?message} (required) or ${VAR:-} (optional, empty by default)
FROM_ENV = re.compile(r"^\$\{[A-Z_]+:(\?[^}]*|-)\}$")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found = compose["services"]
    assert isinstance(found, dict)
    return found


def test_every_service_is_there(compose: dict[str, Any]) -> None:
    assert set(services(compose)) == {"postgres", "redis", "migrate", "worker", "dashboard"}


def test_two_workers_start_after_a_successful_migration(compose: dict[str, Any]) -> None:
    worker = services(compose)["worker"]
    assert worker["deploy"]["replicas"] == 2
    assert worker["command"] == ["executor", "worker"]
    assert worker["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
    migrate = services(compose)["migrate"]
    assert migrate["command"] == ["executor", "migrate"]
    assert migrate["restart"] == "no"
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_long_running_services_have_health_checks(compose: dict[str, Any]) -> None:
    for name in ("postgres", "redis", "worker", "dashboard"):
        check = services(compose)[name].get("healthcheck")
        assert check, name
        assert check["test"], name


def test_dashboard_listens_on_all_interfaces_in_the_container_only(compose: dict[str, Any]) -> None:
    dashboard = services(compose)["dashboard"]
    command = dashboard["command"]
    assert command[:2] == ["executor", "dashboard"]
    assert command[command.index("--host") + 1] == "0.0.0.0"
    assert all(str(p).startswith("127.0.0.1:") for p in dashboard["ports"])
    assert "/healthz" in " ".join(dashboard["healthcheck"]["test"])


def test_app_services_share_the_image_and_the_urls(compose: dict[str, Any]) -> None:
    for name in ("migrate", "worker", "dashboard"):
        service = services(compose)[name]
        assert service["build"] == "."
        env = service["environment"]
        assert env["EXECUTOR_DATABASE_URL"].startswith(
            "postgresql://executor:${POSTGRES_PASSWORD:?"
        )
        assert env["EXECUTOR_DATABASE_URL"].endswith("@postgres:5432/executor")
        assert env["EXECUTOR_REDIS_URL"] == "redis://redis:6379/0"


def test_no_secret_is_written_in_the_file(compose: dict[str, Any]) -> None:
    for name, service in services(compose).items():
        for key, value in (service.get("environment") or {}).items():
            if SECRETISH.search(key):
                assert FROM_ENV.match(str(value)), f"{name}.{key} must come from the environment"
            for password in re.findall(r"postgresql://[^:]+:([^@]+)@", str(value)):
                assert FROM_ENV.match(password), f"{name}.{key} embeds a password"


def test_only_named_volumes(compose: dict[str, Any]) -> None:
    for name, service in services(compose).items():
        for volume in service.get("volumes", []):
            source = str(volume).split(":", 1)[0]
            assert source in compose["volumes"], f"{name} mounts a host path: {volume}"


def test_dockerfile_builds_the_app_with_the_dashboard_extra() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim$", text, re.MULTILINE)
    assert 'pip install ".[dashboard]"' in text
    assert re.search(r"^USER (?!root)\w+", text, re.MULTILINE), "the image must not run as root"
