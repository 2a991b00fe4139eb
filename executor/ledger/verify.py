"""Replay every run's log against the invariants; the ledger's own auditor.

The replay here is written independently of `executor.commands.machine`: it only knows the
state machines as DESIGN.md draws them, so a bug in the handler's decisions cannot hide by
being repeated in the checker.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import psycopg

Conn = psycopg.Connection[dict[str, Any]]

RUN_EDGES: dict[str, dict[str, set[str]]] = {
    "run_started": {"pending": {"running"}},
    "run_paused": {"running": {"paused"}},
    "run_resumed": {"paused": {"running"}, "failed": {"running"}},
    "run_completed": {"running": {"completed"}},
    "run_failed": {"running": {"failed"}},
    "run_cancelled": {"pending": {"cancelled"}, "running": {"cancelled"}, "paused": {"cancelled"}},
}
STEP_TERMINAL = {"completed", "failed", "cancelled"}
RUN_TERMINAL = {"completed", "failed", "cancelled"}
TRANSIENT_REASONS = {"key_taken", "paused", "not_due", "busy"}
OUTCOME_EVENTS = {
    "step_completed": "completed",
    "step_failed": "failed",
    "step_retrying": "retrying",
}


@dataclass(frozen=True)
class Violation:
    run_id: str | None
    step_key: str | None
    seq: int | None
    invariant: str
    message: str

    def __str__(self) -> str:
        where = f"run {self.run_id}"
        if self.step_key:
            where += f" step {self.step_key}"
        if self.seq is not None:
            where += f" seq {self.seq}"
        return f"{self.invariant} violated at {where}: {self.message}"


@dataclass
class VerifyReport:
    runs: int = 0
    events: int = 0
    receipts: int = 0
    drops: int = 0
    violations: list[Violation] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations

    def as_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "runs": self.runs,
            "events": self.events,
            "receipts": self.receipts,
            "drops": self.drops,
            "violations": [asdict(v) for v in self.violations],
        }


@dataclass
class _Step:
    status: str = "pending"
    attempt: int = 0
    max_attempts: int = 1
    output: Any = None
    error: Any = None
    started: set[int] = field(default_factory=set)
    outcomes: set[int] = field(default_factory=set)


def verify(conn: Conn, *, run_id: str | None = None, stop_at_first: bool = False) -> VerifyReport:
    """Check I1, I2 and I4 and that stored rows equal the replayed state."""
    report = VerifyReport()
    # One REPEATABLE READ snapshot, so a verify running beside live workers sees rows and
    # events as of the same instant.
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        for violation in _check(conn, report, run_id):
            report.violations.append(violation)
            if stop_at_first:
                break
    return report


def _check(conn: Conn, report: VerifyReport, only: str | None) -> Iterator[Violation]:
    where, params = ("WHERE run_id = %s", (only,)) if only else ("", ())
    runs = {r["run_id"]: r for r in conn.execute(f"SELECT * FROM executor.runs {where}", params)}
    steps: dict[str, dict[str, dict[str, Any]]] = {}
    for r in conn.execute(f"SELECT * FROM executor.steps {where}", params):
        steps.setdefault(r["run_id"], {})[r["step_key"]] = r
    receipts = {
        r["idempotency_key"]: r
        for r in conn.execute(
            f"SELECT idempotency_key, run_id, outcome, first_seq, last_seq "
            f"FROM executor.receipts {where}",
            params,
        )
    }
    report.runs = len(runs)
    report.receipts = len(receipts)
    keys_with_events: Counter[str] = Counter()

    seen: set[str] = set()
    cur = conn.cursor(name="verify_events")
    cur.itersize = 5000
    cur.execute(
        f"SELECT run_id, seq, type, step_key, attempt, idempotency_key, payload "
        f"FROM executor.events {where} ORDER BY run_id, seq",
        params,
    )
    current: str | None = None
    batch: list[dict[str, Any]] = []
    for ev in cur:
        report.events += 1
        keys_with_events[ev["idempotency_key"]] += 1
        if ev["run_id"] != current and batch:
            yield from _replay(current, batch, runs, steps, receipts)
            batch = []
        current = ev["run_id"]
        seen.add(ev["run_id"])
        batch.append(ev)
    if batch:
        yield from _replay(current, batch, runs, steps, receipts)
    cur.close()
    for run_id in sorted(set(runs) - seen):
        yield Violation(run_id, None, None, "I4", "run row has no events")

    yield from _check_receipts(conn, receipts, keys_with_events, report, where, params)


def _replay(
    run_id: str | None,
    events: list[dict[str, Any]],
    runs: dict[str, dict[str, Any]],
    stored_steps: dict[str, dict[str, dict[str, Any]]],
    receipts: dict[str, dict[str, Any]],
) -> Iterator[Violation]:
    assert run_id is not None
    for expected, ev in enumerate(events, start=1):
        if ev["seq"] != expected:
            yield Violation(run_id, ev["step_key"], ev["seq"], "I4", f"expected seq {expected}")
            return
    status: str | None = None
    output: Any = None
    steps: dict[str, _Step] = {}
    for ev in events:
        seq, type_, key = ev["seq"], ev["type"], ev["step_key"]
        payload = ev["payload"] or {}
        receipt = receipts.get(ev["idempotency_key"])
        if receipt is None or receipt["outcome"] != "applied":
            yield Violation(
                run_id, key, seq, "I2", f"event {type_} has no applied receipt for its key"
            )
        elif not (receipt["first_seq"] or 0) <= seq <= (receipt["last_seq"] or -1):
            yield Violation(run_id, key, seq, "I2", f"event {type_} lies outside its receipt")
        if type_ == "run_created":
            if status is not None:
                yield Violation(run_id, None, seq, "I1", "run_created twice")
            status = "pending"
            continue
        if status is None:
            yield Violation(run_id, key, seq, "I1", f"{type_} before run_created")
            return
        if type_.startswith("run_"):
            allowed = RUN_EDGES.get(type_, {}).get(status)
            if not allowed:
                yield Violation(run_id, None, seq, "I1", f"{type_} from run status {status}")
                return
            if (
                type_ == "run_resumed"
                and status == "failed"
                and payload.get("reason") != "manual_retry"
            ):
                yield Violation(run_id, None, seq, "I1", "failed run reopened without retry")
            status = next(iter(allowed))
            if type_ == "run_completed":
                output = payload.get("output")
            continue
        if key is None:
            yield Violation(run_id, None, seq, "I1", f"{type_} without a step")
            return
        if status in RUN_TERMINAL:
            yield Violation(run_id, key, seq, "I1", f"{type_} after the run became {status}")
            return
        problem = _step_event(steps, key, type_, ev["attempt"], payload, status)
        if problem:
            yield Violation(run_id, key, seq, "I1", problem)
            return

    yield from _compare_rows(run_id, status, output, steps, runs, stored_steps, events)


def _step_event(
    steps: dict[str, _Step],
    key: str,
    type_: str,
    attempt: int | None,
    payload: dict[str, Any],
    run_status: str,
) -> str | None:
    if type_ == "step_created":
        if key in steps:
            return "step_created twice"
        if run_status != "running":
            return f"step_created while run {run_status}"
        steps[key] = _Step(max_attempts=int(payload.get("max_attempts", 1)))
        return None
    step = steps.get(key)
    if step is None:
        return f"{type_} for a step never created"
    if type_ == "step_cancelled":
        if step.status in STEP_TERMINAL:
            return f"step_cancelled after {step.status}"
        step.status = "cancelled"
        return None
    if attempt is None:
        return f"{type_} without an attempt"
    if type_ == "step_queued":
        if step.status not in ("pending", "retrying", "failed"):
            return f"step_queued from {step.status}"
        if step.status == "failed" and not payload.get("manual"):
            return "failed step queued again without a manual retry"
        if attempt != step.attempt + 1:
            return f"step_queued attempt {attempt} after attempt {step.attempt}"
        if run_status != "running":
            return f"step_queued while run {run_status}"
        step.status, step.attempt, step.error = "queued", attempt, None
        return None
    if attempt != step.attempt:
        return f"{type_} for attempt {attempt} while the step is at attempt {step.attempt}"
    if type_ == "step_started":
        if step.status in STEP_TERMINAL:
            return f"step_started after {step.status}"
        if attempt in step.started or step.status != "queued":
            return (
                f"second step_started for attempt {attempt}"
                if attempt in step.started
                else (f"step_started from {step.status}")
            )
        step.started.add(attempt)
        step.status = "running"
        return None
    if type_ in OUTCOME_EVENTS:
        if step.status in STEP_TERMINAL:
            return f"{type_} after {step.status}"
        if attempt in step.outcomes:
            return f"second outcome for attempt {attempt}"
        if step.status != "running":
            return f"{type_} from {step.status}"
        if type_ == "step_retrying" and attempt >= step.max_attempts:
            return f"step_retrying at attempt {attempt} of {step.max_attempts}"
        step.outcomes.add(attempt)
        step.status = OUTCOME_EVENTS[type_]
        if type_ == "step_completed":
            step.output, step.error = payload.get("output"), None
        else:
            step.error = payload.get("error")
        return None
    return f"unknown event type {type_}"


def _compare_rows(
    run_id: str,
    status: str | None,
    output: Any,
    steps: dict[str, _Step],
    runs: dict[str, dict[str, Any]],
    stored_steps: dict[str, dict[str, dict[str, Any]]],
    events: list[dict[str, Any]],
) -> Iterator[Violation]:
    last = events[-1]["seq"]
    row = runs.get(run_id)
    if row is None:
        yield Violation(run_id, None, last, "state", "events for a run with no row")
        return
    if row["last_seq"] != last:
        yield Violation(
            run_id, None, last, "I4", f"runs.last_seq is {row['last_seq']}, log ends at {last}"
        )
    if row["status"] != status:
        yield Violation(
            run_id, None, last, "state", f"run row is {row['status']}, log says {status}"
        )
    if status == "completed" and row["output"] != output:
        yield Violation(run_id, None, last, "state", "run output differs from run_completed")
    stored = stored_steps.get(run_id, {})
    for key in sorted(set(stored) | set(steps)):
        derived, srow = steps.get(key), stored.get(key)
        if derived is None or srow is None:
            yield Violation(
                run_id, key, last, "state", "step row and step log disagree on existence"
            )
            continue
        for name, want, got in (
            ("status", derived.status, srow["status"]),
            ("attempt", derived.attempt, srow["attempt"]),
        ):
            if want != got:
                yield Violation(
                    run_id, key, last, "state", f"step {name} is {got}, log says {want}"
                )
        if derived.status == "completed" and derived.output != srow["output"]:
            yield Violation(run_id, key, last, "state", "step output differs from step_completed")


def _check_receipts(
    conn: Conn,
    receipts: dict[str, dict[str, Any]],
    keys_with_events: Counter[str],
    report: VerifyReport,
    where: str,
    params: tuple[Any, ...],
) -> Iterator[Violation]:
    drops_by_key: Counter[tuple[str, str]] = Counter()
    for d in conn.execute(
        f"SELECT idempotency_key, reason, run_id FROM executor.drops {where}", params
    ):
        report.drops += 1
        if d["idempotency_key"] is None:
            continue
        drops_by_key[(d["idempotency_key"], d["reason"])] += 1
        if d["reason"] in TRANSIENT_REASONS:
            continue  # a refusal for now leaves the key usable: no receipt by design
        if d["idempotency_key"] not in receipts:
            yield Violation(
                d["run_id"], None, None, "I2", f"drop of key {d['idempotency_key']} has no receipt"
            )
    for key, r in receipts.items():
        if r["outcome"] == "applied":
            expected = (r["last_seq"] or 0) - (r["first_seq"] or 1) + 1
            if keys_with_events[key] != expected:
                yield Violation(
                    r["run_id"],
                    None,
                    r["first_seq"],
                    "I2",
                    f"key {key} applied with {expected} events but {keys_with_events[key]} found",
                )
        elif drops_by_key[(key, r["outcome"])] < 1:
            yield Violation(r["run_id"], None, None, "I2", f"dropped key {key} has no drop record")
