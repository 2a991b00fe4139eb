"""Replay one run's log through the tables in rules.py, then hold the rows up against it.

Fed one event at a time; what it keeps is the run's rebuilt state (its steps), which the
rows comparison needs anyway, and nothing of any other run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from executor.ledger.verify.rules import COUNTERS, RUN_EVENTS, STEP_EVENTS, StepEdge
from executor.ledger.verify.state import (
    RUN_TERMINAL,
    STEP_MOVING,
    STEP_TERMINAL,
    Event,
    Problem,
    RunState,
    StepState,
    json_text,
)

# (invariant, rule, message, step_key, seq)
Report = Callable[[str, str, str, str | None, int | None], None]


class RunReplay:
    """The replay of one run; `broken` once its history stops being a path (I1, I4)."""

    def __init__(self, run_id: str, report: Report) -> None:
        self.state = RunState(run_id)
        self.report = report
        self.broken = False
        self.last_seq = 0
        self._txn_key: str | None = None

    # --- feeding -----------------------------------------------------------------------------

    def feed(self, ev: Event) -> None:
        if self.broken:
            return
        if ev.seq != self.last_seq + 1:
            self._break("I4", "seq_gap", f"expected seq {self.last_seq + 1}", ev)
            return
        self.last_seq = ev.seq
        if ev.key != self._txn_key:
            self._end_transaction()
            self._txn_key = ev.key
        if ev.type == "run_created":
            self._run_created(ev)
        elif self.state.status is None:
            self._break("I1", "before_run_created", f"{ev.type} before run_created", ev)
        elif ev.type in RUN_EVENTS:
            self._run_event(ev)
        elif ev.type in STEP_EVENTS or ev.type == "step_created":
            self._step_event(ev)
        else:
            self._break("I1", "unknown_event", f"unknown event type {ev.type}", ev)

    def _problem(self, problem: Problem, ev: Event) -> None:
        self.report(
            problem.invariant,
            problem.rule,
            problem.message,
            problem.step_key if problem.step_key is not None else ev.step_key,
            ev.seq,
        )

    def _break(self, invariant: str, rule: str, message: str, ev: Event) -> None:
        self.report(invariant, rule, message, ev.step_key, ev.seq)
        self.broken = True

    def _end_transaction(self) -> None:
        reopen = self.state.reopen
        if reopen is not None:
            self.state.reopen = None
            self.report(
                "run",
                "reopen_without_retry",
                "run_resumed(manual_retry) without a manual step_queued in its transaction",
                None,
                reopen[1],
            )

    def _run_created(self, ev: Event) -> None:
        if self.state.status is not None:
            self._break("I1", "run_created_twice", "run_created twice", ev)
            return
        self.state.status = "pending"
        if ev.payload.get("parent_run_id") is not None:
            self.state.parent = {
                k: ev.payload.get(k) for k in ("parent_run_id", "parent_step_key", "parent_attempt")
            }

    def _run_event(self, ev: Event) -> None:
        run = self.state
        edge = RUN_EVENTS[ev.type]
        before = run.status
        assert before is not None
        if before not in edge.moves:
            self._break("I1", "transition", f"{ev.type} from run status {before}", ev)
            return
        for check in edge.checks:
            problem = check(run, ev)
            if problem is not None:
                self._problem(problem, ev)
        to = edge.moves[before]
        if to is not None:
            run.status = to
        for effect in edge.effects:
            effect(run, ev, before)

    def _step_event(self, ev: Event) -> None:
        run = self.state
        key = ev.step_key
        if key is None:
            self._break("I1", "step_event_without_step", f"{ev.type} without a step", ev)
            return
        if run.status in RUN_TERMINAL:
            self._break(
                "I1", "after_terminal_run", f"{ev.type} after the run became {run.status}", ev
            )
            return
        if ev.type == "step_created":
            self._step_created(ev, key)
            return
        step = run.steps.get(key)
        if step is None:
            self._break("I1", "unknown_step", f"{ev.type} for a step never created", ev)
            return
        edge = STEP_EVENTS[ev.type]
        problem = self._structure(edge, step, ev)
        if problem is not None:
            self._break("I1", problem[0], problem[1], ev)
            return
        if edge.fenced:
            fence = ev.fence
            if fence is not None and step.fence is not None and fence != step.fence:
                self._problem(
                    Problem(
                        "I6",
                        "fence_mismatch",
                        f"{ev.type} carries fence {fence!r}, attempt {step.attempt} was "
                        f"started under {step.fence!r}",
                    ),
                    ev,
                )
        for check in edge.checks:
            found = check(run, ev, step)
            if found is not None:
                self._problem(found, ev)
        before = step.status
        if before == "pending" and edge.attempt == "same":
            step.attempt = ev.attempt or 0  # a map step leaves pending without a dispatch
        if edge.outcome:
            step.outcomes.add(step.attempt)
        run.move(step, edge.moves[before])
        for effect in edge.effects:
            effect(run, ev, step, before)

    def _structure(self, edge: StepEdge, step: StepState, ev: Event) -> tuple[str, str] | None:
        """What the tables cannot express as a check: the path itself, attempts, duplicates."""
        if step.status in STEP_TERMINAL and step.status not in edge.moves:
            return "transition", f"{ev.type} after {step.status}"
        if edge.attempt != "any" and ev.attempt is None:
            return "attempt", f"{ev.type} without an attempt"
        attempt = ev.attempt or 0
        if edge.attempt == "next" and attempt != step.attempt + 1:
            return "attempt", f"{ev.type} attempt {attempt} after attempt {step.attempt}"
        if edge.attempt == "same" and attempt != step.attempt:
            leaving_pending = step.status == "pending" and attempt == step.attempt + 1
            if not leaving_pending:
                return (
                    "attempt",
                    f"{ev.type} for attempt {attempt} while the step is at attempt {step.attempt}",
                )
        if edge.start and attempt in step.started:
            return "duplicate_start", f"second step_started for attempt {attempt}"
        if edge.outcome and attempt in step.outcomes:
            return "duplicate_outcome", f"second outcome for attempt {attempt}"
        if step.status not in edge.moves:
            return "transition", f"{ev.type} from {step.status}"
        return None

    def _step_created(self, ev: Event, key: str) -> None:
        run = self.state
        if key in run.steps:
            self._break("I1", "step_created_twice", "step_created twice", ev)
            return
        p = ev.payload
        step = StepState(
            key,
            max_attempts=int(p.get("max_attempts") or 1),
            depends_on=tuple(p.get("depends_on") or ()),
            kind=str(p.get("kind") or ("item" if p.get("parent") is not None else "task")),
            map_over=p.get("map_over"),
            parent=p.get("parent"),
            index=p.get("index"),
        )
        allowed = ("running", "paused") if step.parent is not None else ("running",)
        if run.status not in allowed:
            self._break("I1", "transition", f"step_created while run {run.status}", ev)
            return
        if step.parent is not None:
            parent = run.steps.get(step.parent)
            if parent is None or not parent.is_map or parent.status in STEP_TERMINAL:
                what = "unknown" if parent is None else parent.status if parent.is_map else "task"
                self._problem(
                    Problem("run", "map_item_order", f"item of map {step.parent}, which is {what}"),
                    ev,
                )
            else:
                parent.items += 1
                for dep in parent.upstream:
                    upstream = run.steps.get(dep)
                    if upstream is None or upstream.status != "completed":
                        status = "never created" if upstream is None else upstream.status
                        self._problem(
                            Problem(
                                "run",
                                "dependency_order",
                                f"item created while its map's upstream {dep} is {status}",
                            ),
                            ev,
                        )
                        break
        run.steps[key] = step
        run.counts["pending"] += 1

    # --- the end of the log ------------------------------------------------------------------

    def finish(self, row: dict[str, Any] | None, step_rows: dict[str, dict[str, Any]]) -> None:
        """Close the last transaction and compare the stored rows with the replay."""
        self._end_transaction()
        if self.broken:
            return
        run = self.state
        last = self.last_seq
        if row is None:
            self.report("state", "run_row", "events for a run with no row", None, last)
            return
        if row["last_seq"] != last:
            self.report(
                "I4",
                "last_seq",
                f"runs.last_seq is {row['last_seq']}, log ends at {last}",
                None,
                last,
            )
        if row["status"] != run.status:
            self.report(
                "state", "run_row", f"run row is {row['status']}, log says {run.status}", None, last
            )
        if run.status == "completed" and json_text(row["output"]) != run.output:
            self.report("state", "run_row", "run output differs from run_completed", None, last)
        for column, statuses in COUNTERS.items():
            if column in row:
                want = len(run.steps) if statuses is None else sum(run.counts[s] for s in statuses)
                if row[column] != want:
                    self.report(
                        "state",
                        "counter",
                        f"runs.{column} is {row[column]}, log says {want}",
                        None,
                        last,
                    )
        for key in sorted(set(step_rows) | set(run.steps)):
            self._compare_step(key, run.steps.get(key), step_rows.get(key))

    def _compare_step(
        self, key: str, derived: StepState | None, srow: dict[str, Any] | None
    ) -> None:
        last = self.last_seq
        if derived is None or srow is None:
            self.report(
                "state", "step_row", "step row and step log disagree on existence", key, last
            )
            return
        for name, want, got in (
            ("status", derived.status, srow["status"]),
            ("attempt", derived.attempt, srow["attempt"]),
        ):
            if want != got:
                self.report(
                    "state", "step_row", f"step {name} is {got}, log says {want}", key, last
                )
        if derived.status == "completed" and derived.output != json_text(srow["output"]):
            self.report("state", "step_row", "step output differs from step_completed", key, last)
        if "waiting_on" in srow:
            want_waiting = sum(
                1
                for d in derived.depends_on
                if self.state.steps.get(d) is None or self.state.steps[d].status != "completed"
            )
            if srow["waiting_on"] != want_waiting:
                self.report(
                    "state",
                    "step_row",
                    f"waiting_on is {srow['waiting_on']}, log says {want_waiting}",
                    key,
                    last,
                )

    def stuck_reason(self) -> tuple[str | None, str] | None:
        """Why a running run cannot move on its own, or None when something can move it.

        A waiting map step whose items all completed is not waiting on anything: only the
        transaction that completed its last item could have completed it.
        """
        run = self.state
        for step in run.steps.values():
            if step.status in STEP_MOVING and not (step.status == "waiting" and step.items_done):
                return None
        pending = run.first_step(frozenset({"pending"}))
        done = run.first_step(frozenset({"waiting"}))  # only maps with all items done are left
        if done is not None:
            return done.key, f"map step {done.key} waits although all its items completed"
        counts = ", ".join(f"{n} {s}" for s, n in sorted(run.counts.items()) if n)
        return (
            pending.key if pending else None,
            f"nothing queued, running, retrying, sleeping or waiting ({counts or 'no steps'})",
        )
