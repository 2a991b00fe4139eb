"""Property: whatever the transport does to deliveries, the ledger stays correct.

Hypothesis draws a workflow (a small DAG with parallel branches and joins) and a hostile
transport: deliveries duplicated, held back and delivered out of order, old ones sent again,
workers that complete, fail (retryably or not) or lose their lease and come back as zombies
with a stale completion, and operators who pause, resume, cancel and retry by hand. Each
round of deliveries is applied from several threads at once; a sequential drain phase then
delivers what is left until the run is terminal.

Afterwards:

* `verify` finds nothing (I1 valid histories, I2 receipts, I4 gapless log, rows = replay);
* every delivery left exactly one record: applied receipts + drop rows == deliveries (I2);
* delivering any already-delivered command again changes nothing: same rows, same events,
  same receipts, same outbox, one more `duplicate` drop each (I3);
* the run reached a terminal status (nothing got stuck).

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
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from psycopg_pool import ConnectionPool

from executor.commands.models import (
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
    StartRun,
    StartStep,
    StepSpec,
    parse_obj,
)
from executor.ledger.handler import Ledger
from executor.ledger.outcome import Outcome
from executor.ledger.verify import verify

Pool = ConnectionPool[psycopg.Connection[dict[str, Any]]]

EXAMPLES = {"dev": 10, "default": 60, "ci": 150, "thorough": 500}
MAX_EXAMPLES = EXAMPLES.get(os.environ.get("HYPOTHESIS_PROFILE", "default"), 60)

NO_WAIT = BackoffPolicy(initial=0, jitter=False)  # retries are due at once
FATES = ("complete", "fail", "fatal", "die")
EXTERNALS = ("pause", "resume", "cancel", "retry")
TERMINAL = ("completed", "failed", "cancelled")

_run_ids = itertools.count()


@dataclass(frozen=True)
class Plan:
    specs: tuple[StepSpec, ...]
    seed: int
    threads: int
    rounds: int
    dup_rate: float  # chance a delivery is duplicated, and that old ones are sent again
    hold_rate: float  # chance a due delivery is held back to a later round (reordering)
    zombie_rate: float  # chance a worker that lost its lease still reports, late
    fate_weights: tuple[int, ...]  # complete, fail (retryable), fail (fatal), die
    externals: tuple[tuple[int, str], ...]  # (round, kind) operator commands
    retries_after_failure: int  # manual retries an operator makes once the run failed


@st.composite
def workflows(draw: st.DrawFn) -> tuple[StepSpec, ...]:
    """1-5 steps; each depends on a random subset of earlier ones (branches and joins)."""
    count = draw(st.integers(1, 5))
    specs: list[StepSpec] = []
    for i in range(count):
        earlier = [s.step_key for s in specs]
        deps = (
            draw(st.lists(st.sampled_from(earlier), unique=True, max_size=min(3, i)))
            if earlier
            else []
        )
        specs.append(
            StepSpec(
                step_key=f"s{i}",
                depends_on=tuple(sorted(deps)),
                max_attempts=draw(st.integers(1, 3)),
                backoff=NO_WAIT,
            )
        )
    return tuple(specs)


@st.composite
def plans(draw: st.DrawFn) -> Plan:
    rounds = draw(st.integers(1, 8))
    return Plan(
        specs=draw(workflows()),
        seed=draw(st.integers(0, 2**32 - 1)),
        threads=draw(st.integers(2, 6)),
        rounds=rounds,
        dup_rate=draw(st.sampled_from([0.0, 0.2, 0.5])),
        hold_rate=draw(st.sampled_from([0.0, 0.25, 0.5])),
        zombie_rate=draw(st.sampled_from([0.0, 0.7, 1.0])),
        fate_weights=draw(
            st.tuples(st.integers(2, 6), st.integers(0, 3), st.integers(0, 1), st.integers(0, 4))
        ),
        externals=tuple(
            draw(
                st.lists(
                    st.tuples(st.integers(0, rounds - 1), st.sampled_from(EXTERNALS)), max_size=4
                )
            )
        ),
        retries_after_failure=draw(st.integers(0, 2)),
    )


@dataclass
class Sim:
    """The transport, the workers, the reaper and the operators, as one adversary.

    Sent commands wait in `bag` with the tick from which they may be delivered. A chaos
    round delivers everything due (minus what it holds back, plus duplicates) from several
    threads at once; the drain delivers one due command at a time, picked at random.
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
    external_count: int = 0
    # Late reports held until the step's next attempt is queued: (step_key, attempt, command).
    zombies: list[tuple[str, int, Command]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.plan.seed)

    def send(self, command: Command, delay: int = 0) -> None:
        self.bag.append((self.clock + delay, command))

    def apply_all(
        self, commands: list[Command], threads: ThreadPoolExecutor | None = None
    ) -> list[Outcome]:
        self.delivered.extend(commands)
        for command in commands:
            self.first_by_key.setdefault(command.idempotency_key, command)
        if threads is None:
            return [self.ledger.apply(c) for c in commands]
        return list(threads.map(self.ledger.apply, commands))  # re-raises any exception

    def deliver_one(self, command: Command) -> Outcome:
        outcome = self.apply_all([command])[0]
        self.react(command, outcome)
        return outcome

    def react(self, command: Command, outcome: Outcome) -> None:
        if not outcome.applied:
            return
        for ev in outcome.events:
            if ev.type == "step_queued" and ev.step_key and ev.attempt:
                self.release_zombies(ev.step_key, superseded_by=ev.attempt)
        for item in outcome.followups:
            self.send(parse_obj(item.command))  # through the wire format, like a job
        if isinstance(command, StartStep):
            self.work(command, outcome)
        elif outcome.continued:
            # The completion started a dependant in place: its sender now runs that one.
            assert outcome.step_context is not None
            ctx = outcome.step_context
            self.work(
                StartStep(run_id=command.run_id, step_key=ctx.step_key, attempt=ctx.attempt),
                outcome,
            )

    def work(self, start: StartStep, outcome: Outcome) -> None:
        """What the worker that won this attempt ends up sending."""
        fate = self.rng.choices(FATES, weights=self.plan.fate_weights)[0]
        run, key, n = start.run_id, start.step_key, start.attempt
        if fate == "complete":
            # Half the workers offer to continue in place (CompleteStep.continue_on).
            here = "default" if self.rng.random() < 0.5 else None
            self.send(
                CompleteStep(
                    fence="f",
                    run_id=run,
                    step_key=key,
                    attempt=n,
                    output={key: n},
                    continue_on=here,
                )
            )
        elif fate in ("fail", "fatal"):
            retryable = fate == "fail"
            self.send(
                FailStep(
                    fence="f", run_id=run, step_key=key, attempt=n, error=fate, retryable=retryable
                )
            )
        else:
            # The worker stops heartbeating and the reaper sees the lapsed lease. Maybe the
            # worker was only partitioned: it reports later, by then often for a stale attempt.
            assert outcome.step_context is not None
            lease = outcome.step_context.lease_expires_at
            assert lease is not None
            self.send(
                ExpireLease(run_id=run, step_key=key, attempt=n, observed_lease=lease.isoformat())
            )
            if self.rng.random() < self.plan.zombie_rate:
                late = CompleteStep(fence="f", run_id=run, step_key=key, attempt=n, output="zombie")
                if self.rng.random() < 0.3:
                    self.send(late, delay=self.rng.randint(1, 6))
                else:  # comes back just as the next attempt is dispatched
                    self.zombies.append((key, n, late))

    def release_zombies(self, step_key: str | None = None, *, superseded_by: int = 0) -> None:
        """Send the late reports of `step_key` older than attempt `superseded_by` (or all)."""
        for zombie in list(self.zombies):
            key, n, late = zombie
            if step_key is None or (key == step_key and n < superseded_by):
                self.zombies.remove(zombie)
                self.send(late, delay=self.rng.randint(0, 2))

    def external(self, kind: str) -> Command:
        self.external_count += 1
        key = f"{self.run_id}:{kind}:{self.external_count}"
        if kind == "pause":
            return PauseRun(run_id=self.run_id, idempotency_key=key)
        if kind == "resume":
            return ResumeRun(run_id=self.run_id, idempotency_key=key)
        if kind == "cancel":
            return CancelRun(run_id=self.run_id, idempotency_key=key)
        failed = [k for k, s in self.step_statuses().items() if s == "failed"]
        step = self.rng.choice(failed or [s.step_key for s in self.plan.specs])
        return RetryStep(run_id=self.run_id, step_key=step, idempotency_key=key)

    def chaos(self, threads: ThreadPoolExecutor) -> None:
        for rnd in range(self.plan.rounds):
            self.clock = rnd
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
            batch.extend(self.external(kind) for r, kind in self.plan.externals if r == rnd)
            self.rng.shuffle(batch)
            self.clock = rnd + 1
            for command, outcome in zip(batch, self.apply_all(batch, threads), strict=True):
                self.react(command, outcome)

    def drain(self) -> str:
        retries_left = self.plan.retries_after_failure
        for _ in range(2000):
            self.clock += 1
            if self.bag:
                due = [i for i, (t, _) in enumerate(self.bag) if t <= self.clock]
                if due:
                    self.deliver_one(self.bag.pop(self.rng.choice(due))[1])
                continue
            if self.zombies:  # whatever never got superseded reports in the end
                self.release_zombies()
                continue
            status = self.run_status()
            if status == "paused":
                self.deliver_one(self.external("resume"))
            elif status == "failed" and retries_left:
                retries_left -= 1
                self.deliver_one(self.external("retry"))
            elif status in TERMINAL:
                return status
            else:
                raise AssertionError(
                    f"run {self.run_id} is {status} with nothing left to deliver; "
                    f"steps {self.step_statuses()}"
                )
        raise AssertionError(f"run {self.run_id} did not settle: {self.step_statuses()}")

    def run_status(self) -> str:
        with self.pool.connection() as conn:
            row = conn.execute(
                "SELECT status FROM executor.runs WHERE run_id = %s", (self.run_id,)
            ).fetchone()
        assert row is not None
        return str(row["status"])

    def step_statuses(self) -> dict[str, str]:
        with self.pool.connection() as conn:
            rows = conn.execute(
                "SELECT step_key, status FROM executor.steps WHERE run_id = %s ORDER BY step_key",
                (self.run_id,),
            ).fetchall()
        return {str(r["step_key"]): str(r["status"]) for r in rows}


