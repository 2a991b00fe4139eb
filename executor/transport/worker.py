"""Our RQ worker: runs only `executor.transport.jobs.deliver`, screens every job before
running anything, keeps one Postgres pool open across jobs, and runs the recovery sweep.

Start it with `executor worker [QUEUE ...]` (`run_worker` below), or with RQ's own CLI:

    rq worker -w executor.transport.worker.ExecutorWorker -u "$EXECUTOR_REDIS_URL" \\
        --serializer executor.transport.serializer.JSONCommandSerializer high default low

Both read the same settings (`queue_config`: EXECUTOR_CONFIG and EXECUTOR_* variables) and
EXECUTOR_DATABASE_URL; with `rq worker` name the queues yourself, highest priority first.
The worker forces the JSON serializer whatever `--serializer` says, so a forgotten flag
cannot bring pickle back.

Which RQ base class
-------------------
`ExecutorWorker` extends `SimpleWorker` (jobs run in the worker process); the forking
variant `ExecutorForkingWorker` extends `Worker` (one child process per job, RQ's default)
and works the same. Measured with the `noop` sample workflow (a start_run job and four no-op
steps per run), local Postgres and Redis, on the project's shared 2-core machine while other
test suites ran (load average 4-7, so absolute numbers are noisy; the ratio held in every
round):

    2 workers, 150 runs, 3 rounds:      SimpleWorker 54-94 steps/s   forking Worker 12-24
    1 worker, --burst, 100 runs, 3 rds: SimpleWorker 58-65 jobs/s    forking Worker 14-19

A forked child cannot use its parent's Postgres connections, so every job in the forking
worker pays for a fork and for opening a connection before its first query; that, not the
step, is most of its time. The isolation a fork buys is not needed for correctness here: a
step that crashes or hangs its process loses its lease, and the reaper retries it as a new
attempt, the same as a SIGKILLed horse. Pick `fork` (EXECUTOR_WORKER_CLASS=fork) for step
code that leaks memory or must not share a process with the next step.

Malformed jobs
--------------
Before a job runs, `screen_job` checks, without unpickling or importing anything: the job
data is UTF-8 JSON (pickle bytes are recognised and refused by name), it is RQ's
`[function, instance, args, kwargs]` shape, the function is on the allow-list, and the one
argument is a valid command. A job failing any check is recorded in the ledger
(`record_invalid`, reason `invalid_payload`), logged, and deleted from Redis; no run or step
changes and the worker takes the next job. Deleting rather than failing the job keeps
hostile bytes out of RQ's failed registry, where a pickle-configured RQ tool might load
them; the ledger keeps the raw payload for inspection. A queue entry RQ cannot even load
(an id that is not UTF-8 or that RQ refuses, a hash without `data`, a corrupt status or
date; see `entries`) is treated the same way instead of stopping the worker or lingering in
Redis. If the ledger cannot be reached to record a rejection, the entry goes back on its
queue for a later attempt rather than vanishing unrecorded.

If RQ's work loop does die of an unexpected exception, `work` raises `WorkerDied` after
RQ's teardown, so `executor worker` and `rq worker -w ...` exit non-zero and a supervisor
that restarts failed processes restarts it (RQ itself logs the exception and returns
normally, which would exit 0).

The leader
----------
Each worker process runs a `Leader` thread (executor.recovery.leader): the one process that
holds a Postgres advisory lock fires due timers several times a second and runs the relay
and reaper every `sweep_interval`; the others stand by to take over when it dies.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, cast

import psycopg
import redis
from rq.exceptions import StopRequested
from rq.intermediate_queue import IntermediateQueue
from rq.job import Job
from rq.queue import Queue
from rq.utils import import_attribute
from rq.worker import BaseWorker, SimpleWorker, Worker

from executor.commands.models import COMMAND_TYPES
from executor.errors import ConfigurationError, ExecutorError, InvalidCommand
from executor.recovery.leader import Leader
from executor.transport import jobs
from executor.transport.bookkeeping import LeanBookkeeping
from executor.transport.dispatch import DELIVER
from executor.transport.entries import (
    MalformedEntry,
    ScreeningQueue,
    id_problem,
    job_key,
    printable,
)
from executor.transport.jobs import decode, decode_chain
from executor.transport.runtime import configure_runtime, get_runtime
from executor.transport.serializer import JSONCommandSerializer, RefusedPayload
from executor.transport.timeouts import StepDeathPenalty
from queue_config import ExecutorSettings, load_settings

log = logging.getLogger("executor.worker")

ALLOWED_FUNCTIONS = frozenset({DELIVER})

BEAT_AT_MOST_EVERY = 1.0
"""Seconds between RQ worker heartbeats sent on their own (see heartbeat)."""

SUSPENSION_ASKED_EVERY = 1.0
"""Seconds between asking Redis whether the workers are suspended (see check_for_suspension)."""

PUBSUB_WAKE_S = 0.5
"""Seconds between an idle pub/sub listener's wake-ups, which bound how long it takes to stop
it (see subscribe)."""


class WorkerDied(ExecutorError):
    """The worker's loop died of an unexpected exception (logged above); restart the worker."""


