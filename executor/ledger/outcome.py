"""What `apply` returns: the verdict on one delivery, in terms a caller can act on."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict


class EventRef(BaseModel):
    model_config = ConfigDict(frozen=True)

    seq: int
    type: str
    step_key: str | None = None
    attempt: int | None = None


class OutboxItem(BaseModel):
    """A follow-up command committed with the change; push it, then confirm it."""

    model_config = ConfigDict(frozen=True)

    outbox_id: int
    run_id: str
    queue: str
    idempotency_key: str
    command: dict[str, Any]
    not_before: datetime | None = None
    timeout_seconds: float | None = None


class StepContext(BaseModel):
    """What a started attempt needs to run, read under the same locks that started it."""

    model_config = ConfigDict(frozen=True)

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


class Outcome(BaseModel):
    model_config = ConfigDict(frozen=True)

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

    @property
    def dropped(self) -> bool:
        return not self.applied

    def summary(self) -> str:
        if self.applied:
            kinds = ", ".join(f"{e.seq}:{e.type}" for e in self.events)
            return f"applied {self.command_type} → {kinds}"
        return f"dropped {self.command_type}: {self.reason} ({self.detail})"
