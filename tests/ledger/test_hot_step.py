"""A hot step: 32 copies of the same delivery arrive at the same instant.

At-least-once transport at its worst: every copy of a start (then of a completion) is
released by one barrier. Exactly one copy of each is applied, the other 31 are recorded as
`duplicate`, and no deadlock or serialization failure ever reaches a caller.
"""

from __future__ import annotations

import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg
import pytest
from psycopg_pool import ConnectionPool

from executor.commands.models import (
    Command,
    CompleteStep,
    CreateRun,
    StartRun,
    StartStep,
    StepSpec,
)
from executor.ledger.handler import Ledger
from executor.ledger.outcome import Outcome
from executor.ledger.verify import verify

Pool = ConnectionPool[psycopg.Connection[dict[str, Any]]]

COPIES = 32
WAIT = 60.0


def deliver_at_once(ledger: Ledger, command: Command, copies: int = COPIES) -> list[Outcome]:
    barrier = threading.Barrier(copies)

    def one() -> Outcome:
        barrier.wait(WAIT)
        return ledger.apply(command)

    with ThreadPoolExecutor(max_workers=copies) as ex:
        futures = [ex.submit(one) for _ in range(copies)]
        # .result() re-raises whatever a caller would have seen.
        return [f.result(WAIT) for f in futures]


def test_thirty_two_copies_of_start_then_complete(pool: Pool) -> None:
    ledger = Ledger(pool)
    run_id = "hot"
    ledger.apply(CreateRun(run_id=run_id, workflow="wf", idempotency_key="create:hot"))
    # A sibling step keeps the run busy so the hot step's rows are not the only ones locked.
    ledger.apply(
        StartRun(
            run_id=run_id,
            workflow="wf",
            steps=(StepSpec(step_key="hot"), StepSpec(step_key="sibling")),
        )
    )

    starts = deliver_at_once(ledger, StartStep(run_id=run_id, step_key="hot", attempt=1))
    assert Counter(o.reason for o in starts) == {None: 1, "duplicate": COPIES - 1}
    (applied,) = [o for o in starts if o.applied]
    assert [e.type for e in applied.events] == ["step_started"]
    assert applied.step_context is not None

    completions = deliver_at_once(
        ledger,
        CompleteStep(fence="f", run_id=run_id, step_key="hot", attempt=1, output={"hits": 1}),
    )
    assert Counter(o.reason for o in completions) == {None: 1, "duplicate": COPIES - 1}
    (applied,) = [o for o in completions if o.applied]
    assert [e.type for e in applied.events] == ["step_completed"]
    assert ledger.retries == 0, "every copy should queue on the run row lock, not conflict"

    with pool.connection() as conn:
        step = conn.execute(
            "SELECT status, attempt, output FROM executor.steps "
            "WHERE run_id = %s AND step_key = 'hot'",
            (run_id,),
        ).fetchone()
        events = conn.execute(
            "SELECT type, count(*) AS n FROM executor.events "
            "WHERE run_id = %s AND step_key = 'hot' GROUP BY type ORDER BY type",
            (run_id,),
        ).fetchall()
        drops = conn.execute(
            "SELECT idempotency_key, reason, count(*) AS n FROM executor.drops "
            "GROUP BY idempotency_key, reason ORDER BY idempotency_key"
        ).fetchall()
        receipts = conn.execute(
            "SELECT idempotency_key, outcome FROM executor.receipts "
            "WHERE idempotency_key LIKE '%%:hot:hot:1%%' ORDER BY idempotency_key"
        ).fetchall()
        report = verify(conn)
    assert step == {"status": "completed", "attempt": 1, "output": {"hits": 1}}
    assert events == [
        {"type": "step_completed", "n": 1},
        {"type": "step_created", "n": 1},
        {"type": "step_queued", "n": 1},
        {"type": "step_started", "n": 1},
    ]
    assert drops == [
        {"idempotency_key": "complete_step:hot:hot:1:f", "reason": "duplicate", "n": COPIES - 1},
        {"idempotency_key": "start_step:hot:hot:1", "reason": "duplicate", "n": COPIES - 1},
    ]
    assert receipts == [
        {"idempotency_key": "complete_step:hot:hot:1:f", "outcome": "applied"},
        {"idempotency_key": "start_step:hot:hot:1", "outcome": "applied"},
    ]
    assert report.ok, [str(v) for v in report.violations]


@pytest.mark.parametrize("concurrency_key", [None, "workdir:/srv/app"])
def test_thirty_two_copies_of_a_launch(pool: Pool, concurrency_key: str | None) -> None:
    """A run does not exist yet, so there is no row to lock: the receipt key decides."""
    ledger = Ledger(pool)
    launch = CreateRun(
        run_id="born",
        workflow="wf",
        concurrency_key=concurrency_key,
        idempotency_key="producer-retry-1",
    )
    outcomes = deliver_at_once(ledger, launch)
    assert Counter(o.reason for o in outcomes) == {None: 1, "duplicate": COPIES - 1}
    with pool.connection() as conn:
        runs = conn.execute("SELECT count(*) AS n FROM executor.runs").fetchone()
        events = conn.execute("SELECT count(*) AS n FROM executor.events").fetchone()
        report = verify(conn)
    assert runs == {"n": 1}
    assert events == {"n": 1}
    assert report.ok, [str(v) for v in report.violations]
