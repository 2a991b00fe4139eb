"""What verify found: violations (exit 3) and stuck runs (exit 5), kept apart.

A stuck run breaks no rule of the log, it just cannot move (I7), so an operator reads it
differently from a corrupted log; callers that only care about correctness read `.ok`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

# Enough to act on; the totals still count everything, so a badly broken ledger is
# reported in bounded memory too.
MAX_KEPT = 1000


class StopVerify(Exception):
    """Raised inside the scan once the caller asked to stop at the first violation."""


def _where(run_id: str | None, step_key: str | None, seq: int | None) -> str:
    where = f"run {run_id}"
    if step_key:
        where += f" step {step_key}"
    if seq is not None:
        where += f" seq {seq}"
    return where


@dataclass(frozen=True)
class Violation:
    run_id: str | None
    step_key: str | None
    seq: int | None
    invariant: str
    message: str
    rule: str = ""

    def __str__(self) -> str:
        name = f"{self.invariant}/{self.rule}" if self.rule else self.invariant
        return f"{name} violated at {_where(self.run_id, self.step_key, self.seq)}: {self.message}"


@dataclass(frozen=True)
class Stuck:
    run_id: str
    step_key: str | None
    seq: int | None
    status: str
    message: str
    rule: str = "stuck"

    def __str__(self) -> str:
        where = _where(self.run_id, self.step_key, self.seq)
        return f"stuck at {where} ({self.status}): {self.message}"


@dataclass
class VerifyReport:
    runs: int = 0
    events: int = 0
    receipts: int = 0
    drops: int = 0
    violations: list[Violation] = field(default_factory=list)
    stuck: list[Stuck] = field(default_factory=list)
    violations_total: int = 0
    stuck_total: int = 0
    stop_at_first: bool = False

    @property
    def ok(self) -> bool:
        """No invariant is broken (stuck runs are reported apart, see `exit_code`)."""
        return self.violations_total == 0

    @property
    def exit_code(self) -> int:
        """3 on a violation (whether or not a run is also stuck), 5 on a stuck run, else 0."""
        if self.violations_total:
            return 3
        return 5 if self.stuck_total else 0

    def violation(self, violation: Violation) -> None:
        self.violations_total += 1
        if len(self.violations) < MAX_KEPT:
            self.violations.append(violation)
        if self.stop_at_first:
            raise StopVerify

    def stuck_run(self, stuck: Stuck) -> None:
        self.stuck_total += 1
        if len(self.stuck) < MAX_KEPT:
            self.stuck.append(stuck)

    def as_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "runs": self.runs,
            "events": self.events,
            "receipts": self.receipts,
            "drops": self.drops,
            "violations": [asdict(v) for v in self.violations],
            "stuck": [asdict(s) for s in self.stuck],
            "violations_total": self.violations_total,
            "stuck_total": self.stuck_total,
            "exit_code": self.exit_code,
        }
