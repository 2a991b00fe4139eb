"""Writing a decided transition: the second round trip of the handler.

The hot path (start or complete a step) is one statement of data-modifying CTEs
(`queries.write_changes`): receipt, spent outbox rows, changed steps, the run with its
counters and new `last_seq`, the events, and the outbox rows when there are follow-ups.
Rarer transitions add a statement each for what only they do: creating a run or steps,
keeping an external event, changing a second run, notifying waiters that a run ended.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from psycopg.types.json import Jsonb

from executor.commands.models import Command, field_of, wire
from executor.commands.state import RunRow, StepRow
from executor.commands.transition import NewEvent, OtherRun, Transition
from executor.ledger import queries as q
from executor.ledger.pipe import Pipe, Result

# One changed step (every start, a completion that readies nothing) and up to
# `queries.LISTED_EVENTS` events go as parameters of their own: as a document, the server
# parses it, reads it in a function scan and joins it to its row, and for one row that costs
# more than the update (110k instructions of a command's 1,400k). False only in the test that
# compares both forms: every row then goes as a document.
ROWS_AS_PARAMETERS = True


def write(conn: Pipe, command: Command, t: Transition, *, grace: float) -> Result | None:
    """Queue every write of `t` on the pipeline; returns the outbox rows it adds, if any."""
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
        conn.execute(q.INSERT_STEPS, (run.run_id, json_text([_new_step_doc(s) for s in new])))
    changed = [s for s in t.steps.values() if s.dirty and not s.new]
    assert all(s.ctid for s in changed), "a changed step was not read under this lock"
    # Rows and lists go as JSON documents (steps, events, outbox) or a text[] literal (keys),
    # not typed arrays: psycopg dumps an array element by element in Python, and thirty of
    # them cost more client CPU than the rest of the command; json.dumps is C. The one step
    # and the few events of the commands sent most go as parameters (`_step_params`).
    params: dict[str, Any] = {
        "key": command.idempotency_key,
        "run_id": run.run_id,
        "step_key": field_of(command, "step_key", None),
        "attempt": field_of(command, "attempt", None),
        "command_type": command.type,
        # As its job carries it (`wire`): unset optional fields left out.
        "command": command.model_dump_json(exclude_none=True),
        "first_seq": first,
        "last_seq": last,
        "r_status": run.status,
        "r_output": _json_or_null(run.output),
        "r_error": _json_or_null(run.error),
        "r_slot": run.concurrency_slot,
        "r_total": run.steps_total,
        "r_completed": run.steps_completed,
        "r_active": run.steps_active,
        "r_failed": run.steps_failed,
    }
    one_step = _step_params(params, changed)
    listed = _event_params(params, t.events)
    if t.spent_keys:
        params["spent"] = text_array([command.idempotency_key, *t.spent_keys])
    if t.followups:
        params["grace"] = grace
        params["outbox"] = json_text(
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
        )
    written = conn.execute(
        q.WRITE_CHANGES[bool(t.spent_keys), bool(t.followups), one_step, listed], params
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
    return written if t.followups else None


def _step_params(params: dict[str, Any], changed: list[StepRow]) -> bool:
    """The changed steps' new values: one as parameters of its own (True), any other number
    as a document."""
    if len(changed) != 1 or not ROWS_AS_PARAMETERS:
        params["s_ctid"] = _tids(s.ctid for s in changed)
        params["steps"] = json_text([_step_doc(s) for s in changed])
        return False
    (step,) = changed
    params.update(
        s_ctid=step.ctid,
        s_step_key=step.step_key,
        s_status=step.status,
        s_attempt=step.attempt,
        s_output=_json_or_null(step.output),
        s_error=_json_or_null(step.error),
        s_lease_expires_at=_iso(step.lease_expires_at),
        s_next_attempt_at=_iso(step.next_attempt_at),
        s_waiting_on=step.waiting_on,
        s_items_total=step.items_total,
        s_items_done=step.items_done,
        s_fence=step.fence,
        s_wake_at=_iso(step.wake_at),
        s_event_name=step.event_name,
        s_child_run_id=step.child_run_id,
    )
    return True


def _event_params(params: dict[str, Any], events: list[NewEvent]) -> int:
    """The events to append: up to `queries.LISTED_EVENTS` as parameters (their number), more
    as a document (0)."""
    if ROWS_AS_PARAMETERS and 0 < len(events) <= q.LISTED_EVENTS:
        for i, e in enumerate(events):
            params[f"e{i}_type"] = e.type
            params[f"e{i}_step_key"] = e.step_key
            params[f"e{i}_attempt"] = e.attempt
            params[f"e{i}_payload"] = _json_or_null(e.payload)
        return len(events)
    params["events"] = json_text(
        [
            _present(
                {"type": e.type, "step_key": e.step_key, "attempt": e.attempt, "payload": e.payload}
            )
            for e in events
        ]
    )
    return 0


def _insert_run(conn: Pipe, run: RunRow, last_seq: int) -> None:
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


def _write_other(conn: Pipe, other: OtherRun) -> None:
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
            "command": Jsonb(wire(other.receipt_command)),
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


# One encoder for every document: `json.dumps` with any argument set builds a new one per call,
# which cost more than the encoding of a command's small documents.
json_text = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode


def _json_or_null(value: Any) -> str | None:
    return None if value is None else json_text(value)


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()


def text_array(values: Iterable[str]) -> str:
    """A text[] literal, every element quoted: psycopg dumps a list element by element in
    Python. Inside quotes only a double quote and a backslash need escaping."""
    quoted = (v.replace("\\", "\\\\").replace('"', '\\"') for v in values)
    return "{" + ",".join(f'"{v}"' for v in quoted) + "}"


def _tids(ctids: Iterable[str | None]) -> str:
    """A tid[] literal: ctids are `(block,offset)`, nothing in them needs quoting."""
    return "{" + ",".join(f'"{c}"' for c in ctids) + "}"


def _new_step_doc(s: StepRow) -> dict[str, Any]:
    return {
        "step_key": s.step_key,
        "status": s.status,
        "attempt": s.attempt,
        "max_attempts": s.max_attempts,
        "depends_on": list(s.depends_on),
        "queue": s.queue,
        "timeout_seconds": s.timeout_seconds,
        "backoff": s.backoff,
        "kind": s.kind,
        "dependants": list(s.dependants),
        "waiting_on": s.waiting_on,
        "map_over": s.map_over,
        "parent_step": s.parent_step,
        "item_index": s.item_index,
        "item": s.item,
        "output": s.output,
        "fence": s.fence,
        "lease_expires_at": _iso(s.lease_expires_at),
        "items_total": s.items_total,
    }


def _step_doc(s: StepRow) -> dict[str, Any]:
    return _present(
        {
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
    )


def _present(doc: dict[str, Any]) -> dict[str, Any]:
    """The keys with a value: jsonb_to_recordset reads a missing key as NULL, as it reads
    null, and the server parses a document at some 200 instructions a byte."""
    return {k: v for k, v in doc.items() if v is not None}
