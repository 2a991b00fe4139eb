"""The committing handler: the only code that writes runs, steps and events.

One transaction per delivery, in two round trips (libpq's pipeline mode, `pipe.py`):

1. lock the run row, read the idempotency key, and lock the rows the command names — its
   step, that step's dependants and its map (one call of `executor.lock_for_command`,
   sql/005);
2. write the steps, the run (with the new `last_seq` and its step counters), the events,
   the receipt and the outbox rows, and COMMIT.

Because every event-appending transaction holds the run row lock until it commits, events
get `seq` values in commit order with no gaps (I4), and a late command waits for the
transaction that makes it late, then sees the terminal state and is dropped. A decision that
needs more rows (a run completing reads its sinks' outputs) reads them on the same
transaction, an extra round trip only for that command.

A key's fate is fixed by an applied command or a final refusal (a receipt). A transient
refusal is recorded as a drop with no receipt, so the same key can still apply later. A
duplicate from the delivery that owns a running attempt (its first try committed, its answer
was lost) is told so and given the attempt to run.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg import errors as pg_errors
from psycopg.types.json import Jsonb

from executor import observability
from executor.commands.machine import decide
from executor.commands.models import Command, CreateRun, field_of, wire
from executor.commands.state import TRANSIENT_REASONS, StepRow
from executor.commands.transition import Drop, Transition
from executor.errors import LedgerBusy
from executor.ledger import queries as q
from executor.ledger import writes
from executor.ledger.outcome import EventRef, OutboxItem, Outcome, StepContext
from executor.ledger.pipe import Pipe, Result, transaction
from executor.ledger.rows import (
    DbSource,
    key_state,
    locked_run,
    locked_step,
    run_from_row,
    step_from_row,
    timestamp,
)
from executor.storage.db import Pool

log = logging.getLogger("executor.ledger")

Conn = psycopg.Connection[dict[str, Any]]

_RETRYABLE = (
    pg_errors.SerializationFailure,
    pg_errors.DeadlockDetected,
    pg_errors.UniqueViolation,
    pg_errors.InvalidSqlStatementName,  # prepared statements deallocated (pipe.py)
)

# Commands that may end a step, and so must see its dependants and its map.
_OUTCOMES = frozenset({"complete_step", "wake_step", "child_finished"})

# The transaction's planner settings ride in its first statement (q.LOCK_FOR_COMMAND), set
# before the lock is taken. Postgres would plan the write anew on every call, at a cost above
# its execution: its estimate of the generic plan (unknown array and document sizes) loses to
# each custom one; the generic plan is the same join by key whatever the sizes (checked at
# W=10,000). A generic plan is made once a connection, from the statistics of that moment:
# on a young ledger (tables of a few pages, not yet analyzed) it would read the steps table
# whole to find the rows by ctid, and keep doing so as the table grows. Every statement here
# reaches its rows by key or ctid, so a sequential scan is never the plan wanted.

# The unique violations two honest deliveries can race into; anything else is a real fault.
_RACING_CONSTRAINTS = frozenset(
    {"receipts_pkey", "runs_pkey", "runs_concurrency_slot", "concurrency_keys_pkey"}
)


@dataclass
class LedgerHooks:
    """Seams for tests that force an interleaving: called while the row locks are held."""

    after_lock: Callable[[Command], None] | None = None
    before_commit: Callable[[Command], None] | None = None
    inside: Callable[[Command, Conn], None] | None = None
    """Called with the command's own connection, writes done, locks held (tests that read
    the transaction's own statistics)."""


@dataclass
class _Pending:
    """What a committed transaction still has to read back from its pipelined results."""

    outcome: Outcome
    error: Exception | None = None
    outbox: Result | None = None
    context: tuple[StepRow, Transition | dict[str, Any], Result | None] | None = None


