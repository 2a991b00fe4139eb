"""No command reads a whole table, however young the ledger (issue 8).

The handler's statements run on generic plans, made once a connection from the statistics
of that moment. On a ledger whose tables are a few pages and not yet analyzed, Postgres
found the steps a completion changes by reading the steps table whole (their ctids as a
filter), and kept that plan while the table grew: the cost of every command grew with the
size of the ledger. Counted here per command in its own transaction
(pg_stat_xact_user_tables), on freshly emptied tables, over a whole run.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from executor.commands.models import Command, CompleteStep, CreateRun, StartRun, StartStep, StepSpec
from executor.ledger.handler import Ledger, LedgerHooks
from executor.storage.db import configure_connection

SCANS = """
SELECT relname, seq_scan FROM pg_stat_xact_user_tables
WHERE schemaname = 'executor' AND seq_scan > 0 ORDER BY relname
"""


def test_no_command_of_a_run_scans_a_table_on_a_young_ledger(db_url: str) -> None:
    scans: dict[str, list[dict[str, Any]]] = {}
    current: list[str] = []

    def inside(command: Command, conn: psycopg.Connection[dict[str, Any]]) -> None:
        scans.setdefault(current[0], []).extend(conn.execute(SCANS).fetchall())

    pool: ConnectionPool[Any] = ConnectionPool(
        db_url,
        configure=configure_connection,
        kwargs={"row_factory": dict_row, "autocommit": True},
        min_size=1,
        max_size=1,  # one connection: its plans are made on the first commands, tables empty
        open=True,
    )
    try:
        with pool.connection() as conn:
            conn.execute("ANALYZE executor.steps")  # statistics of an empty table
        ledger = Ledger(pool, hooks=LedgerHooks(inside=inside))

        def apply(name: str, command: Command) -> None:
            with pool.connection() as conn:
                # Counters of earlier transactions not yet flushed would show in the view.
                conn.execute("SELECT pg_stat_force_next_flush()")
            current[:] = [name]
            assert ledger.apply(command).applied, name

        parallel = [f"p{i}" for i in range(3)]
        specs = (
            StepSpec(step_key="root"),
            *(StepSpec(step_key=k, depends_on=("root",)) for k in parallel),
            StepSpec(step_key="join", depends_on=tuple(parallel)),
        )
        for n in range(3):  # later runs meet the plans the first one made
            run = f"young-{n}"
            apply("create_run", CreateRun(run_id=run, workflow="wf", idempotency_key=run))
            apply("start_run", StartRun(run_id=run, workflow="wf", steps=specs))
            for key in ("root", *parallel, "join"):
                apply(f"start {key}", StartStep(run_id=run, step_key=key, attempt=1, fence="f"))
                apply(
                    f"complete {key}",
                    CompleteStep(run_id=run, step_key=key, attempt=1, fence="f"),
                )
    finally:
        pool.close()
    assert len(scans) == 12
    assert {name: rows for name, rows in scans.items() if rows} == {}
