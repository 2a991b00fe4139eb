"""Property: whatever the transport does to deliveries, the ledger stays correct.

Hypothesis draws a workflow (a small DAG with parallel branches and joins, of tasks, durable
sleeps, waits for an external event, child runs and maps over a task's list) and a hostile
transport: deliveries duplicated, held back and delivered out of order, old ones sent again,
workers that complete, fail (retryably or not) or lose their lease and come back as zombies
with a stale completion, answers lost after the commit (the sender asks again under the same
fence and must be told what it owns), operators who pause, resume, cancel (the parent or a
child) and retry by hand, timers woken before they are due, backoffs that are not over when
a clock-skewed worker dispatches, events sent before the wait, after it, twice, and after the
run ended. Each round of deliveries is applied from several threads at once; a sequential
drain phase then delivers what is left until every run of the example is terminal.

Time is the database's: timers and backoffs are an hour long, and the test's "clock" moves
by setting `wake_at` / `next_attempt_at` of the example's steps into the past, after which a
reaper pass (as executor.recovery.reaper does it) wakes what is due. The relay is simulated
too: commands whose answer was lost, or that were refused for now, are delivered again from
`executor.outbox`, the only place they survive.

Afterwards, for the run and every child run it started:

* `verify` finds nothing and no run is stuck (I1 valid histories, I2 receipts, I4 gapless
  log, rows = replay, the run-level rules, parents and children agreeing);
* every delivery left exactly one record: applied receipts + drop rows == deliveries, plus
  the receipt a child run's creation leaves in its own log (I2);
* delivering any already-delivered command again changes nothing: same rows, same events,
  same receipts, same outbox, one more `duplicate` drop each (I3);
* every run reached a terminal status (nothing got stuck; no run is left paused).

`HYPOTHESIS_PROFILE` picks the number of examples: dev (10), default (60), ci (150),
thorough (500). Thread interleavings cannot be replayed, so a failure may shrink poorly or be
reported as flaky; the falsifying plan (workflow, seed, rates) still describes the schedule.
"""

from __future__ import annotations

import itertools
import os
import random
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import psycopg
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st
from psycopg_pool import ConnectionPool

from executor.commands.models import (
    AwaitChild,
    AwaitEvent,
    BackoffPolicy,
    CancelRun,
    Command,
    CompleteStep,
    CreateRun,
    ExpireLease,
    FailStep,
    PauseRun,
    ResumeRun,
    RetryStep,
    SendEvent,
    Sleep,
    StartRun,
    StartStep,
    StepSpec,
    SuspendStep,
    WakeStep,
    parse_obj,
    unplanned_start,
)
from executor.ledger.handler import Ledger
from executor.ledger.outcome import Outcome, StepContext
from executor.ledger.verify import verify

Pool = ConnectionPool[psycopg.Connection[dict[str, Any]]]

EXAMPLES = {"dev": 10, "default": 60, "ci": 150, "thorough": 500}
MAX_EXAMPLES = EXAMPLES.get(os.environ.get("HYPOTHESIS_PROFILE", "default"), 60)

HOUR = 3600.0
NO_WAIT = BackoffPolicy(initial=0, jitter=False)  # retries are due at once
LATER = BackoffPolicy(initial=HOUR, cap=HOUR, jitter=False)  # due once the test's clock moves
FATES = ("complete", "fail", "fatal", "die")
EXTERNALS = ("pause", "resume", "cancel", "retry", "cancel_child", "wake")
KINDS = ("task", "task", "sleep", "wait", "child", "child", "map", "map")
TERMINAL = ("completed", "failed", "cancelled")
CHILD_WORKFLOW = "child"

_run_ids = itertools.count()


@dataclass(frozen=True)
class Plan:
    specs: tuple[StepSpec, ...]
    child_specs: tuple[StepSpec, ...]  # the graph of every child run
    seed: int
    threads: int
    rounds: int
    dup_rate: float  # chance a delivery is duplicated, and that old ones are sent again
    hold_rate: float  # chance a due delivery is held back to a later round (reordering)
    zombie_rate: float  # chance a worker that lost its lease still reports, late
    lost_rate: float  # chance the answer to a delivery is lost and the sender asks again
    tick_rate: float  # chance per round that the clock moves: every timer and backoff is due
    relay_rate: float  # chance per round that the relay pushes every outbox row again
    early_event_rate: float  # chance a wait's event is sent before the step waits
    fate_weights: tuple[int, ...]  # complete, fail (retryable), fail (fatal), die
    externals: tuple[tuple[int, str], ...]  # (round, kind) operator commands
    retries_after_failure: int  # manual retries an operator makes once the run failed


