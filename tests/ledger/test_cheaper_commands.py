"""What migration 009 and the leaner write path changed, checked on the real server.

* A command spends its own outbox row by its key, whatever characters the key holds, and
  reads only that row, however many its run has queued; the other keys a command may settle
  travel as a hand-made text[] literal, from which every key must come back unchanged.
* The run's status, a receipt's outcome, a concurrency limit (009) and the steps', events'
  and drops' checked columns (010) are guarded by domains instead of CHECK constraints: the
  same values are refused, with the same error class. The runs' slot rules are a row
  trigger that refuses what their CHECKs refused, under the same constraint names.
* The lock's answer is json and the named step is locked first: a completion still locks
  and changes its dependants (the fan-out case), and a start locks its step alone. Its rows
  are arrays (011), in the order `rows.RUN_FIELDS` and `rows.STEP_FIELDS` give.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from executor.commands.models import CompleteStep, CreateRun, StartRun, StartStep, StepSpec
from executor.ledger.handler import Ledger, LedgerHooks
from executor.ledger.rows import RUN_FIELDS, STEP_FIELDS, locked_run, locked_step
from executor.ledger.verify import verify
from executor.ledger.writes import text_array

Pool = ConnectionPool[psycopg.Connection[dict[str, Any]]]

LOCK = "SELECT executor.lock_for_command('r1', %s, 'a', 'f', NULL, 1, NULL, %s) AS l"

AWKWARD_KEYS = [
    "plain",
    'with "double" quotes',
    "back\\slash and \\\\ two",
    "comma, and {braces}",
    "  leading and trailing spaces  ",
    "NULL",
    "",
    "ünïcødé ☃ \t tab",
    "'single'",
]


def test_every_key_comes_back_from_its_text_array_literal(db_url: str) -> None:
    with psycopg.connect(db_url) as conn:
        for keys in ([k] for k in AWKWARD_KEYS):
            row = conn.execute("SELECT %s::text[]", (text_array(keys),)).fetchone()
            assert row is not None
            assert row[0] == keys
        row = conn.execute("SELECT %s::text[]", (text_array(AWKWARD_KEYS),)).fetchone()
        assert row is not None
        assert row[0] == AWKWARD_KEYS


def test_a_command_spends_its_outbox_row_whatever_its_key(pool: Pool) -> None:
    ledger = Ledger(pool)
    key = 'start_run "r1", {with} \\ odd, chars'
    ledger.apply(CreateRun(run_id="r1", workflow="w", idempotency_key="create:r1"))
    start = StartRun(
        run_id="r1",
        workflow="w",
        steps=(StepSpec(step_key="a"),),
        idempotency_key=key,
    )
    ledger.enqueue(start, "default")
    with pool.connection() as conn:
        before = conn.execute(
            "SELECT count(*) AS n FROM executor.outbox WHERE idempotency_key = %s", (key,)
        ).fetchone()
    assert before == {"n": 1}
    assert ledger.apply(start).applied
    with pool.connection() as conn:
        after = conn.execute(
            "SELECT count(*) AS n FROM executor.outbox WHERE idempotency_key = %s", (key,)
        ).fetchone()
    assert after == {"n": 0}


@pytest.mark.parametrize(
    ("statement", "params"),
    [
        (
            "INSERT INTO executor.runs (run_id, workflow, status) VALUES (%s, 'w', %s)",
            ("bad-status", "finished"),
        ),
        (
            "INSERT INTO executor.runs (run_id, workflow, status, concurrency_limit)"
            " VALUES (%s, 'w', 'pending', %s)",
            ("bad-limit", 0),
        ),
        (
            "INSERT INTO executor.concurrency_keys (concurrency_key, concurrency_limit)"
            " VALUES (%s, %s)",
            ("k", 10_001),
        ),
        (
            "INSERT INTO executor.receipts (idempotency_key, run_id, command_type, command,"
            " outcome) VALUES (%s, 'r', 'start_step', '{}', %s)",
            ("bad-outcome", "maybe"),
        ),
        (
            "INSERT INTO executor.drops (idempotency_key, reason, detail) VALUES (%s, %s, '')",
            ("bad-reason", "bored"),
        ),
    ],
)
def test_the_domains_refuse_what_the_checks_refused(
    db_url: str, statement: str, params: tuple[Any, ...]
) -> None:
    with psycopg.connect(db_url) as conn:
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute(statement, params)
        conn.rollback()


@pytest.mark.parametrize(
    ("table", "assignment", "value"),
    [
        ("steps", "status = %s", "finished"),
        ("steps", "kind = %s", "job"),
        ("steps", "max_attempts = %s", 0),
        ("steps", "waiting_on = %s", -1),
        ("events", "type = %s", "step_exploded"),
        ("events", "seq = %s", 0),
    ],
)
def test_the_step_and_event_domains_refuse_what_the_checks_refused(
    pool: Pool, table: str, assignment: str, value: Any
) -> None:
    ledger = Ledger(pool)
    ledger.apply(CreateRun(run_id="r1", workflow="w", idempotency_key="create:r1"))
    ledger.apply(
        StartRun(run_id="r1", workflow="w", steps=(StepSpec(step_key="a"),), idempotency_key="s:r1")
    )
    with psycopg.connect(pool.conninfo) as conn:
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute(f"UPDATE executor.{table} SET {assignment} WHERE run_id = 'r1'", (value,))


@pytest.mark.parametrize(
    ("status", "slot", "limit", "constraint"),
    [
        ("running", None, 1, "runs_active_holds_slot"),
        ("completed", 0, 1, "runs_active_holds_slot"),
        ("running", 1, 1, "runs_slot_below_limit"),
        ("running", -1, 2, "runs_slot_below_limit"),
    ],
)
def test_the_slot_trigger_refuses_what_the_slot_checks_refused(
    db_url: str, status: str, slot: int | None, limit: int, constraint: str
) -> None:
    with psycopg.connect(db_url) as conn:
        conn.execute(
            "INSERT INTO executor.runs (run_id, workflow, status, concurrency_key,"
            " concurrency_slot, concurrency_limit) VALUES ('ok', 'w', 'running', 'k', 0, 1)"
        )
        with pytest.raises(psycopg.errors.CheckViolation) as refused:
            conn.execute(
                "UPDATE executor.runs SET status = %s, concurrency_slot = %s,"
                " concurrency_limit = %s WHERE run_id = 'ok'",
                (status, slot, limit),
            )
        assert refused.value.diag.constraint_name == constraint
        assert refused.value.diag.table_name == "runs"
        conn.rollback()


def test_a_run_without_a_key_may_not_hold_a_slot_beyond_its_limit(db_url: str) -> None:
    """The trigger's WHEN lets every row with a slot through, keyed or not."""
    with psycopg.connect(db_url) as conn:
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute(
                "INSERT INTO executor.runs (run_id, workflow, status, concurrency_slot,"
                " concurrency_limit) VALUES ('x', 'w', 'running', 3, 1)"
            )