class Ledger:
    """Applies commands to the Postgres ledger; safe to share between threads."""

    def __init__(
        self,
        pool: Pool,
        *,
        lease_seconds: float = 30.0,
        max_retries: int = 8,
        hooks: LedgerHooks | None = None,
        outbox_grace_seconds: float = 10.0,
    ) -> None:
        self.pool = pool
        self.lease_seconds = lease_seconds
        self.outbox_grace_seconds = outbox_grace_seconds
        self.max_retries = max_retries
        self.hooks = hooks or LedgerHooks()
        self.retries = 0

    def apply(self, command: Command) -> Outcome:
        """Commit `command` or record why it was dropped; never both, never neither.

        Raises ConcurrencyKeyTaken / ConcurrencyLimitConflict (after recording the refusal)
        when a launch or a reopening retry finds its key's slots taken, and LedgerBusy (after
        recording a `busy` drop) if serialization failures or deadlocks outlast the budget.
        """
        last: Exception | None = None
        for attempt in range(self.max_retries + 1):
            try:
                pending = self._apply_once(command)
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
            observability.command_outcome(pending.outcome)  # observability
            if pending.error is not None:
                raise pending.error
            return pending.outcome
        detail = (
            f"not applied after {self.max_retries + 1} tries (serialization failures, "
            f"deadlocks or racing inserts): {last}"
        )
        self.record_drop(command, "busy", detail)
        raise LedgerBusy(f"{command.describe()} {detail}") from last

    def record_drop(self, command: Command, reason: str, detail: str) -> Outcome:
        """Record, in a transaction of its own, a delivery refused before the handler could
        decide it (a busy ledger, a workflow this worker does not know or cannot plan).
        Refusals for now only: no receipt, the key stays usable."""
        assert reason in TRANSIENT_REASONS or reason in ("unknown_entity", "invalid_payload")
        with self.pool.connection() as conn:
            _insert_drop(conn, command, reason, detail)
        log.warning("dropped %s: %s (%s)", command.describe(), reason, detail)
        return _dropped(command, reason, detail, transient=True)

    def record_invalid(self, raw: str, detail: str, *, command_type: str | None = None) -> Outcome:
        """Record a delivery that never became a command (bad JSON, schema, pickled bytes).

        Postgres text cannot hold NUL or a lone surrogate (Python's stand-in for bytes that
        were not UTF-8), and a delivery carrying them is exactly what must be recorded, so
        both are stored as visible escapes (`\\x00`, `\\udcff`) rather than refused.
        """

        def storable(text: str) -> str:
            escaped = text.encode("utf-8", "backslashreplace").decode("utf-8")
            return escaped.replace("\x00", "\\x00")

        raw, detail = storable(raw[:10_000]), storable(detail)
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
                    raw,
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

    def enqueue(self, command: Command, queue: str) -> OutboxItem:
        """Make a command durable before anyone delivers it: one outbox row, committed."""
        with self.pool.connection() as conn:
            row = conn.execute(
                q.INSERT_OUTBOX,
                {
                    "run_id": command.run_id,
                    "queue": queue,
                    "key": command.idempotency_key,
                    "command": Jsonb(wire(command)),
                    "not_before": None,
                    "timeout": None,
                    "grace": self.outbox_grace_seconds,
                },
            ).fetchone()
        assert row is not None
        return OutboxItem(**row)

    def extend_lease(
        self, run_id: str, step_key: str, attempt: int, fence: str | None = None
    ) -> datetime | None:
        """Push the lease of a running attempt forward; None means it is no longer ours."""
        with self.pool.connection() as conn:
            row = conn.execute(
                q.EXTEND_LEASE, (self.lease_seconds, run_id, step_key, attempt, fence)
            ).fetchone()
        if row is None:
            return None
        expires: datetime = row["lease_expires_at"]
        return expires

    # --- one transaction -----------------------------------------------------------------

    def _apply_once(self, command: Command) -> _Pending:
        # transaction() leaves the connection idle (committed or rolled back) or closed, so
        # it goes back as it is: the pool's context manager would also commit it, a no-op
        # on an autocommit connection that still costs a lock and a status check.
        conn = self.pool.getconn()
        try:
            with transaction(conn) as pipe:
                pending = self._decide_and_write(pipe, command)
        finally:
            self.pool.putconn(conn)
        if pending.context is not None or pending.outbox is not None:
            _read_back(pending)
        return pending

    def _decide_and_write(self, conn: Pipe, command: Command) -> _Pending:
        fence = field_of(command, "fence", None)
        launch_key = command.concurrency_key if isinstance(command, CreateRun) else None
        row = conn.execute(
            q.LOCK_FOR_COMMAND,
            (
                command.run_id,
                command.idempotency_key,
                field_of(command, "step_key", None),
                fence,
                launch_key,
                field_of(command, "concurrency_limit", 1),
                field_of(command, "continue_with", None),
                command.type in _OUTCOMES,
            ),
        ).fetchone()
        assert row is not None
        locked = row["locked"]
        now = timestamp(locked["now"])
        assert now is not None
        if self.hooks.after_lock:
            self.hooks.after_lock(command)

        if locked["outcome"] is not None:
            return self._duplicate(conn, command, locked)

        run = run_from_row(locked_run(locked["run"])) if locked["run"] else None
        steps = {r[0]: step_from_row(locked_step(r)) for r in locked["steps"]}
        launch = None
        if launch_key is not None and locked["key"] is not None:
            launch = key_state(launch_key, locked["key"])
        source = DbSource(
            conn, command.run_id, launch_key=launch, limit=field_of(command, "concurrency_limit", 1)
        )
        try:
            t = decide(command, run, steps, now, self.lease_seconds, source)
        except Drop as drop:
            outbox = self._record_refusal(conn, command, drop)
            outcome = _dropped(
                command, drop.reason, drop.detail, transient=drop.reason in TRANSIENT_REASONS
            )
            return _Pending(outcome, error=drop.error, outbox=outbox)

        outbox = writes.write(conn, command, t, grace=self.outbox_grace_seconds)
        context = None
        if t.started is not None:
            context = (t.started, t, _upstream(conn, command.run_id, t.started, t))
        if self.hooks.before_commit or self.hooks.inside:
            with conn.paused() as plain:  # the hook sees the writes done, the locks held
                if self.hooks.before_commit:
                    self.hooks.before_commit(command)
                if self.hooks.inside:
                    self.hooks.inside(command, plain)
        return _Pending(_applied(command, t), outbox=outbox, context=context)

    def _duplicate(self, conn: Pipe, command: Command, locked: dict[str, Any]) -> _Pending:
        received = timestamp(locked["received_at"])
        assert received is not None
        detail = f"key first delivered at {received.isoformat()} with outcome {locked['outcome']}"
        owned = step_from_row(locked_step(locked["owned"])) if locked["owned"] else None
        if owned is not None:
            detail += (
                f"; delivery {owned.fence} still owns {owned.step_key} attempt "
                f"{owned.attempt} and runs it"
            )
        _insert_drop(conn, command, "duplicate", detail)
        conn.execute(q.SPEND_OUTBOX, (command.run_id, command.idempotency_key))
        outcome = _dropped(command, "duplicate", detail, owner=owned is not None)
        if owned is None:
            return _Pending(outcome)
        run = locked_run(locked["run"])
        return _Pending(outcome, context=(owned, run, _upstream(conn, command.run_id, owned, None)))

    def _record_refusal(self, conn: Pipe, command: Command, drop: Drop) -> Result | None:
        if drop.reason not in TRANSIENT_REASONS:
            conn.execute(
                q.INSERT_RECEIPT,
                (
                    *_ids(command),
                    Jsonb(wire(command)),
                    drop.reason,
                    drop.detail,
                    None,
                    None,
                ),
            )
            conn.execute(q.SPEND_OUTBOX, (command.run_id, command.idempotency_key))
        _insert_drop(conn, command, drop.reason, drop.detail)
        log.info("dropped %s: %s (%s)", command.describe(), drop.reason, drop.detail)
        if drop.resend is None:
            return None
        resend = drop.resend
        return conn.execute(
            q.RESEND_LATER,
            {
                "run_id": command.run_id,
                "queue": resend.queue,
                "key": resend.command.idempotency_key,
                "command": Jsonb(wire(resend.command)),
                "not_before": resend.not_before,
                "timeout": resend.timeout_seconds,
                "grace": self.outbox_grace_seconds,
            },
        )