def _graph(draw: st.DrawFn, count: int, kinds: tuple[str, ...]) -> tuple[StepSpec, ...]:
    """`count` steps; each depends on a random subset of earlier ones (branches and joins)."""
    specs: list[StepSpec] = []
    for i in range(count):
        earlier = [s.step_key for s in specs]
        deps = set(
            draw(st.lists(st.sampled_from(earlier), unique=True, max_size=min(3, i)))
            if earlier
            else []
        )
        kind = draw(st.sampled_from(kinds))
        tasks = [s.step_key for s in specs if s.kind == "task"]
        map_over = None
        if kind == "map":
            if tasks:
                map_over = draw(st.sampled_from(tasks))
                deps.add(map_over)
            else:
                kind = "task"
        specs.append(
            StepSpec(
                step_key=f"s{i}",
                depends_on=tuple(sorted(deps)),
                max_attempts=draw(st.integers(1, 3)),
                backoff=draw(st.sampled_from([NO_WAIT, NO_WAIT, LATER])),
                kind=kind,  # type: ignore[arg-type]
                map_over=map_over,
            )
        )
    return tuple(specs)


@st.composite
def workflows(draw: st.DrawFn) -> tuple[StepSpec, ...]:
    """1-5 steps of every kind: task, sleep, wait (an event), child (a run), map."""
    return _graph(draw, draw(st.integers(1, 5)), KINDS)


@st.composite
def child_workflows(draw: st.DrawFn) -> tuple[StepSpec, ...]:
    return _graph(draw, draw(st.integers(1, 2)), ("task",))


@st.composite
def plans(draw: st.DrawFn) -> Plan:
    rounds = draw(st.integers(1, 8))
    return Plan(
        specs=draw(workflows()),
        child_specs=draw(child_workflows()),
        seed=draw(st.integers(0, 2**32 - 1)),
        threads=draw(st.integers(2, 6)),
        rounds=rounds,
        dup_rate=draw(st.sampled_from([0.0, 0.2, 0.5])),
        hold_rate=draw(st.sampled_from([0.0, 0.25, 0.5])),
        zombie_rate=draw(st.sampled_from([0.0, 0.7, 1.0])),
        lost_rate=draw(st.sampled_from([0.0, 0.2, 0.5])),
        tick_rate=draw(st.sampled_from([0.0, 0.3, 0.7])),
        relay_rate=draw(st.sampled_from([0.0, 0.3])),
        early_event_rate=draw(st.sampled_from([0.0, 0.5, 1.0])),
        fate_weights=draw(
            st.tuples(st.integers(2, 6), st.integers(0, 3), st.integers(0, 1), st.integers(0, 4))
        ),
        externals=tuple(
            draw(
                st.lists(
                    st.tuples(st.integers(0, rounds - 1), st.sampled_from(EXTERNALS)), max_size=5
                )
            )
        ),
        retries_after_failure=draw(st.integers(0, 2)),
    )


