"""Pushing committed follow-up commands from the outbox into RQ, at least once.

Every command becomes one RQ job calling `executor.transport.jobs.deliver` with the command
as its argument (and the chain of starts an item carries in `then`, if any), serialized as
JSON. The job id is derived from the command's
idempotency key, and the enqueue is RQ's atomic unique enqueue, so pushing the same outbox
row twice (the handler's caller and the relay racing, the reaper re-pushing) leaves one job,
not two. Duplicates that still get through (a job re-pushed after it was lost) are harmless:
the ledger drops the second delivery of a key as `duplicate`.

A job id that already exists is left alone while RQ still has it queued, running or
finished; one that failed, was stopped or cancelled is replaced, because such a job never
applied its command (the ledger was unreachable, the worker died before the handler
committed), and the step it carries would otherwise wait for the failure TTL.

Pushing never deletes an outbox row: the transaction that applies (or finally refuses) a
command deletes the row that carried it, so a row lives exactly as long as its command is
undecided, and the relay pushes it again whenever its `push_after` passes.

Commands due later (a retry's backoff) are not sent to Redis early. The process that wrote
them keeps them on a timer (`Later`) and pushes each at its time; if that process dies, the
relay pushes the row once `push_after` (due time + grace) passes. RQ's scheduled jobs would
need a scheduler beside the workers and live in Redis, where a flush loses them.

Push failures (Redis down) are logged and leave the rows to the relay; they never raise into
the caller, whose command has already committed.
"""

from __future__ import annotations

import hashlib
import heapq
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import redis
from psycopg_pool import ConnectionPool
from rq.job import Job, JobStatus
from rq.queue import Queue
from rq.worker import Worker

from executor.ledger.outcome import OutboxItem
from executor.transport.enqueue import enqueue
from executor.transport.serializer import JSONCommandSerializer
from queue_config import ExecutorSettings

log = logging.getLogger("executor.dispatch")

DELIVER = "executor.transport.jobs.deliver"
"""The one function our jobs name; the worker runs nothing else."""

Conn = psycopg.Connection[dict[str, Any]]
Pool = ConnectionPool[Conn]

# An item written for "now" carries the writing transaction's now(), which may lie a hair
# ahead of our clock; within this it is pushed at once rather than put on the timer.
CLOCK_TOLERANCE = timedelta(milliseconds=5)

# RQ statuses meaning the job never applied its command, so a re-push must replace it.
_DEAD = frozenset({JobStatus.FAILED.value, JobStatus.STOPPED.value, JobStatus.CANCELED.value})

SEARCHED_QUEUE_LENGTH = 1_000
"""A re-push looks for a queued job in its queue only while the queue is this short."""

BACKLOG_FRESH_SECONDS = 0.05
"""How long an answer of `Dispatcher.backlogged` is kept."""

