"""Wrong tokens per client address, in a moving one-minute window (the `limits` library).

Only failures are counted (a wrong bearer token, a wrong login), so an operator with the
right token never uses the budget up. A client over the limit is refused before its token
is even compared, with 429 and `Retry-After`, until the oldest failure leaves the window:
that is what turns 300 guesses in 0.4 s into 20 a minute. The count is per dashboard
process; behind a proxy every client shares the proxy's address (uvicorn runs without
`proxy_headers`), which errs on the side of refusing.
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
        reset = self._limiter.get_window_stats(self._item, "auth-failures", client).reset_time
        return max(1, math.ceil(reset - time.time()))

    def failed(self, client: str) -> None:
        self._limiter.hit(self._item, "auth-failures", client)