def snapshot(pool: Pool, run_id: str) -> dict[str, list[dict[str, Any]]]:
    """Everything a delivery could change for one run, except the drop log."""
    queries = {
        "run": "SELECT * FROM executor.runs WHERE run_id = %s",
        "steps": "SELECT * FROM executor.steps WHERE run_id = %s ORDER BY step_key",
        "events": "SELECT * FROM executor.events WHERE run_id = %s ORDER BY seq",
        "receipts": "SELECT * FROM executor.receipts WHERE run_id = %s ORDER BY idempotency_key",
        "outbox": "SELECT * FROM executor.outbox WHERE run_id = %s ORDER BY outbox_id",
    }
    with pool.connection() as conn:
        return {name: conn.execute(sql, (run_id,)).fetchall() for name, sql in queries.items()}


def receipt_keys(pool: Pool, run_id: str) -> set[str]:
    with pool.connection() as conn:
        rows = conn.execute(
            "SELECT idempotency_key FROM executor.receipts WHERE run_id = %s", (run_id,)
        ).fetchall()
    return {r["idempotency_key"] for r in rows}


def drop_reasons(pool: Pool, run_id: str) -> Counter[str]:
    with pool.connection() as conn:
        rows = conn.execute(
            "SELECT reason, count(*) AS n FROM executor.drops WHERE run_id = %s GROUP BY reason",
            (run_id,),
        ).fetchall()
    return Counter({str(r["reason"]): int(r["n"]) for r in rows})


