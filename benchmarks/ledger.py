"""Ledger throughput: `Ledger.apply` next to the naive two-statement write it replaces.

Not a test. Both sides run in one process against the same server with the same number of
threads, each thread with its own connection, in alternating rounds (ledger first on even
rounds, naive first on odd ones) so that a noisy machine hurts both alike; the report gives
the median of the rounds and their ratio. The target (issue 8) is a ratio of at least 0.6:
correctness (row locks, receipts, outbox, gapless sequence) may cost at most 40% of the
throughput of the code that corrupts its log under concurrency.

The workload is what workers mostly send: each thread launches runs of `steps_per_run`
independent steps (create_run, start_run) and then starts and completes every step, so the
mix is ~90% start_step/complete_step spread over many runs (different rows).

* Ledger side: every command through `Ledger.apply` on the real `executor` tables, under
  run ids `bench-<tag>-...`, deleted afterwards.
* Naive side: the same commands as a conditional `UPDATE` (refusing terminal steps) and a
  separate event `INSERT` at `max(seq) + 1`, in autocommit with nothing spanning them, on
  scratch copies of the tables in a schema `executor_bench_<tag>`, dropped afterwards.

Round trips per command are measured, not assumed: a few more commands of each kind go
through the counting proxy of `benchmarks.wire`.

Run it against a database with no relay or workers attached (their jobs would race the
bench's own commands): `python -m benchmarks.ledger <database-url>` or
`executor bench --what ledger` (which gives it a scratch database of its own).
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool

from benchmarks.wire import PostgresCounter
from executor.commands.models import (
    Command,
    CompleteStep,
    CreateRun,
    StartRun,
    StartStep,
    StepSpec,
)
from executor.errors import ConfigurationError
from executor.ledger.handler import Ledger

Conn = psycopg.Connection[dict[str, Any]]

TARGET_RATIO = 0.6
WORKFLOW = "bench"
TERMINAL = "('completed', 'failed', 'cancelled')"


# --- the two writers ------------------------------------------------------------------------


class _Writer:
    """Drives one thread's stream of commands: launch a run, start and complete its steps."""

    def __init__(self, prefix: str, steps_per_run: int) -> None:
        self.prefix = prefix
        self.step_keys = [f"s{i:03d}" for i in range(steps_per_run)]
        self.ids = itertools.count()
        self.run_id = ""
        self.todo: list[str] = []

    def run(self, stop_at: float) -> int:
        done = 0
        while time.monotonic() < stop_at:
            if not self.todo:
                self.run_id = f"{self.prefix}-{next(self.ids)}"
                self.create()
                self.start_run()
                self.todo = list(reversed(self.step_keys))
                done += 2
                continue
            key = self.todo.pop()
            self.start_step(key)
            self.complete_step(key, last=not self.todo)
            done += 2
        return done

    def whole_run(self, run_id: str) -> None:
        """One run from start to end, every command in order (for counting, not timing)."""
        self.run_id = run_id
        self.create()
        self.start_run()
        for key in self.step_keys:
            self.start_step(key)
            self.complete_step(key, last=key == self.step_keys[-1])

    def create(self) -> None:
        raise NotImplementedError

    def start_run(self) -> None:
        raise NotImplementedError

    def start_step(self, key: str) -> None:
        raise NotImplementedError

    def complete_step(self, key: str, *, last: bool) -> None:
        raise NotImplementedError