@dataclass(frozen=True)
class Rejection:
    """Why a job was refused, and what to record about it."""

    detail: str
    raw: str
    command_type: str | None = None


def screen_job(job: Job, allowed: frozenset[str] = ALLOWED_FUNCTIONS) -> Rejection | None:
    """Check a dequeued job without running, importing or unpickling anything."""
    data = job.data
    raw = printable(data)
    try:
        decoded = JSONCommandSerializer.loads(data)
    except RefusedPayload as exc:
        return Rejection(str(exc), raw)
    if not (isinstance(decoded, list) and len(decoded) == 4):
        return Rejection("job data is not RQ's [function, instance, args, kwargs] list", raw)
    func, instance, args, kwargs = decoded
    if func not in allowed:
        return Rejection(
            f"job names function {repr(func)[:200]}, which is not on the allow-list "
            f"({', '.join(sorted(allowed))}); nothing was run",
            raw,
        )
    if instance is not None:
        return Rejection("job names a method of an instance; only plain functions are run", raw)
    then = None
    if isinstance(args, list) and len(args) in (1, 2) and kwargs == {}:
        payload = args[0]
        then = args[1] if len(args) == 2 else None
    elif args == [] and isinstance(kwargs, dict) and list(kwargs) == ["command"]:
        payload = kwargs["command"]
    else:
        return Rejection(f"{DELIVER} takes the command and, optionally, a chain of starts", raw)
    kind = payload.get("type") if isinstance(payload, dict) else None
    try:
        decode_chain(decode(payload), then)
    except InvalidCommand as exc:
        return Rejection(str(exc), raw, kind if kind in COMMAND_TYPES else None)
    return None


if TYPE_CHECKING:
    _Base = BaseWorker
else:
    _Base = object


