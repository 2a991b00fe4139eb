"""A command's one changed step and its few events go as parameters, its other rows as
documents (`writes._step_params`, `writes._event_params`): both forms must write the same rows.

The same commands run on two runs, one with every row sent as a document (the form every
command used before), and the runs' steps, events, receipts and run rows are compared column
by column, times aside (each run has its own `now()`). The commands cover each form: a start
(one step, one event), a completion that readies two steps (three of each), one that readies
one (two steps, two events), a retryable failure, a run's last completion (one step, two
events) and a failure that ends its run (one step, two events, the run's error).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import psycopg
import pytest
from psycopg_pool import ConnectionPool

from executor.commands.models import (
    BackoffPolicy,
    Command,
    CompleteStep,
    CreateRun,
    FailStep,
    StartRun,
    StartStep,
    StepSpec,
)
from executor.ledger import queries as q
from executor.ledger import writes
from executor.ledger.handler import Ledger
from executor.ledger.pipe import Pipe
from executor.ledger.verify import verify

Pool = ConnectionPool[psycopg.Connection[dict[str, Any]]]

FENCE = "f"
LATE = ("lease_expires_at", "next_attempt_at", "wake_at")


def _commands(run: str) -> list[Command]:
    fan = (
        StepSpec(step_key="a"),
        StepSpec(step_key="b", depends_on=("a",)),
        StepSpec(step_key="c", depends_on=("a",)),
        StepSpec(step_key="d", depends_on=("b", "c")),
        StepSpec(step_key="flaky", max_attempts=3, backoff=BackoffPolicy(jitter=False)),
    )

    def start(key: str, attempt: int = 1) -> StartStep:
        return StartStep(run_id=run, step_key=key, attempt=attempt, fence=FENCE)

    def complete(key: str) -> CompleteStep:
        output: Any = {key: [1, "ü"]}
        return CompleteStep(run_id=run, step_key=key, attempt=1, output=output, fence=FENCE)

    return [
        CreateRun(run_id=run, workflow="w", input={"n": 1}, idempotency_key=f"create:{run}"),
        StartRun(run_id=run, workflow="w", steps=fan, idempotency_key=f"start_run:{run}"),
        start("a"),
        complete("a"),  # readies b and c: three steps, three events
        start("b"),
        complete("b"),  # d waits on one fewer: two steps, one event
        start("flaky"),
        FailStep(run_id=run, step_key="flaky", attempt=1, error="x", fence=FENCE),
        start("c"),
        complete("c"),  # readies d: two steps, two events
        start("d"),
        complete("d"),
        start("a"),  # a duplicate: dropped, nothing written but the drop
    ]


def _ending(run: str) -> list[Command]:
    return [
        CreateRun(run_id=run, workflow="w", idempotency_key=f"create:{run}"),
        StartRun(
            run_id=run, workflow="w", steps=(StepSpec(step_key="s"),), idempotency_key=f"s:{run}"
        ),
        StartStep(run_id=run, step_key="s", attempt=1, fence=FENCE),
        FailStep(
            run_id=run, step_key="s", attempt=1, error="no", retryable=False, fence=FENCE
        ),  # the step's and the run's end: one step, two events
    ]


def _normal(value: Any, run: str) -> Any:
    """A value with its run's id made neutral and its times reduced to whether they are set."""
    if isinstance(value, datetime):
        return "<time>"
    if isinstance(value, str):
        return value.replace(run, "<run>")
    if isinstance(value, dict):
        return {k: "<time>" if k in LATE and v else _normal(v, run) for k, v in value.items()}
    if isinstance(value, list):
        return [_normal(v, run) for v in value]
    return value


def _rows(conn: psycopg.Connection[dict[str, Any]], run: str) -> dict[str, Any]:
    queries = {
        "run": "SELECT * FROM executor.runs WHERE run_id = %s",
        "steps": "SELECT * FROM executor.steps WHERE run_id = %s ORDER BY step_key",
        "events": "SELECT * FROM executor.events WHERE run_id = %s ORDER BY seq",
        "receipts": "SELECT * FROM executor.receipts WHERE run_id = %s ORDER BY first_seq",
    }
    out: dict[str, Any] = {}
    for name, query in queries.items():
        rows = conn.execute(query, (run,)).fetchall()
        out[name] = [
            {k: _normal(v, run) for k, v in r.items() if k not in ("created_at", "updated_at")}
            for r in rows
        ]
    return out


@pytest.mark.parametrize("script", [_commands, _ending], ids=["fan-out", "ending"])
def test_parameters_and_documents_write_the_same_rows(
    pool: Pool, monkeypatch: pytest.MonkeyPatch, script: Any
) -> None:
    ledger = Ledger(pool)
    by_parameters = [ledger.apply(c) for c in script("run-params")]
    with monkeypatch.context() as forced:
        forced.setattr(writes, "ROWS_AS_PARAMETERS", False)
        by_documents = [ledger.apply(c) for c in script("run-documents")]

    assert [o.applied for o in by_parameters] == [o.applied for o in by_documents]
    assert [o.events for o in by_parameters] == [o.events for o in by_documents]
    with pool.connection() as conn:
        assert _rows(conn, "run-params") == _rows(conn, "run-documents")
        for run in ("run-params", "run-documents"):
            report = verify(conn, run_id=run)
            assert report.ok, report


def test_the_commands_sent_most_take_the_parameter_form(
    pool: Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Which form each command took, by the statement it ran: a start and a leaf's
    completion pass everything as parameters; a completion that readies steps does not."""
    seen: list[str] = []
    real = Pipe.execute

    def spy(self: Any, query: str, params: Any = None) -> Any:
        if query in q.WRITE_CHANGES.values():
            seen.append(
                ("steps doc" if "jsonb_to_recordset(%(steps)s" in query else "step params")
                + " / "
                + ("events doc" if "%(events)s" in query else "event params")
            )
        return real(self, query, params)

    ledger = Ledger(pool)
    commands = _commands("r")
    for command in commands[:2]:
        assert ledger.apply(command).applied
    monkeypatch.setattr(Pipe, "execute", spy)
    for command in commands[2:6]:
        assert ledger.apply(command).applied
    assert seen == [
        "step params / event params",  # start a
        "steps doc / events doc",  # complete a: a, b, c and three events
        "step params / event params",  # start b
        "steps doc / event params",  # complete b: b and d, one event
    ]
