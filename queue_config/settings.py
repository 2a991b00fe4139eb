"""The executor's settings: queues, timeouts, retry defaults, leases and worker knobs.

Three layers, later ones winning: `default.toml` next to this file (the documented
defaults), the TOML file named by `EXECUTOR_CONFIG`, then `EXECUTOR_<FIELD>` environment
variables. The result is validated as a whole, so a bad value fails at start with the file or
variable it came from, not later inside a worker.

pydantic-settings is not used: list values come from the environment as plain comma lists
(`EXECUTOR_WORKFLOW_MODULES=a,b`) and queues are an array of tables, neither of which it
reads without JSON; the loader below is small and says where each bad value came from.
"""

from __future__ import annotations

import json
import logging
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from executor.errors import ConfigurationError

log = logging.getLogger("executor.config")

CONFIG_ENV = "EXECUTOR_CONFIG"
ENV_PREFIX = "EXECUTOR_"
DEFAULT_FILE = Path(__file__).with_name("default.toml")

# Variables with the prefix that are not settings: read elsewhere, never warned about.
_NOT_SETTINGS = frozenset(
    {
        "EXECUTOR_CONFIG",
        "EXECUTOR_DATABASE_URL",
        "EXECUTOR_REDIS_URL",
        "EXECUTOR_DATA_DIR",
        "EXECUTOR_SQL_DIR",
        "EXECUTOR_TEST_DATA_DIR",
    }
)
_NOT_SETTINGS_PREFIXES = ("EXECUTOR_DASHBOARD_", "EXECUTOR_TEST_", "EXECUTOR_BENCH_")
_warned: set[str] = set()

RATE_PATTERN = r"^\s*\d+(\.\d+)?\s*/\s*(s|sec|second|m|min|minute|h|hour)\s*$"
"""What a `rate_limit` looks like: "50/s", "100/m", "2.5/h" (see executor.transport.ratelimit)."""

Name = Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.:\-]+$")]
Seconds = Annotated[float, Field(gt=0, le=7 * 86_400)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class QueueSettings(_Model):
    """One RQ queue. Its place in `queues` is its priority."""

    name: Name
    job_timeout: Annotated[int, Field(ge=1, le=7 * 86_400)] = 180
    result_ttl: Annotated[int, Field(ge=0, le=30 * 86_400)] = 0
    failure_ttl: Annotated[int, Field(ge=1, le=365 * 86_400)] = 86_400
    rate_limit: Annotated[str, Field(pattern=RATE_PATTERN)] | None = None
    """Step starts allowed on this queue across all workers, e.g. "50/s", "100/m"."""


class BackoffSettings(_Model):
    """Exponential backoff with full jitter and a cap (the fields of `BackoffPolicy`)."""

    initial: Annotated[float, Field(ge=0, le=86_400)] = 1.0
    multiplier: Annotated[float, Field(ge=1, le=100)] = 2.0
    cap: Annotated[float, Field(ge=0, le=86_400)] = 60.0
    jitter: bool = True


class RetrySettings(_Model):
    max_attempts: Annotated[int, Field(ge=1, le=1000)] = 3
    backoff: BackoffSettings = BackoffSettings()


def _default_queues() -> tuple[QueueSettings, ...]:
    return (
        QueueSettings(name="high"),
        QueueSettings(name="default"),
        QueueSettings(name="low", job_timeout=600),
    )


class ExecutorSettings(_Model):
    """Everything a worker, the relay and the reaper read; see default.toml for each field."""

    queues: tuple[QueueSettings, ...] = Field(default_factory=_default_queues, min_length=1)
    default_queue: Name = "default"
    lease_seconds: Seconds = 30.0
    heartbeat_interval: Seconds = 10.0
    sweep_interval: Seconds = 5.0
    outbox_grace_seconds: Annotated[float, Field(ge=0, le=86_400)] = 10.0
    step_timeout_grace_seconds: Annotated[float, Field(ge=0, le=86_400)] = 5.0
    workflow_modules: tuple[Annotated[str, Field(pattern=r"^[A-Za-z_][\w.]*$")], ...] = (
        "executor.workflows.sample",
    )
    worker_class: Literal["simple", "fork"] = "simple"
    pool_size: Annotated[int, Field(ge=3, le=200)] = 4
    relay_batch_size: Annotated[int, Field(ge=1, le=100_000)] = 500
    schedule_grace_seconds: Annotated[float, Field(ge=0, le=7 * 86_400)] = 60.0
    retention_days: Annotated[float, Field(gt=0, le=36_500)] | None = None
    retry: RetrySettings = RetrySettings()
    public_url: Annotated[str, Field(pattern=r"^https?://[^\s]+$", max_length=500)] = (
        "http://127.0.0.1:8080"
    )

    @model_validator(mode="after")
    def _consistent(self) -> ExecutorSettings:
        names = [q.name for q in self.queues]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"queue names must be unique; repeated: {duplicated}")
        if self.default_queue not in names:
            raise ValueError(
                f"default_queue {self.default_queue!r} is not one of the queues {names}"
            )
        if self.heartbeat_interval >= self.lease_seconds:
            raise ValueError(
                f"heartbeat_interval ({self.heartbeat_interval}s) must be shorter than "
                f"lease_seconds ({self.lease_seconds}s), or every running step loses its lease"
            )
        return self

    @property
    def queue_names(self) -> tuple[str, ...]:
        """Queue names, highest priority first: the order a worker listens in."""
        return tuple(q.name for q in self.queues)

    def queue(self, name: str) -> QueueSettings:
        """Settings of `name`; a queue not configured gets the default queue's settings.

        Steps may name any queue; workers started on an explicit list may serve it, so an
        unknown name is routed rather than refused.
        """
        for q in self.queues:
            if q.name == name:
                return q
        base = self.queue(self.default_queue)
        return base.model_copy(update={"name": name})

    def render(self) -> str:
        """The effective settings as TOML, loadable again through EXECUTOR_CONFIG."""
        data = self.model_dump(mode="json")
        lines = ["# effective executor settings"]
        lines += [
            f"{k} = {_toml_value(v)}" if v is not None else f"# {k} is unset"
            for k, v in data.items()
            if not isinstance(v, dict | list)
        ]
        lines += [f"{k} = {_toml_value(v)}" for k, v in data.items() if _is_scalar_list(v)]
        for queue in data["queues"]:
            lines += ["", "[[queues]]"]
            lines += [
                f"{k} = {_toml_value(v)}" if v is not None else f"# {k} is unset"
                for k, v in queue.items()
            ]
        lines += _toml_table("retry", data["retry"])
        return "\n".join(lines) + "\n"


