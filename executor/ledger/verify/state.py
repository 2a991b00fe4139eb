"""The state verify rebuilds from one run's log, and the statuses it reasons about.

Written from DESIGN.md's state machines, not imported from `executor.commands`: a handler
bug repeated in shared constants would otherwise pass its own audit.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

RUN_TERMINAL = frozenset({"completed", "failed", "cancelled"})
RUN_LIVE = frozenset({"pending", "queued", "running", "paused"})
# Statuses that hold a concurrency slot (I5); a `queued` run is waiting for one.
RUN_HOLDS_KEY = frozenset({"pending", "running", "paused"})

STEP_TERMINAL = frozenset({"completed", "failed", "cancelled"})
# A run may not fail while one of its steps is in one of these (DESIGN: "once none of its
# steps is queued or running").
STEP_IN_FLIGHT = frozenset({"queued", "running"})
# A running run with a step in one of these can still move on its own, so it is not stuck.
STEP_MOVING = frozenset({"queued", "running", "retrying", "sleeping", "waiting"})

TRANSIENT_DROPS = frozenset({"key_taken", "paused", "not_due", "busy"})
FINAL_DROPS = frozenset(
    {
        "duplicate",
        "stale_attempt",
        "terminal",
        "invalid_transition",
        "unknown_entity",
        "invalid_payload",
    }
)


def json_text(text: str | None) -> str | None:
    """A jsonb value as Postgres prints it (canonical), with JSON null and SQL NULL as None."""
    return None if text is None or text == "null" else text


def parse(text: str | None) -> Any:
    return None if text is None else json.loads(text)


class Payload(Mapping[str, Any]):
    """An event payload parsed on first use: most events are checked on the columns the
    scan extracts (fence, manual, output), and parsing every payload would double the time.
    """

    __slots__ = ("_data", "_text")

    def __init__(self, text: str | None = None, data: dict[str, Any] | None = None) -> None:
        self._text = text
        self._data = data

    def _load(self) -> dict[str, Any]:
        if self._data is None:
            loaded = json.loads(self._text) if self._text else {}
            self._data = loaded if isinstance(loaded, dict) else {}
        return self._data

    def __getitem__(self, key: str) -> Any:
        return self._load()[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self._load().get(key, default)

    def __iter__(self) -> Iterator[str]:
        return iter(self._load())

    def __len__(self) -> int:
        return len(self._load())


class Event(NamedTuple):
    seq: int
    type: str
    step_key: str | None
    attempt: int | None
    key: str
    payload: Payload  # without "output", which is `output`
    fence: str | None  # payload "fence", as text
    manual: bool  # payload "manual" is true
    output: str | None  # payload "output" as canonical jsonb text (json_text)


class Problem(NamedTuple):
    """A broken rule found by a check: the invariant, a stable rule name, what happened."""

    invariant: str
    rule: str
    message: str
    step_key: str | None = None


@dataclass
class StepState:
    key: str
    status: str = "pending"
    attempt: int = 0
    max_attempts: int = 1
    depends_on: tuple[str, ...] = ()
    kind: str = "task"
    map_over: str | None = None
    parent: str | None = None  # the map step an item belongs to
    index: int | None = None
    items_declared: int | None = None  # N, from a map step's step_waiting payload
    items: int = 0
    items_completed: int = 0
    output: str | None = None  # canonical jsonb text, see json_text
    fence: str | None = None  # the fence of the current attempt's step_started
    child_run_id: str | None = None
    started: set[int] = field(default_factory=set)
    outcomes: set[int] = field(default_factory=set)

    @property
    def is_map(self) -> bool:
        return self.kind == "map" or self.map_over is not None

    @property
    def upstream(self) -> tuple[str, ...]:
        if self.map_over is not None and self.map_over not in self.depends_on:
            return (*self.depends_on, self.map_over)
        return self.depends_on

    @property
    def items_done(self) -> bool:
        """A waiting map step whose every item completed: only its own completion is left."""
        return (
            self.is_map
            and self.items_declared is not None
            and self.items == self.items_declared
            and self.items_completed == self.items
        )


@dataclass
class RunState:
    run_id: str
    status: str | None = None
    output: str | None = None
    steps: dict[str, StepState] = field(default_factory=dict)
    counts: Counter[str] = field(default_factory=Counter)
    # A run_resumed(manual_retry) waiting for its manual step_queued in the same transaction.
    reopen: tuple[str, int] | None = None
    parent: dict[str, Any] | None = None  # a child run's parent, from run_created

    def move(self, step: StepState, to: str) -> None:
        self.counts[step.status] -= 1
        self.counts[to] += 1
        step.status = to

    def first_step(self, statuses: frozenset[str]) -> StepState | None:
        """The first step (by key) in one of `statuses`, found only when the counts say
        there is one: the scan is for a message, the common answer is "none".
        """
        if not any(self.counts[s] for s in statuses):
            return None
        return next(s for _, s in sorted(self.steps.items()) if s.status in statuses)

    def first_outside(self, statuses: frozenset[str]) -> StepState | None:
        """The first step (by key) in none of `statuses`, if any."""
        if sum(self.counts[s] for s in statuses) == len(self.steps):
            return None
        return next(s for _, s in sorted(self.steps.items()) if s.status not in statuses)
