"""Pushing committed follow-up commands from the outbox into RQ, at least once.

Every command becomes one RQ job calling `executor.transport.jobs.deliver` with the command
as its only argument, serialized as JSON. The job id is derived from the command's
idempotency key, and the enqueue is RQ's atomic unique enqueue, so pushing the same outbox
row twice (the handler's caller and the relay racing, the reaper re-pushing) leaves one job,
not two. Duplicates that still get through (a job re-pushed after it was lost) are harmless:
the ledger drops the second delivery of a key as `duplicate`.

A job id that already exists is left alone while RQ still has it queued, running or
finished; one that failed, was stopped or cancelled is replaced, because such a job never
applied its command (the ledger was unreachable, the worker died before the handler
committed), and the step it carries would otherwise wait for the failure TTL.

Commands due later (a retry's backoff) are not sent to Redis early: their outbox rows stay
in Postgres and the relay pushes them once due. RQ's scheduled jobs would need a scheduler
process beside the workers and would sit in Redis, where a flush loses them; the outbox
already has the row, durable, and the relay already runs every `sweep_interval`. The cost is
that a retry starts up to one sweep interval after its backoff ends.

Push failures (Redis down) are logged and leave the rows in the outbox for the relay; they
never raise into the caller, whose command has already committed.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import redis
from psycopg_pool import ConnectionPool
from rq.exceptions import DuplicateJobError
from rq.job import Job, JobStatus
from rq.queue import Queue

from executor.commands.models import Command, wire
from executor.ledger.outcome import OutboxItem
from executor.transport.serializer import JSONCommandSerializer
from queue_config import ExecutorSettings

log = logging.getLogger("executor.dispatch")

DELIVER = "executor.transport.jobs.deliver"
"""The one function our jobs name; the worker runs nothing else."""

Conn = psycopg.Connection[dict[str, Any]]
Pool = ConnectionPool[Conn]

# The handler's clock (Postgres now()) and ours may differ slightly; an item due within this
# margin is pushed now rather than parked for a whole sweep interval.
CLOCK_TOLERANCE = timedelta(milliseconds=50)

# RQ statuses meaning the job never applied its command, so a re-push must replace it.
_WAITING = frozenset({JobStatus.QUEUED.value, JobStatus.DEFERRED.value, JobStatus.SCHEDULED.value})
_DEAD = frozenset({JobStatus.FAILED.value, JobStatus.STOPPED.value, JobStatus.CANCELED.value})

_CONFIRM_PUSHED = """
DELETE FROM executor.outbox WHERE outbox_id IN (
    SELECT outbox_id FROM executor.outbox WHERE outbox_id = ANY(%s) FOR UPDATE SKIP LOCKED
)
"""


_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def job_id_for(idempotency_key: str) -> str:
    """RQ job id for a command key: readable, allowed by RQ (`[A-Za-z0-9_-]`), and injective.

    The readable part is lossy (every other character becomes `_`), so a digest of the whole
    key follows it.
    """
    digest = hashlib.sha256(idempotency_key.encode()).hexdigest()[:24]
    return f"{_UNSAFE.sub('_', idempotency_key)[:120]}-{digest}"


def describe(command: dict[str, Any]) -> str:
    """Short job description for RQ tooling (RQ's default repeats the whole argument)."""
    parts = [str(command.get("type")), str(command.get("run_id"))]
    if "step_key" in command:
        parts.append(f"{command.get('step_key')}#{command.get('attempt')}")
    return " ".join(parts)


class Dispatcher:
    """Turns outbox items and commands into RQ jobs; thread-safe (redis-py and the pool are).

    With a pool, `push` deletes the rows it pushed and looks up step timeouts; without one it
    only enqueues, and the relay later finds the jobs present and deletes the rows.
    """

    def __init__(
        self, redis: redis.Redis, settings: ExecutorSettings, pool: Pool | None = None
    ) -> None:
        self.redis = redis
        self.settings = settings
        self.pool = pool
        self._queues: dict[str, Queue] = {}

    # --- the handler's path ----------------------------------------------------------------

    def push(self, items: Sequence[OutboxItem]) -> None:
        """Enqueue the due items, then delete their outbox rows in one statement.

        Never raises for Redis or Postgres trouble: the rows stay and the relay retries.
        """
        if not items:
            return
        now = datetime.now(UTC)
        due = [i for i in items if _is_due(i, now)]
        if len(due) < len(items):
            log.debug("%d item(s) not yet due, left for the relay", len(items) - len(due))
        pushed = self.push_items(due)
        if pushed and self.pool is not None:
            try:
                with self.pool.connection() as conn:
                    conn.execute(_CONFIRM_PUSHED, (pushed,))
            except psycopg.Error as exc:
                log.warning(
                    "pushed %d job(s) but could not delete their outbox rows: %s", len(pushed), exc
                )

    def push_items(self, items: Sequence[OutboxItem]) -> list[int]:
        """Enqueue each item now (due or not); returns the outbox ids now safely in Redis.

        Stops at the first Redis error: the rest stay in the outbox for the relay.
        """
        pushed: list[int] = []
        for item in items:
            try:
                self.ensure_job(item.command, item.queue, step_timeout=item.timeout_seconds)
            except redis.RedisError as exc:
                log.warning(
                    "could not push %s (%s); %d item(s) left in the outbox for the relay",
                    item.idempotency_key,
                    exc,
                    len(items) - len(pushed),
                )
                break
            pushed.append(item.outbox_id)
        return pushed

    # --- commands from clients and the reaper ------------------------------------------------

    def enqueue_command(self, command: Command, queue: str | None = None) -> str:
        """Enqueue a command for a worker to apply (Client.submit); returns the RQ job id.

        Unlike `push`, Redis errors raise: nothing durable holds this command yet.
        """
        self.ensure_job(wire(command), queue or self.settings.default_queue)
        return job_id_for(command.idempotency_key)

    def ensure_job(
        self,
        command: dict[str, Any],
        queue: str,
        *,
        step_timeout: float | None = None,
        replace_started_after: float | None = None,
    ) -> str:
        """Make sure a live job carries `command`; returns "enqueued", "present" or "replaced".

        `replace_started_after` (seconds) also replaces a job RQ has held as started for that
        long: the reaper uses it for a step still `queued` in the ledger, whose start job
        would have moved it to `running` within milliseconds had its worker lived.
        """
        key = str(command["idempotency_key"])
        job_id = job_id_for(key)
        if self._try_enqueue(job_id, command, queue, step_timeout):
            return "enqueued"
        fields = self.redis.hmget(Job.key_for(job_id), ["status", "started_at"])
        status = _text(fields[0])
        if (
            status is None
            or status in _DEAD
            or (
                status == JobStatus.STARTED.value
                and replace_started_after is not None
                and _older_than(_text(fields[1]), replace_started_after)
            )
        ):
            self._delete_job(job_id)
            if self._try_enqueue(job_id, command, queue, step_timeout):
                log.info("replaced %s job %s for %s", status or "broken", job_id, key)
                return "replaced"
        return "present"

    def job_is_live(self, idempotency_key: str, *, started_within: float) -> bool:
        """Queued, or started less than `started_within` seconds ago (else its worker died)."""
        status, started_at = self.redis.hmget(
            Job.key_for(job_id_for(idempotency_key)), ["status", "started_at"]
        )
        state = _text(status)
        if state == JobStatus.STARTED.value:
            return not _older_than(_text(started_at), started_within)
        return state in _WAITING

    def job_state(self, idempotency_key: str) -> str | None:
        """RQ status of the job carrying this key, or None when Redis has no such job."""
        raw = self.redis.hget(Job.key_for(job_id_for(idempotency_key)), "status")
        return _text(raw)

    # --- internals ---------------------------------------------------------------------------

    def _queue(self, name: str) -> Queue:
        queue = self._queues.get(name)
        if queue is None:
            queue = Queue(name, connection=self.redis, serializer=JSONCommandSerializer)
            self._queues[name] = queue
        return queue

    def route(self, queue_name: str) -> str:
        """The queue a job really goes to: `default` means the configured default queue.

        Workflows and the handler say `default` without knowing the deployment's queue names;
        a deployment whose default queue is called something else must still get those jobs.
        """
        if queue_name == "default" and "default" not in self.settings.queue_names:
            return self.settings.default_queue
        return queue_name

    def _try_enqueue(
        self, job_id: str, command: dict[str, Any], queue_name: str, step_timeout: float | None
    ) -> bool:
        queue_name = self.route(queue_name)
        conf = self.settings.queue(queue_name)
        timeout = conf.job_timeout
        meta: dict[str, Any] = {"idempotency_key": command["idempotency_key"]}
        if step_timeout is not None:
            timeout = math.ceil(step_timeout + self.settings.step_timeout_grace_seconds)
            meta["step_timeout"] = step_timeout
        queue = self._queue(queue_name)
        job = queue.create_job(
            DELIVER,
            args=(command,),
            job_id=job_id,
            timeout=timeout,
            result_ttl=conf.result_ttl,
            failure_ttl=conf.failure_ttl,
            description=describe(command),
            meta=meta,
        )
        try:
            queue.enqueue_job(job, unique=True)
        except DuplicateJobError:
            return False
        return True

    def _delete_job(self, job_id: str) -> None:
        try:
            Job.fetch(job_id, connection=self.redis, serializer=JSONCommandSerializer).delete()
        except redis.RedisError:
            raise
        except Exception:  # a hash RQ cannot even load: remove it by key
            self.redis.delete(Job.key_for(job_id))


def _is_due(item: OutboxItem, now: datetime) -> bool:
    return item.not_before is None or item.not_before <= now + CLOCK_TOLERANCE


def _text(raw: bytes | str | None) -> str | None:
    """redis-py answers bytes or str depending on the client's decode_responses."""
    if not raw:
        return None
    return raw.decode() if isinstance(raw, bytes) else raw


def _older_than(raw: str | None, seconds: float) -> bool:
    if not raw:
        return True
    try:
        started = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        return True
    if started.tzinfo is None:
        started = started.replace(tzinfo=UTC)
    return datetime.now(UTC) - started > timedelta(seconds=seconds)
