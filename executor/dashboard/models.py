"""Rows as the dashboard shows them: immutable models built from query rows (`from_row`).

The same models feed the HTML templates and the JSON API, so a page and its endpoint can
never disagree about what a field means.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field


class _Row(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Any:
        return cls.model_validate(row)


def error_message(error: Any) -> str | None:
    """The one-line message of a stored error (`{"message", "type", "traceback"}` or text)."""
    if error is None:
        return None
    if isinstance(error, dict):
        message = error.get("message")
        kind = error.get("type")
        text = str(message) if message is not None else str(error)
        return f"{kind}: {text}" if kind and kind not in text else text
    return str(error)


def _compact(value: Any, limit: int = 160) -> str:
    text = json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _clock(iso: Any) -> str:
    try:
        return datetime.fromisoformat(str(iso)).astimezone(UTC).strftime("%H:%M:%S UTC")
    except ValueError:
        return str(iso)


def error_traceback(error: Any) -> str | None:
    if isinstance(error, dict) and error.get("traceback"):
        return str(error["traceback"])
    return None


class _ErrorShown:
    """The error column as the pages show it: a message, and a traceback when there is one."""

    if TYPE_CHECKING:  # a field on some rows, a property on events; not a field here
        error: Any

    @property
    def error_message(self) -> str | None:
        return error_message(self.error)

    @property
    def error_traceback(self) -> str | None:
        return error_traceback(self.error)


class RunSummary(_ErrorShown, _Row):
    run_id: str
    workflow: str
    status: str
    concurrency_key: str | None = None
    error: Any = None
    last_seq: int
    created_at: datetime
    updated_at: datetime
    steps: dict[str, int] = {}

    @property
    def steps_total(self) -> int:
        return sum(self.steps.values())


class Run(RunSummary):
    input: Any = None
    output: Any = None
    concurrency_limit: int = 1
    concurrency_slot: int | None = None
    queue_position: int | None = None
    parent_run_id: str | None = None
    parent_step_key: str | None = None


class Step(_ErrorShown, _Row):
    run_id: str
    step_key: str
    status: str
    attempt: int
    max_attempts: int
    depends_on: list[str] = []
    queue: str = "default"
    timeout_seconds: float | None = None
    output: Any = None
    error: Any = None
    lease_expires_at: datetime | None = None
    next_attempt_at: datetime | None = None
    created_at: datetime
    updated_at: datetime
    kind: str = "task"
    parent_step: str | None = Field(default=None, description="The map of an item step.")
    item_index: int | None = None
    items_total: int | None = Field(default=None, description="A map's item count.")
    items_done: int = 0
    wake_at: datetime | None = Field(
        default=None, description="A sleeping step's timer, or a waiting step's timeout."
    )
    event_name: str | None = Field(default=None, description="The event a step waits for.")
    child_run_id: str | None = None

    @property
    def waits_for_event(self) -> bool:
        return self.status == "waiting" and self.event_name is not None


class ItemCounts(_Row):
    """A map's items by status: what the run page shows instead of ten thousand rows."""

    step_key: str
    total: int
    by_status: dict[str, int]


class ChildRun(_Row):
    run_id: str
    workflow: str
    status: str
    parent_step_key: str | None = None
    created_at: datetime
    updated_at: datetime


class Event(_ErrorShown, _Row):
    run_id: str
    seq: int
    type: str
    step_key: str | None = None
    attempt: int | None = None
    idempotency_key: str
    payload: Any = None
    created_at: datetime

    @property
    def error(self) -> Any:
        return self.payload.get("error") if isinstance(self.payload, dict) else None

    @property
    def summary(self) -> str:
        """The payload in words, for the timeline (the API returns the payload itself)."""
        p = self.payload if isinstance(self.payload, dict) else {}
        t = self.type
        if t == "run_created":
            parts = [f"workflow {p.get('workflow')}"]
            if p.get("concurrency_key"):
                parts.append(f"concurrency key {p['concurrency_key']}")
            parts.append(f"input {_compact(p.get('input'))}")
            return " · ".join(parts)
        if t == "step_created" and p.get("parent") is not None:
            return f"item {p.get('index')} of map {p['parent']} · queue {p.get('queue')}"
        if t == "step_created":
            deps = p.get("depends_on") or []
            parts = [f"after {', '.join(deps)}" if deps else "root step"]
            n = p.get("max_attempts")
            parts.append(f"up to {n} attempt" + ("" if n == 1 else "s"))
            parts.append(f"queue {p.get('queue')}")
            if p.get("timeout_seconds"):
                parts.append(f"timeout {p['timeout_seconds']}s")
            return " · ".join(parts)
        if t == "step_started" and p.get("lease_expires_at"):
            return f"lease until {_clock(p['lease_expires_at'])}"
        if t == "step_retrying" and p.get("next_attempt_at"):
            return f"next attempt at {_clock(p['next_attempt_at'])}"
        if t == "step_queued" and p.get("manual"):
            return f"manual retry by {p.get('requested_by') or 'an operator'}"
        if t in _WAIT_SUMMARIES:
            return _WAIT_SUMMARIES[t](p)
        if t in ("step_completed", "run_completed"):
            return f"output {_compact(p.get('output'))}"
        if t in ("run_paused", "run_resumed", "run_cancelled", "step_cancelled"):
            reason = p.get("reason")
            if t == "run_resumed" and reason == "manual_retry":
                return f"reopened by the manual retry of {p.get('step_key')}"
            return f"reason: {reason}" if reason else ""
        if t in ("step_failed", "run_failed", "run_started", "step_queued"):
            return ""
        return _compact(p) if p else ""


