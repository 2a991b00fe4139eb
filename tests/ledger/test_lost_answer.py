"""Lost answers, forced with the proxy (support/pgproxy.py): the COMMIT goes through, the
reply never reaches the sender, which sees a broken connection and asks again.

After each single lost answer the step still runs under its attempt, the run completes,
no attempt is charged, and the log names the owner (issue 7, "fencing tokens"):

- a start_step's answer lost: the sender's retry is the owner's duplicate; it runs the step;
- a planning start_run that started its first step in place;
- a complete_step that started a dependant in place, with the run running or paused;
- a fail_step: the retry is a duplicate; the next attempt is dispatched from the outbox;
- a job timeout during COMMIT (the interruption itself, raised after the commit).

How to write one (the proxy's whole API):

    arming = pg_proxy.arm(match=lambda c: c.mentions("start_step"))  # LOSE_ANSWER, one shot
    with pytest.raises(psycopg.OperationalError):
        ledger.apply(command)                     # on a pool opened on `proxy_db_url`
    (firing,) = arming.wait()                     # an Event: no sleeps
    assert firing.committed                       # the server said COMMIT; the sender never saw it
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row
from support.pgproxy import PgProxy

from executor.commands.models import (
    BackoffPolicy,
    CreateRun,
    PauseRun,
    ResumeRun,
    StartRun,
    StartStep,
    parse_obj,
)
from executor.errors import StepTimeout
from executor.ledger.handler import Ledger
from executor.ledger.verify import verify
from executor.storage.db import open_pool
from executor.workflows.definition import StepContext, Workflow
from executor.workflows.runner import StepRunner

calls: list[tuple[str, str, int]] = []

chain = Workflow("t_lost", max_attempts=2, backoff=BackoffPolicy(initial=0, jitter=False))


@chain.step
def first(ctx: StepContext) -> str:
    calls.append((ctx.run_id, ctx.step_key, ctx.attempt))
    return "one"


@chain.step(depends_on=[first])
def second(ctx: StepContext) -> str:
    calls.append((ctx.run_id, ctx.step_key, ctx.attempt))
    if ctx.input == "fail once" and ctx.attempt == 1:
        raise ConnectionError("flaky")
    return "two"


@pytest.fixture(autouse=True)
def _forget_calls() -> None:
    calls.clear()


@pytest.fixture
def proxied_ledger(proxy_db_url: str) -> Iterator[Ledger]:
    """A Ledger whose every connection goes through the proxy."""
    pool = open_pool(proxy_db_url, name="lost-answer", max_size=4)
    try:
        yield Ledger(pool)
    finally:
        pool.close()


def rows(db_url: str, sql: str, *params: Any) -> list[dict[str, Any]]:
    with psycopg.connect(db_url, row_factory=dict_row) as conn:
        return conn.execute(sql, params).fetchall()


def steps(db_url: str, run_id: str) -> dict[str, tuple[str, int]]:
    found = rows(
        db_url, "SELECT step_key, status, attempt FROM executor.steps WHERE run_id = %s", run_id
    )
    return {r["step_key"]: (r["status"], r["attempt"]) for r in found}


def run_status(db_url: str, run_id: str) -> str:
    return str(
        rows(db_url, "SELECT status FROM executor.runs WHERE run_id = %s", run_id)[0]["status"]
    )


def owner_drops(db_url: str) -> list[str]:
    found = rows(
        db_url, "SELECT detail FROM executor.drops WHERE reason = 'duplicate' ORDER BY drop_id"
    )
    return [r["detail"] for r in found if "still owns" in r["detail"]]


def assert_verified(db_url: str) -> None:
    with psycopg.connect(db_url, row_factory=dict_row, autocommit=True) as conn:
        report = verify(conn)
    assert report.ok, [str(v) for v in report.violations]


def planned(ledger: Ledger, run_id: str, run_input: Any = None, **start: Any) -> StartRun:
    ledger.apply(
        CreateRun(run_id=run_id, workflow="t_lost", input=run_input, idempotency_key=run_id)
    )
    return StartRun(run_id=run_id, workflow="t_lost", steps=chain.specs(), **start)


def test_a_lost_answer_to_start_step_lets_the_retrying_sender_run_the_step(
    pg_proxy: PgProxy, proxied_ledger: Ledger, db_url: str
) -> None:
    ledger = proxied_ledger
    assert ledger.apply(planned(ledger, "r1")).applied
    arming = pg_proxy.arm(match=lambda c: c.mentions("start_step"))
    runner = StepRunner(ledger, lambda items: None)
    last = runner.run(
        StartStep(run_id="r1", step_key="first", attempt=1), fence="d1", continue_for=60
    )
    (firing,) = arming.wait()
    assert firing.committed  # the start went through; its answer did not
    assert last.run_status == "completed", last.summary()
    assert calls == [("r1", "first", 1), ("r1", "second", 1)]  # once each, attempt 1
    assert steps(db_url, "r1") == {"first": ("completed", 1), "second": ("completed", 1)}
    (owned,) = owner_drops(db_url)  # the log names the owner
    assert owned.endswith(
        "with outcome applied; delivery d1 still owns first attempt 1 and runs it"
    )
    assert_verified(db_url)


def test_a_lost_answer_to_a_planning_start_run_runs_its_first_step(
    pg_proxy: PgProxy, proxied_ledger: Ledger, db_url: str
) -> None:
    ledger = proxied_ledger
    start = planned(ledger, "r2", fence="d2", continue_on="default")
    arming = pg_proxy.arm(match=lambda c: c.mentions("start_run") and c.mentions("step_created"))
    runner = StepRunner(ledger, lambda items: None)
    outcome = runner.apply(start)  # what jobs.handle does with a planned start_run
    (firing,) = arming.wait()
    assert firing.committed
    assert (outcome.applied, outcome.owner) == (False, True)
    assert outcome.step_context is not None
    assert outcome.step_context.step_key == "first"
    last = runner.run_started("r2", outcome, fence="d2", continue_for=60)
    assert last.run_status == "completed", last.summary()
    assert calls == [("r2", "first", 1), ("r2", "second", 1)]
    (owned,) = owner_drops(db_url)
    assert "delivery d2 still owns first attempt 1" in owned
    assert_verified(db_url)


@pytest.mark.parametrize("pause_in_between", [False, True], ids=["running", "paused"])
def test_a_lost_answer_to_a_completion_that_continued_runs_the_continued_step(
    pg_proxy: PgProxy, proxied_ledger: Ledger, db_url: str, pause_in_between: bool
) -> None:
    ledger = proxied_ledger
    assert ledger.apply(planned(ledger, "r3")).applied
    arming = pg_proxy.arm(match=lambda c: c.mentions("complete_step"))
    if pause_in_between:
        original = ledger.apply

        def pause_after_the_lost_commit(command: Any) -> Any:
            if arming.fired.is_set() and not getattr(pause_after_the_lost_commit, "done", False):
                pause_after_the_lost_commit.done = True  # type: ignore[attr-defined]
                assert original(PauseRun(run_id="r3", idempotency_key="pause")).applied
            return original(command)

        ledger.apply = pause_after_the_lost_commit  # type: ignore[method-assign]
    runner = StepRunner(ledger, lambda items: None)
    last = runner.run(
        StartStep(run_id="r3", step_key="first", attempt=1), fence="d3", continue_for=60
    )
    (firing,) = arming.wait()
    assert firing.committed
    assert calls == [("r3", "first", 1), ("r3", "second", 1)]
    assert steps(db_url, "r3") == {"first": ("completed", 1), "second": ("completed", 1)}
    (owned,) = owner_drops(db_url)
    assert "delivery d3 still owns second attempt 1" in owned
    # A paused run lets started steps finish; it completes once resumed.
    assert last.run_status == ("paused" if pause_in_between else "completed"), last.summary()
    if pause_in_between:
        resumed = ledger.apply(ResumeRun(run_id="r3", idempotency_key="resume"))
        assert resumed.run_status == "completed", resumed.summary()
    assert run_status(db_url, "r3") == "completed"
    assert_verified(db_url)


def test_a_lost_answer_to_fail_step_charges_only_the_real_failure(
    pg_proxy: PgProxy, proxied_ledger: Ledger, db_url: str
) -> None:
    ledger = proxied_ledger
    assert ledger.apply(planned(ledger, "r4", "fail once")).applied
    runner = StepRunner(ledger, lambda items: None)
    arming = pg_proxy.arm(match=lambda c: c.mentions("fail_step"))
    runner.run(StartStep(run_id="r4", step_key="first", attempt=1), fence="d4", continue_for=60)
    (firing,) = arming.wait()
    assert firing.committed
    assert steps(db_url, "r4")["second"] == ("retrying", 1)  # one failure, recorded once
    outbox = rows(db_url, "SELECT idempotency_key, command FROM executor.outbox")
    assert [o["idempotency_key"] for o in outbox] == ["dispatch_step:r4:second:2"]
    dispatched = ledger.apply(parse_obj(outbox[0]["command"]))  # as the relay would deliver it
    assert dispatched.applied, dispatched.summary()
    last = runner.run(StartStep(run_id="r4", step_key="second", attempt=2), fence="d5")
    assert last.run_status == "completed", last.summary()
    assert calls == [("r4", "first", 1), ("r4", "second", 1), ("r4", "second", 2)]
    assert_verified(db_url)


class TimesOutDuringCommit(Ledger):
    """The job's timeout fires while the COMMIT of the matching command is in flight: the
    transaction has committed, the sender gets the interruption instead of the answer."""

    def __init__(self, *args: Any, kind: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.kind = kind
        self.fired = False

    def apply(self, command: Any) -> Any:
        outcome = super().apply(command)
        if command.type == self.kind and not self.fired:
            self.fired = True
            raise StepTimeout("step exceeded its timeout (180 seconds)")
        return outcome


@pytest.mark.parametrize("kind", ["start_step", "complete_step"])
def test_a_job_timeout_during_commit_loses_no_step_and_charges_no_attempt(
    pool: Any, db_url: str, kind: str
) -> None:
    ledger = TimesOutDuringCommit(pool, kind=kind)
    assert ledger.apply(planned(ledger, "r5")).applied
    rearmed: list[int] = []
    runner = StepRunner(ledger, lambda items: None)
    last = runner.run(
        StartStep(run_id="r5", step_key="first", attempt=1),
        fence="d6",
        continue_for=60,
        on_continue=lambda: rearmed.append(1),
    )
    assert ledger.fired
    assert last.run_status == "completed", last.summary()
    assert calls == [("r5", "first", 1), ("r5", "second", 1)]
    assert rearmed  # the job's timeout was armed again before going on
    assert_verified(db_url)