def test_an_update_to_an_unknown_run_status_is_refused(pool: Pool) -> None:
    Ledger(pool).apply(CreateRun(run_id="r1", workflow="w", idempotency_key="create:r1"))
    with psycopg.connect(pool.conninfo) as conn:
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute("UPDATE executor.runs SET status = %s WHERE run_id = 'r1'", ("done",))


def test_a_completion_locks_and_readies_its_dependants_a_start_its_step_alone(
    pool: Pool,
) -> None:
    ledger = Ledger(pool)
    fan = tuple(StepSpec(step_key=f"b{i}", depends_on=("a",)) for i in range(5))
    ledger.apply(CreateRun(run_id="r1", workflow="w", idempotency_key="create:r1"))
    ledger.apply(
        StartRun(
            run_id="r1",
            workflow="w",
            steps=(StepSpec(step_key="a"), *fan),
            idempotency_key="start_run:r1",
        )
    )
    with pool.connection() as conn:
        locked = conn.execute(LOCK, ("k-start", False)).fetchone()
    assert locked is not None
    assert [s[0] for s in locked["l"]["steps"]] == ["a"]

    started = ledger.apply(StartStep(run_id="r1", step_key="a", attempt=1, fence="f"))
    assert started.applied
    with pool.connection() as conn:
        locked = conn.execute(LOCK, ("k-done", True)).fetchone()
    assert locked is not None
    assert [s[0] for s in locked["l"]["steps"]] == ["a", "b0", "b1", "b2", "b3", "b4"]

    done = ledger.apply(
        CompleteStep(run_id="r1", step_key="a", attempt=1, output={"x": 1}, fence="f")
    )
    assert done.applied
    assert sorted(e.step_key or "" for e in done.events if e.type == "step_queued") == [
        f"b{i}" for i in range(5)
    ]
    with pool.connection() as conn:
        conn.row_factory = dict_row
        statuses = conn.execute(
            "SELECT step_key, status FROM executor.steps WHERE run_id = 'r1' ORDER BY step_key"
        ).fetchall()
        report = verify(conn, run_id="r1")
    assert [r["status"] for r in statuses] == ["completed"] + ["queued"] * 5
    assert report.ok, report


