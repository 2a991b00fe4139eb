"""Lost answers, forced with the proxy (support/pgproxy.py): the COMMIT goes through, the
reply never reaches the sender, which sees a broken connection and retries.

How to write one (the proxy's whole API):

    arming = pg_proxy.arm(match=lambda c: c.mentions("start_step"))  # LOSE_ANSWER, one shot
    with pytest.raises(psycopg.OperationalError):
        ledger.apply(command)                     # on a pool opened on `proxy_db_url`
    (firing,) = arming.wait()                     # an Event: no sleeps
    assert firing.committed                       # the server said COMMIT; the sender never saw it

`arm(DROP_BEFORE)` cuts the connection before forwarding the COMMIT instead (it never
happens), `shots=N` cuts N matching COMMITs, and `match` sees a `Commit`: the transaction's
statements and bound parameters (`mentions`), `backend_pid`, `application_name`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NoReturn

import psycopg
import pytest
from psycopg.rows import dict_row
from support.pgproxy import PgProxy

from executor.commands.models import CreateRun, StartRun, StartStep, StepSpec
from executor.ledger.handler import Ledger
from executor.storage.db import open_pool


@pytest.fixture
def proxied_ledger(proxy_db_url: str) -> Iterator[Ledger]:
    """A Ledger whose every connection goes through the proxy."""
    pool = open_pool(proxy_db_url, name="lost-answer", max_size=4)
    try:
        yield Ledger(pool)
    finally:
        pool.close()


def premise(condition: bool, what: str) -> None:
    """A precondition of the demonstration, failing loudly (not as the expected xfail)."""
    if not condition:
        fail(what)


def fail(what: str) -> NoReturn:
    pytest.fail(f"premise broken: {what}", pytrace=False)


def step_row(db_url: str, run_id: str, step_key: str) -> dict[str, Any] | None:
    with psycopg.connect(db_url, row_factory=dict_row) as conn:
        return conn.execute(
            "SELECT status, attempt FROM executor.steps WHERE run_id = %s AND step_key = %s",
            (run_id, step_key),
        ).fetchone()


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason=(
        "issue 7 bug 1: after a lost answer to start_step the step row says running and the "
        "retried start is dropped as a duplicate, so the step never runs and only lease "
        "expiry moves it, charging an attempt"
    ),
)
def test_a_lost_answer_to_start_step_lets_the_retrying_sender_run_the_step(
    pg_proxy: PgProxy, proxied_ledger: Ledger, db_url: str
) -> None:
    ledger = proxied_ledger
    ledger.apply(CreateRun(run_id="r1", workflow="wf", idempotency_key="create:r1"))
    ledger.apply(StartRun(run_id="r1", workflow="wf", steps=(StepSpec(step_key="work"),)))
    start = StartStep(run_id="r1", step_key="work", attempt=1)

    arming = pg_proxy.arm(match=lambda c: c.mentions("start_step"))
    try:
        ledger.apply(start)
        fail("the armed start_step came back although the proxy was to cut it")
    except psycopg.OperationalError:
        pass
    (firing,) = arming.wait()
    premise(firing.committed, f"the server committed the start ({firing.server_reply})")
    premise(
        step_row(db_url, "r1", "work") == {"status": "running", "attempt": 1},
        f"the start committed: {step_row(db_url, 'r1', 'work')}",
    )

    # The sender saw only a broken connection; it retries on a fresh one, as a worker does.
    retried = ledger.apply(start)
    assert retried.step_context is not None, retried.summary()  # today: dropped as duplicate
    assert retried.step_context.attempt == 1
    assert step_row(db_url, "r1", "work") == {"status": "running", "attempt": 1}
