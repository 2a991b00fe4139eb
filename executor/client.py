"""The API for apps: start runs, send commands, read state. Needs only the two URLs.

No workflow code is imported here: a run is created `pending` and the first worker that
knows the workflow plans its steps, the way a Temporal client never loads workflow code.
"""

from __future__ import annotations

import time
import uuid
from datetime import datetime
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict
from redis import Redis

from executor.commands.models import Command, CreateRun
from executor.commands.state import RUN_TERMINAL
from executor.errors import ExecutorError
from executor.ledger.handler import Ledger
from executor.ledger.outcome import Outcome
from executor.schedules import store, ticker
from executor.schedules.model import Catchup, Schedule
from executor.storage.db import open_pool

if TYPE_CHECKING:
    from executor.transport.dispatch import Dispatcher


class StepView(BaseModel):
    model_config = ConfigDict(frozen=True)

    step_key: str
    status: str
    attempt: int
    max_attempts: int
    depends_on: list[str]
    output: Any = None
    error: Any = None
    updated_at: datetime


class RunView(BaseModel):
    model_config = ConfigDict(frozen=True)

    run_id: str
    workflow: str
    status: str
    concurrency_key: str | None
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
        self.ledger = Ledger(self.pool, lease_seconds=self.settings.lease_seconds)
        self._dispatcher: Dispatcher | None = None

    @property
    def dispatcher(self) -> Dispatcher:
        if self._dispatcher is None:
            from executor.transport.dispatch import Dispatcher

            self._dispatcher = Dispatcher(self.redis, self.settings, self.pool)
        return self._dispatcher

    def close(self) -> None:
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
        idempotency_key: str | None = None,
        run_id: str | None = None,
    ) -> str:
        """Create a run and hand it to the workers; returns its run id.

        With an `idempotency_key`, calling again returns the first call's run id instead of
        starting a second run. Raises ConcurrencyKeyTaken naming the run that holds the key.
        """
        run_id = run_id or uuid.uuid4().hex
        command = CreateRun(
            run_id=run_id,
            workflow=workflow,
            input=input,
            concurrency_key=concurrency_key,
            idempotency_key=idempotency_key or f"create_run:{run_id}",
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
        if getattr(command, "continue_on", None) is not None:
            # It promises to run the step it starts; only the worker running the chain can.
            raise ExecutorError("continue_on is for the worker that will run the started step")
        outcome = self.ledger.apply(command)
        if outcome.followups:
            self.dispatcher.push(outcome.followups)
        return outcome

    def submit(self, command: Command, *, queue: str = "default") -> str:
        """Enqueue the command for a worker to apply; returns the RQ job id."""
        return self.dispatcher.enqueue_command(command, queue)

    def get_run(self, run_id: str) -> RunView | None:
        with self.pool.connection() as conn:
            run = conn.execute(
                "SELECT * FROM executor.runs WHERE run_id = %s", (run_id,)
            ).fetchone()
            if run is None:
                return None
            steps = conn.execute(
                "SELECT step_key, status, attempt, max_attempts, depends_on, output, error, "
                "updated_at FROM executor.steps WHERE run_id = %s ORDER BY created_at, step_key",
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

    def wait(self, run_id: str, timeout: float = 60.0, *, poll: float = 0.05) -> RunView:
        """Block until the run is completed, failed or cancelled."""
        deadline = time.monotonic() + timeout
        delay = poll
        while True:
            view = self.get_run(run_id)
            if view is None:
                raise ExecutorError(f"no run {run_id}")
            if view.done:
                return view
            if time.monotonic() >= deadline:
                raise RunTimeout(f"run {run_id} is still {view.status} after {timeout:.0f}s")
            time.sleep(delay)
            delay = min(delay * 1.5, 1.0)

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