def _waiting(p: dict[str, Any]) -> str:
    if p.get("child_run_id"):
        return f"waits for child run {p['child_run_id']} of {p.get('workflow')}"
    if p.get("items") is not None:
        return f"map of {p['items']} item" + ("" if p["items"] == 1 else "s")
    timeout = f" · times out at {_clock(p['timeout_at'])}" if p.get("timeout_at") else ""
    return f"waits for event {p.get('event')}{timeout}"


def _received(p: dict[str, Any]) -> str:
    where = (
        f"completes step {p['consumed_by']}" if p.get("consumed_by") else "kept until a step waits"
    )
    return f"event {p.get('event')} · {where} · payload {_compact(p.get('payload'))}"


_WAIT_SUMMARIES: dict[str, Callable[[dict[str, Any]], str]] = {
    "run_queued": lambda p: f"queued for a slot of concurrency key {p.get('concurrency_key')}",
    "run_admitted": lambda p: (
        f"admitted to slot {p.get('slot')}, freed by run {p.get('released_by')}"
    ),
    "step_sleeping": lambda p: f"timer at {_clock(p.get('wake_at'))}",
    "step_waiting": _waiting,
    "event_received": _received,
}


class Drop(_Row):
    drop_id: int
    idempotency_key: str | None = None
    run_id: str | None = None
    step_key: str | None = None
    attempt: int | None = None
    command_type: str | None = None
    reason: str
    detail: str
    command: Any = None
    raw: str | None = None
    received_at: datetime


class FailedStep(_ErrorShown, _Row):
    run_id: str
    step_key: str
    attempt: int
    max_attempts: int
    error: Any = None
    updated_at: datetime
    workflow: str
    run_status: str

    @property
    def retryable(self) -> bool:
        """Only a failed step of a failed or running run can be retried by hand."""
        return self.run_status in ("failed", "running")


class LedgerHealth(_Row):
    """What Postgres says about work in flight: the other half of queue health."""

    outbox_pending: int = 0
    outbox_oldest_seconds: float | None = None
    steps_queued: int = 0
    steps_retrying: int = 0
    steps_running: int = 0
    steps_sleeping: int = 0
    steps_waiting: int = 0
    leases_expired: int = 0
    runs_queued: int = 0


class QueueInfo(_Row):
    name: str
    queued: int
    started: int
    failed: int
    scheduled: int
    deferred: int
    finished: int


class WorkerInfo(_Row):
    name: str
    state: str
    queues: list[str] = []
    hostname: str | None = None
    pid: int | None = None
    current_job_id: str | None = None
    current_job: str | None = None
    last_heartbeat: datetime | None = None
    heartbeat_age_seconds: float | None = None
    birth_date: datetime | None = None
    successful_jobs: int = 0
    failed_jobs: int = 0


class TransportSnapshot(_Row):
    ok: bool
    error: str | None = None
    queues: list[QueueInfo] = []
    workers: list[WorkerInfo] = []


def in_graph_order(steps: list[Step]) -> list[Step]:
    """Upstream before downstream (by longest path from a root), then by key."""
    by_key = {s.step_key: s for s in steps}
    depth: dict[str, int] = {}

    def layer(key: str, trail: frozenset[str] = frozenset()) -> int:
        if key not in depth:
            parents = [p for p in by_key[key].depends_on if p in by_key and p not in trail]
            depth[key] = 1 + max((layer(p, trail | {key}) for p in parents), default=-1)
        return depth[key]

    return sorted(steps, key=lambda s: (layer(s.step_key), s.step_key))