@dataclass
class Sim:
    """The transport, the workers, the relay, the reaper and the operators, as one adversary.

    Sent commands wait in `bag` with the tick from which they may be delivered. A chaos
    round delivers everything due (minus what it holds back, plus duplicates) from several
    threads at once; the drain delivers one due command at a time, picked at random.

    A delivery is what a worker does with a job: a `start_step` gets a fence of its own (a
    duplicated job is two deliveries, two fences), a `start_run` without steps is planned.
    A lost answer is that delivery applied twice with the same fence, the first outcome
    never seen: whatever it wrote to the outbox is only delivered by the relay.
    """

    ledger: Ledger
    pool: Pool
    run_id: str
    plan: Plan
    rng: random.Random = field(init=False)
    clock: int = 0
    bag: list[tuple[int, Command]] = field(default_factory=list)
    delivered: list[Command] = field(default_factory=list)
    first_by_key: dict[str, Command] = field(default_factory=dict)
    runs: list[str] = field(default_factory=list)  # this run, then its children as created
    external_count: int = 0
    fences: int = 0
    lost: int = 0
    owner_answers: int = 0
    events_sent: Counter[str] = field(default_factory=Counter)
    # Late reports held until the step's next attempt is queued: (run, step, attempt, command).
    zombies: list[tuple[str, str, int, Command]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.plan.seed)
        self.runs.append(self.run_id)
        self.specs = {s.step_key: s for s in self.plan.specs}
        self.mapped = {s.map_over for s in self.plan.specs if s.map_over is not None}

    # --- the transport ---------------------------------------------------------------------

    def send(self, command: Command, delay: int = 0) -> None:
        self.bag.append((self.clock + delay, command))

    def from_wire(self, obj: dict[str, Any]) -> Command:
        """An outbox row's command as a job carries it (a start_run to plan has no steps)."""
        if obj.get("type") == "start_run" and not obj.get("steps"):
            return unplanned_start(obj["run_id"], obj["workflow"])
        return parse_obj(obj)

    def fence(self) -> str:
        self.fences += 1
        return f"f{self.fences}"

    def receive(self, command: Command) -> Command:
        """What the worker that got this job applies."""
        if isinstance(command, StartStep) and command.fence is None:
            return command.model_copy(update={"fence": self.fence()})
        if isinstance(command, StartRun) and not command.steps:
            specs = self.plan.child_specs if command.run_id != self.run_id else self.plan.specs
            here = self.rng.random() < 0.5  # half the planners run a root step in place
            return StartRun(
                run_id=command.run_id,
                workflow=command.workflow,
                steps=specs,
                continue_on="default" if here else None,
                fence=self.fence() if here else None,
            )
        return command

    def apply_all(
        self, commands: list[Command], threads: ThreadPoolExecutor | None = None
    ) -> list[tuple[Command, Outcome]]:
        received = [(self.receive(c), self.rng.random() < self.plan.lost_rate) for c in commands]
        for command, lost in received:
            self.delivered.extend([command] * (2 if lost else 1))
            self.first_by_key.setdefault(command.idempotency_key, command)
            self.lost += lost
        if threads is None:
            outcomes = [self._apply(c, lost) for c, lost in received]
        else:  # re-raises any exception
            outcomes = list(threads.map(lambda pair: self._apply(*pair), received))
        return [(c, o) for (c, _), o in zip(received, outcomes, strict=True)]

    def _apply(self, command: Command, lost: bool) -> Outcome:
        if lost:
            self.ledger.apply(command)  # committed, but the answer never reaches the sender
        return self.ledger.apply(command)

    def deliver_one(self, command: Command) -> Outcome:
        received, outcome = self.apply_all([command])[0]
        self.react(received, outcome)
        return outcome

    # --- the workers -----------------------------------------------------------------------

    def react(self, command: Command, outcome: Outcome) -> None:
        if outcome.owner:
            # Our earlier try committed unseen and started this attempt under our fence.
            self.owner_answers += 1
            assert outcome.step_context is not None
            self.work(command.run_id, outcome.step_context)
            return
        if not outcome.applied:
            return
        for ev in outcome.events:
            if ev.type == "step_queued" and ev.step_key and ev.attempt:
                self.release_zombies((command.run_id, ev.step_key), superseded_by=ev.attempt)
        for item in outcome.followups:
            if item.run_id not in self.runs:
                self.runs.append(item.run_id)  # a child run this transaction created
            self.send(self.from_wire(item.command))  # through the wire format, like a job
        if isinstance(command, SuspendStep) and isinstance(command.until, AwaitEvent):
            self.answer(command)
        if outcome.step_context is not None:  # a start, or a step started in place
            self.work(command.run_id, outcome.step_context)

    def answer(self, wait: SuspendStep) -> None:
        if self.rng.random() < 0.7:  # the event comes after the step waits, maybe twice
            self.send_event(wait.run_id, wait.step_key, delay=self.rng.randint(0, 3))

    def work(self, run_id: str, ctx: StepContext) -> None:
        """What the worker that owns this attempt ends up sending."""
        key, n, fence = ctx.step_key, ctx.attempt, ctx.fence
        assert fence is not None, f"{run_id}/{key} attempt {n} started without a fence"
        if ctx.kind in ("task", "item"):
            fate = self.rng.choices(FATES, weights=self.plan.fate_weights)[0]
        else:  # sleep, wait and child steps suspend at once, unless their worker dies first
            weights = self.plan.fate_weights
            fate = "die" if self.rng.random() * sum(weights) < weights[3] else "suspend"
        if fate == "complete":
            # Half the workers offer to continue in place (CompleteStep.continue_on).
            here = "default" if self.rng.random() < 0.5 else None
            self.send(
                CompleteStep(
                    fence=fence,
                    run_id=run_id,
                    step_key=key,
                    attempt=n,
                    output=self.output(run_id, key, n),
                    continue_on=here,
                )
            )
        elif fate in ("fail", "fatal"):
            retryable = fate == "fail"
            self.send(
                FailStep(
                    fence=fence,
                    run_id=run_id,
                    step_key=key,
                    attempt=n,
                    error=fate,
                    retryable=retryable,
                )
            )
        elif fate == "suspend":
            self.send(
                SuspendStep(
                    fence=fence, run_id=run_id, step_key=key, attempt=n, until=self.until(ctx)
                )
            )
        else:
            # The worker stops heartbeating and the reaper sees the lapsed lease. Maybe the
            # worker was only partitioned: it reports later, by then often for a stale attempt.
            lease = ctx.lease_expires_at
            assert lease is not None
            self.send(
                ExpireLease(
                    run_id=run_id, step_key=key, attempt=n, observed_lease=lease.isoformat()
                )
            )
            if self.rng.random() < self.plan.zombie_rate:
                late = CompleteStep(
                    fence=fence, run_id=run_id, step_key=key, attempt=n, output="zombie"
                )
                if self.rng.random() < 0.3:
                    self.send(late, delay=self.rng.randint(1, 6))
                else:  # comes back just as the next attempt is dispatched
                    self.zombies.append((run_id, key, n, late))

    def output(self, run_id: str, key: str, attempt: int) -> Any:
        if run_id == self.run_id and key in self.mapped:
            if self.rng.random() < 0.1:
                return {"not": "a list"}  # the map over it fails
            return [f"{key}.{attempt}.{i}" for i in range(self.rng.randint(0, 5))]
        return {key: attempt}

    def until(self, ctx: StepContext) -> Sleep | AwaitEvent | AwaitChild:
        if ctx.kind == "sleep":
            return Sleep(seconds=self.rng.choice([0.0, HOUR]))
        if ctx.kind == "wait":
            return AwaitEvent(
                event=f"ev-{ctx.step_key}", timeout_seconds=self.rng.choice([None, HOUR])
            )
        assert ctx.kind == "child", ctx
        return AwaitChild(workflow=CHILD_WORKFLOW, input={"step": ctx.step_key, "n": ctx.attempt})

    def release_zombies(
        self, step: tuple[str, str] | None = None, *, superseded_by: int = 0
    ) -> None:
        """Send the late reports of `step` older than attempt `superseded_by` (or all)."""
        for zombie in list(self.zombies):
            run_id, key, n, late = zombie
            if step is None or ((run_id, key) == step and n < superseded_by):
                self.zombies.remove(zombie)
                self.send(late, delay=self.rng.randint(0, 2))

    # --- events, operators, the clock, the relay and the reaper ----------------------------

    def send_event(self, run_id: str, step_key: str, delay: int = 0) -> None:
        """One intent to send the step's event (its own key), delivered one to three times."""
        self.events_sent[step_key] += 1
        command = SendEvent(
            run_id=run_id,
            event=f"ev-{step_key}",
            payload={"to": step_key, "n": self.events_sent[step_key]},
            idempotency_key=f"{run_id}:event:{step_key}:{self.events_sent[step_key]}",
        )
        for _ in range(self.rng.randint(1, 3)):
            self.send(command, delay=delay)

    def external(self, kind: str) -> Command | None:
        self.external_count += 1
        key = f"{self.run_id}:{kind}:{self.external_count}"
        if kind == "pause":
            return PauseRun(run_id=self.run_id, idempotency_key=key)
        if kind == "resume":
            return ResumeRun(run_id=self.run_id, idempotency_key=key)
        if kind == "cancel":
            return CancelRun(run_id=self.run_id, idempotency_key=key)
        if kind == "cancel_child":
            children = self.runs[1:]
            if not children:
                return None
            return CancelRun(run_id=self.rng.choice(children), idempotency_key=key)
        if kind == "wake":  # a timer woken before it is due (or for a step with none)
            timers = self.rows(
                "SELECT run_id, step_key, attempt FROM executor.steps WHERE run_id = ANY(%s) "
                "AND status IN ('sleeping', 'waiting') AND wake_at IS NOT NULL "
                "ORDER BY run_id, step_key"
            )
            if not timers:
                return None
            t = self.rng.choice(timers)
            return WakeStep(run_id=t["run_id"], step_key=t["step_key"], attempt=t["attempt"])
        failed = [k for k, s in self.step_statuses().items() if s == "failed"]
        step = self.rng.choice(failed or [s.step_key for s in self.plan.specs])
        return RetryStep(run_id=self.run_id, step_key=step, idempotency_key=key)

    def tick(self) -> int:
        """The clock moves past every timer and backoff of the example; then the reaper runs.
        Returns how many wake-ups it sent."""
        self.discover()
        with self.pool.connection() as conn:
            conn.execute(
                "UPDATE executor.steps SET wake_at = now() - interval '1 millisecond' "
                "WHERE run_id = ANY(%s) AND status IN ('sleeping', 'waiting') AND wake_at > now()",
                (self.runs,),
            )
            conn.execute(
                "UPDATE executor.steps SET next_attempt_at = now() - interval '1 millisecond' "
                "WHERE run_id = ANY(%s) AND status = 'retrying' AND next_attempt_at > now()",
                (self.runs,),
            )
        due = self.rows(  # the reaper's DUE_TIMERS, for this example's runs
            "SELECT s.run_id, s.step_key, s.attempt FROM executor.steps AS s "
            "JOIN executor.runs AS r ON r.run_id = s.run_id AND r.status = 'running' "
            "WHERE s.run_id = ANY(%s) AND s.status IN ('sleeping', 'waiting') "
            "AND s.wake_at <= now() ORDER BY s.run_id, s.step_key"
        )
        for t in due:
            self.send(WakeStep(run_id=t["run_id"], step_key=t["step_key"], attempt=t["attempt"]))
        return len(due)

    def discover(self) -> None:
        """Children the sender never heard of (the answer creating them was lost)."""
        for row in self.rows(
            "SELECT run_id FROM executor.runs WHERE parent_run_id = ANY(%s) ORDER BY run_id"
        ):
            if row["run_id"] not in self.runs:
                self.runs.append(row["run_id"])

    def relay(self) -> int:
        """Push every undecided outbox row of the example again, whatever its push_after."""
        self.discover()
        rows = self.rows(
            "SELECT command FROM executor.outbox WHERE run_id = ANY(%s) ORDER BY outbox_id"
        )
        for row in rows:
            self.send(self.from_wire(row["command"]), delay=self.rng.randint(0, 2))
        return len(rows)

    def chaos(self, threads: ThreadPoolExecutor) -> None:
        for rnd in range(self.plan.rounds):
            self.clock = rnd
            if self.rng.random() < self.plan.tick_rate:
                self.tick()
            if self.rng.random() < self.plan.relay_rate:
                self.relay()
            batch: list[Command] = []
            kept: list[tuple[int, Command]] = []
            for due, command in self.bag:
                if due <= rnd and self.rng.random() >= self.plan.hold_rate:
                    batch.append(command)
                else:
                    kept.append((due, command))
            self.bag = kept
            for command in list(batch):
                if self.rng.random() < self.plan.dup_rate:
                    batch.extend([command] * self.rng.randint(1, 3))
            if self.delivered and self.rng.random() < self.plan.dup_rate:
                batch.extend(self.rng.sample(self.delivered, k=min(3, len(self.delivered))))
            for r, kind in self.plan.externals:
                if r == rnd and (sent := self.external(kind)) is not None:
                    batch.append(sent)
            self.rng.shuffle(batch)
            self.clock = rnd + 1
            for command, outcome in self.apply_all(batch, threads):
                self.react(command, outcome)

    def drain(self) -> str:
        """Deliver what is left, then let time pass, resume, relay and answer waits until
        every run is terminal; returns the run's final status."""
        retries_left = self.plan.retries_after_failure
        for _ in range(3000):
            self.clock += 1
            if self.bag:
                due = [i for i, (t, _) in enumerate(self.bag) if t <= self.clock]
                if due:
                    self.deliver_one(self.bag.pop(self.rng.choice(due))[1])
                continue
            if self.zombies:  # whatever never got superseded reports in the end
                self.release_zombies()
                continue
            self.discover()
            statuses = self.run_statuses()
            paused = [r for r, s in statuses.items() if s == "paused"]
            for run_id in paused:
                self.external_count += 1
                key = f"{run_id}:resume:{self.external_count}"
                self.deliver_one(ResumeRun(run_id=run_id, idempotency_key=key))
            if paused:
                continue
            if self.rows("SELECT 1 FROM executor.outbox WHERE run_id = ANY(%s) LIMIT 1"):
                self.tick()  # so a relayed retry or timer is not refused as not due again
                self.relay()
                continue
            unanswered = self.rows(
                "SELECT s.run_id, s.step_key FROM executor.steps AS s "
                "JOIN executor.runs AS r ON r.run_id = s.run_id AND r.status = 'running' "
                "WHERE s.run_id = ANY(%s) AND s.status = 'waiting' AND s.event_name IS NOT NULL "
                "AND s.wake_at IS NULL ORDER BY s.run_id, s.step_key"
            )
            for w in unanswered:
                self.send_event(w["run_id"], w["step_key"])
            if unanswered or self.tick():
                continue
            if statuses[self.run_id] == "failed" and retries_left:
                retries_left -= 1
                retry = self.external("retry")
                assert retry is not None
                self.deliver_one(retry)
            elif all(s in TERMINAL for s in statuses.values()):
                return statuses[self.run_id]
            else:
                raise AssertionError(
                    f"runs {statuses} with nothing left to deliver; steps {self.all_steps()}"
                )
        raise AssertionError(f"runs did not settle: {self.run_statuses()} {self.all_steps()}")

    # --- reading the ledger ----------------------------------------------------------------

    def rows(self, sql: str) -> list[dict[str, Any]]:
        with self.pool.connection() as conn:
            return conn.execute(sql, (self.runs,)).fetchall()

    def run_statuses(self) -> dict[str, str]:
        rows = self.rows("SELECT run_id, status FROM executor.runs WHERE run_id = ANY(%s)")
        found = {str(r["run_id"]): str(r["status"]) for r in rows}
        return {r: found[r] for r in self.runs if r in found}

    def step_statuses(self, run_id: str | None = None) -> dict[str, str]:
        with self.pool.connection() as conn:
            rows = conn.execute(
                "SELECT step_key, status FROM executor.steps WHERE run_id = %s ORDER BY step_key",
                (run_id or self.run_id,),
            ).fetchall()
        return {str(r["step_key"]): str(r["status"]) for r in rows}

    def all_steps(self) -> dict[str, dict[str, str]]:
        return {r: self.step_statuses(r) for r in self.runs}


