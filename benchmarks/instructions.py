"""The ledger bench's workload through one connection, for counting instructions.

Not a test, and not part of `executor bench`: on a shared 2-core machine the ledger bench's
ratio moves by ±0.1 from one run to the next, too much to tell a 3% change. Instructions
retired do not move: run the Postgres server under `valgrind --tool=callgrind` (each backend
writes its own profile, named by pid) and drive it with this module twice, with two run
counts; the difference between the two backends' totals, divided by the difference in
commands, is the server's instructions per command, the same to a few parts in a thousand
on every try. Run the client under callgrind the same way for its side. See
docs/benchmarks.md ("Instructions per command") for the recipe and the figures.

`python -m benchmarks.instructions <database-url> ledger|naive <runs>` prints the backend
pid. The database must be migrated; the naive side also needs the scratch copies of the
tables in a schema `naive` (`--create-naive` makes them).
"""

from __future__ import annotations

import argparse
import uuid
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from benchmarks.ledger import _LedgerWriter, _NaiveWriter, _Writer
from executor.ledger.handler import Ledger

SCHEMA = "naive"
STEPS_PER_RUN = 10  # as the ledger bench


def create_naive(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(SCHEMA)))
        for table in ("runs", "steps", "events"):
            conn.execute(
                sql.SQL("CREATE TABLE IF NOT EXISTS {}.{} (LIKE executor.{} INCLUDING ALL)").format(
                    sql.Identifier(SCHEMA), sql.Identifier(table), sql.Identifier(table)
                )
            )


def drive(database_url: str, side: str, runs: int) -> int:
    """`runs` runs of the ledger bench's shape on one connection; returns its backend pid."""
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    kwargs: dict[str, Any] = {"autocommit": True, "row_factory": dict_row}
    if side == "ledger":
        pool: ConnectionPool[psycopg.Connection[dict[str, Any]]] = ConnectionPool(
            database_url, min_size=1, max_size=1, kwargs=kwargs, name="instructions"
        )
        try:
            with pool.connection() as conn:
                pid = _pid(conn)
            writer = _LedgerWriter(Ledger(pool), prefix, STEPS_PER_RUN)
            _run(writer, runs)
            if writer.unexpected:
                raise RuntimeError(f"unexpected drops: {writer.unexpected[:3]}")
        finally:
            pool.close()
        return pid
    with psycopg.connect(database_url, **kwargs) as conn:
        pid = _pid(conn)
        _run(_NaiveWriter(conn, SCHEMA, prefix, STEPS_PER_RUN), runs)
    return pid


def _pid(conn: psycopg.Connection[dict[str, Any]]) -> int:
    row = conn.execute("SELECT pg_backend_pid() AS pid").fetchone()
    assert row is not None
    return int(row["pid"])


def _run(writer: _Writer, runs: int) -> None:
    for n in range(runs):
        writer.whole_run(f"{writer.prefix}-{n}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("database_url")
    parser.add_argument("side", choices=("ledger", "naive"))
    parser.add_argument("runs", type=int)
    parser.add_argument("--create-naive", action="store_true")
    args = parser.parse_args(argv)
    if args.create_naive:
        create_naive(args.database_url)
    print(drive(args.database_url, args.side, args.runs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
