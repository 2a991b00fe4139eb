"""I5: one active run per concurrency key, under launches that race each other.

The published bug: a "one active run per working directory" guard looked only at
`running`/`paused` rows while new rows were created `pending`, so two near-simultaneous
launches both passed the check. Here every round releases 16 launches at once through a
barrier; the partial unique index must let exactly one through and the others must be told
who holds the key.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg
import pytest
from psycopg_pool import ConnectionPool

from executor.commands.models import (
    CancelRun,
    Command,
    CompleteStep,
    CreateRun,
    FailStep,
    PauseRun,
    ResumeRun,
    RetryStep,
    StartRun,
    StartStep,
    StepSpec,
)
from executor.errors import ConcurrencyKeyTaken
from executor.ledger.handler import Ledger
from executor.ledger.outcome import Outcome
from executor.ledger.verify import verify

Pool = ConnectionPool[psycopg.Connection[dict[str, Any]]]

THREADS = 16
ROUNDS = 50
KEY = "workdir:/srv/checkout"
WAIT = 60.0


def create(run_id: str, key: str | None = KEY) -> CreateRun:
    return CreateRun(
        run_id=run_id, workflow="wf", concurrency_key=key, idempotency_key=f"create:{run_id}"
    )


def start(ledger: Ledger, run_id: str, max_attempts: int = 1) -> None:
    outcome = ledger.apply(
        StartRun(
            run_id=run_id,
            workflow="wf",
            steps=(StepSpec(step_key="work", max_attempts=max_attempts),),
        )
    )
    assert outcome.applied, outcome.summary()
    outcome = ledger.apply(StartStep(run_id=run_id, step_key="work", attempt=1))
    assert outcome.applied, outcome.summary()


def complete(ledger: Ledger, run_id: str) -> None:
    start(ledger, run_id)
    outcome = ledger.apply(CompleteStep(fence="f", run_id=run_id, step_key="work", attempt=1))
    assert outcome.run_status == "completed", outcome.summary()


def cancel(ledger: Ledger, run_id: str) -> None:
    outcome = ledger.apply(CancelRun(run_id=run_id, idempotency_key=f"cancel:{run_id}"))
    assert outcome.run_status == "cancelled", outcome.summary()


def fail(ledger: Ledger, run_id: str) -> None:
    start(ledger, run_id)
    outcome = ledger.apply(
        FailStep(
            fence="f", run_id=run_id, step_key="work", attempt=1, error="boom", retryable=False
        )
    )
    assert outcome.run_status == "failed", outcome.summary()


def holders(pool: Pool, key: str = KEY) -> list[str]:
    with pool.connection() as conn:
        rows = conn.execute(
            "SELECT run_id FROM executor.runs WHERE concurrency_key = %s "
            "AND status IN ('pending', 'running', 'paused') ORDER BY run_id",
            (key,),
        ).fetchall()
    return [str(r["run_id"]) for r in rows]


def assert_verified(pool: Pool) -> None:
    with pool.connection() as conn:
        report = verify(conn)
    assert report.ok, [str(v) for v in report.violations]


Result = Outcome | ConcurrencyKeyTaken


@pytest.fixture
def race() -> Iterator[Callable[[Ledger, list[Command]], list[Result]]]:
    """Apply commands from as many threads, all released at once by a barrier."""
    with ThreadPoolExecutor(max_workers=THREADS) as ex:

        def run(ledger: Ledger, commands: list[Command]) -> list[Result]:
            barrier = threading.Barrier(len(commands))

            def one(command: Command) -> Result:
                barrier.wait(WAIT)
                try:
                    return ledger.apply(command)
                except ConcurrencyKeyTaken as exc:
                    return exc

            futures = [ex.submit(one, c) for c in commands]
            return [f.result(WAIT) for f in futures]

        yield run


def test_exactly_one_of_sixteen_simultaneous_launches_wins(
    pool: Pool, race: Callable[[Ledger, list[Command]], list[Result]]
) -> None:
    ledger = Ledger(pool)
    for rnd in range(ROUNDS):
        results = race(ledger, [create(f"launch-{rnd}-{i}") for i in range(THREADS)])
        winners = [r for r in results if isinstance(r, Outcome)]
        refused = [r for r in results if isinstance(r, ConcurrencyKeyTaken)]
        assert len(winners) == 1, f"round {rnd}: {[str(r) for r in results]}"
        assert len(refused) == THREADS - 1
        winner = winners[0]
        assert winner.applied
        assert winner.run_status == "pending"
        assert winner.run_id is not None
        for exc in refused:
            assert exc.holder_run_id == winner.run_id
            assert exc.concurrency_key == KEY
            assert winner.run_id in str(exc)
        assert holders(pool) == [winner.run_id]
        # A terminal run releases the key for the next round: complete half, cancel half.
        if rnd % 2 == 0:
            complete(ledger, winner.run_id)
        else:
            cancel(ledger, winner.run_id)
        assert holders(pool) == []

    with pool.connection() as conn:
        runs = conn.execute("SELECT count(*) AS n FROM executor.runs").fetchone()
        refusals = conn.execute(
            "SELECT count(*) AS n FROM executor.drops "
            "WHERE reason = 'key_taken' AND command_type = 'create_run' "
            "AND detail LIKE 'concurrency key%%'"
        ).fetchone()
        receipts = conn.execute(
            "SELECT outcome, count(*) AS n FROM executor.receipts "
            "WHERE command_type = 'create_run' GROUP BY outcome ORDER BY outcome"
        ).fetchall()
    assert runs == {"n": ROUNDS}
    assert refusals == {"n": ROUNDS * (THREADS - 1)}
    # A refusal for a held key is transient: recorded as a drop, no receipt, key reusable.
    assert receipts == [{"outcome": "applied", "n": ROUNDS}]
    assert_verified(pool)


def test_a_pending_run_holds_the_key(pool: Pool) -> None:
    ledger = Ledger(pool)
    assert ledger.apply(create("first")).run_status == "pending"
    with pytest.raises(ConcurrencyKeyTaken) as info:
        ledger.apply(create("second"))
    assert info.value.holder_run_id == "first"
    # The refusal is transient: while the key is held, every retry names the holder again...
    with pytest.raises(ConcurrencyKeyTaken) as info:
        ledger.apply(create("second"))
    assert info.value.holder_run_id == "first"
    cancel(ledger, "first")  # a pending run can be cancelled, which releases the key
    # ...and once it is free, the same launch with the same idempotency key starts the run.
    assert ledger.apply(create("second")).applied
    assert holders(pool) == ["second"]
    with pool.connection() as conn:
        drops = conn.execute(
            "SELECT reason, count(*) AS n FROM executor.drops "
            "WHERE idempotency_key = 'create:second' GROUP BY reason"
        ).fetchall()
    assert drops == [{"reason": "key_taken", "n": 2}]
    assert_verified(pool)


def test_a_paused_run_holds_the_key_until_it_ends(pool: Pool) -> None:
    ledger = Ledger(pool)
    ledger.apply(create("first"))
    start(ledger, "first")
    assert ledger.apply(PauseRun(run_id="first", idempotency_key="pause")).run_status == "paused"
    with pytest.raises(ConcurrencyKeyTaken) as info:
        ledger.apply(create("second"))
    assert info.value.holder_run_id == "first"
    assert ledger.apply(ResumeRun(run_id="first", idempotency_key="resume")).applied
    with pytest.raises(ConcurrencyKeyTaken) as info:
        ledger.apply(create("third"))
    assert info.value.holder_run_id == "first"
    done = ledger.apply(CompleteStep(fence="f", run_id="first", step_key="work", attempt=1))
    assert done.run_status == "completed"
    assert ledger.apply(create("fourth")).applied
    assert_verified(pool)


def test_a_failed_run_releases_the_key(pool: Pool) -> None:
    ledger = Ledger(pool)
    ledger.apply(create("first"))
    fail(ledger, "first")
    assert ledger.apply(create("second")).applied
    assert holders(pool) == ["second"]


def test_keys_are_independent_and_null_keys_never_conflict(pool: Pool) -> None:
    ledger = Ledger(pool)
    assert ledger.apply(create("a", "k1")).applied
    assert ledger.apply(create("b", "k2")).applied
    assert ledger.apply(create("c", None)).applied
    assert ledger.apply(create("d", None)).applied
    with pytest.raises(ConcurrencyKeyTaken):
        ledger.apply(create("e", "k1"))
    assert_verified(pool)


def test_manual_retry_is_refused_when_another_run_took_the_key(pool: Pool) -> None:
    ledger = Ledger(pool)
    ledger.apply(create("old"))
    fail(ledger, "old")
    assert ledger.apply(create("new")).applied  # the key was free once "old" failed

    retry = RetryStep(run_id="old", step_key="work", idempotency_key="retry-1")
    with pytest.raises(ConcurrencyKeyTaken) as info:
        ledger.apply(retry)
    assert info.value.holder_run_id == "new"
    assert "new" in str(info.value)

    with pool.connection() as conn:
        old = conn.execute(
            "SELECT r.status, r.last_seq, s.status AS step, s.attempt FROM executor.runs r "
            "JOIN executor.steps s USING (run_id) WHERE run_id = 'old'"
        ).fetchone()
        receipt = conn.execute(
            "SELECT outcome, detail FROM executor.receipts WHERE idempotency_key = 'retry-1'"
        ).fetchone()
        drop = conn.execute(
            "SELECT reason, detail FROM executor.drops WHERE idempotency_key = 'retry-1'"
        ).fetchone()
    assert old is not None
    assert (old["status"], old["step"], old["attempt"]) == ("failed", "failed", 1)
    assert receipt is None  # refused for now: the key is not used up
    assert drop is not None
    assert drop["reason"] == "key_taken"
    assert "held by run new" in drop["detail"]
    with pytest.raises(ConcurrencyKeyTaken):  # the same click, delivered again
        ledger.apply(retry)

    cancel(ledger, "new")
    reopened = ledger.apply(retry)  # the same click once the key is free: it applies
    assert reopened.applied
    assert reopened.run_status == "running"
    assert [(e.type, e.attempt) for e in reopened.events] == [
        ("run_resumed", None),
        ("step_queued", 2),
    ]
    assert holders(pool) == ["old"]
    assert_verified(pool)


def test_a_reopening_retry_races_new_launches(
    pool: Pool, race: Callable[[Ledger, list[Command]], list[Result]]
) -> None:
    """The reopening UPDATE and the launches' INSERTs contend for the same index entry."""
    ledger = Ledger(pool)
    for rnd in range(12):
        failed = f"failed-{rnd}"
        ledger.apply(create(failed))
        fail(ledger, failed)
        commands: list[Command] = [
            RetryStep(run_id=failed, step_key="work", idempotency_key=f"retry:{rnd}"),
            *[create(f"rival-{rnd}-{i}") for i in range(7)],
        ]
        results = race(ledger, commands)
        winners = [r for r in results if isinstance(r, Outcome)]
        assert len(winners) == 1, f"round {rnd}: {[str(r) for r in results]}"
        winner = winners[0]
        assert winner.applied
        assert winner.run_id is not None
        assert all(
            r.holder_run_id == winner.run_id for r in results if isinstance(r, ConcurrencyKeyTaken)
        )
        assert holders(pool) == [winner.run_id]
        cancel(ledger, winner.run_id)
    assert_verified(pool)