class _ExecutorWorkerMixin(LeanBookkeeping, _Base):
    """The behaviour both worker classes share; see the module docstring."""

    allowed_functions: ClassVar[frozenset[str]] = ALLOWED_FUNCTIONS
    death_penalty_class = StepDeathPenalty

    def __init__(
        self,
        queues: Any,
        *args: Any,
        settings: ExecutorSettings | None = None,
        database_url: str | None = None,
        **kwargs: Any,
    ) -> None:
        # Set before RQ's __init__, which already reads dequeue_timeout.
        self.executor_settings = settings
        self.database_url = database_url
        self.leader: Leader | None = None
        self._loop_depth = 0
        self._loop_error: Exception | None = None
        self._beaten_at = float("-inf")
        self._suspension_asked_at = float("-inf")
        kwargs["serializer"] = JSONCommandSerializer
        # Forced like the serializer: rq's CLI passes plain Queue objects (and its default
        # queue class), whose dequeue stops the worker on a malformed entry.
        queue_class = kwargs.get("queue_class")
        if not (isinstance(queue_class, type) and issubclass(queue_class, ScreeningQueue)):
            kwargs["queue_class"] = ScreeningQueue
        queues = [
            q.name if isinstance(q, Queue) and not isinstance(q, ScreeningQueue) else q
            for q in ([queues] if isinstance(queues, str | Queue) else queues)
        ]
        super().__init__(queues, *args, **kwargs)

    # --- start-up and the loop ---------------------------------------------------------------

    def bootstrap(self, *args: Any, **kwargs: Any) -> None:
        """Build the runtime (pool, ledger, workflows) before registering: fail fast on config."""
        if self.executor_settings is None:
            self.executor_settings = load_settings()
        runtime = configure_runtime(
            self.executor_settings, database_url=self.database_url, redis_client=self.connection
        )
        _ensure_logging()
        super().bootstrap(*args, **kwargs)
        self.leader = Leader(runtime, runtime.database_url)
        self.leader.start()

    def subscribe(self) -> None:
        """RQ's, with the listener waking every PUBSUB_WAKE_S instead of every 60 s.

        redis-py 8's `PubSubWorkerThread.stop()` joins its thread with no timeout, and RQ
        calls it on the way out after unsubscribing. A listener that read the unsubscribe
        reply before `stop()` cleared its flag then waits for a subscription for its whole
        `sleep_time`, and the worker took 60 s to exit after a SIGTERM (seen under load:
        exit tests timing out). Copied from RQ 3.0 but for that number; no hook takes it.
        """
        self.log.info("Worker %s: subscribing to channel %s", self.name, self.pubsub_channel_name)
        self.pubsub = self.connection.pubsub()
        self.pubsub.subscribe(**{self.pubsub_channel_name: self.handle_payload})
        self.pubsub_thread = self.pubsub.run_in_thread(  # type: ignore[assignment]  # RQ: None
            sleep_time=PUBSUB_WAKE_S, daemon=True, exception_handler=self._pubsub_exception_handler
        )

    def teardown(self) -> None:
        if self.leader is not None:
            self.leader.stop()
        super().teardown()  # type: ignore[no-untyped-call]

    def work(self, *args: Any, **kwargs: Any) -> bool:
        """RQ's work loop; raises WorkerDied if the loop died of an unexpected exception."""
        self._loop_error = None
        worked = bool(super().work(*args, **kwargs))
        error = self._loop_error
        if error is not None:
            raise WorkerDied(
                f"worker {self.name} stopped: its work loop died of {type(error).__name__}: {error}"
            ) from error
        return worked

    @contextmanager
    def _loop_step(self) -> Iterator[None]:
        """Note an exception escaping a step of RQ's loop body: the loop ends on it.

        Only the outermost step counts: RQ calls some of these from inside others (the
        heartbeat and maintenance from the dequeue) and retries Redis errors there.
        """
        self._loop_depth += 1
        try:
            yield
        except StopRequested:
            raise
        except Exception as exc:
            if self._loop_depth == 1:
                self._loop_error = exc
            raise
        finally:
            self._loop_depth -= 1

    def check_for_suspension(self, burst: bool) -> None:
        """RQ's, asked at most once a second. RQ asks Redis before every job whether an
        operator suspended the workers (`rq suspend`), a round trip a job; a suspension is
        now obeyed within a second, and while suspended the worker waits as RQ's does."""
        with self._loop_step():
            if time.monotonic() - self._suspension_asked_at < SUSPENSION_ASKED_EVERY:
                return
            super().check_for_suspension(burst)
            self._suspension_asked_at = time.monotonic()

    def heartbeat(self, timeout: int | None = None, pipeline: Any = None) -> None:
        """RQ's heartbeat, at most once a second when it would cost round trips of its own.

        RQ beats twice around every dequeue, three commands each, to push an expiry that is
        minutes away (worker_ttl + 60 s): a quarter of RQ's Redis round trips for a job of
        ours. A beat with its own timeout (a job's) or in a pipeline is always sent.
        """
        with self._loop_step():
            now = time.monotonic()
            if timeout is None and pipeline is None and now - self._beaten_at < BEAT_AT_MOST_EVERY:
                return
            super().heartbeat(timeout, pipeline)
            if timeout is None:
                self._beaten_at = now

    # --- screening ---------------------------------------------------------------------------

    def execute_job(self, job: Job, queue: Queue) -> None:
        with self._loop_step():
            rejection = screen_job(job, self.allowed_functions)
            if rejection is not None:
                self.reject_job(job, queue, rejection)
                return
            super().execute_job(job, queue)

    def reject_job(self, job: Job, queue: Queue, rejection: Rejection) -> None:
        """Record, log and delete a job that must not run; the worker carries on."""
        self._reject(
            queue.key, job.id.encode(), rejection.detail, rejection.raw, rejection.command_type
        )

    def dequeue_job_and_maintain_ttl(
        self, timeout: int | None, max_idle_time: int | None = None
    ) -> tuple[Job, Queue] | None:
        """RQ's dequeue, except that an entry RQ cannot load is rejected, not fatal."""
        with self._loop_step():
            while True:
                try:
                    return super().dequeue_job_and_maintain_ttl(timeout, max_idle_time)
                except MalformedEntry as entry:
                    self._reject_entry(entry)
                except redis.RedisError:
                    raise
                except Exception as exc:
                    # RQ attaches the id and queue to anything else that fails a fetch.
                    job_id = getattr(exc, "job_id", None)
                    queue = getattr(exc, "queue", None)
                    if not isinstance(job_id, str) or not isinstance(queue, Queue):
                        raise
                    detail = f"RQ cannot load the job hash: {exc!r}"
                    self._reject_entry(MalformedEntry(queue.key, job_id.encode(), detail))

    def _reject_entry(self, entry: MalformedEntry) -> None:
        fields = cast(dict[bytes, bytes], self.connection.hgetall(job_key(entry.raw_id)))
        raw = repr(
            {
                "job_id": entry.raw_id,
                "hash": {printable(k, 200): v[:2_000] for k, v in fields.items()},
            }
        )[:10_000]
        self._reject(entry.queue_key, entry.raw_id, entry.detail, raw, None)

    def _reject(
        self, queue_key: str, raw_id: bytes, reason: str, raw: str, command_type: str | None
    ) -> None:
        """Record a rejected entry, then delete it; if the ledger is unreachable, requeue it.

        Deleting an entry whose record failed would lose the only evidence of it. Any fault
        other than an unreachable database would fail the same way again, so it is logged
        and the entry deleted.
        """
        name = queue_key.removeprefix(Queue.redis_queue_namespace_prefix)
        detail = f"job {printable(raw_id, 500)} on queue {name}: {reason}"[:2000]
        self.log.warning("Worker %s: rejected %s", self.name, detail)
        requeue = False
        try:
            get_runtime().ledger.record_invalid(raw, detail, command_type=command_type)
        except psycopg.OperationalError:
            self.log.exception("Worker %s: could not record the rejection; requeued", self.name)
            requeue = True
        except Exception:
            self.log.exception("Worker %s: could not record the rejection", self.name)
        pipe: Any = self.connection.pipeline()  # its hints say str; ids here are raw bytes
        with pipe:
            pipe.lrem(IntermediateQueue.get_intermediate_queue_key(queue_key), 0, raw_id)
            pipe.lrem(queue_key, 0, raw_id)
            if requeue:
                pipe.rpush(queue_key, raw_id)
            else:
                pipe.delete(job_key(raw_id))
            pipe.execute()

    def _reject_stuck_entries(self) -> None:
        """Reject ids in our intermediate queues that RQ's maintenance would fail on.

        An entry is left there when a worker moves it off a single queue and dies before
        screening it (or crashed on it, as RQ does on its own). Removing it first makes one
        worker the owner, so two workers never record it twice.
        """
        for queue in self.queues:
            key = queue.intermediate_queue_key
            stuck = cast(list[bytes], self.connection.lrange(key, 0, -1))
            for raw_id in stuck:
                problem = id_problem(raw_id)
                if problem is None:
                    continue
                if self.connection.lrem(key, 1, raw_id):  # type: ignore[arg-type]
                    self._reject_entry(MalformedEntry(queue.key, raw_id, problem))

    def run_maintenance_tasks(self) -> None:
        with self._loop_step():
            self._reject_stuck_entries()
            super().run_maintenance_tasks()  # type: ignore[no-untyped-call]


