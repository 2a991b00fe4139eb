"""Where the ledger and the queues live: two URLs, from the environment or embedded servers.

Each URL is resolved on its own, so a user can bring their own Postgres and still get an
embedded Redis (or the other way round). Queue and worker settings live in `queue_config`.
"""

from __future__ import annotations

import os

from executor.storage import embedded

DATABASE_URL_ENV = "EXECUTOR_DATABASE_URL"
REDIS_URL_ENV = "EXECUTOR_REDIS_URL"


def _from_env(name: str) -> str | None:
    value = os.environ.get(name, "").strip()
    return value or None


def resolve_database_url(*, data_dir: str | None = None) -> str:
    """The ledger URL; starts (or reuses) the embedded Postgres only when the env var is unset."""
    return _from_env(DATABASE_URL_ENV) or embedded.ensure_postgres(data_dir)


def resolve_redis_url(*, data_dir: str | None = None) -> str:
    """The queue URL; starts (or reuses) the embedded Redis only when the env var is unset."""
    return _from_env(REDIS_URL_ENV) or embedded.ensure_redis(data_dir)


def resolve_urls(*, data_dir: str | None = None) -> tuple[str, str]:
    """(database_url, redis_url) for this process, as every entry point should obtain them."""
    return resolve_database_url(data_dir=data_dir), resolve_redis_url(data_dir=data_dir)
