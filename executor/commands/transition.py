"""The in-memory result of deciding one command, and the rows it may pull in on the way.

The handler locks the run and the rows a command names up front (the step, its dependants
and its map). A decision that needs more — the outputs of a run's sinks when it completes,
the steps a resume restarts, the run a freed slot admits — asks a `RowSource`, which the
handler backs with queries on the same transaction (each locking what it returns) and tests
back with dicts. Every such read is reached through an index and is proportional to the
work the command does, never to the size of its run.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from executor.commands.models import Command
from executor.commands.state import STEP_IN_FLIGHT, RunEvent, RunRow, StepRow


class Drop(Exception):
    """Refuse the command: nothing it changed in memory is kept.

    `resend` (for a transient refusal of a system command, e.g. `not_due`) is written back to
    the outbox in the same transaction, so the command is delivered again when it can apply.
    `error` is raised to the caller after the drop is recorded (a launch refused for its key).
    """

    def __init__(
        self,
        reason: str,
        detail: str,
        *,
        resend: FollowUp | None = None,
        error: Exception | None = None,
    ) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.resend = resend
        self.error = error


@dataclass(frozen=True)
class NewEvent:
    type: str
    step_key: str | None = None
    attempt: int | None = None
    payload: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class FollowUp:
    """A command to deliver after commit, no earlier than `not_before`."""

    queue: str
    command: Command
    not_before: datetime | None = None
    timeout_seconds: float | None = None


@dataclass(frozen=True)
class KeyState:
    """A concurrency key as locked for a launch, an admission or a reopening."""

    concurrency_key: str
    limit: int
    holders: dict[int, str]
    queued: int

    def free_slot(self, limit: int) -> int | None:
        return next((s for s in range(limit) if s not in self.holders), None)

    @property
    def holder(self) -> str:
        return self.holders[min(self.holders)]


@dataclass
class OtherRun:
    """A second run the same transaction changes: a child it creates, a run it admits.

    Its events get their own receipt (`receipt_key`), in that run's log.
    """

    run: RunRow
    receipt_key: str
    receipt_command: Command
    created: bool = False
    events: list[NewEvent] = field(default_factory=list)


@dataclass(frozen=True)
class Buffered:
    """An external event to keep (index into the transition's events gives its seq)."""

    event: str
    payload: Any
    event_index: int
    consumed_by: str | None = None


class RowSource(Protocol):
    def steps(self, keys: Iterable[str]) -> dict[str, StepRow]: ...
    def resumable(self) -> list[StepRow]: ...
    def unfinished(self) -> list[StepRow]: ...
    def failed_step(self) -> str | None: ...
    def sink_outputs(self) -> dict[str, Any]: ...
    def item_outputs(self, map_key: str) -> list[Any]: ...
    def waiting_for(self, event: str) -> list[StepRow]: ...
    def buffered_event(self, event: str) -> RunEvent | None: ...
    def concurrency(self, concurrency_key: str) -> KeyState: ...
    def oldest_queued(self, concurrency_key: str) -> RunRow | None: ...


@dataclass
class Transition:
    run: RunRow
    steps: dict[str, StepRow]
    source: RowSource
    now: datetime
    lease_seconds: float
    fence: str | None = None
    events: list[NewEvent] = field(default_factory=list)
    followups: list[FollowUp] = field(default_factory=list)
    others: list[OtherRun] = field(default_factory=list)
    buffered: list[Buffered] = field(default_factory=list)
    consumed: list[tuple[int, str, int]] = field(default_factory=list)
    """(received_seq, step_key, index of the consuming event) of run_events consumed."""
    spent_keys: list[str] = field(default_factory=list)
    """Keys of outbox commands this transition makes moot (a retry's dispatch, when a resume
    queues the retry itself): their rows go with it."""
    run_created: bool = False
    key_limit: tuple[str, int] | None = None
    started: StepRow | None = None
    continued: StepRow | None = None
    ended: bool = False

    def emit(self, type_: str, step: StepRow | None = None, **payload: Any) -> int:
        self.events.append(
            NewEvent(
                type_, step.step_key if step else None, step.attempt if step else None, payload
            )
        )
        return len(self.events) - 1

    def set_run(self, status: str, **fields: Any) -> None:
        self.run.status = status
        for name, value in fields.items():
            setattr(self.run, name, value)

    def step(self, key: str) -> StepRow | None:
        if key not in self.steps:
            self.steps.update(self.source.steps([key]))
        return self.steps.get(key)

    def load(self, keys: Iterable[str]) -> list[StepRow]:
        wanted = list(keys)
        missing = [k for k in wanted if k not in self.steps]
        if missing:
            self.steps.update(self.source.steps(missing))
        return [self.steps[k] for k in wanted if k in self.steps]

    def add_step(self, step: StepRow) -> None:
        step.new = step.dirty = True
        self.steps[step.step_key] = step
        self.run.steps_total += 1
        self._count(step.status, +1)

    def move(self, step: StepRow, status: str) -> None:
        """Every status change goes through here, so the run's counters stay exact."""
        self._count(step.status, -1)
        step.status = status
        step.dirty = True
        self._count(status, +1)

    def _count(self, status: str, delta: int) -> None:
        if status == "completed":
            self.run.steps_completed += delta
        elif status == "failed":
            self.run.steps_failed += delta
        elif status in STEP_IN_FLIGHT:
            self.run.steps_active += delta