def snapshot(pool: Pool, run_ids: list[str]) -> dict[str, list[dict[str, Any]]]:
    """Everything a delivery could change for these runs, except the drop log."""
    queries = {
        "runs": "SELECT * FROM executor.runs WHERE run_id = ANY(%s) ORDER BY run_id",
        "steps": "SELECT * FROM executor.steps WHERE run_id = ANY(%s) ORDER BY run_id, step_key",
        "events": "SELECT * FROM executor.events WHERE run_id = ANY(%s) ORDER BY run_id, seq",
        "receipts": (
            "SELECT * FROM executor.receipts WHERE run_id = ANY(%s) ORDER BY idempotency_key"
        ),
        "outbox": "SELECT * FROM executor.outbox WHERE run_id = ANY(%s) ORDER BY outbox_id",
        "run_events": (
            "SELECT * FROM executor.run_events WHERE run_id = ANY(%s) ORDER BY run_id, received_seq"
        ),
    }
    with pool.connection() as conn:
        return {name: conn.execute(sql, (run_ids,)).fetchall() for name, sql in queries.items()}


def receipt_keys(pool: Pool, run_ids: list[str]) -> set[str]:
    with pool.connection() as conn:
        rows = conn.execute(
            "SELECT idempotency_key FROM executor.receipts WHERE run_id = ANY(%s)", (run_ids,)
        ).fetchall()
    return {r["idempotency_key"] for r in rows}


