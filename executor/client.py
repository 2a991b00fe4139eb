"""The API for apps: start runs, send commands and events, read state. Needs only the URLs.

No workflow code is imported here: a run is created `pending` and the first worker that
knows the workflow plans its steps, the way a Temporal client never loads workflow code.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
import uuid
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

import psycopg
from pydantic import BaseModel, ConfigDict
from redis import Redis

from executor import observability
from executor.commands.models import Command, CreateRun, SendEvent
from executor.commands.state import RUN_TERMINAL
from executor.errors import ExecutorError
from executor.ledger.handler import Ledger
from executor.ledger.outcome import Outcome
from executor.schedules import store, ticker
from executor.schedules.model import Catchup, Schedule
from executor.storage.db import open_pool

if TYPE_CHECKING:
    from executor.transport.dispatch import Dispatcher

ENDED_CHANNEL = "executor_run_ended"
"""The handler NOTIFYs this channel with the run id in the transaction that ends a run."""


class StepView(BaseModel):
    model_config = ConfigDict(frozen=True)

    step_key: str
    status: str
    attempt: int
    max_attempts: int
    depends_on: list[str]
    kind: str = "task"
    parent_step: str | None = None
    child_run_id: str | None = None
    event_name: str | None = None
    wake_at: datetime | None = None
    output: Any = None
    error: Any = None
    updated_at: datetime


class RunView(BaseModel):
    model_config = ConfigDict(frozen=True)

    run_id: str
    workflow: str
    status: str
    concurrency_key: str | None
    concurrency_limit: int = 1
    parent_run_id: str | None = None
    parent_step_key: str | None = None
    input: Any = None
    output: Any = None
    error: Any = None
    last_seq: int
    created_at: datetime
    updated_at: datetime
    steps: list[StepView] = []

    @property
    def done(self) -> bool:
        return self.status in RUN_TERMINAL


class RunTimeout(ExecutorError):
    """The run did not reach a terminal status in time; it is still running."""


class Client:
    """Thread-safe; open one per process and close it at exit."""

    def __init__(
        self,
        database_url: str | None = None,
        redis_url: str | None = None,
        *,
        pool_size: int = 4,
    ) -> None:
        from queue_config import load_settings

        if database_url is None or redis_url is None:
            from executor.config import resolve_urls

            found_db, found_redis = resolve_urls()
            database_url = database_url or found_db
            redis_url = redis_url or found_redis
        self.database_url = database_url
        self.redis_url = redis_url
        self.settings = load_settings()
        self.pool = open_pool(database_url, name="client", max_size=pool_size)
        self.redis = Redis.from_url(redis_url)
        self.ledger = Ledger(
            self.pool,
            lease_seconds=self.settings.lease_seconds,
            outbox_grace_seconds=self.settings.outbox_grace_seconds,
        )
        self._dispatcher: Dispatcher | None = None
        self._ended = _EndedRuns(database_url)

    @property
    def dispatcher(self) -> Dispatcher:
        if self._dispatcher is None:
            from executor.transport.dispatch import Dispatcher

            self._dispatcher = Dispatcher(self.redis, self.settings, self.pool)
        return self._dispatcher

    def close(self) -> None:
        self._ended.close()
        self.pool.close()
        self.redis.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start_run(
        self,
        workflow: str,
        input: Any = None,
        *,
        concurrency_key: str | None = None,
        concurrency_limit: int = 1,
        on_conflict: Literal["reject", "queue"] = "reject",
        idempotency_key: str | None = None,
        run_id: str | None = None,
    ) -> str:
        """Create a run and hand it to the workers; returns its run id.

        With an `idempotency_key`, calling again returns the first call's run id instead of
        starting a second run. At most `concurrency_limit` runs hold a `concurrency_key`;
        when all its slots are taken the launch raises ConcurrencyKeyTaken naming a holder
        (`on_conflict="reject"`) or waits `queued` for a slot (`"queue"`). A refused launch
        does not use up its idempotency key: retried once the key frees, it starts the run.
        """
        run_id = run_id or uuid.uuid4().hex
        command = CreateRun(
            run_id=run_id,
            workflow=workflow,
            input=input,
            concurrency_key=concurrency_key,
            concurrency_limit=concurrency_limit,
            on_conflict=on_conflict,
            idempotency_key=idempotency_key or f"create_run:{run_id}",
            traceparent=observability.run_traceparent(workflow, run_id),  # observability
        )
        outcome = self.apply(command)
        if outcome.applied:
            return run_id
        with self.pool.connection() as conn:
            first = conn.execute(
                "SELECT run_id, outcome, detail FROM executor.receipts WHERE idempotency_key = %s",
                (command.idempotency_key,),
            ).fetchone()
        if first is not None and first["outcome"] == "applied":
            return str(first["run_id"])
        raise ExecutorError(f"run not started: {outcome.reason} ({outcome.detail})")

    def apply(self, command: Command) -> Outcome:
        """Commit the command now and push the jobs it caused; returns the outcome."""
        if getattr(command, "continue_on", None) or getattr(command, "continue_with", None):
            # It promises to run the step it starts; only the worker running the chain can.
            raise ExecutorError("continue_on is for the worker that will run the started step")
        if isinstance(command, CreateRun) and command.parent_run_id is not None:
            raise ExecutorError("parent_run_id is set by the ledger, for child runs only")
        outcome = self.ledger.apply(command)
        if outcome.followups:
            self.dispatcher.push(outcome.followups)
        return outcome

    def submit(self, command: Command, *, queue: str = "default") -> str:
        """Hand the command to a worker to apply; returns the RQ job id.

        Durable before it returns: the command is committed to the outbox first, and the
        relay delivers it again (a flushed Redis, a failed job) until it is decided.
        """
        from executor.transport.dispatch import job_id_for

        item = self.ledger.enqueue(command, queue)
        self.dispatcher.push([item])
        return job_id_for(command.idempotency_key)

    def send_event(
        self, run_id: str, event: str, payload: Any = None, *, idempotency_key: str
    ) -> Outcome:
        """Send an external event to a run: a step waiting for it completes with `payload`;
        if none waits yet, the run keeps it for the first that does. The same key twice is a
        `duplicate`; a finished run answers `terminal`."""
        return self.apply(
            SendEvent(run_id=run_id, event=event, payload=payload, idempotency_key=idempotency_key)
        )

    def hook_url(self, run_id: str, event: str, *, base_url: str | None = None) -> str:
        """A URL a third party may POST JSON to, sending `event` (the body its payload) to
        this run and nothing else. Unguessable; only a digest of it is stored."""
        token = f"{run_id}~{secrets.token_urlsafe(32)}"
        with self.pool.connection() as conn:
            conn.execute(
                "INSERT INTO executor.hooks (run_id, token_sha256, event) VALUES (%s, %s, %s)",
                (run_id, hashlib.sha256(token.encode()).hexdigest(), event),
            )
        base = (base_url or self.settings.public_url).rstrip("/")
        return f"{base}/hooks/{token}"

    def get_run(self, run_id: str) -> RunView | None:
        with self.pool.connection() as conn:
            run = conn.execute(
                "SELECT * FROM executor.runs WHERE run_id = %s", (run_id,)
            ).fetchone()
            if run is None:
                return None
            steps = conn.execute(
                "SELECT step_key, status, attempt, max_attempts, depends_on, kind, parent_step, "
                "child_run_id, event_name, wake_at, output, error, updated_at "
                "FROM executor.steps WHERE run_id = %s "
                "ORDER BY created_at, parent_step NULLS FIRST, item_index, step_key",
                (run_id,),
            ).fetchall()
        return RunView.model_validate({**run, "steps": steps})

    def status_counts(self, run_ids: list[str]) -> dict[str, int]:
        """How many of these runs are in each status, in one query."""
        with self.pool.connection() as conn:
            rows = conn.execute(
                "SELECT status, count(*) AS n FROM executor.runs WHERE run_id = ANY(%s) "
                "GROUP BY status",
                (run_ids,),
            ).fetchall()
        return {r["status"]: int(r["n"]) for r in rows}

    def wait(self, run_id: str, timeout: float = 60.0) -> RunView:
        """Block until the run is completed, failed or cancelled.

        Woken by the NOTIFY the ending transaction sends, not by polling; the status is read
        once before listening and once per wake-up.
        """
        deadline = time.monotonic() + timeout
        with self._ended.watch(run_id) as ended:
            while True:
                view = self.get_run(run_id)
                if view is None:
                    raise ExecutorError(f"no run {run_id}")
                if view.done:
                    return view
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RunTimeout(f"run {run_id} is still {view.status} after {timeout:.0f}s")
                ended.wait(min(left, 5.0))  # re-read now and then: a listener may reconnect
                ended.clear()

    # --- schedules: thin over executor.schedules, which the CLI and dashboard use too ------

    def create_schedule(
        self,
        name: str,
        cron: str,
        workflow: str,
        input: dict[str, Any] | None = None,
        *,
        timezone: str = "UTC",
        catchup: Catchup = "latest",
        paused: bool = False,
        now: datetime | None = None,
    ) -> Schedule:
        """Start `workflow` with `input` at every tick of `cron` read in `timezone`.

        The sweep leader starts each tick's run exactly once; `catchup` decides the ticks
        missed while no worker ran ("none", "latest" or "all"). The first tick is the first
        after `now` (default: the database clock). Raises ScheduleExists, InvalidSchedule.
        """
        return store.create(
            self.pool,
            name,
            cron,
            workflow,
            input,
            timezone=timezone,
            catchup=catchup,
            paused=paused,
            now=now,
        )

    def get_schedule(self, name: str) -> Schedule | None:
        return store.get(self.pool, name)

    def list_schedules(self) -> list[Schedule]:
        return store.list_all(self.pool)

    def pause_schedule(self, name: str) -> Schedule:
        """No tick of the schedule starts after this returns."""
        return store.pause(self.pool, name)

    def resume_schedule(self, name: str, *, now: datetime | None = None) -> Schedule:
        """Ticks start again from the first after `now`; those missed while paused do not."""
        return store.resume(self.pool, name, now=now)

    def delete_schedule(self, name: str) -> None:
        store.delete(self.pool, name)

    def trigger_schedule(self, name: str, *, idempotency_key: str | None = None) -> str:
        """Start one run of the schedule now, outside its ticks; returns its run id."""
        return ticker.trigger(self, name, idempotency_key=idempotency_key).run_id

    def backfill_schedule(
        self, name: str, start: datetime, end: datetime, *, now: datetime | None = None
    ) -> ticker.BackfillReport:
        """Start every past tick in [start, end] not started yet; repeating it starts none."""
        return ticker.backfill(self, name, start, end, now=now)


class _EndedRuns:
    """One LISTEN connection per client, shared by every `wait` of its threads."""

    def __init__(self, database_url: str) -> None:
        self.database_url = database_url
        self._lock = threading.Lock()
        self._watchers: dict[str, list[threading.Event]] = {}
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._closed = threading.Event()

    def watch(self, run_id: str) -> _Watch:
        event = threading.Event()
        with self._lock:
            self._watchers.setdefault(run_id, []).append(event)
            if self._thread is None or not self._thread.is_alive():
                self._ready.clear()
                self._thread = threading.Thread(
                    target=self._listen, name="executor-wait", daemon=True
                )
                self._thread.start()
        self._ready.wait(5.0)  # listening before the caller's first read: no lost wake-up
        return _Watch(self, run_id, event)

    def _forget(self, run_id: str, event: threading.Event) -> None:
        with self._lock:
            events = self._watchers.get(run_id, [])
            if event in events:
                events.remove(event)
            if not events:
                self._watchers.pop(run_id, None)

    def _listen(self) -> None:
        while not self._closed.is_set():
            try:
                with psycopg.connect(self.database_url, autocommit=True) as conn:
                    conn.execute(f"LISTEN {ENDED_CHANNEL}")
                    self._ready.set()
                    self._wake_all()  # anything may have ended while we reconnected
                    while not self._closed.is_set():
                        for note in conn.notifies(timeout=0.5):
                            with self._lock:
                                events = list(self._watchers.get(note.payload, ()))
                            for event in events:
                                event.set()
            except Exception:  # the server went away, or was told to end us: listen again
                self._ready.set()
                self._closed.wait(0.5)

    def _wake_all(self) -> None:
        with self._lock:
            for events in self._watchers.values():
                for event in events:
                    event.set()

    def close(self) -> None:
        self._closed.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


class _Watch:
    def __init__(self, owner: _EndedRuns, run_id: str, event: threading.Event) -> None:
        self.owner = owner
        self.run_id = run_id
        self.event = event

    def __enter__(self) -> threading.Event:
        return self.event

    def __exit__(self, *exc: object) -> None:
        self.owner._forget(self.run_id, self.event)
