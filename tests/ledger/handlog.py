"""Hand-built ledgers for verify's tests: plain INSERTs, no handler, no state machine.

A `Log` is one run's events grouped by the command (idempotency key) that produced them;
each `apply` is one applied receipt. The rows it writes are what the events say, by a plain
"last event wins" reading, so a test that breaks one rule breaks only that one.

`widen` opens the schema to CORE-PLAN's vocabulary (new statuses, events, transient drop
reasons, the new columns) inside the caller's transaction, which the test rolls back; once
the core's migration has them, it changes nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row, tuple_row
from psycopg.types.json import Jsonb

from executor.ledger.verify import VerifyReport, verify

Conn = psycopg.Connection[dict[str, Any]]

Ev = tuple[str, str | None, int | None, dict[str, Any]]

RUN_TO = {
    "run_created": "pending",
    "run_queued": "queued",
    "run_admitted": "pending",
    "run_started": "running",
    "run_paused": "paused",
    "run_resumed": "running",
    "run_completed": "completed",
    "run_failed": "failed",
    "run_cancelled": "cancelled",
}
STEP_TO = {
    "step_created": "pending",
    "step_queued": "queued",
    "step_started": "running",
    "step_completed": "completed",
    "step_failed": "failed",
    "step_retrying": "retrying",
    "step_cancelled": "cancelled",
    "step_sleeping": "sleeping",
    "step_waiting": "waiting",
}

_WIDEN = """
DO $$
DECLARE r record;
BEGIN
    FOR r IN SELECT conrelid::regclass AS t, conname FROM pg_constraint
             WHERE connamespace = 'executor'::regnamespace AND contype IN ('c', 'u', 'x')
               AND conrelid <> 0
    LOOP
        EXECUTE format('ALTER TABLE %s DROP CONSTRAINT %I', r.t, r.conname);
    END LOOP;
    FOR r IN SELECT contypid::regtype AS d, conname FROM pg_constraint
             WHERE connamespace = 'executor'::regnamespace AND contypid <> 0
    LOOP
        EXECUTE format('ALTER DOMAIN %s DROP CONSTRAINT %I', r.d, r.conname);
    END LOOP;
    FOR r IN SELECT i.indexrelid::regclass AS idx FROM pg_index AS i
             JOIN pg_class AS c ON c.oid = i.indrelid
             WHERE c.relnamespace = 'executor'::regnamespace AND i.indisunique
               AND NOT i.indisprimary
    LOOP
        EXECUTE format('DROP INDEX %s', r.idx);
    END LOOP;
    DROP TRIGGER IF EXISTS runs_slot_rules ON executor.runs;
END $$;
ALTER TABLE executor.runs
    ADD COLUMN IF NOT EXISTS concurrency_limit integer NOT NULL DEFAULT 1,
    ADD COLUMN IF NOT EXISTS concurrency_slot integer,
    ADD COLUMN IF NOT EXISTS parent_run_id text,
    ADD COLUMN IF NOT EXISTS parent_step_key text,
    ADD COLUMN IF NOT EXISTS steps_total integer NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS steps_completed integer NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS steps_active integer NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS steps_failed integer NOT NULL DEFAULT 0;
ALTER TABLE executor.steps
    ADD COLUMN IF NOT EXISTS waiting_on integer NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS child_run_id text;
