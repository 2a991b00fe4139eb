"""Writing a decided transition: the second round trip of the handler.

The hot path (start or complete a step) is one statement of data-modifying CTEs
(`WRITE_CHANGES`): receipt, changed steps, the run with its counters and new `last_seq`,
the events, the outbox. Rarer transitions add a statement each for what only they do:
creating a run or steps, keeping an external event, changing a second run, notifying
waiters that a run ended.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from executor.commands.models import Command, wire
from executor.commands.state import RunRow, StepRow
from executor.commands.transition import OtherRun, Transition
from executor.ledger import queries as q

Conn = psycopg.Connection[dict[str, Any]]


def write(
    conn: Conn, command: Command, t: Transition, *, grace: float
) -> psycopg.Cursor[dict[str, Any]]:
    """Queue every write of `t` on the pipeline; returns the outbox RETURNING cursor."""
    run = t.run
    first = run.last_seq + 1
    last = run.last_seq + len(t.events)
    if t.run_created:
        _insert_run(conn, run, last)
    if t.key_limit is not None:
        key, limit = t.key_limit
        conn.execute(q.SET_KEY_LIMIT, (limit, key, limit))
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
                [s.kind for s in new],
                [Jsonb(list(s.dependants)) for s in new],
                [s.waiting_on for s in new],
                [s.map_over for s in new],
                [s.parent_step for s in new],
                [s.item_index for s in new],
                [_jsonb(s.item) for s in new],
                [_jsonb(s.output) for s in new],
                [s.fence for s in new],
                [s.lease_expires_at for s in new],
                [s.items_total for s in new],
            ),
        )
    changed = [s for s in t.steps.values() if s.dirty and not s.new]
    assert all(s.ctid for s in changed), "a changed step was not read under this lock"
    # Rows go as one JSON document each (steps, events, outbox), not one typed array per
    # column: dumping thirty arrays cost more client CPU than the rest of the command.
    outbox = conn.execute(
        q.WRITE_CHANGES,
        {
            "key": command.idempotency_key,
            "run_id": run.run_id,
            "step_key": getattr(command, "step_key", None),
            "attempt": getattr(command, "attempt", None),
            "command_type": command.type,
            "command": command.model_dump_json(),
            "first_seq": first,
            "last_seq": last,
            "spent": [command.idempotency_key, *t.spent_keys],
            "grace": grace,
            "s_ctid": [s.ctid for s in changed],
            "steps": _json([_step_doc(s) for s in changed]),
            "r_status": run.status,
            "r_output": _json_or_null(run.output),
            "r_error": _json_or_null(run.error),
            "r_slot": run.concurrency_slot,
            "r_total": run.steps_total,
            "r_completed": run.steps_completed,
            "r_active": run.steps_active,
            "r_failed": run.steps_failed,
            "events": _json(
                [
                    {
                        "type": e.type,
                        "step_key": e.step_key,
                        "attempt": e.attempt,
                        "payload": e.payload,
                    }
                    for e in t.events
                ]
            ),
            "outbox": _json(
                [
                    {
                        "run_id": f.command.run_id,
                        "queue": f.queue,
                        "idempotency_key": f.command.idempotency_key,
                        "command": wire(f.command),
                        "not_before": _iso(f.not_before),
                        "timeout_seconds": f.timeout_seconds,
                    }
                    for f in t.followups
                ]
            ),
        },
    )
    if t.buffered:
        conn.execute(
            q.INSERT_RUN_EVENTS,
            (
                run.run_id,
                command.idempotency_key,
                [first + b.event_index for b in t.buffered],
                [b.event for b in t.buffered],
                [_jsonb(b.payload) for b in t.buffered],
                [b.consumed_by for b in t.buffered],
            ),
        )
    for received_seq, step_key, index in t.consumed:
        conn.execute(q.CONSUME_RUN_EVENT, (step_key, first + index, run.run_id, received_seq))
    for other in t.others:
        _write_other(conn, other)
    if t.ended:
        conn.execute(q.NOTIFY_ENDED, (run.run_id,))
    run.last_seq = last
    return outbox


def _insert_run(conn: Conn, run: RunRow, last_seq: int) -> None:
    conn.execute(
        q.INSERT_RUN,
        (
            run.run_id,
            run.workflow,
            run.status,
            run.concurrency_key,
            run.concurrency_limit,
            run.concurrency_slot,
            Jsonb(run.input),
            last_seq,
            run.parent_run_id,
            run.parent_step_key,
            run.parent_attempt,
            run.traceparent,
            run.status == "queued",
        ),
    )


def _write_other(conn: Conn, other: OtherRun) -> None:
    run = other.run
    first = run.last_seq + 1
    last = run.last_seq + len(other.events)
    if other.created:
        _insert_run(conn, run, last)
    conn.execute(
        q.WRITE_OTHER_RUN,
        {
            "key": other.receipt_key,
            "run_id": run.run_id,
            "command_type": other.receipt_command.type,
            "command": Jsonb(other.receipt_command.model_dump(mode="json")),
            "first_seq": first,
            "last_seq": last,
            "status": run.status,
            "slot": run.concurrency_slot,
            "e_type": [e.type for e in other.events],
            "e_payload": [Jsonb(e.payload) for e in other.events],
        },
    )
    run.last_seq = last


def _jsonb(value: Any) -> Jsonb | None:
    return None if value is None else Jsonb(value)


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), allow_nan=False)


def _json_or_null(value: Any) -> str | None:
    return None if value is None else _json(value)


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()


def _step_doc(s: StepRow) -> dict[str, Any]:
    return {
        "ctid": s.ctid,
        "step_key": s.step_key,
        "status": s.status,
        "attempt": s.attempt,
        "output": s.output,
        "error": s.error,
        "lease_expires_at": _iso(s.lease_expires_at),
        "next_attempt_at": _iso(s.next_attempt_at),
        "waiting_on": s.waiting_on,
        "items_total": s.items_total,
        "items_done": s.items_done,
        "fence": s.fence,
        "wake_at": _iso(s.wake_at),
        "event_name": s.event_name,
        "child_run_id": s.child_run_id,
    }
