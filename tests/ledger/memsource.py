"""An in-memory `RowSource` for tests of the pure state machine.

`prepare` derives what the ledger keeps incrementally (dependants, waiting_on, the run's
step counters) from a hand-written set of rows, so tests can state rows as a reader would.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from executor.commands.state import STEP_IN_FLIGHT, RunEvent, RunRow, StepRow
from executor.commands.transition import KeyState


class MemorySource:
    def __init__(
        self,
        steps: dict[str, StepRow],
        *,
        keys: dict[str, KeyState] | None = None,
        queued: dict[str, list[RunRow]] | None = None,
        events: list[RunEvent] | None = None,
    ) -> None:
        self.rows = steps
        self.keys = keys or {}
        self.queued = queued or {}
        self.events = events or []

    def steps(self, keys: Iterable[str]) -> dict[str, StepRow]:
        return {k: self.rows[k] for k in keys if k in self.rows}

    def resumable(self) -> list[StepRow]:
        return [
            s
            for s in self.rows.values()
            if (s.status == "pending" and s.waiting_on == 0) or s.status == "retrying"
        ]

    def unfinished(self) -> list[StepRow]:
        done = ("completed", "failed", "cancelled")
        return [s for s in self.rows.values() if s.status not in done]

    def failed_step(self) -> str | None:
        return next((k for k, s in sorted(self.rows.items()) if s.status == "failed"), None)

    def sink_outputs(self) -> dict[str, Any]:
        return {
            k: s.output for k, s in self.rows.items() if not s.dependants and s.parent_step is None
        }

    def item_outputs(self, map_key: str) -> list[Any]:
        items = sorted(
            (s for s in self.rows.values() if s.parent_step == map_key),
            key=lambda s: s.item_index or 0,
        )
        return [s.output for s in items]

    def waiting_for(self, event: str) -> list[StepRow]:
        return [s for s in self.rows.values() if s.status == "waiting" and s.event_name == event]

    def buffered_event(self, event: str) -> RunEvent | None:
        return next((e for e in self.events if e.event == event), None)

    def concurrency(self, concurrency_key: str) -> KeyState:
        return self.keys.get(concurrency_key) or KeyState(concurrency_key, 1, {}, 0)

    def oldest_queued(self, concurrency_key: str) -> RunRow | None:
        waiting = self.queued.get(concurrency_key) or []
        return waiting.pop(0) if waiting else None


def prepare(run: RunRow | None, steps: dict[str, StepRow]) -> None:
    """Fill the incremental fields from the rows as given (idempotent)."""
    for key, step in steps.items():
        step.dependants = tuple(sorted(k for k, s in steps.items() if key in s.depends_on))
        step.waiting_on = sum(1 for d in step.depends_on if steps[d].status != "completed")
    if run is None:
        return
    run.steps_total = len(steps)
    run.steps_completed = sum(1 for s in steps.values() if s.status == "completed")
    run.steps_failed = sum(1 for s in steps.values() if s.status == "failed")
    run.steps_active = sum(1 for s in steps.values() if s.status in STEP_IN_FLIGHT)