WORKERS_FRESH_SECONDS = 5.0
"""How long an answer of `Dispatcher.workers_on` is kept."""

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
    """Turns outbox items into RQ jobs; thread-safe (redis-py is)."""

    def __init__(
        self, redis: redis.Redis, settings: ExecutorSettings, pool: Pool | None = None
    ) -> None:
        self.redis = redis
        self.settings = settings
        self.pool = pool
        self._queues: dict[str, Queue] = {}
        self._backlog: dict[str, tuple[float, bool]] = {}
        self._workers: dict[str, tuple[float, int]] = {}
        self.later = Later(self.push_items)

    def push(self, items: Sequence[OutboxItem]) -> None:
        """Enqueue the due items now and the others when they are due.

        Never raises for Redis trouble: the rows stay and the relay retries.
        """
        if not items:
            return
        now = datetime.now(UTC)
        due = []
        for item in items:
            if _is_due(item, now):
                due.append(item)
            else:
                self.later.add(item)
        if due:
            self.push_items(due)

    def push_items(self, items: Sequence[OutboxItem]) -> list[int]:
        """Enqueue each item now (due or not); returns the outbox ids now safely in Redis.

        All new jobs go in one round trip (`executor.transport.enqueue`); only the items
        whose job id exists already are looked at further, again a few round trips for all
        of them. On a Redis error the items not yet known to be in Redis stay in the
        outbox for the relay.
        """
        jobs = [
            self._job(
                job_id_for(item.idempotency_key),
                item.command,
                item.queue,
                item.timeout_seconds,
                item.then,
            )
            for item in items
        ]
        try:
            fresh = enqueue(self.redis, jobs)
        except redis.RedisError as exc:
            log.warning(
                "could not push %d item(s) (%s); left in the outbox for the relay", len(items), exc
            )
            return []
        pushed = [item.outbox_id for item, new in zip(items, fresh, strict=True) if new]
        taken = [item for item, new in zip(items, fresh, strict=True) if not new]
        if not taken:
            return pushed
        try:
            ids = [job_id_for(item.idempotency_key) for item in taken]
            stale = self._stale(ids, self.settings.outbox_grace_seconds)
            for item, job_id, replace in zip(taken, ids, stale, strict=True):
                if replace:
                    self._replace(job_id, item.command, item.queue, item.timeout_seconds, item.then)
                pushed.append(item.outbox_id)
        except redis.RedisError as exc:
            log.warning(
                "could not check %d existing job(s) (%s); left in the outbox for the relay",
                len(taken),
                exc,
            )
        return pushed

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
        long. Pushes come from outbox rows, and a row is gone once its command is decided, so
        a job started that long ago whose command is still undecided lost its worker.
        """
        job_id = job_id_for(str(command["idempotency_key"]))
        if self._try_enqueue(job_id, command, queue, step_timeout):
            return "enqueued"
        if self._stale([job_id], replace_started_after)[0]:
            return self._replace(job_id, command, queue, step_timeout)
        return "present"

    def backlogged(self, queue: str) -> bool:
        """Whether jobs wait on `queue`: every worker on it has work, none would take a new
        job at once. Errors count as not busy (the job is then pushed, the safe choice).

        Asked after every step, so the answer is kept for BACKLOG_FRESH_SECONDS: a queue
        that was busy 50 ms ago is as good a guess, without a round trip a step."""
        now = time.monotonic()
        seen = self._backlog.get(queue)
        if seen is not None and now - seen[0] < BACKLOG_FRESH_SECONDS:
            return seen[1]
        try:
            busy = bool(self.redis.llen(self._queue(self.route(queue)).key))
        except redis.RedisError:
            return False
        self._backlog[queue] = (now, busy)
        return busy

    def workers_on(self, queue: str) -> int:
        """How many workers listen on `queue` (at least 1), kept for WORKERS_FRESH_SECONDS:
        asked once a fan-out, to split it into a chain for each."""
        now = time.monotonic()
        seen = self._workers.get(queue)
        if seen is not None and now - seen[0] < WORKERS_FRESH_SECONDS:
            return seen[1]
        try:
            count = max(1, Worker.count(queue=self._queue(self.route(queue))))
        except redis.RedisError:
            return 1
        self._workers[queue] = (now, count)
        return count

    # --- internals ---------------------------------------------------------------------------

    def _stale(self, job_ids: Sequence[str], replace_started_after: float | None) -> list[bool]:
        """Which of these existing job ids carry a job that will never apply its command:
        gone, failed, or (with `replace_started_after`) started that long ago or queued on
        no queue. One round trip for all, plus the queue searches of `_off_queue`."""
        pipe = self.redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hmget(Job.key_for(job_id), ["status", "started_at", "origin"])
        stale, queued = [], []
        for i, fields in enumerate(pipe.execute()):
            status = _text(fields[0])
            stale.append(status is None or status in _DEAD)
            if stale[i] or replace_started_after is None:
                continue
            if status == JobStatus.STARTED.value:
                stale[i] = _older_than(_text(fields[1]), replace_started_after)
            elif status == JobStatus.QUEUED.value:
                queued.append((i, _text(fields[2])))
        off = self._off_queue([(job_ids[i], origin) for i, origin in queued])
        for (i, _), lost in zip(queued, off, strict=True):
            stale[i] = lost
        return stale

    def _off_queue(self, jobs: Sequence[tuple[str, str | None]]) -> list[bool]:
        """For (job id, origin queue) pairs of jobs RQ still calls queued: which are on no
        queue, because a worker took them off (into its intermediate queue) and died before
        marking them started.

        The relay asks this of every due row, and a backlog's rows all fall due while their
        jobs wait, so the question must not cost the queue's length: searching a queue of
        10,000 for each of its 10,000 jobs made one relay pass quadratic. The intermediate
        queue (as long as the workers on it) is searched always; the queue itself only while
        it is short. A lost job in a long queue is found once the queue drains below that,
        its row re-pushed on the relay's backoff meanwhile."""
        if not jobs:
            return []
        queues = {name: self._queue(name) for _, name in jobs if name is not None}
        pipe = self.redis.pipeline(transaction=False)
        for job_id, name in jobs:
            if name is not None:
                pipe.lpos(queues[name].intermediate_queue_key, job_id)
        for queue in queues.values():
            pipe.llen(queue.key)
        answers = iter(pipe.execute())
        lost = [name is None or next(answers) is not None for _, name in jobs]
        length = {name: int(next(answers)) for name in queues}
        search = [
            i
            for i, (_, name) in enumerate(jobs)
            if not lost[i] and name is not None and length[name] <= SEARCHED_QUEUE_LENGTH
        ]
        if search:
            pipe = self.redis.pipeline(transaction=False)
            for i in search:
                job_id, name = jobs[i]
                pipe.lpos(queues[str(name)].key, job_id)
            for i, position in zip(search, pipe.execute(), strict=True):
                lost[i] = position is None
        return lost

    def _replace(
        self,
        job_id: str,
        command: dict[str, Any],
        queue: str,
        step_timeout: float | None,
        then: Sequence[OutboxItem] = (),
    ) -> str:
        self._delete_job(job_id)
        if self._try_enqueue(job_id, command, queue, step_timeout, then):
            log.info("replaced job %s for %s", job_id, command["idempotency_key"])
            return "replaced"
        return "present"  # someone else enqueued it in between

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
        self,
        job_id: str,
        command: dict[str, Any],
        queue_name: str,
        step_timeout: float | None,
        then: Sequence[OutboxItem] = (),
    ) -> bool:
        return enqueue(self.redis, [self._job(job_id, command, queue_name, step_timeout, then)])[0]

    def _job(
        self,
        job_id: str,
        command: dict[str, Any],
        queue_name: str,
        step_timeout: float | None,
        then: Sequence[OutboxItem] = (),
    ) -> tuple[Queue, Job]:
        """The RQ job for a command: `deliver(command)`, or `deliver(command, chain)` with the
        commands of `then` for the same worker to run after it."""
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
            args=(command, [t.command for t in then]) if then else (command,),
            job_id=job_id,
            timeout=timeout,
            result_ttl=conf.result_ttl,
            failure_ttl=conf.failure_ttl,
            description=describe(command),
            meta=meta,
        )
        return queue, job

    def _delete_job(self, job_id: str) -> None:
        try:
            Job.fetch(job_id, connection=self.redis, serializer=JSONCommandSerializer).delete()
        except redis.RedisError:
            raise
        except Exception:  # a hash RQ cannot even load: remove it by key
            self.redis.delete(Job.key_for(job_id))


