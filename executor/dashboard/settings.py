"""Dashboard settings: who may look, who may act, and how the pages behave.

Tokens come from the environment (never from code): `EXECUTOR_DASHBOARD_VIEWER_TOKENS` and
`EXECUTOR_DASHBOARD_OPERATOR_TOKENS`, comma-separated. A token must be long and random enough
to guess by no means (length and an entropy estimate are checked). `EXECUTOR_DASHBOARD_SECRET_KEY`
signs session cookies; when unset a random key is drawn per process, so sessions end when the
dashboard restarts (set it to keep operators logged in across restarts or replicas).
`EXECUTOR_DASHBOARD_ALLOWED_HOSTS` names the `Host` values the dashboard answers besides the
loopback ones (a DNS-rebinding page reaches 127.0.0.1 under a name of its own).
"""

from __future__ import annotations

import ipaddress
import math
import os
import secrets
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from executor.errors import ConfigurationError

VIEWER_TOKENS_ENV = "EXECUTOR_DASHBOARD_VIEWER_TOKENS"
OPERATOR_TOKENS_ENV = "EXECUTOR_DASHBOARD_OPERATOR_TOKENS"
SECRET_KEY_ENV = "EXECUTOR_DASHBOARD_SECRET_KEY"  # noqa: S105 - a variable name
SECURE_COOKIES_ENV = "EXECUTOR_DASHBOARD_SECURE_COOKIES"
ALLOWED_HOSTS_ENV = "EXECUTOR_DASHBOARD_ALLOWED_HOSTS"

MIN_TOKEN_LENGTH = 20
MIN_TOKEN_BITS = 80.0
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
GENERATE_HINT = "generate one with: python -c 'import secrets; print(secrets.token_urlsafe(24))'"


@dataclass(frozen=True)
class DashboardSettings:
    """Everything `create_app` needs besides the connections it is handed or opens."""

    database_url: str | None = None
    redis_url: str | None = None
    viewer_tokens: tuple[str, ...] = ()
    operator_tokens: tuple[str, ...] = ()
    secret_key: bytes = field(default_factory=lambda: secrets.token_bytes(32), repr=False)
    session_max_age: int = 12 * 3600
    secure_cookies: bool = False
    refresh_seconds: float = 5.0
    page_size: int = 50
    bulk_retry_limit: int = 500
    events_page_size: int = 500
    metrics_public: bool = False
    metrics_cache_seconds: float = 5.0
    statement_timeout_ms: int = 5000
    read_pool_size: int = 4
    allowed_hosts: tuple[str, ...] = ()
    auth_failures_per_minute: int = 20
    hook_requests_per_minute: int = 60
    stuck_after_seconds: float = 600.0

    def __post_init__(self) -> None:
        _check_tokens(self.viewer_tokens, self.operator_tokens)
        if len(self.secret_key) < 16 or estimated_bits(self.secret_key.decode("latin-1")) < 64:
            raise ConfigurationError(
                "the dashboard secret key must be at least 16 bytes of random text; "
                + GENERATE_HINT
            )
        if not 1 <= self.page_size <= 500:
            raise ConfigurationError("page_size must be between 1 and 500")
        if self.hook_requests_per_minute < 1:
            raise ConfigurationError("hook_requests_per_minute must be at least 1")
        if not 1 <= self.bulk_retry_limit <= 500:
            raise ConfigurationError("bulk_retry_limit must be between 1 and 500")

    @property
    def hosts(self) -> tuple[str, ...]:
        """Every `Host` the dashboard answers: the loopback names and the configured ones."""
        return (*LOOPBACK_HOSTS, *self.allowed_hosts)

    @property
    def has_tokens(self) -> bool:
        return bool(self.viewer_tokens or self.operator_tokens)

    def with_generated_operator_token(self) -> tuple[DashboardSettings, str]:
        """A copy with one fresh random operator token, returned so it can be shown once."""
        token = secrets.token_urlsafe(24)
        return replace(self, operator_tokens=(*self.operator_tokens, token)), token

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> DashboardSettings:
        """Read tokens, the cookie key and cookie flags from the environment."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {
            "viewer_tokens": split_tokens(env.get(VIEWER_TOKENS_ENV, "")),
            "operator_tokens": split_tokens(env.get(OPERATOR_TOKENS_ENV, "")),
            "secure_cookies": env.get(SECURE_COOKIES_ENV, "").strip().lower()
            in {"1", "true", "yes", "on"},
            "allowed_hosts": split_tokens(env.get(ALLOWED_HOSTS_ENV, "")),
        }
        secret = env.get(SECRET_KEY_ENV, "").strip()
        if secret:
            values["secret_key"] = secret.encode("utf-8")
        values.update(overrides)
        return cls(**values)


def split_tokens(raw: str) -> tuple[str, ...]:
    """`a, b,,c` → (`a`, `b`, `c`): whitespace around commas and empty items are ignored."""
    return tuple(part.strip() for part in raw.split(",") if part.strip())


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and `localhost`: addresses no other machine can reach."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def estimated_bits(text: str) -> float:
    """Shannon entropy of the characters times the length: a ceiling on what the text can
    hold, low for `aaaa…` or `abab…`. A random URL-safe token of 32 characters gets ~150."""
    if not text:
        return 0.0
    counts = Counter(text)
    n = len(text)
    return -sum(c / n * math.log2(c / n) for c in counts.values()) * n


def _check_tokens(viewer: tuple[str, ...], operator: tuple[str, ...]) -> None:
    for token in (*viewer, *operator):
        if any(ch.isspace() for ch in token) or not token.isprintable() or not token.isascii():
            raise ConfigurationError(
                "dashboard tokens must be printable ASCII without whitespace; " + GENERATE_HINT
            )
        if len(token) < MIN_TOKEN_LENGTH or estimated_bits(token) < MIN_TOKEN_BITS:
            raise ConfigurationError(
                f"a dashboard token is too weak: it needs at least {MIN_TOKEN_LENGTH} "
                f"characters and about {MIN_TOKEN_BITS:.0f} bits of randomness; " + GENERATE_HINT
            )
    if set(viewer) & set(operator):
        raise ConfigurationError("a dashboard token cannot be both a viewer and an operator token")