def applied_receipts(pool: Pool, run_id: str) -> int:
    with pool.connection() as conn:
        row = conn.execute(
            "SELECT count(*) AS n FROM executor.receipts WHERE run_id = %s AND outcome = 'applied'",
            (run_id,),
        ).fetchone()
    assert row is not None
    return int(row["n"])


@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    database=None,  # keep no example database inside the repository
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(plan=plans())
def test_any_delivery_schedule_keeps_the_ledger_correct(pool: Pool, plan: Plan) -> None:
    run_id = f"prop-{next(_run_ids)}"
    ledger = Ledger(pool, lease_seconds=-1)  # every lease has lapsed by the time it is read
    sim = Sim(ledger, pool, run_id, plan)
    create = CreateRun(run_id=run_id, workflow="wf", idempotency_key=f"create:{run_id}")
    begin = StartRun(run_id=run_id, workflow="wf", steps=plan.specs)
    for setup in (create, begin):
        outcome = sim.apply_all([setup])[0]
        assert outcome.applied, outcome.summary()
        if setup is begin:
            sim.react(begin, outcome)  # send the root steps' start jobs

    with ThreadPoolExecutor(max_workers=plan.threads) as threads:
        sim.chaos(threads)
    final = sim.drain()
    assert final in TERMINAL

    with pool.connection() as conn:
        report = verify(conn, run_id=run_id)
    assert report.ok, [str(v) for v in report.violations]

    # I2: every delivery is exactly one record.
    before_drops = drop_reasons(pool, run_id)
    event(f"run {final}")  # shown by --hypothesis-show-statistics
    for reason in before_drops:
        event(f"dropped {reason}")
    event(f"deliveries {len(sim.delivered) // 25 * 25}+")
    for kind in Counter(type(c).__name__ for c in sim.delivered):
        event(f"delivered {kind}")
    assert applied_receipts(pool, run_id) + sum(before_drops.values()) == len(sim.delivered)

    # I3: delivering any decided command again changes nothing but the drop log. A key only
    # ever refused for now (paused, not due) is not decided: a later delivery may apply.
    before = snapshot(pool, run_id)
    decided = receipt_keys(pool, run_id)
    again = [c for key, c in sim.first_by_key.items() if key in decided]
    for delivered in again:
        redelivery = ledger.apply(delivered)
        assert redelivery.reason == "duplicate", (delivered.describe(), redelivery.summary())
        assert not redelivery.events
        assert not redelivery.followups
    assert snapshot(pool, run_id) == before
    after_drops = drop_reasons(pool, run_id)
    assert after_drops - before_drops == Counter({"duplicate": len(again)})