"""


def widen(conn: psycopg.Connection[Any]) -> None:
    conn.execute(_WIDEN)


@pytest.fixture
def ledger(db_url: str) -> Iterator[Conn]:
    """A connection in a transaction on the widened schema, rolled back after the test."""
    with psycopg.connect(db_url, row_factory=dict_row) as conn:
        widen(conn)
        yield conn
        conn.rollback()


def check(conn: Conn, *logs: Log, run_id: str | None = None) -> VerifyReport:
    for log in logs:
        log.write(conn)
    return verify(conn, run_id=run_id)


def found(report: VerifyReport) -> list[tuple[str, str | None, str | None, int | None]]:
    return [(v.rule, v.run_id, v.step_key, v.seq) for v in report.violations]


def stuck(report: VerifyReport) -> list[tuple[str, str, str | None]]:
    return [(s.rule, s.run_id, s.step_key) for s in report.stuck]


def assert_clean(report: VerifyReport) -> None:
    assert report.ok, [str(v) for v in report.violations]
    assert not report.stuck, [str(s) for s in report.stuck]
    assert report.exit_code == 0


def E(type_: str, step: str | None = None, attempt: int | None = None, **payload: Any) -> Ev:
    return (type_, step, attempt, payload)


def out(step: str) -> dict[str, Any]:
    """The output every hand-built step returns."""
    return {"step": step}


def fence(step: str, attempt: int) -> str:
    return f"job-{step}-{attempt}"


@dataclass
class Log:
    run_id: str = "r1"
    concurrency_key: str | None = None
    columns: dict[str, Any] = field(default_factory=dict)  # extra run columns, e.g. the limit
    events: list[tuple[int, str, str | None, int | None, str, dict[str, Any]]] = field(
        default_factory=list
    )
    receipts: dict[str, dict[str, Any]] = field(default_factory=dict)
    drops: list[tuple[str, str, str | None]] = field(default_factory=list)
    status: str | None = None
    output: Any = None
    steps: dict[str, dict[str, Any]] = field(default_factory=dict)

    # --- building ----------------------------------------------------------------------------

    def apply(self, key: str, *events: Ev) -> Log:
        """One applied command: its events, in order, under one receipt."""
        first = len(self.events) + 1
        for type_, step, attempt, payload in events:
            self.events.append((len(self.events) + 1, type_, step, attempt, key, payload))
            self._track(type_, step, attempt, payload)
        self.receipts[key] = {"outcome": "applied", "first": first, "last": len(self.events)}
        return self

    def drop(self, key: str, reason: str, *, receipt: bool | None = None) -> Log:
        """A refused delivery; a final, non-duplicate refusal fixes its key's fate."""
        transient = reason in ("key_taken", "paused", "not_due", "busy")
        if receipt if receipt is not None else not transient and reason != "duplicate":
            self.receipts[key] = {"outcome": reason, "first": None, "last": None}
        self.drops.append((key, reason, None))
        return self

    def _track(self, type_: str, step: str | None, attempt: int | None, p: dict[str, Any]) -> None:
        if type_ in RUN_TO:
            self.status = RUN_TO[type_]
            if type_ == "run_completed":
                self.output = p.get("output")
            if type_ == "run_created" and p.get("parent_run_id"):
                self.columns.setdefault("parent_run_id", p["parent_run_id"])
                self.columns.setdefault("parent_step_key", p["parent_step_key"])
            return
        if step is None or type_ not in STEP_TO:
            return
        if type_ == "step_created":
            self.steps[step] = {
                "status": "pending",
                "attempt": 0,
                "output": None,
                "depends_on": list(p.get("depends_on", [])),
                "max_attempts": p.get("max_attempts", 1),
                "child_run_id": None,
            }
            return
        row = self.steps[step]
        row["status"] = STEP_TO[type_]
        if attempt is not None and type_ != "step_cancelled":
            row["attempt"] = attempt
        if type_ == "step_completed":
            row["output"] = p.get("output")
        if type_ == "step_waiting" and p.get("child_run_id"):
            row["child_run_id"] = p["child_run_id"]

    # --- the usual commands ------------------------------------------------------------------

    def create(self, **payload: Any) -> Log:
        return self.apply(f"create:{self.run_id}", E("run_created", workflow="wf", **payload))

    def start(
        self,
        steps: dict[str, list[str]],
        *,
        queue: tuple[str, ...] = (),
        max_attempts: int = 1,
        specs: dict[str, dict[str, Any]] | None = None,
    ) -> Log:
        created = [
            E(
                "step_created",
                k,
                0,
                depends_on=d,
                max_attempts=max_attempts,
                **(specs or {}).get(k, {}),
            )
            for k, d in steps.items()
        ]
        queued = [E("step_queued", k, 1) for k in queue]
        return self.apply(f"start_run:{self.run_id}", E("run_started"), *created, *queued)

    def begin(self, step: str, attempt: int = 1) -> Log:
        return self.apply(
            f"start_step:{self.run_id}:{step}:{attempt}",
            E("step_started", step, attempt, fence=fence(step, attempt)),
        )

    def complete(self, step: str, attempt: int = 1, *then: Ev, output: Any = None) -> Log:
        done = E(
            "step_completed",
            step,
            attempt,
            fence=fence(step, attempt),
            output=out(step) if output is None else output,
        )
        return self.apply(f"complete_step:{self.run_id}:{step}:{attempt}", done, *then)

    def run_step(self, step: str, attempt: int = 1, *then: Ev) -> Log:
        return self.begin(step, attempt).complete(step, attempt, *then)

    def fail(self, step: str, attempt: int = 1, *then: Ev, retry: bool = False) -> Log:
        event = "step_retrying" if retry else "step_failed"
        return self.apply(
            f"fail_step:{self.run_id}:{step}:{attempt}",
            E(event, step, attempt, fence=fence(step, attempt), error={"message": "boom"}),
            *then,
        )

    # --- writing -----------------------------------------------------------------------------

    def write(
        self,
        conn: psycopg.Connection[Any],
        *,
        run: dict[str, Any] | None = None,
        steps: dict[str, dict[str, Any]] | None = None,
    ) -> Log:
        """INSERT the rows; `run` and `steps` override columns to make rows disagree."""
        with conn.cursor(row_factory=tuple_row) as cur:
            have = {
                f"{t}.{c}"
                for t, c in cur.execute(
                    "SELECT table_name, column_name FROM information_schema.columns "
                    "WHERE table_schema = 'executor'"
                )
            }
        statuses = [s["status"] for s in self.steps.values()]
        cols: dict[str, Any] = {
            "run_id": self.run_id,
            "workflow": "wf",
            "status": self.status,
            "concurrency_key": self.concurrency_key,
            "output": Jsonb(self.output) if self.status == "completed" else None,
            "last_seq": len(self.events),
            "steps_total": len(statuses),
            "steps_completed": statuses.count("completed"),
            "steps_active": statuses.count("queued") + statuses.count("running"),
            "steps_failed": statuses.count("failed"),
            **self.columns,
            **(run or {}),
        }
        _insert(conn, "runs", {k: v for k, v in cols.items() if f"runs.{k}" in have})
        for key, s in self.steps.items():
            waiting = sum(1 for d in s["depends_on"] if self.steps[d]["status"] != "completed")
            row = {
                "run_id": self.run_id,
                "step_key": key,
                "status": s["status"],
                "attempt": s["attempt"],
                "max_attempts": s["max_attempts"],
                "depends_on": s["depends_on"],
                "output": Jsonb(s["output"]) if s["output"] is not None else None,
                "waiting_on": waiting,
                "child_run_id": s["child_run_id"],
                **(steps or {}).get(key, {}),
            }
            _insert(conn, "steps", {k: v for k, v in row.items() if f"steps.{k}" in have})
        for seq, type_, step, attempt, key, payload in self.events:
            conn.execute(
                "INSERT INTO executor.events (run_id, seq, type, step_key, attempt, "
                "idempotency_key, payload) VALUES (%s, %s, %s, %s, %s, %s, %s)",
                (self.run_id, seq, type_, step, attempt, key, Jsonb(payload)),
            )
        for key, r in self.receipts.items():
            conn.execute(
                "INSERT INTO executor.receipts (idempotency_key, run_id, command_type, command, "
                "outcome, first_seq, last_seq) VALUES (%s, %s, %s, '{}', %s, %s, %s)",
                (key, self.run_id, key.split(":")[0], r["outcome"], r["first"], r["last"]),
            )
        for key, reason, step in self.drops:
            conn.execute(
                "INSERT INTO executor.drops (idempotency_key, run_id, step_key, reason, detail) "
                "VALUES (%s, %s, %s, %s, 'hand-built')",
                (key, self.run_id, step, reason),
            )
        return self


def _insert(conn: psycopg.Connection[Any], table: str, row: dict[str, Any]) -> None:
    names = ", ".join(row)
    marks = ", ".join(["%s"] * len(row))
    conn.execute(f"INSERT INTO executor.{table} ({names}) VALUES ({marks})", list(row.values()))
