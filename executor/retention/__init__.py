"""Retention: `executor prune` and the sweep leader's `retention_days` (see prune.py)."""

from executor.retention.prune import (
    InvalidDuration,
    PruneReport,
    parse_duration,
    prune,
    prune_for_leader,
)

__all__ = ["InvalidDuration", "PruneReport", "parse_duration", "prune", "prune_for_leader"]