class ExecutorWorker(_ExecutorWorkerMixin, SimpleWorker):
    """The default: jobs run in the worker process, the pool stays open across them."""


class ExecutorForkingWorker(_ExecutorWorkerMixin, Worker):
    """RQ's forking worker with our screening and sweep; each job runs in a fresh child.

    Its jobs do not run dependants in place (see jobs.CONTINUE_IN_PLACE).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        jobs.CONTINUE_IN_PLACE = False


WORKER_CLASSES: dict[str, type[_ExecutorWorkerMixin]] = {
    "simple": ExecutorWorker,
    "fork": ExecutorForkingWorker,
}


def resolve_worker_class(choice: str | type[BaseWorker]) -> type[_ExecutorWorkerMixin]:
    """Accepts "simple", "fork", a dotted path or a class, as long as it is one of ours.

    Any other RQ worker would run jobs without screening them, so it is refused.
    """
    cls: Any = choice
    if isinstance(choice, str):
        cls = WORKER_CLASSES.get(choice) or import_attribute(choice)
    if not (isinstance(cls, type) and issubclass(cls, _ExecutorWorkerMixin)):
        raise ConfigurationError(
            f"worker class {choice!r} is not an executor worker; use simple, fork, or a "
            "subclass of executor.transport.worker.ExecutorWorker"
        )
    return cls


def run_worker(
    settings: ExecutorSettings,
    queues: Sequence[str] | None = None,
    burst: bool = False,
    worker_class: str | type[BaseWorker] | None = None,
) -> None:
    """Run a worker on `queues` (default: every configured queue, by priority) until stopped."""
    from executor.config import resolve_urls

    cls = resolve_worker_class(worker_class or settings.worker_class)
    database_url, redis_url = resolve_urls()
    connection: redis.Redis = redis.Redis.from_url(redis_url)
    worker = cls(
        list(queues or settings.queue_names),
        connection=connection,
        settings=settings,
        database_url=database_url,
    )
    worker.work(burst=burst)


def _ensure_logging() -> None:
    """Make `executor.*` logs visible next to RQ's when nothing else configured logging."""
    root = logging.getLogger()
    ours = logging.getLogger("executor")
    if root.handlers or ours.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    ours.addHandler(handler)
    ours.setLevel(logging.INFO)