def _ids(command: Command) -> tuple[Any, ...]:
    return (
        command.idempotency_key,
        command.run_id,
        field_of(command, "step_key", None),
        field_of(command, "attempt", None),
        command.type,
    )


def _insert_drop(conn: Conn | Pipe, command: Command, reason: str, detail: str) -> None:
    key, run_id, step_key, attempt, kind = _ids(command)
    conn.execute(
        q.INSERT_DROP,
        (
            key,
            run_id,
            step_key,
            attempt,
            kind,
            reason,
            detail,
            Jsonb(command.model_dump(mode="json")),
            None,
        ),
    )


def _upstream(conn: Pipe, run_id: str, step: StepRow, t: Transition | None) -> Result | None:
    """Outputs of the started step's upstream not already in hand, read in the commit's round
    trip (None: nothing to read). Completed steps never change, so any snapshot would do.
    A step whose depends_on was left out of its locked row (a long one) has it read here."""
    if step.depends_known:
        wanted = [d for d in step.depends_on if t is None or d not in t.steps]
        return conn.execute(q.OUTPUTS, (writes.json_text(wanted), run_id)) if wanted else None
    known = writes.json_text([] if t is None else list(t.steps))
    return conn.execute(q.UPSTREAM, {"known": known, "run_id": run_id, "step_key": step.step_key})