OUTBOX_READS = """
SELECT coalesce(sum(idx_tup_fetch), 0) AS n FROM pg_stat_xact_user_tables
WHERE schemaname = 'executor' AND relname = 'outbox'
"""


def test_a_command_reads_its_own_outbox_row_not_its_runs(pool: Pool) -> None:
    """A generic plan of `idempotency_key = ANY(...)` bounds only run_id: a start in a run
    of 300 queued steps read all 300 outbox rows (a 10,000-step run ran at half speed)."""
    reads: list[int] = []

    def inside(command: Any, conn: psycopg.Connection[dict[str, Any]]) -> None:
        row = conn.execute(OUTBOX_READS).fetchone()
        assert row is not None
        reads.append(int(row["n"]))

    ledger = Ledger(pool, hooks=LedgerHooks(inside=inside))
    width = 300
    ledger.apply(CreateRun(run_id="r1", workflow="w", idempotency_key="create:r1"))
    started = ledger.apply(
        StartRun(
            run_id="r1",
            workflow="w",
            steps=tuple(StepSpec(step_key=f"s{i:03d}") for i in range(width)),
            idempotency_key="start_run:r1",
        )
    )
    assert len(started.followups) == width  # a start_step row in the outbox for each
    reads.clear()
    for i in range(5):  # generic plans from the sixth execution on, if not forced
        start = StartStep(run_id="r1", step_key=f"s{i:03d}", attempt=1, fence="f")
        assert ledger.apply(start).applied
    # Postgres 15 keeps a backend's counts pending across transactions until it flushes
    # them (at most once a second), so each command's own reads are a difference.
    own = [b - a if b >= a else b for a, b in zip([0, *reads], reads, strict=False)]
    assert max(own) <= 2, own
    with pool.connection() as conn:
        left = conn.execute("SELECT count(*) AS n FROM executor.outbox").fetchone()
    assert left == {"n": width - 5}


def test_the_lock_answers_rows_as_arrays_in_the_order_rows_py_names_them(pool: Pool) -> None:
    """sql/011 and `rows.RUN_FIELDS` / `rows.STEP_FIELDS` must agree field by field."""
    ledger = Ledger(pool)
    ledger.apply(CreateRun(run_id="r1", workflow="w", input={"i": 1}, idempotency_key="c:r1"))
    ledger.apply(
        StartRun(
            run_id="r1",
            workflow="w",
            steps=(StepSpec(step_key="a", max_attempts=4, queue="q1", timeout_seconds=9.5),),
            idempotency_key="s:r1",
        )
    )
    assert ledger.apply(StartStep(run_id="r1", step_key="a", attempt=1, fence="f")).applied
    with pool.connection() as conn:
        locked = conn.execute(LOCK, ("k-fields", False)).fetchone()
        run = conn.execute("SELECT * FROM executor.runs WHERE run_id = 'r1'").fetchone()
        step = conn.execute(
            "SELECT *, ctid::text AS ctid, cardinality(depends_on) AS upstreams"
            " FROM executor.steps WHERE run_id = 'r1' AND step_key = 'a'"
        ).fetchone()
    assert locked is not None
    assert run is not None
    assert step is not None
    as_run = locked_run(locked["l"]["run"])
    assert as_run == {k: run[k] for k in RUN_FIELDS}
    (fields,) = locked["l"]["steps"]
    as_step = locked_step(fields)
    for name in ("lease_expires_at",):  # json carries times as text
        as_step[name] = datetime.fromisoformat(as_step[name])
    assert as_step == {k: step[k] for k in STEP_FIELDS}