class _LedgerWriter(_Writer):
    def __init__(self, ledger: Ledger, prefix: str, steps_per_run: int) -> None:
        super().__init__(prefix, steps_per_run)
        self.ledger = ledger
        self.specs = tuple(StepSpec(step_key=k, max_attempts=3) for k in self.step_keys)
        self.unexpected: list[str] = []

    def _apply(self, command: Command) -> None:
        outcome = self.ledger.apply(command)
        if not outcome.applied:
            self.unexpected.append(outcome.summary())

    def create(self) -> None:
        run = self.run_id
        self._apply(CreateRun(run_id=run, workflow=WORKFLOW, idempotency_key=f"create:{run}"))

    def start_run(self) -> None:
        self._apply(
            StartRun(
                run_id=self.run_id,
                workflow=WORKFLOW,
                steps=self.specs,
                idempotency_key=f"start_run:{self.run_id}",
            )
        )

    def start_step(self, key: str) -> None:
        self._apply(
            StartStep(
                run_id=self.run_id,
                step_key=key,
                attempt=1,
                fence="bench",
                idempotency_key=f"start_step:{self.run_id}:{key}:1",
            )
        )

    def complete_step(self, key: str, *, last: bool) -> None:
        self._apply(
            CompleteStep(
                run_id=self.run_id,
                step_key=key,
                attempt=1,
                output={"ok": True},
                fence="bench",
                idempotency_key=f"complete_step:{self.run_id}:{key}:1",
            )
        )


class _NaiveWriter(_Writer):
    """The published bug's write path: conditional UPDATE, then a separate event INSERT."""

    def __init__(self, conn: Conn, schema: str, prefix: str, steps_per_run: int) -> None:
        super().__init__(prefix, steps_per_run)
        self.conn = conn
        s = sql.Identifier(schema)
        self.insert_run = sql.SQL(
            "INSERT INTO {}.runs (run_id, workflow, status) VALUES (%s, %s, 'pending')"
        ).format(s)
        self.start_run_sql = sql.SQL(
            "UPDATE {}.runs SET status = 'running', updated_at = now() "
            "WHERE run_id = %s AND status = 'pending'"
        ).format(s)
        self.insert_steps = sql.SQL(
            "INSERT INTO {}.steps (run_id, step_key, status, attempt, max_attempts) "
            "SELECT %s, k, 'queued', 1, 3 FROM unnest(%s::text[]) AS k"
        ).format(s)
        self.set_step = sql.SQL(
            "UPDATE {}.steps SET status = %s, output = %s, lease_expires_at = %s, "
            "updated_at = now() "
            "WHERE run_id = %s AND step_key = %s AND status NOT IN " + TERMINAL
        ).format(s)
        self.finish_run = sql.SQL(
            "UPDATE {}.runs SET status = 'completed', updated_at = now() "
            "WHERE run_id = %s AND status NOT IN " + TERMINAL
        ).format(s)
        self.append = sql.SQL(
            "INSERT INTO {0}.events (run_id, seq, type, step_key, attempt, idempotency_key) "
            "SELECT %s, m.base + u.i, u.type, u.step_key, u.attempt, %s "
            "FROM (SELECT COALESCE(max(seq), 0) AS base FROM {0}.events WHERE run_id = %s) AS m, "
            "unnest(%s::text[], %s::text[], %s::int[]) WITH ORDINALITY AS u(type, step_key, "
            "attempt, i)"
        ).format(s)

    def _events(self, key: str, *events: tuple[str, str | None, int | None]) -> None:
        self.conn.execute(
            self.append,
            (
                self.run_id,
                key,
                self.run_id,
                [e[0] for e in events],
                [e[1] for e in events],
                [e[2] for e in events],
            ),
        )

    def create(self) -> None:
        self.conn.execute(self.insert_run, (self.run_id, WORKFLOW))
        self._events(f"create:{self.run_id}", ("run_created", None, None))

    def start_run(self) -> None:
        self.conn.execute(self.start_run_sql, (self.run_id,))
        self.conn.execute(self.insert_steps, (self.run_id, self.step_keys))
        self._events(
            f"start_run:{self.run_id}",
            ("run_started", None, None),
            *[("step_created", k, 0) for k in self.step_keys],
            *[("step_queued", k, 1) for k in self.step_keys],
        )

    def start_step(self, key: str) -> None:
        lease = datetime.now(UTC) + timedelta(seconds=30)
        cur = self.conn.execute(self.set_step, ("running", None, lease, self.run_id, key))
        if cur.rowcount:
            self._events(f"start_step:{self.run_id}:{key}:1", ("step_started", key, 1))

    def complete_step(self, key: str, *, last: bool) -> None:
        cur = self.conn.execute(
            self.set_step, ("completed", Jsonb({"ok": True}), None, self.run_id, key)
        )
        if not cur.rowcount:
            return
        if last:
            self.conn.execute(self.finish_run, (self.run_id,))
            self._events(
                f"complete_step:{self.run_id}:{key}:1",
                ("step_completed", key, 1),
                ("run_completed", None, None),
            )
        else:
            self._events(f"complete_step:{self.run_id}:{key}:1", ("step_completed", key, 1))


