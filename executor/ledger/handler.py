"""The committing handler: the only code that writes runs, steps and events.

One transaction per delivery, in two round trips (psycopg pipeline mode):

1. lock the run row, then every step of the run in key order, and look up the
   idempotency key (one call of `executor.lock_for_command`, sql/004);
2. write the steps, the run (with the new `last_seq`), the events, the receipt and the
   outbox rows, and COMMIT.

Because every event-appending transaction holds the run row lock until it commits, events
get `seq` values in commit order with no gaps (I4), and a late command waits for the
transaction that makes it late, then sees the terminal state and is dropped.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg import errors as pg_errors
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool

from executor import observability
from executor.commands.machine import Drop, Transition, decide
from executor.commands.models import Command, CreateRun, StartStep, wire
from executor.commands.state import RunRow, StepRow
from executor.errors import ConcurrencyKeyTaken, LedgerBusy
from executor.ledger import queries as q
from executor.ledger.outcome import EventRef, OutboxItem, Outcome, StepContext

log = logging.getLogger("executor.ledger")

Conn = psycopg.Connection[dict[str, Any]]
Pool = ConnectionPool[Conn]

_RETRYABLE = (pg_errors.SerializationFailure, pg_errors.DeadlockDetected, pg_errors.UniqueViolation)

# The unique violations two honest deliveries can race into; anything else is a real fault.
_RACING_CONSTRAINTS = frozenset(
    {"receipts_pkey", "runs_pkey", "runs_one_active_per_concurrency_key"}
)


@dataclass
class LedgerHooks:
    """Seams for tests that force an interleaving: called while the row locks are held."""

    after_lock: Callable[[Command], None] | None = None
    before_commit: Callable[[Command], None] | None = None


class _Conflict(Exception):
    pass


class Ledger:
    """Applies commands to the Postgres ledger; safe to share between threads."""

    def __init__(
        self,
        pool: Pool,
        *,
        lease_seconds: float = 30.0,
        max_retries: int = 8,
        hooks: LedgerHooks | None = None,
    ) -> None:
        self.pool = pool
        self.lease_seconds = lease_seconds
        self.max_retries = max_retries
        self.hooks = hooks or LedgerHooks()
        self.retries = 0

    def apply(self, command: Command) -> Outcome:
        """Commit `command` or record why it was dropped; never both, never neither.

        Raises ConcurrencyKeyTaken (after recording the refusal) when a launch or a reopening
        retry collides with another active run, and LedgerBusy if serialization failures or
        deadlocks persist past the retry budget.
        """
        last: Exception | None = None
        for attempt in range(self.max_retries + 1):
            try:
                outcome, conflict = self._apply_once(command)
            except _RETRYABLE as exc:
                if (
                    isinstance(exc, pg_errors.UniqueViolation)
                    and exc.diag.constraint_name not in _RACING_CONSTRAINTS
                ):
                    raise
                last = exc
                self.retries += 1
                observability.ledger_retry(exc)  # observability
                log.debug("retrying %s after %s", command.describe(), type(exc).__name__)
                time.sleep(random.uniform(0, 0.002 * 2**attempt))
                continue
            observability.command_outcome(outcome)  # observability
            if conflict is not None:
                raise conflict
            return outcome
        raise LedgerBusy(
            f"{command.describe()} not applied after {self.max_retries + 1} tries "
            f"(serialization failures, deadlocks or racing inserts): {last}"
        ) from last

    def record_invalid(self, raw: str, detail: str, *, command_type: str | None = None) -> Outcome:
        """Record a delivery that never became a command (bad JSON, schema, pickled bytes)."""
        with self.pool.connection() as conn:
            conn.execute(
                q.INSERT_DROP,
                (
                    None,
                    None,
                    None,
                    None,
                    command_type,
                    "invalid_payload",
                    detail,
                    None,
                    raw[:10_000],
                ),
            )
        log.warning("dropped invalid payload: %s", detail)
        return Outcome(
            idempotency_key=None,
            run_id=None,
            command_type=command_type,
            applied=False,
            reason="invalid_payload",
            detail=detail,
        )

    def extend_lease(self, run_id: str, step_key: str, attempt: int) -> datetime | None:
        """Push the lease of a running attempt forward; None means the attempt was superseded."""
        with self.pool.connection() as conn:
            row = conn.execute(
                q.EXTEND_LEASE, (self.lease_seconds, run_id, step_key, attempt)
            ).fetchone()
        if row is None:
            return None
        expires: datetime = row["lease_expires_at"]
        return expires

    def started_by(self, run_id: str, idempotency_key: str) -> StepContext | None:
        """The step a command started in place, if it is still running that attempt.

        For a sender whose commit went through but whose answer was lost (CompleteStep with
        `continue_on`): nobody else will run that step, so the sender must.
        """
        with self.pool.connection() as conn:
            row = conn.execute(q.STARTED_BY, (run_id, idempotency_key)).fetchone()
            if row is None:
                return None
            upstream = conn.execute(q.OUTPUTS, (run_id, list(row["depends_on"]))).fetchall()
        return StepContext(
            step_key=row["step_key"],
            attempt=row["attempt"],
            queue=row["queue"],
            workflow=row["workflow"],
            run_input=row["input"],
            upstream={r["step_key"]: r["output"] for r in upstream},
            timeout_seconds=row["timeout_seconds"],
            lease_expires_at=row["lease_expires_at"],
            max_attempts=row["max_attempts"],
        )

    def _apply_once(self, command: Command) -> tuple[Outcome, ConcurrencyKeyTaken | None]:
        # BEGIN and COMMIT are sent by hand inside one pipeline: psycopg's transaction()
        # block would sync after BEGIN and again after COMMIT, five round trips instead of two.
        with self.pool.connection() as conn:
            try:
                with conn.pipeline() as pipeline:
                    conn.execute("BEGIN")
                    result = self._decide_and_write(conn, pipeline, command)
                    conn.execute("COMMIT")
            except BaseException:
                if not conn.closed:
                    conn.rollback()
                raise
        outcome, conflict, outbox_cur = result
        if outbox_cur is not None:
            rows = outbox_cur.fetchall()
            if rows:
                followups = tuple(OutboxItem.model_validate(r) for r in rows)
                outcome = outcome.model_copy(update={"followups": followups})
        return outcome, conflict

    def _decide_and_write(
        self, conn: Conn, pipeline: psycopg.Pipeline, command: Command
    ) -> tuple[Outcome, ConcurrencyKeyTaken | None, psycopg.Cursor[dict[str, Any]] | None]:
        row = conn.execute(
            q.LOCK_FOR_COMMAND,
            (command.run_id, command.idempotency_key, not isinstance(command, CreateRun)),
        ).fetchone()
        assert row is not None
        locked = row["locked"]
        run_row, step_rows = locked["run"], locked["steps"]
        receipt = {
            "outcome": locked["outcome"],
            "received_at": _timestamp(locked["received_at"]),
            "now": _timestamp(locked["now"]),
        }
        if self.hooks.after_lock:
            self.hooks.after_lock(command)

        if receipt["outcome"] is not None:
            detail = (
                f"key first delivered at {receipt['received_at'].isoformat()} "
                f"with outcome {receipt['outcome']}"
            )
            self._insert_drop(conn, command, "duplicate", detail)
            return self._dropped(command, "duplicate", detail), None, None

        run = _run_from_row(run_row) if run_row else None
        steps = {r["step_key"]: _step_from_row(r) for r in step_rows}
        try:
            t = decide(command, run, steps, receipt["now"], self.lease_seconds)
        except Drop as drop:
            self._record_drop(conn, command, drop.reason, drop.detail)
            return self._dropped(command, drop.reason, drop.detail), None, None

        conflict = self._claim_run(conn, command, t)
        if conflict is not None:
            return self._dropped(command, "invalid_transition", str(conflict)), conflict, None

        outbox_cur = self._write(conn, command, t)
        if self.hooks.before_commit:
            pipeline.sync()  # so the hook sees the writes done and the locks still held
            self.hooks.before_commit(command)
        return self._applied(command, t, ()), None, outbox_cur

    def _claim_run(self, conn: Conn, command: Command, t: Transition) -> ConcurrencyKeyTaken | None:
        """Insert a launched run, or check a reopened one, against I5; record any refusal.

        A launch writes its receipt before its row, so a concurrent delivery of the same key
        waits on the receipt and is then a duplicate, never a rival for the concurrency key.
        """
        key = t.run.concurrency_key
        if t.run_created:
            self._insert_receipt(conn, command, "applied", None, 1, len(t.events))
            inserted = conn.execute(
                q.INSERT_RUN,
                (
                    t.run.run_id,
                    t.run.workflow,
                    "pending",
                    key,
                    Jsonb(t.run.input),
                    len(t.events),
                    getattr(command, "traceparent", None),  # observability: the run's trace
                ),
            ).fetchone()
            if inserted is not None:
                return None
        elif key is None or not t.reopened:
            return None
        assert key is not None
        holder = conn.execute(q.KEY_HOLDER, (key, t.run.run_id)).fetchone()
        if holder is None:
            if t.run_created:
                # The holder settled between our insert and this read: start over.
                raise pg_errors.SerializationFailure("concurrency key released meanwhile")
            return None
        err = ConcurrencyKeyTaken(key, holder["run_id"])
        if t.run_created:
            conn.execute(
                q.UPDATE_RECEIPT_OUTCOME, ("invalid_transition", str(err), command.idempotency_key)
            )
            self._insert_drop(conn, command, "invalid_transition", str(err))
        else:
            self._record_drop(conn, command, "invalid_transition", str(err))
        return err

    def _write(self, conn: Conn, command: Command, t: Transition) -> psycopg.Cursor[dict[str, Any]]:
        first = t.run.last_seq + 1
        last = t.run.last_seq + len(t.events)
        run = t.run
        new = [s for s in t.steps.values() if s.new]
        if new:
            conn.execute(
                q.INSERT_STEPS,
                (
                    run.run_id,
                    [s.step_key for s in new],
                    [s.status for s in new],
                    [s.attempt for s in new],
                    [s.max_attempts for s in new],
                    [Jsonb(list(s.depends_on)) for s in new],
                    [s.queue for s in new],
                    [s.timeout_seconds for s in new],
                    [Jsonb(s.backoff) for s in new],
                ),
            )
        changed = [s for s in t.steps.values() if s.dirty]
        return conn.execute(
            q.WRITE_CHANGES,
            {
                "key": command.idempotency_key,
                "run_id": run.run_id,
                "step_key": getattr(command, "step_key", None),
                "attempt": getattr(command, "attempt", None),
                "command_type": command.type,
                "command": Jsonb(command.model_dump(mode="json")),
                "first_seq": first,
                "last_seq": last,
                "with_receipt": not t.run_created,  # a launch's receipt is in _claim_run
                "s_key": [s.step_key for s in changed],
                "s_status": [s.status for s in changed],
                "s_attempt": [s.attempt for s in changed],
                "s_output": [_jsonb(s.output) for s in changed],
                "s_error": [_jsonb(s.error) for s in changed],
                "s_lease": [s.lease_expires_at for s in changed],
                "s_next": [s.next_attempt_at for s in changed],
                "r_status": run.status,
                "r_output": _jsonb(run.output),
                "r_error": _jsonb(run.error),
                "e_seq": list(range(first, last + 1)),
                "e_type": [e.type for e in t.events],
                "e_step": [e.step_key for e in t.events],
                "e_attempt": [e.attempt for e in t.events],
                "e_payload": [Jsonb(e.payload) for e in t.events],
                "o_queue": [f.queue for f in t.followups],
                "o_key": [f.command.idempotency_key for f in t.followups],
                "o_command": [Jsonb(wire(f.command)) for f in t.followups],
                "o_not_before": [f.not_before for f in t.followups],
                "o_timeout": [f.timeout_seconds for f in t.followups],
            },
        )

    def _insert_receipt(
        self,
        conn: Conn,
        command: Command,
        outcome: str,
        detail: str | None,
        first_seq: int | None,
        last_seq: int | None,
    ) -> None:
        conn.execute(
            q.INSERT_RECEIPT,
            (
                command.idempotency_key,
                command.run_id,
                getattr(command, "step_key", None),
                getattr(command, "attempt", None),
                command.type,
                Jsonb(command.model_dump(mode="json")),
                outcome,
                detail,
                first_seq,
                last_seq,
            ),
        )

    def _insert_drop(self, conn: Conn, command: Command, reason: str, detail: str) -> None:
        conn.execute(
            q.INSERT_DROP,
            (
                command.idempotency_key,
                command.run_id,
                getattr(command, "step_key", None),
                getattr(command, "attempt", None),
                command.type,
                reason,
                detail,
                Jsonb(command.model_dump(mode="json")),
                None,
            ),
        )

    def _record_drop(self, conn: Conn, command: Command, reason: str, detail: str) -> None:
        self._insert_receipt(conn, command, reason, detail, None, None)
        self._insert_drop(conn, command, reason, detail)
        log.info("dropped %s: %s (%s)", command.describe(), reason, detail)

    def _dropped(self, command: Command, reason: str, detail: str) -> Outcome:
        return Outcome(
            idempotency_key=command.idempotency_key,
            run_id=command.run_id,
            command_type=command.type,
            applied=False,
            reason=reason,
            detail=detail,
        )

    def _applied(self, command: Command, t: Transition, followups: Sequence[OutboxItem]) -> Outcome:
        first = t.run.last_seq + 1
        events = tuple(
            EventRef(seq=first + i, type=e.type, step_key=e.step_key, attempt=e.attempt)
            for i, e in enumerate(t.events)
        )
        started = t.steps[command.step_key] if isinstance(command, StartStep) else t.continued
        context = None
        if started is not None:
            context = StepContext(
                step_key=started.step_key,
                attempt=started.attempt,
                queue=started.queue,
                workflow=t.run.workflow,
                run_input=t.run.input,
                upstream={d: t.steps[d].output for d in started.depends_on},
                timeout_seconds=started.timeout_seconds,
                lease_expires_at=started.lease_expires_at,
                max_attempts=started.max_attempts,
            )
        return Outcome(
            idempotency_key=command.idempotency_key,
            run_id=command.run_id,
            command_type=command.type,
            applied=True,
            events=events,
            followups=tuple(followups),
            run_status=t.run.status,
            step_context=context,
            continued=t.continued is not None,
        )


def _jsonb(value: Any) -> Jsonb | None:
    return None if value is None else Jsonb(value)


def _run_from_row(row: dict[str, Any]) -> RunRow:
    return RunRow(
        run_id=row["run_id"],
        workflow=row["workflow"],
        status=row["status"],
        concurrency_key=row["concurrency_key"],
        input=row["input"],
        output=row["output"],
        error=row["error"],
        last_seq=row["last_seq"],
    )


def _timestamp(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


def _step_from_row(row: dict[str, Any]) -> StepRow:
    return StepRow(
        step_key=row["step_key"],
        status=row["status"],
        attempt=row["attempt"],
        max_attempts=row["max_attempts"],
        depends_on=tuple(row["depends_on"]),
        queue=row["queue"],
        timeout_seconds=row["timeout_seconds"],
        backoff=row["backoff"],
        output=row["output"],
        error=row["error"],
        lease_expires_at=_timestamp(row["lease_expires_at"]),
        next_attempt_at=_timestamp(row["next_attempt_at"]),
    )