def drop_reasons(pool: Pool, run_ids: list[str]) -> Counter[str]:
    with pool.connection() as conn:
        rows = conn.execute(
            "SELECT reason, count(*) AS n FROM executor.drops WHERE run_id = ANY(%s) "
            "GROUP BY reason",
            (run_ids,),
        ).fetchall()
    return Counter({str(r["reason"]): int(r["n"]) for r in rows})


def records_by_run(pool: Pool, run_ids: list[str]) -> Counter[str]:
    """Applied receipts + drop rows, per run."""
    with pool.connection() as conn:
        rows = conn.execute(
            "SELECT run_id, count(*) AS n FROM ("
            " SELECT run_id FROM executor.receipts WHERE run_id = ANY(%s) AND outcome = 'applied'"
            " UNION ALL SELECT run_id FROM executor.drops WHERE run_id = ANY(%s)) AS r "
            "GROUP BY run_id",
            (run_ids, run_ids),
        ).fetchall()
    return Counter({str(r["run_id"]): int(r["n"]) for r in rows})


@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    database=None,  # keep no example database inside the repository
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(plan=plans())
def test_any_delivery_schedule_keeps_the_ledger_correct(pool: Pool, plan: Plan) -> None:
    run_id = f"prop-{next(_run_ids)}"
    note(f"{run_id}: {plan!r}")
    ledger = Ledger(pool, lease_seconds=-1)  # every lease has lapsed by the time it is read
    sim = Sim(ledger, pool, run_id, plan)
    create = CreateRun(run_id=run_id, workflow="wf", idempotency_key=f"create:{run_id}")
    begin = StartRun(run_id=run_id, workflow="wf", steps=plan.specs)
    for setup in (create, begin):
        command, outcome = sim.apply_all([setup])[0]
        assert outcome.applied or outcome.reason == "duplicate", outcome.summary()
        if command is begin:
            sim.react(begin, outcome)  # send the root steps' start jobs
    for spec in plan.specs:  # events sent before their step waits, maybe before it exists
        if spec.kind == "wait" and sim.rng.random() < plan.early_event_rate:
            sim.send_event(run_id, spec.step_key)

    with ThreadPoolExecutor(max_workers=plan.threads) as threads:
        sim.chaos(threads)
    final = sim.drain()
    assert final in TERMINAL
    runs = sim.runs
    statuses = sim.run_statuses()
    assert set(statuses) == set(runs), f"child runs named but never created: {runs} {statuses}"
    assert all(s in TERMINAL for s in statuses.values()), statuses  # none is left paused

    # Events sent once the run ended are refused as terminal, and recorded.
    for spec in plan.specs:
        if spec.kind == "wait":
            late = SendEvent(
                run_id=run_id,
                event=f"ev-{spec.step_key}",
                idempotency_key=f"{run_id}:late:{spec.step_key}",
            )
            outcome = sim.apply_all([late])[0][1]
            assert outcome.reason in ("terminal", "duplicate"), outcome.summary()

    with pool.connection() as conn:
        for r in runs:
            report = verify(conn, run_id=r)
            assert report.ok, [str(v) for v in report.violations]
            assert not report.stuck, [str(s) for s in report.stuck]

    # I2: every delivery is exactly one record (a child's creation adds a receipt of its own,
    # in its log, for a delivery to its parent).
    before_drops = drop_reasons(pool, runs)
    event(f"run {final}")  # shown by --hypothesis-show-statistics
    event(f"child runs {len(runs) - 1}")
    event(f"lost answers {min(sim.lost, 5)}{'+' if sim.lost >= 5 else ''}")
    event(f"owner answers {min(sim.owner_answers, 3)}{'+' if sim.owner_answers >= 3 else ''}")
    for reason in before_drops:
        event(f"dropped {reason}")
    for step in sim.rows("SELECT DISTINCT kind, status FROM executor.steps WHERE run_id = ANY(%s)"):
        event(f"{step['kind']} step {step['status']}")  # every kind reached every end
    event(f"deliveries {len(sim.delivered) // 25 * 25}+")
    for kind in Counter(type(c).__name__ for c in sim.delivered):
        event(f"delivered {kind}")
    deliveries = Counter(c.run_id for c in sim.delivered)
    for child in runs[1:]:
        deliveries[child] += 1
    assert records_by_run(pool, runs) == deliveries

    # I3: delivering any decided command again changes nothing but the drop log. A key only
    # ever refused for now (paused, not due) is not decided: a later delivery may apply.
    before = snapshot(pool, runs)
    decided = receipt_keys(pool, runs)
    again = [c for key, c in sim.first_by_key.items() if key in decided]
    for delivered in again:
        redelivery = ledger.apply(delivered)
        assert redelivery.reason == "duplicate", (delivered.describe(), redelivery.summary())
        assert not redelivery.owner
        assert not redelivery.events
        assert not redelivery.followups
    assert snapshot(pool, runs) == before
    after_drops = drop_reasons(pool, runs)
    assert after_drops - before_drops == Counter({"duplicate": len(again)})
