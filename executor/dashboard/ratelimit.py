"""Wrong tokens per client address, and requests per hook URL, in a moving one-minute window
(the `limits` library).

Only failures are counted (a wrong bearer token, a wrong login), so an operator with the
right token never uses the budget up. A client over the limit is refused before its token
is even compared, with 429 and `Retry-After`, until the oldest failure leaves the window:
that is what turns 300 guesses in 0.4 s into 20 a minute. The count is per dashboard
process; behind a proxy every client shares the proxy's address (uvicorn runs without
`proxy_headers`), which errs on the side of refusing.

Hook URLs are limited per token instead (`RequestLimiter`): every request counts, whoever
sends it, since a third party's retries are what a limit is for, and the proxy in front of
many senders must not make them share one budget.
"""

from __future__ import annotations

import math
import time

from limits import RateLimitItemPerMinute
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter


class FailureLimiter:
    def __init__(self, per_minute: int) -> None:
        self._item = RateLimitItemPerMinute(per_minute)
        self._limiter = MovingWindowRateLimiter(MemoryStorage())

    def blocked_for(self, client: str) -> int | None:
        """Seconds until `client` may try again, or None if it may try now."""
        if self._limiter.test(self._item, "auth-failures", client):
            return None
        return _retry_after(self._limiter, self._item, "auth-failures", client)

    def failed(self, client: str) -> None:
        self._limiter.hit(self._item, "auth-failures", client)


def _retry_after(limiter: MovingWindowRateLimiter, item: RateLimitItemPerMinute, *ids: str) -> int:
    reset = limiter.get_window_stats(item, *ids).reset_time
    return max(1, math.ceil(reset - time.time()))


class RequestLimiter:
    """`per_minute` requests per key; the next one is refused until the window frees up."""

    def __init__(self, per_minute: int, namespace: str) -> None:
        self._item = RateLimitItemPerMinute(per_minute)
        self._limiter = MovingWindowRateLimiter(MemoryStorage())
        self._namespace = namespace

    def admit(self, key: str) -> int | None:
        """Count one request for `key`: None if it may go on, else seconds to wait."""
        if self._limiter.hit(self._item, self._namespace, key):
            return None
        return _retry_after(self._limiter, self._item, self._namespace, key)
