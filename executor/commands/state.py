"""Rows as the handler locked them, and the terminal/active sets of the state machines."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

RUN_STATUSES = ("pending", "running", "paused", "completed", "failed", "cancelled")
RUN_TERMINAL = frozenset({"completed", "failed", "cancelled"})

STEP_STATUSES = ("pending", "queued", "running", "completed", "failed", "retrying", "cancelled")
STEP_TERMINAL = frozenset({"completed", "failed", "cancelled"})
STEP_IN_FLIGHT = frozenset({"queued", "running"})

DROP_REASONS = (
    "duplicate",
    "stale_attempt",
    "terminal",
    "invalid_transition",
    "unknown_entity",
    "invalid_payload",
)


@dataclass
class RunRow:
    run_id: str
    workflow: str
    status: str
    concurrency_key: str | None
    input: Any
    output: Any
    error: Any
    last_seq: int


@dataclass
class StepRow:
    step_key: str
    status: str
    attempt: int
    max_attempts: int
    depends_on: tuple[str, ...]
    queue: str
    timeout_seconds: float | None
    backoff: dict[str, Any]
    output: Any = None
    error: Any = None
    lease_expires_at: datetime | None = None
    next_attempt_at: datetime | None = None
    dirty: bool = field(default=False, compare=False)
    new: bool = field(default=False, compare=False)
