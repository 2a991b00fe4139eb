"""Rows as the handler locked them, and the status sets of the state machines.

A run carries counters of its steps (how many exist, are completed, are in flight, have
failed), kept by every transition that moves a step. They are what lets one command decide
readiness and completion without reading the rest of its run: a step knows how many of its
upstream steps are still unfinished (`waiting_on`) and who depends on it (`dependants`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

RUN_STATUSES = ("queued", "pending", "running", "paused", "completed", "failed", "cancelled")
RUN_TERMINAL = frozenset({"completed", "failed", "cancelled"})
RUN_HOLDS_KEY = frozenset({"pending", "running", "paused"})

STEP_STATUSES = (
    "pending",
    "queued",
    "running",
    "sleeping",
    "waiting",
    "retrying",
    "completed",
    "failed",
    "cancelled",
)
STEP_TERMINAL = frozenset({"completed", "failed", "cancelled"})
STEP_IN_FLIGHT = frozenset({"queued", "running"})
"""Steps a worker holds or is about to: a run with a failed step waits for these to end."""

STEP_KINDS = ("task", "sleep", "wait", "child", "map", "item")

FINAL_REASONS = (
    "duplicate",
    "stale_attempt",
    "terminal",
    "invalid_transition",
    "unknown_entity",
    "invalid_payload",
)
TRANSIENT_REASONS = ("key_taken", "paused", "not_due", "busy")
"""Refusals a later state can lift: recorded as drops, but they do not fix the key's fate."""

DROP_REASONS = FINAL_REASONS + TRANSIENT_REASONS


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
    concurrency_limit: int = 1
    concurrency_slot: int | None = None
    steps_total: int = 0
    steps_completed: int = 0
    steps_active: int = 0
    steps_failed: int = 0
    parent_run_id: str | None = None
    parent_step_key: str | None = None
    parent_attempt: int | None = None
    traceparent: str | None = None


@dataclass
class StepRow:
    step_key: str
    status: str
    attempt: int
    max_attempts: int
    depends_on: tuple[str, ...]
    """Empty on a locked row whose list is long (a join's may be thousands of keys): the
    handler leaves it out. `upstreams` is its length either way; see `depends_known`."""
    queue: str
    timeout_seconds: float | None
    backoff: dict[str, Any]
    output: Any = None
    error: Any = None
    lease_expires_at: datetime | None = None
    next_attempt_at: datetime | None = None
    kind: str = "task"
    dependants: tuple[str, ...] = ()
    waiting_on: int = 0
    map_over: str | None = None
    parent_step: str | None = None
    item_index: int | None = None
    item: Any = None
    items_total: int | None = None
    items_done: int = 0
    fence: str | None = None
    wake_at: datetime | None = None
    event_name: str | None = None
    child_run_id: str | None = None
    upstreams: int = field(default=0, compare=False)
    ctid: str | None = field(default=None, compare=False)
    """Where the locked row version is: the handler updates it by that, not by key."""
    dirty: bool = field(default=False, compare=False)
    new: bool = field(default=False, compare=False)

    def __post_init__(self) -> None:
        if not self.upstreams:
            self.upstreams = len(self.depends_on)

    @property
    def depends_known(self) -> bool:
        return len(self.depends_on) == self.upstreams


@dataclass(frozen=True)
class RunEvent:
    """An external event sent to a run and not yet consumed by a waiting step."""

    event: str
    received_seq: int
    payload: Any