# --- rounds ----------------------------------------------------------------------------------


def _timed(writers: list[_Writer], seconds: float) -> float:
    """Run every writer in its own thread for `seconds`; commands per second, all together."""
    counts = [0] * len(writers)
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(writers) + 1)
    stop_at = [0.0]

    def body(i: int) -> None:
        barrier.wait()
        try:
            counts[i] = writers[i].run(stop_at[0])
        except BaseException as exc:  # reported by the caller
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(i,), daemon=True) for i in range(len(writers))]
    for t in threads:
        t.start()
    stop_at[0] = time.monotonic() + seconds
    started = time.monotonic()
    barrier.wait()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started
    if errors:
        raise errors[0]
    return sum(counts) / elapsed


def _check_schema(conn: Conn) -> None:
    row = conn.execute("SELECT to_regclass('executor.events') AS t").fetchone()
    if row is None or row["t"] is None:
        raise ConfigurationError("the executor schema is missing: run `executor migrate` first")


def _scratch_schema(conn: Conn, schema: str) -> None:
    s = sql.Identifier(schema)
    conn.execute(sql.SQL("CREATE SCHEMA {}").format(s))
    for table in ("runs", "steps", "events"):
        conn.execute(
            sql.SQL("CREATE TABLE {}.{} (LIKE executor.{} INCLUDING ALL)").format(
                s, sql.Identifier(table), sql.Identifier(table)
            )
        )


def _cleanup(conn: Conn, schema: str, prefix: str) -> None:
    like = f"{prefix}-%"
    conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
    for table in ("outbox", "drops", "receipts", "events", "steps", "runs"):
        conn.execute(
            sql.SQL("DELETE FROM executor.{} WHERE run_id LIKE %s").format(sql.Identifier(table)),
            (like,),
        )


