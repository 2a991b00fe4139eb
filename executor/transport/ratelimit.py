"""Rate limits that hold across every worker process: GCRA in one Redis script.

Why a script of our own: RQ has no rate limiting, and the Python limiters (limits,
pyrate-limiter) either keep state per process or take one limit per call, so a step under a
queue limit and a workflow limit could spend a token of one and be refused by the other.
The script checks every limit of a step at once on the Redis server's clock and spends
tokens only when all admit it.

A limited step is not started: the worker waits for its turn (short waits, in place) or
hands the job back for later (long ones), so no attempt is charged and no lease held.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib.resources import files

import redis

from queue_config import ExecutorSettings

_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|sec|second|m|min|minute|h|hour)\s*$")
_UNIT = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60, "h": 3600, "hour": 3600}


@dataclass(frozen=True)
class Rate:
    per_second: float

    @classmethod
    def parse(cls, text: str) -> Rate:
        found = _RATE.match(text)
        if found is None:
            raise ValueError(f"rate limit {text!r} is not like '50/s', '100/m' or '2.5/h'")
        count = float(found.group(1))
        if count <= 0:
            raise ValueError(f"rate limit {text!r} must allow more than nothing")
        return cls(count / _UNIT[found.group(2)])

    @property
    def interval_us(self) -> int:
        return max(1, round(1_000_000 / self.per_second))


class Limiter:
    """Asks Redis whether a step under `limits` may start now; thread-safe."""

    def __init__(self, client: redis.Redis, prefix: str = "executor:rate:") -> None:
        self.prefix = prefix
        source = files("executor.transport").joinpath("lua/rate_limit.lua").read_text()
        self._script = client.register_script(source)

    def wait_for(self, limits: dict[str, Rate]) -> float:
        """0.0 if the step may start now (its tokens are spent), else seconds to wait."""
        if not limits:
            return 0.0
        names = sorted(limits)
        waited = self._script(
            keys=[self.prefix + n for n in names],
            args=[limits[n].interval_us for n in names],
        )
        return int(waited) / 1_000_000


class RateLimits:
    """The limits a step start is under: its queue's (queue_config) and its workflow's."""

    def __init__(
        self, settings: ExecutorSettings, limiter: Limiter, route: Callable[[str], str]
    ) -> None:
        """`route` maps a step's queue name to the queue it really uses (`default`)."""
        self.settings = settings
        self.limiter = limiter
        self.route = route
        self._queues = {
            q.name: Rate.parse(q.rate_limit) for q in settings.queues if q.rate_limit is not None
        }

    def of(self, workflow: str | None, queue: str) -> dict[str, Rate]:
        from executor.errors import UnknownWorkflow
        from executor.workflows.registry import get_workflow

        limits: dict[str, Rate] = {}
        queue = self.route(queue)
        rate = self._queues.get(queue)
        if rate is not None:
            limits[f"queue:{queue}"] = rate
        if workflow is not None:
            try:
                own = get_workflow(workflow).rate_limit
            except UnknownWorkflow:
                own = None
            if own is not None:
                limits[f"workflow:{workflow}"] = own
        return limits