class Later:
    """Items due later, delivered at their time by one timer thread of this process.

    Only for precision: every item is an outbox row the relay pushes anyway once its
    `push_after` passes, so a process that dies with items here loses nothing. `deliver`,
    when set, takes an item instead of pushing it as a job (a retry's dispatch is applied
    here at once: one trip through Redis less between a failure and its next attempt).
    """

    def __init__(self, push: Callable[[Sequence[OutboxItem]], list[int]]) -> None:
        self._push = push
        self.deliver: Callable[[OutboxItem], None] | None = None
        self._heap: list[tuple[datetime, int, OutboxItem]] = []
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None

    def add(self, item: OutboxItem) -> None:
        assert item.not_before is not None
        with self._wake:
            heapq.heappush(self._heap, (item.not_before, item.outbox_id, item))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._loop, name="executor-later", daemon=True
                )
                self._thread.start()
            self._wake.notify()

    def pending(self) -> int:
        with self._wake:
            return len(self._heap)

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._heap:
                    self._wake.wait()
                due_at = self._heap[0][0]
                wait = (due_at - datetime.now(UTC)).total_seconds()
                if wait > 0:
                    self._wake.wait(wait)
                    continue
                _, _, item = heapq.heappop(self._heap)
            try:
                if self.deliver is not None:
                    self.deliver(item)
                else:
                    self._push([item])
            except Exception:  # the relay pushes the row later
                log.warning("could not push %s on time", item.idempotency_key, exc_info=True)


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
