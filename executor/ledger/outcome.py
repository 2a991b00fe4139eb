"""What `apply` returns: the verdict on one delivery, in terms a caller can act on.

Frozen dataclasses, not pydantic models: they are built from rows the handler itself just
read, several per command on the hot path, and validating them again cost more than the
state machine's decision.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from datetime import datetime
from typing import Any


@dataclass(frozen=True, slots=True)
class EventRef:
    seq: int
    type: str
    step_key: str | None = None
    attempt: int | None = None


@dataclass(frozen=True, slots=True)
class OutboxItem:
    """A follow-up command committed with the change, for its writer to push.

    `then`: starts of the same run that ride in this item's job, for the worker that takes
    it to run one after another (`StepRunner` splits a wide fan-out so). Each keeps its own
    outbox row, which the relay pushes on its own if the chain never gets to it.
    """

    outbox_id: int
    run_id: str
    queue: str
    idempotency_key: str
    command: dict[str, Any]
    not_before: datetime | None = None
    timeout_seconds: float | None = None
    then: tuple[OutboxItem, ...] = ()


@dataclass(frozen=True, slots=True)
class StepContext:
    """What a started attempt needs to run, read under the same locks that started it."""

    step_key: str
    attempt: int
    queue: str
    workflow: str
    run_input: Any
    upstream: dict[str, Any]
    timeout_seconds: float | None
    lease_expires_at: datetime | None
    max_attempts: int
    fence: str | None = None
    kind: str = "task"
    item: Any = None
    item_index: int | None = None
    parent_step: str | None = None


@dataclass(frozen=True, slots=True)
class Outcome:
    idempotency_key: str | None
    run_id: str | None
    command_type: str | None
    applied: bool
    reason: str | None = None
    detail: str | None = None
    events: tuple[EventRef, ...] = ()
    followups: tuple[OutboxItem, ...] = ()
    run_status: str | None = None
    step_context: StepContext | None = None
    continued: bool = False
    """A completion that also started `step_context`'s step for its sender to run in place."""
    owner: bool = False
    """A duplicate from the delivery that owns `step_context`'s attempt (its earlier try
    committed, the answer was lost): the sender must run that step, nobody else will."""
    transient: bool = False
    """Refused for now (`key_taken`, `paused`, `not_due`, `busy`); the key stays usable."""

    def updated(self, **changes: Any) -> Outcome:
        return replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def dropped(self) -> bool:
        return not self.applied

    def summary(self) -> str:
        if self.applied:
            kinds = ", ".join(f"{e.seq}:{e.type}" for e in self.events)
            return f"applied {self.command_type} → {kinds}"
        return f"dropped {self.command_type}: {self.reason} ({self.detail})"