def run_bench(
    database_url: str,
    *,
    connections: int = 4,
    seconds: float = 5.0,
    rounds: int = 10,
    steps_per_run: int = 10,
    measure_round_trips: bool = True,
    cleanup: bool = True,
    verbose: bool = True,
) -> dict[str, Any]:
    """Commands/s through `Ledger.apply` and through the naive write, side by side.

    Each side runs `rounds` slices of `seconds / rounds` with `connections` threads; the
    report holds the per-round rates, their medians, the ratio ledger/naive and the measured
    round trips per command. Prints a table unless `verbose` is false.
    """
    if connections < 1 or rounds < 1 or seconds <= 0 or steps_per_run < 1:
        raise ValueError("connections, rounds, seconds and steps_per_run must be positive")
    tag = uuid.uuid4().hex[:8]
    prefix = f"bench-{tag}"
    schema = f"executor_bench_{tag}"
    slice_s = seconds / rounds

    admin: Conn = psycopg.connect(database_url, autocommit=True, row_factory=dict_row)
    pool: ConnectionPool[Conn] = ConnectionPool(
        database_url,
        min_size=connections,
        max_size=connections,
        kwargs={"autocommit": True, "row_factory": dict_row},
        open=False,
        name="ledger-bench",
    )
    naive_conns: list[Conn] = []
    prepared = False
    try:
        _check_schema(admin)
        prepared = True
        _scratch_schema(admin, schema)
        pool.open(wait=True, timeout=30)
        naive_conns = [
            psycopg.connect(database_url, autocommit=True, row_factory=dict_row)
            for _ in range(connections)
        ]
        ledger = Ledger(pool)
        ledger_writers = [
            _LedgerWriter(ledger, f"{prefix}-L{i}", steps_per_run) for i in range(connections)
        ]
        naive_writers = [
            _NaiveWriter(c, schema, f"{prefix}-N{i}", steps_per_run)
            for i, c in enumerate(naive_conns)
        ]
        sides: dict[str, Callable[[float], float]] = {
            "ledger": lambda s: _timed(list(ledger_writers), s),
            "naive": lambda s: _timed(list(naive_writers), s),
        }
        for side in sides.values():  # warm up: connections, plans, prepared statements
            side(min(0.5, slice_s))
        per_round: dict[str, list[float]] = {"ledger": [], "naive": []}
        for rnd in range(rounds):
            order = ("ledger", "naive") if rnd % 2 == 0 else ("naive", "ledger")
            for name in order:
                per_round[name].append(sides[name](slice_s))

        round_trips: dict[str, Any] = {"measured": False}
        if measure_round_trips:
            try:
                round_trips = measure_round_trips_per_command(database_url, schema, prefix)
            except (OSError, psycopg.Error, ValueError) as exc:
                round_trips = {"measured": False, "error": f"{type(exc).__name__}: {exc}"}

        ledger_median = statistics.median(per_round["ledger"])
        naive_median = statistics.median(per_round["naive"])
        unexpected = [u for w in ledger_writers for u in w.unexpected]
        result: dict[str, Any] = {
            "connections": connections,
            "seconds": seconds,
            "rounds": rounds,
            "steps_per_run": steps_per_run,
            "ledger": {
                "commands_per_s": ledger_median,
                "per_round": per_round["ledger"],
                "retries": ledger.retries,
                "unexpected_drops": len(unexpected),
            },
            "naive": {
                "commands_per_s": naive_median,
                "per_round": per_round["naive"],
            },
            "ratio": ledger_median / naive_median if naive_median else None,
            # Each ledger round next to the naive round run right before or after it.
            "paired_ratio_median": statistics.median(
                led / nai if nai else 0.0
                for led, nai in zip(per_round["ledger"], per_round["naive"], strict=True)
            ),
            "target_ratio": TARGET_RATIO,
            "round_trips": round_trips,
            # Load on this machine while the bench ran: high values mean noisy numbers.
            "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        }
        result["meets_target"] = result["ratio"] is not None and result["ratio"] >= TARGET_RATIO
        if unexpected:
            result["ledger"]["first_unexpected_drop"] = unexpected[0]
        if verbose:
            print(format_report(result))
        return result
    finally:
        for c in naive_conns:
            c.close()
        pool.close()
        try:
            if cleanup and prepared:
                _cleanup(admin, schema, prefix)
        finally:
            admin.close()


def run_scratch(ctx: Any) -> dict[str, Any]:
    """`executor bench --what ledger`: the bench on a scratch database of its own."""
    from executor.storage.migrate import migrate

    url = ctx.scratch.create("ledger")
    try:
        migrate(url)
        return run_bench(url, seconds=ctx.seconds, verbose=False)
    finally:
        ctx.scratch.drop(url)


def format_report(result: dict[str, Any]) -> str:
    led, nai = result["ledger"], result["naive"]
    rounds = " ".join(f"{x:7.0f}" for x in led["per_round"])
    naive_rounds = " ".join(f"{x:7.0f}" for x in nai["per_round"])
    ratio = result["ratio"]
    verdict = "meets" if result["meets_target"] else "MISSES"
    lines = [
        f"ledger bench: {result['connections']} connections, {result['rounds']} alternating "
        f"rounds of {result['seconds'] / result['rounds']:.1f}s, runs of "
        f"{result['steps_per_run']} steps (medians, commands/s)",
        f"  {'':24} {'median':>8}   per round",
        f"  {'Ledger.apply':24} {led['commands_per_s']:8.0f}   {rounds}",
        f"  {'naive UPDATE + INSERT':24} {nai['commands_per_s']:8.0f}   {naive_rounds}",
        f"  {'ratio ledger / naive':24} {ratio:8.2f}x  ({verdict} the {TARGET_RATIO}x target; "
        f"median of paired rounds {result['paired_ratio_median']:.2f}x)"
        if ratio is not None
        else "  ratio: n/a",
        f"  ledger retries (serialization/deadlock/unique): {led['retries']}"
        f", unexpected drops: {led['unexpected_drops']}",
    ]
    if result.get("load_average_1m") is not None:
        lines.append(
            f"  load average (1 min) at the end: {result['load_average_1m']:.2f} "
            f"on {os.cpu_count()} CPUs"
        )
    rt = result["round_trips"]
    if rt.get("measured"):
        by = ", ".join(f"{k} {v}" for k, v in rt["ledger_by_command"].items())
        lines.append(
            f"  round trips per command, counted on the wire: ledger "
            f"{rt['ledger_per_command']:.2f} ({by}); naive {rt['naive_per_command']:.2f}"
        )
    else:
        lines.append(
            "  round trips per command: not measured"
            + (f" ({rt['error']})" if "error" in rt else "")
            + "; by design the ledger needs 2 (lock + read, then write + commit)"
        )
    return "\n".join(lines)


# --- round trips -------------------------------------------------------------------------------


def measure_round_trips_per_command(
    database_url: str, schema: str, prefix: str, *, steps: int = 3
) -> dict[str, Any]:
    """Round trips of each command kind, counted on the wire through a local proxy."""
    by_command: dict[str, list[int]] = {}
    naive_counts: list[int] = []
    proxy = PostgresCounter(database_url)
    url = proxy.url
    try:
        pool: ConnectionPool[Conn] = ConnectionPool(
            url,
            min_size=1,
            max_size=1,
            kwargs={"autocommit": True, "row_factory": dict_row},
            open=False,
            name="ledger-bench-rtt",
        )
        pool.open(wait=True, timeout=30)
        try:
            ledger = Ledger(pool)
            writer = _LedgerWriter(ledger, f"{prefix}-rtt", steps)
            original = ledger.apply

            def counted_apply(command: Command) -> Any:
                before = proxy.snapshot().round_trips
                outcome = original(command)
                kind = command.type if outcome.applied else f"{command.type} (dropped)"
                by_command.setdefault(kind, []).append(proxy.snapshot().round_trips - before)
                return outcome

            ledger.apply = counted_apply  # type: ignore[method-assign]
            writer.whole_run(f"{prefix}-rtt")
            writer.start_step(writer.step_keys[0])  # a duplicate delivery: dropped, recorded
        finally:
            pool.close()

        with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
            naive = _NaiveWriter(conn, schema, f"{prefix}-rtt-naive", steps)
            naive.run_id = f"{prefix}-rtt-naive"

            def counted(action: Callable[[], None]) -> None:
                before = proxy.snapshot().round_trips
                action()
                naive_counts.append(proxy.snapshot().round_trips - before)

            counted(naive.create)
            naive.start_run()
            counted(lambda: naive.start_step(naive.step_keys[0]))
            counted(lambda: naive.complete_step(naive.step_keys[0], last=False))
    finally:
        proxy.close()

    medians = {k: statistics.median(v) for k, v in sorted(by_command.items())}
    applied = [x for k, v in by_command.items() if "dropped" not in k for x in v]
    return {
        "measured": True,
        "method": "Sync/Flush/Query messages counted on the wire by a local proxy",
        "ledger_per_command": statistics.mean(applied),
        "ledger_by_command": {k: int(v) if v == int(v) else v for k, v in medians.items()},
        "naive_per_command": statistics.mean(naive_counts),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("database_url")
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps-per-run", type=int, default=10)
    args = parser.parse_args(argv)
    run_bench(
        args.database_url,
        connections=args.connections,
        seconds=args.seconds,
        rounds=args.rounds,
        steps_per_run=args.steps_per_run,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
