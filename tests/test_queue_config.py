"""queue_config: defaults, the TOML file, EXECUTOR_* variables, and clear errors."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from executor.errors import ConfigurationError
from queue_config import ExecutorSettings, load_settings


def test_default_toml_matches_the_model_defaults() -> None:
    """default.toml documents the defaults; the model must not drift from it."""
    assert load_settings(env={}) == ExecutorSettings()


def test_defaults_route_by_priority_and_import_the_sample() -> None:
    settings = load_settings(env={})
    assert settings.queue_names == ("high", "default", "low")
    assert "executor.workflows.sample" in settings.workflow_modules
    assert settings.heartbeat_interval < settings.lease_seconds


def test_file_then_env_override(tmp_path: Path) -> None:
    path = tmp_path / "executor.toml"
    path.write_text('lease_seconds = 60.0\nworker_class = "fork"\n[retry]\nmax_attempts = 7\n')
    settings = load_settings(
        env={
            "EXECUTOR_CONFIG": str(path),
            "EXECUTOR_LEASE_SECONDS": "90",
            "EXECUTOR_WORKFLOW_MODULES": "a.b, c",
            "EXECUTOR_RETRY__BACKOFF__CAP": "5",
        }
    )
    assert settings.lease_seconds == 90
    assert settings.worker_class == "fork"
    assert settings.retry.max_attempts == 7
    assert settings.retry.backoff.cap == 5
    assert settings.retry.backoff.initial == 1.0  # tables merge key by key
    assert settings.workflow_modules == ("a.b", "c")


def test_queues_from_env_keep_known_settings() -> None:
    settings = load_settings(
        env={"EXECUTOR_QUEUES": "low,urgent", "EXECUTOR_DEFAULT_QUEUE": "urgent"}
    )
    assert settings.queue_names == ("low", "urgent")
    assert settings.queue("low").job_timeout == 600
    assert settings.queue("urgent").job_timeout == 180
    assert settings.queue("unlisted").job_timeout == settings.queue("urgent").job_timeout


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"EXECUTOR_LEASE_SECONDS": "5"}, "heartbeat_interval (10.0s) must be shorter"),
        ({"EXECUTOR_POOL_SIZE": "many"}, "pool_size"),
        ({"EXECUTOR_QUEUES": "a,a", "EXECUTOR_DEFAULT_QUEUE": "a"}, "repeated: ['a']"),
        ({"EXECUTOR_DEFAULT_QUEUE": "nowhere"}, "not one of the queues"),
        ({"EXECUTOR_WORKER_CLASS": "threads"}, "worker_class"),
        ({"EXECUTOR_WORKFLOW_MODULES": "not a module"}, "workflow_modules"),
    ],
)
def test_bad_values_fail_naming_their_source(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        load_settings(env=env)
    assert message in str(info.value)
    assert "env EXECUTOR_" in str(info.value)


def test_unknown_keys_in_a_file_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "typo.toml"
    path.write_text("lease_secs = 3\n")
    with pytest.raises(ConfigurationError, match=r"lease_secs: Extra inputs are not permitted"):
        load_settings(path)


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="does not exist"):
        load_settings(env={"EXECUTOR_CONFIG": str(tmp_path / "nope.toml")})


def test_render_round_trips() -> None:
    settings = load_settings(env={"EXECUTOR_SWEEP_INTERVAL": "0.5", "EXECUTOR_QUEUES": "default"})
    assert ExecutorSettings.model_validate(tomllib.loads(settings.render())) == settings
