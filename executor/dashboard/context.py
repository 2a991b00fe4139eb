"""What every request handler reaches through `request.app.state.ctx`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, cast

from psycopg_pool import ConnectionPool
from starlette.templating import Jinja2Templates

from executor.commands.models import Command
from executor.dashboard import rqinfo
from executor.dashboard.actions import Actions
from executor.dashboard.auth import TokenAuthority
from executor.dashboard.metrics import DashboardMetrics
from executor.dashboard.models import TransportSnapshot
from executor.dashboard.ratelimit import FailureLimiter, RequestLimiter
from executor.dashboard.sessions import SessionManager
from executor.dashboard.settings import DashboardSettings
from executor.ledger.outcome import Outcome

if TYPE_CHECKING:
    from executor.recovery.sweep import SweepContext


class Backend(Protocol):
    """What the dashboard needs from `executor.Client`: apply commands (and push the jobs they
    cause), and the Redis connection RQ's queues live on."""

    def apply(self, command: Command) -> Outcome: ...

    @property
    def redis(self) -> Any: ...


@dataclass
class DashboardContext:
    settings: DashboardSettings
    authority: TokenAuthority
    sessions: SessionManager
    limiter: FailureLimiter
    metrics: DashboardMetrics
    templates: Jinja2Templates
    pool: ConnectionPool[Any]
    backend: Backend
    actions: Actions
    extra_pools: dict[str, ConnectionPool[Any]] = field(default_factory=dict)
    write_pool: ConnectionPool[Any] | None = None
    """Where schedules are changed: the backend's pool, or the dashboard's own."""
    hook_limiter: RequestLimiter = field(default_factory=lambda: RequestLimiter(60, "hooks"))

    @property
    def redis(self) -> Any:
        return self.backend.redis

    @property
    def configured_queues(self) -> tuple[str, ...]:
        """Queue names from `queue_config`, when the backend carries its settings."""
        settings = getattr(self.backend, "settings", None)
        queues = getattr(settings, "queues", ())
        return tuple(str(getattr(q, "name", q)) for q in queues)

    def scheduler(self) -> SweepContext | None:
        """What starting a schedule's run needs (settings, pool, ledger, dispatcher): an
        `executor.Client` has them; a backend that only applies commands does not."""
        backend = self.backend
        if all(hasattr(backend, a) for a in ("settings", "pool", "ledger", "dispatcher")):
            return cast("SweepContext", backend)
        return None

    def transport(self) -> TransportSnapshot:
        return rqinfo.snapshot(self.redis, configured=self.configured_queues)

    def pool_stats(self) -> dict[str, dict[str, int]]:
        pools = {"dashboard": self.pool, **self.extra_pools}
        return {name: dict(p.get_stats()) for name, p in pools.items()}
