"""Continuing in place: a completion may start one ready dependant for its own worker."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from executor.commands.models import (
    CompleteStep,
    CreateRun,
    PauseRun,
    StartRun,
    StartStep,
    StepSpec,
)
from executor.ledger.handler import Ledger
from executor.ledger.outcome import OutboxItem
from executor.ledger.verify import verify
from executor.workflows.definition import StepContext, Workflow
from executor.workflows.runner import StepRunner

Pool = ConnectionPool[psycopg.Connection[dict[str, Any]]]

FAN = (
    StepSpec(step_key="first"),
    StepSpec(step_key="left", depends_on=("first",)),
    StepSpec(step_key="right", depends_on=("first",)),
    StepSpec(step_key="slow", depends_on=("first",), timeout_seconds=5),
    StepSpec(step_key="other", depends_on=("first",), queue="high"),
)


def launch(ledger: Ledger, run_id: str, steps: tuple[StepSpec, ...] = FAN) -> None:
    ledger.apply(CreateRun(run_id=run_id, workflow="w", idempotency_key=f"c-{run_id}"))
    ledger.apply(StartRun(run_id=run_id, workflow="w", steps=steps))
    ledger.apply(StartStep(run_id=run_id, step_key="first", attempt=1))


def assert_verified(db_url: str) -> None:
    with psycopg.connect(db_url, row_factory=dict_row, autocommit=True) as conn:
        report = verify(conn)
    assert report.ok, report.violations


def test_a_completion_starts_one_dependant_of_its_queue_and_enqueues_the_rest(
    pool: Pool, db_url: str
) -> None:
    ledger = Ledger(pool)
    launch(ledger, "r1")
    done = ledger.apply(
        CompleteStep(
            fence="f", run_id="r1", step_key="first", attempt=1, output=1, continue_on="default"
        )
    )
    assert done.continued
    assert done.step_context is not None
    assert (done.step_context.step_key, done.step_context.attempt) == ("left", 1)
    assert done.step_context.upstream == {"first": 1}
    types = [(e.type, e.step_key) for e in done.events]
    assert ("step_started", "left") in types
    # `slow` has its own timeout and `other` another queue: both travel as jobs, as does
    # `right`; `left` has no job at all.
    pushed = sorted(f.command["step_key"] for f in done.followups)
    assert pushed == ["other", "right", "slow"]
    late = ledger.apply(StartStep(run_id="r1", step_key="left", attempt=1))
    assert (late.applied, late.reason) == (False, "invalid_transition")
    assert_verified(db_url)


def test_without_continue_on_every_dependant_travels(pool: Pool) -> None:
    ledger = Ledger(pool)
    launch(ledger, "r2")
    done = ledger.apply(CompleteStep(fence="f", run_id="r2", step_key="first", attempt=1, output=1))
    assert not done.continued
    assert len(done.followups) == 4


def test_a_paused_run_continues_nothing(pool: Pool, db_url: str) -> None:
    ledger = Ledger(pool)
    launch(ledger, "r3")
    ledger.apply(PauseRun(run_id="r3", idempotency_key="pause-r3"))
    done = ledger.apply(
        CompleteStep(
            fence="f", run_id="r3", step_key="first", attempt=1, output=1, continue_on="default"
        )
    )
    assert done.applied
    assert not done.continued
    assert done.followups == ()
    assert_verified(db_url)


chain = Workflow("t_chain", max_attempts=1, register=True)


@chain.step
def one(ctx: StepContext) -> int:
    return 1


@chain.step(depends_on=[one])
def two(ctx: StepContext) -> int:
    return int(ctx.upstream["one"]) + 1


@chain.step(depends_on=[two])
def three(ctx: StepContext) -> int:
    return int(ctx.upstream["two"]) + 1


def test_the_runner_runs_a_chain_in_place_and_the_log_is_valid(pool: Pool, db_url: str) -> None:
    ledger = Ledger(pool)
    ledger.apply(CreateRun(run_id="r4", workflow="t_chain", idempotency_key="c-r4"))
    ledger.apply(StartRun(run_id="r4", workflow="t_chain", steps=chain.specs()))
    pushed: list[OutboxItem] = []
    runner = StepRunner(ledger, pushed.extend)
    last = runner.run(
        fence="f", command=StartStep(run_id="r4", step_key="one", attempt=1), continue_for=60
    )
    assert last.applied
    assert last.run_status == "completed"
    assert pushed == []  # two and three never went through Redis
    with pool.connection() as conn:
        run = conn.execute("SELECT output FROM executor.runs WHERE run_id = 'r4'").fetchone()
    assert run is not None
    assert run["output"] == {"three": 3}
    assert_verified(db_url)


def test_without_a_budget_the_runner_runs_only_its_own_step(pool: Pool) -> None:
    ledger = Ledger(pool)
    ledger.apply(CreateRun(run_id="r5", workflow="t_chain", idempotency_key="c-r5"))
    ledger.apply(StartRun(run_id="r5", workflow="t_chain", steps=chain.specs()))
    pushed: list[OutboxItem] = []
    StepRunner(ledger, pushed.extend).run(
        fence="f", command=StartStep(run_id="r5", step_key="one", attempt=1)
    )
    assert [p.command["step_key"] for p in pushed] == ["two"]


def test_the_worker_planning_a_run_may_start_a_root_step_in_place(pool: Pool, db_url: str) -> None:
    ledger = Ledger(pool)
    ledger.apply(CreateRun(run_id="r6", workflow="w", idempotency_key="c-r6"))
    started = ledger.apply(StartRun(run_id="r6", workflow="w", steps=FAN, continue_on="default"))
    assert started.continued
    assert started.step_context is not None
    assert started.step_context.step_key == "first"
    assert started.followups == ()  # the only root runs in place
    assert_verified(db_url)


class LosesOneAnswer(Ledger):
    """Commits the first continuing completion, then reports the connection as lost."""

    lost = False

    def apply(self, command: Any) -> Any:
        outcome = super().apply(command)
        if getattr(command, "continue_on", None) and not self.lost:
            self.lost = True
            raise psycopg.OperationalError("server closed the connection unexpectedly")
        return outcome


def test_a_lost_answer_does_not_orphan_the_step_it_started(pool: Pool, db_url: str) -> None:
    ledger = LosesOneAnswer(pool)
    ledger.apply(CreateRun(run_id="r7", workflow="t_chain", idempotency_key="c-r7"))
    ledger.apply(StartRun(run_id="r7", workflow="t_chain", steps=chain.specs()))
    runner = StepRunner(ledger, lambda items: None)
    runner.run(
        fence="f", command=StartStep(run_id="r7", step_key="one", attempt=1), continue_for=60
    )
    assert ledger.lost
    with pool.connection() as conn:
        run = conn.execute("SELECT status FROM executor.runs WHERE run_id = 'r7'").fetchone()
    assert run is not None
    assert run["status"] == "completed"  # `two`, started by the unseen commit, still ran
    assert_verified(db_url)


def test_each_step_run_in_place_gets_the_hook_that_re_arms_its_timeout(pool: Pool) -> None:
    ledger = Ledger(pool)
    ledger.apply(CreateRun(run_id="r8", workflow="t_chain", idempotency_key="c-r8"))
    ledger.apply(StartRun(run_id="r8", workflow="t_chain", steps=chain.specs()))
    calls: list[int] = []
    StepRunner(ledger, lambda items: None).run(
        fence="f",
        command=StartStep(run_id="r8", step_key="one", attempt=1),
        continue_for=60,
        on_continue=lambda: calls.append(1),
    )
    assert len(calls) == 2  # before `two` and before `three`, not before `one`