def _is_scalar_list(value: Any) -> bool:
    return isinstance(value, list) and all(not isinstance(v, dict | list) for v in value)


def _toml_table(name: str, table: dict[str, Any]) -> list[str]:
    lines = ["", f"[{name}]"]
    lines += [f"{k} = {_toml_value(v)}" for k, v in table.items() if not isinstance(v, dict)]
    for k, v in table.items():
        if isinstance(v, dict):
            lines += _toml_table(f"{name}.{k}", v)
    return lines


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot render {value!r} as TOML")


# --- loading -------------------------------------------------------------------------------


def load_settings(
    path: str | os.PathLike[str] | None = None, *, env: Mapping[str, str] | None = None
) -> ExecutorSettings:
    """Defaults, then the TOML file (`path`, else $EXECUTOR_CONFIG), then EXECUTOR_* variables.

    Raises ConfigurationError naming the file or variable with the bad value.
    """
    environ = os.environ if env is None else env
    data = _read_toml(DEFAULT_FILE)
    sources = [str(DEFAULT_FILE.name)]
    chosen = path if path is not None else (environ.get(CONFIG_ENV, "").strip() or None)
    if chosen is not None:
        data = _merge(data, _read_toml(Path(chosen)))
        sources.append(str(chosen))
    overrides, names = _env_overrides(environ, data)
    if names:
        data = _merge(data, overrides)
        sources.append("env " + ", ".join(names))
    try:
        return ExecutorSettings.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}"
            for err in exc.errors()[:10]
        )
        raise ConfigurationError(
            f"invalid executor settings (from {' + '.join(sources)}): {problems}"
        ) from exc


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigurationError(f"settings file {path} does not exist ({CONFIG_ENV})") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigurationError(f"cannot read settings file {path}: {exc}") from exc


def _merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """Tables merge key by key; anything else (queues included) is replaced whole."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _env_overrides(
    environ: Mapping[str, str], current: Mapping[str, Any]
) -> tuple[dict[str, Any], list[str]]:
    """Turn EXECUTOR_<FIELD>[__<SUBFIELD>...] variables into a nested dict of raw values."""
    fields = _field_paths(ExecutorSettings)
    out: dict[str, Any] = {}
    used: list[str] = []
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX) or name in _NOT_SETTINGS:
            continue
        if name.startswith(_NOT_SETTINGS_PREFIXES):
            continue
        path = tuple(part.lower() for part in name[len(ENV_PREFIX) :].split("__"))
        kind = fields.get(path)
        if kind is None:
            if name not in _warned:  # once per process: settings load in every Client
                _warned.add(name)
                log.warning("ignoring %s: not an executor setting (a typo?)", name)
            continue
        raw = environ[name].strip()
        value: Any = raw
        if kind == "list":
            value = _env_list(name, raw)
        elif kind == "queues":
            value = _env_queues(name, raw, current.get("queues", []))
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
        used.append(name)
    return out, used


def _field_paths(
    model: type[BaseModel], prefix: tuple[str, ...] = ()
) -> dict[tuple[str, ...], str]:
    paths: dict[tuple[str, ...], str] = {}
    for name, info in model.model_fields.items():
        path = (*prefix, name)
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            paths.update(_field_paths(annotation, path))
        elif name == "queues":
            paths[path] = "queues"
        elif name == "workflow_modules":
            paths[path] = "list"
        else:
            paths[path] = "scalar"
    return paths


def _env_list(name: str, raw: str) -> list[str]:
    if raw.startswith("["):
        try:
            parsed = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ConfigurationError(f"{name} is not a JSON list: {exc}") from exc
        if not isinstance(parsed, list):
            raise ConfigurationError(f"{name} must be a list")
        return [str(v) for v in parsed]
    return [part.strip() for part in raw.split(",") if part.strip()]


def _env_queues(name: str, raw: str, current: list[dict[str, Any]]) -> list[Any]:
    """Either JSON (a list of queue tables) or names in priority order, keeping known settings."""
    if raw.startswith("["):
        try:
            parsed = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ConfigurationError(f"{name} is not a JSON list: {exc}") from exc
        if not isinstance(parsed, list):
            raise ConfigurationError(f"{name} must be a list")
        return parsed
    known = {q.get("name"): q for q in current if isinstance(q, dict)}
    return [known.get(n, {"name": n}) for n in _env_list(name, raw)]
