"""How work is routed: the named queues and their priorities, timeouts, retry/backoff
defaults, leases, the sweep and worker settings, in one validated place.

`load_settings()` reads `default.toml`, then the file named by EXECUTOR_CONFIG, then
EXECUTOR_<FIELD> environment variables; `settings.render()` prints the effective result.
"""

from queue_config.settings import (
    CONFIG_ENV,
    BackoffSettings,
    ExecutorSettings,
    QueueSettings,
    RetrySettings,
    load_settings,
)

__all__ = [
    "CONFIG_ENV",
    "BackoffSettings",
    "ExecutorSettings",
    "QueueSettings",
    "RetrySettings",
    "load_settings",
]
