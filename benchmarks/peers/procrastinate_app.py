"""The Procrastinate peer: four tasks, the fan-out by deferral, the join by a locked row.

BENCH_PROCRASTINATE_URL=postgresql://... python -m benchmarks.peers.procrastinate_app
"""

from __future__ import annotations

import os

import procrastinate

QUEUE = "bench"
JOIN_TABLE = """
CREATE TABLE IF NOT EXISTS bench_join (run_id text PRIMARY KEY, remaining int NOT NULL)
"""

# The connector is replaced by the round's own (a fresh database each round).
app = procrastinate.App(connector=procrastinate.PsycopgConnector())


@app.task(name="first", queue=QUEUE)
async def first(run_id: str) -> None:
    await app.connector.execute_query_async(
        "INSERT INTO bench_join (run_id, remaining) VALUES (%(run_id)s, 2)", run_id=run_id
    )
    await left.defer_async(run_id=run_id)
    await right.defer_async(run_id=run_id)


async def _arrive(run_id: str) -> None:
    """The join: the UPDATE locks the run's row, so exactly one arrival sees zero."""
    row = await app.connector.execute_query_one_async(
        "UPDATE bench_join SET remaining = remaining - 1 WHERE run_id = %(run_id)s "
        "RETURNING remaining",
        run_id=run_id,
    )
    if row["remaining"] == 0:
        await last.defer_async(run_id=run_id)


@app.task(name="left", queue=QUEUE)
async def left(run_id: str) -> None:
    await _arrive(run_id)


@app.task(name="right", queue=QUEUE)
async def right(run_id: str) -> None:
    await _arrive(run_id)


@app.task(name="last", queue=QUEUE)
async def last(run_id: str) -> None:
    return None


def main() -> None:
    connector = procrastinate.PsycopgConnector(conninfo=os.environ["BENCH_PROCRASTINATE_URL"])
    with app.replace_connector(connector):
        app.run_worker(queues=[QUEUE], concurrency=1, delete_jobs="never")


if __name__ == "__main__":
    main()