def _read_back(pending: _Pending) -> None:
    outcome = pending.outcome
    updates: dict[str, Any] = {}
    if pending.outbox is not None:
        rows = pending.outbox.fetchall()
        if rows:
            updates["followups"] = tuple(OutboxItem(**r) for r in rows)
    if pending.context is not None:
        step, where, cursor = pending.context
        rows = cursor.fetchall() if cursor else []
        upstream = {r["step_key"]: r["output"] for r in rows if not r.get("known")}
        if isinstance(where, Transition):
            in_hand = [r["step_key"] for r in rows if r.get("known")] + [
                d for d in step.depends_on if d in where.steps
            ]
            for d in in_hand:
                upstream[d] = where.steps[d].output
            workflow, run_input = where.run.workflow, where.run.input
        else:
            workflow, run_input = where["workflow"], where["input"]
        updates["step_context"] = StepContext(
            step_key=step.step_key,
            attempt=step.attempt,
            queue=step.queue,
            workflow=workflow,
            run_input=run_input,
            upstream=upstream,
            timeout_seconds=step.timeout_seconds,
            lease_expires_at=step.lease_expires_at,
            max_attempts=step.max_attempts,
            fence=step.fence,
            kind=step.kind,
            item=step.item,
            item_index=step.item_index,
            parent_step=step.parent_step,
        )
    if updates:
        pending.outcome = outcome.updated(**updates)


def _dropped(
    command: Command, reason: str, detail: str, *, transient: bool = False, owner: bool = False
) -> Outcome:
    return Outcome(
        idempotency_key=command.idempotency_key,
        run_id=command.run_id,
        command_type=command.type,
        applied=False,
        reason=reason,
        detail=detail,
        transient=transient,
        owner=owner,
    )


def _applied(command: Command, t: Transition) -> Outcome:
    first = t.run.last_seq - len(t.events) + 1
    events = tuple(
        EventRef(seq=first + i, type=e.type, step_key=e.step_key, attempt=e.attempt)
        for i, e in enumerate(t.events)
    )
    return Outcome(
        idempotency_key=command.idempotency_key,
        run_id=command.run_id,
        command_type=command.type,
        applied=True,
        events=events,
        run_status=t.run.status,
        continued=t.continued is not None,
    )
