"""Stream the ledger run by run out of one snapshot, and the checks that span runs.

Five server-side cursors (runs, steps, events, receipts, drops), each in run_id order on an
index, are merged per run_id, so memory is bounded by the largest run, not the ledger. The
merge compares run_ids only for equality: Python cannot reproduce the database collation's
order, so a sixth cursor (the union of run_ids that have rows in runs, receipts or drops,
a Merge Append over the same indexes) decides the order and every stream is drained while
its head equals the current id. Events and steps cannot name a run without a row (foreign
keys); receipts and drops can (a command for a run that never existed), hence the union.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
from psycopg.rows import dict_row, tuple_row

from executor.ledger.verify.accounts import RunAccounts
from executor.ledger.verify.replay import RunReplay
from executor.ledger.verify.report import Stuck, VerifyReport, Violation
from executor.ledger.verify.rules import COUNTERS
from executor.ledger.verify.state import RUN_HOLDS_KEY, RUN_TERMINAL, Event, Payload, json_text

Conn = psycopg.Connection[Any]

ITERSIZE = 5000
BATCH = 1000  # stuck candidates resolved per query, so they never pile up
# Columns the core adds (CORE-PLAN); compared when the schema has them.
_RUN_EXTRAS = ("concurrency_limit", *COUNTERS)
_STEP_EXTRAS = ("waiting_on",)
_ACTIVE = "(" + ", ".join(f"'{s}'" for s in sorted(RUN_HOLDS_KEY)) + ")"


class _Stream:
    """A named cursor read in run_id order (run_id first in every row), one run at a time.

    Rows come in fetchmany batches and a run's rows are sliced out of them: a generator per
    row costs more than the replay itself at a million events.
    """

    def __init__(self, conn: Conn, name: str, query: str, params: tuple[Any, ...]) -> None:
        self.cursor = conn.cursor(name=f"verify_{name}", row_factory=tuple_row)
        self.cursor.execute(query, params)
        self.names = [c.name for c in self.cursor.description or ()]
        self._buf: list[tuple[Any, ...]] = self.cursor.fetchmany(ITERSIZE)
        self._at = 0

    def ids(self) -> Iterator[Any]:
        while self._buf:
            for row in self._buf:
                yield row[0]
            self._buf = self.cursor.fetchmany(ITERSIZE)

    def take(self, run_id: str | None) -> list[tuple[Any, ...]]:
        out: list[tuple[Any, ...]] = []
        while self._buf:
            buf, start = self._buf, self._at
            end = start
            while end < len(buf) and buf[end][0] == run_id:
                end += 1
            out.extend(buf[start:end])
            if end < len(buf):
                self._at = end
                break
            self._buf, self._at = self.cursor.fetchmany(ITERSIZE), 0
        return out

    def dicts(self, run_id: str | None) -> list[dict[str, Any]]:
        return [dict(zip(self.names, row, strict=True)) for row in self.take(run_id)]

    def close(self) -> None:
        self.cursor.close()


def _columns(conn: Conn) -> set[str]:
    with conn.cursor(row_factory=tuple_row) as cur:
        rows = cur.execute(
            "SELECT table_name || '.' || column_name FROM information_schema.columns "
            "WHERE table_schema = 'executor' AND table_name IN ('runs', 'steps')"
        ).fetchall()
    return {r[0] for r in rows}


class Scan:
    def __init__(self, conn: Conn, report: VerifyReport, only: str | None) -> None:
        self.conn = conn
        self.report = report
        self.only = only
        self.columns = _columns(conn)
        self._queued: list[tuple[str, str | None, int, int]] = []  # run, key, limit, seq
        self._idle: list[
            tuple[str, str | None, int | None, str, str]
        ] = []  # run, step, seq, status, why

    def violation(
        self,
        run_id: str | None,
        invariant: str,
        rule: str,
        message: str,
        step_key: str | None,
        seq: int | None,
    ) -> None:
        self.report.violation(Violation(run_id, step_key, seq, invariant, message, rule))

    _none: tuple[Any, ...] = ()

    def _where(self, column: str = "run_id") -> tuple[str, tuple[Any, ...]]:
        return (f"WHERE {column} = %s", (self.only,)) if self.only is not None else ("", ())

    # --- the per-run pass --------------------------------------------------------------------

    def runs(self) -> None:
        where, p = self._where()
        # The planner would rather hash and sort the union; the merge order is what bounds
        # memory, so sorts are priced out while the cursors are declared (then restored).
        with self.conn.cursor(row_factory=tuple_row) as cur:
            old = cur.execute(
                "SELECT current_setting('enable_sort'), current_setting('enable_hashagg')"
            ).fetchone()
        self.conn.execute(
            "SELECT set_config('enable_sort', 'off', true), "
            "set_config('enable_hashagg', 'off', true)"
        )
        run_cols = ", ".join(
            ["run_id", "status", "last_seq", "output::text AS output", "concurrency_key"]
            + [c for c in _RUN_EXTRAS if f"runs.{c}" in self.columns]
        )
        step_cols = ", ".join(
            ["run_id", "step_key", "status", "attempt", "output::text AS output"]
            + [c for c in _STEP_EXTRAS if f"steps.{c}" in self.columns]
        )
        queries = {
            "ids": (
                f"SELECT run_id FROM (SELECT run_id FROM executor.runs {where} UNION ALL "
                f"SELECT run_id FROM executor.receipts {where} UNION ALL "
                f"SELECT run_id FROM executor.drops {where}) AS ids "
                "GROUP BY run_id ORDER BY run_id"
            ),
            "runs": f"SELECT {run_cols} FROM executor.runs {where} ORDER BY run_id",
            "steps": f"SELECT {step_cols} FROM executor.steps {where} ORDER BY run_id, step_key",
            "events": (
                "SELECT run_id, seq, type, step_key, attempt, idempotency_key, "
                "(payload - 'output')::text, payload ->> 'fence', payload ->> 'manual', "
                f"(payload -> 'output')::text FROM executor.events {where} ORDER BY run_id, seq"
            ),
            "receipts": (
                "SELECT run_id, idempotency_key, step_key, outcome, first_seq, last_seq "
                f"FROM executor.receipts {where} ORDER BY run_id, received_at"
            ),
            "drops": (
                "SELECT run_id, idempotency_key, step_key, reason, command_type "
                f"FROM executor.drops {where} ORDER BY run_id, drop_id"
            ),
        }
        streams: dict[str, _Stream] = {}
        try:
            for name, query in queries.items():
                streams[name] = _Stream(self.conn, name, query, p * 3 if name == "ids" else p)
            self.conn.execute(
                "SELECT set_config('enable_sort', %s, true), "
                "set_config('enable_hashagg', %s, true)",
                old,
            )
            for run_id in streams["ids"].ids():
                self._one_run(run_id, streams)
        finally:
            for stream in streams.values():
                stream.close()
        self._resolve_queued()
        self._resolve_idle()

    def _one_run(self, run_id: str | None, s: dict[str, _Stream]) -> None:
        rows = s["runs"].dicts(run_id)
        row = rows[0] if rows else None
        step_rows = {r["step_key"]: r for r in s["steps"].dicts(run_id)}
        receipts = s["receipts"].dicts(run_id)
        self.report.receipts += len(receipts)
        if row is not None:
            self.report.runs += 1

        def i2(rule: str, message: str, step: str | None, seq: int | None) -> None:
            self.violation(run_id, "I2", rule, message, step, seq)

        accounts = RunAccounts(run_id, receipts, self.conn, i2)
        replay: RunReplay | None = None
        if run_id is not None:
            replay = RunReplay(
                run_id,
                lambda inv, rule, msg, step, seq: self.violation(run_id, inv, rule, msg, step, seq),
            )
        events = s["events"].take(run_id)
        for r in events:
            ev = Event(
                r[1], r[2], r[3], r[4], r[5], Payload(r[6]), r[7], r[8] == "true", json_text(r[9])
            )
            accounts.event(ev)
            if replay is not None:
                replay.feed(ev)
        self.report.events += len(events)
        self.report.drops += accounts.finish(s["drops"].dicts(run_id))
        if replay is None or (row is None and not events):
            return  # receipts or drops of a run that never existed: accounted for above
        if not events:
            self.violation(run_id, "I4", "no_events", "run row has no events", None, None)
            return
        replay.finish(row, step_rows)
        if replay.broken or row is None:
            return
        status = replay.state.status
        if status == "queued":
            limit = int(row.get("concurrency_limit") or 1)
            self._queued.append((str(run_id), row.get("concurrency_key"), limit, replay.last_seq))
            if len(self._queued) >= BATCH:
                self._resolve_queued()
        elif status == "running":
            why = replay.stuck_reason()
            if why is not None:
                self._idle.append((str(run_id), why[0], replay.last_seq, status, why[1]))
                if len(self._idle) >= BATCH:
                    self._resolve_idle()

    # --- stuck runs --------------------------------------------------------------------------

    def _resolve_queued(self) -> None:
        """A queued run is stuck when its key has a free slot: admission should have taken it."""
        batch, self._queued = self._queued, []
        keys = sorted({k for _, k, _, _ in batch if k is not None})
        holders: dict[str, int] = {}
        if keys:
            with self.conn.cursor(row_factory=tuple_row) as cur:
                for key, n in cur.execute(
                    "SELECT concurrency_key, count(*) FROM executor.runs "
                    f"WHERE status IN {_ACTIVE} AND concurrency_key = ANY(%s) GROUP BY 1",
                    (keys,),
                ):
                    holders[key] = n
        for run_id, key, limit, seq in batch:
            held = holders.get(key, 0) if key is not None else 0
            if held < limit:
                self.report.stuck_run(
                    Stuck(
                        run_id,
                        None,
                        seq,
                        "queued",
                        f"queued for key {key!r}, which {held} of {limit} slots hold",
                        "stuck_queued",
                    )
                )

    def _resolve_idle(self) -> None:
        """A run that cannot move on its own is stuck unless the outbox still has its command."""
        batch, self._idle = self._idle, []
        if not batch:
            return
        with self.conn.cursor(row_factory=tuple_row) as cur:
            pending = {
                r[0]
                for r in cur.execute(
                    "SELECT DISTINCT run_id FROM executor.outbox WHERE run_id = ANY(%s)",
                    ([b[0] for b in batch],),
                )
            }
        for run_id, step, seq, status, why in batch:
            if run_id not in pending:
                self.report.stuck_run(Stuck(run_id, step, seq, status, why))

    # --- checks across runs ------------------------------------------------------------------

    def _named(self, name: str, query: str, params: tuple[Any, ...]) -> Iterator[dict[str, Any]]:
        with self.conn.cursor(name=f"verify_{name}", row_factory=dict_row) as cur:
            cur.itersize = ITERSIZE
            cur.execute(query, params)
            yield from cur

    def concurrency(self) -> None:
        """I5 over the current rows: at most `limit` holders per key, each in its own slot."""
        has_limit = "runs.concurrency_limit" in self.columns
        limit = "coalesce(max(concurrency_limit), 1)" if has_limit else "1"
        scope, p = "", self._none
        if self.only is not None:
            scope = (
                "AND concurrency_key = "
                "(SELECT concurrency_key FROM executor.runs WHERE run_id = %s)"
            )
            p = (self.only,)
        for g in self._named(
            "i5",
            f"SELECT concurrency_key AS key, count(*) AS n, {limit} AS lim, "
            "array_agg(run_id ORDER BY created_at, run_id) AS holders FROM executor.runs "
            f"WHERE concurrency_key IS NOT NULL AND status IN {_ACTIVE} {scope} "
            f"GROUP BY concurrency_key HAVING count(*) > {limit}",
            p,
        ):
            shown = ", ".join(g["holders"][:5]) + (", ..." if g["n"] > 5 else "")
            self.violation(
                g["holders"][g["lim"]] if len(g["holders"]) > g["lim"] else g["holders"][-1],
                "I5",
                "concurrency_limit",
                f"{g['n']} active runs hold key {g['key']!r} (limit {g['lim']}): {shown}",
                None,
                None,
            )
        if "runs.concurrency_slot" not in self.columns:
            return
        lim = "coalesce(concurrency_limit, 1)" if has_limit else "1"
        for r in self._named(
            "slots",
            "SELECT run_id, concurrency_key AS key, concurrency_slot AS slot, "
            f"{lim} AS lim, count(*) OVER (PARTITION BY concurrency_key, concurrency_slot) AS n "
            f"FROM executor.runs WHERE concurrency_key IS NOT NULL AND status IN {_ACTIVE} "
            f"AND concurrency_slot IS NOT NULL {scope}",
            p,
        ):
            if not 0 <= r["slot"] < r["lim"] or r["n"] > 1:
                self.violation(
                    r["run_id"],
                    "I5",
                    "concurrency_slot",
                    f"holds slot {r['slot']} of key {r['key']!r} (limit {r['lim']}, "
                    f"{r['n']} holders of that slot)",
                    None,
                    None,
                )

    def children(self) -> None:
        """Parent steps and child runs agree (DESIGN: a child's end ends its parent step)."""
        if "steps.child_run_id" in self.columns:
            scope, p = "", self._none
            if self.only is not None:
                scope, p = "AND (s.run_id = %s OR s.child_run_id = %s)", (self.only, self.only)
            for r in self._named(
                "children",
                "SELECT s.run_id, s.step_key, s.status, s.output, s.child_run_id, "
                "c.status AS child_status, c.output AS child_output "
                "FROM executor.steps AS s LEFT JOIN executor.runs AS c "
                f"ON c.run_id = s.child_run_id WHERE s.child_run_id IS NOT NULL {scope}",
                p,
            ):
                self._child_link(r)
        if "runs.parent_run_id" in self.columns:
            scope, p = "", self._none
            if self.only is not None:
                scope, p = "AND (c.run_id = %s OR c.parent_run_id = %s)", (self.only, self.only)
            for r in self._named(
                "parents",
                "SELECT c.run_id, c.status, c.parent_run_id, c.parent_step_key, "
                "s.status AS step_status, pr.status AS parent_status FROM executor.runs AS c "
                "LEFT JOIN executor.steps AS s "
                "ON s.run_id = c.parent_run_id AND s.step_key = c.parent_step_key "
                "LEFT JOIN executor.runs AS pr ON pr.run_id = c.parent_run_id "
                f"WHERE c.parent_run_id IS NOT NULL {scope}",
                p,
            ):
                if r["step_status"] is None:
                    self.violation(
                        r["run_id"],
                        "run",
                        "child_link",
                        f"child of step {r['parent_step_key']} of run {r['parent_run_id']}, "
                        "which does not exist",
                        None,
                        None,
                    )
                elif r["parent_status"] == "cancelled" and r["status"] not in RUN_TERMINAL:
                    self._idle.append(
                        (r["run_id"], None, None, r["status"], "its parent run was cancelled")
                    )
        self._resolve_idle()

    def _child_link(self, r: dict[str, Any]) -> None:
        child, status = r["child_run_id"], r["child_status"]
        if status is None:
            self.violation(
                r["run_id"],
                "run",
                "child_link",
                f"waits on child run {child}, which does not exist",
                r["step_key"],
                None,
            )
        elif r["status"] == "completed" and (
            status != "completed" or r["output"] != r["child_output"]
        ):
            self.violation(
                r["run_id"],
                "run",
                "child_link",
                f"completed, but its child run {child} is {status}"
                + (" with another output" if status == "completed" else ""),
                r["step_key"],
                None,
            )
        elif r["status"] == "waiting" and status in RUN_TERMINAL:
            self._idle.append(
                (
                    r["run_id"],
                    r["step_key"],
                    None,
                    "running",
                    f"waits on child run {child}, which is {status}",
                )
            )
