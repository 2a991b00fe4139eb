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
them; the ledger keeps the raw payload for inspection. A job hash RQ cannot even load (a
corrupt status or date) is treated the same way instead of stopping the worker.

The leader
----------
Each worker process runs a `Leader` thread (executor.recovery.leader): the one process that
holds a Postgres advisory lock fires due timers several times a second and runs the relay
and reaper every `sweep_interval`; the others stand by to take over when it dies.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import redis
from rq.job import Job
from rq.queue import Queue
from rq.utils import import_attribute
from rq.worker import BaseWorker, SimpleWorker, Worker

from executor.commands.models import COMMAND_TYPES
from executor.errors import ConfigurationError, InvalidCommand
from executor.recovery.leader import Leader
from executor.transport import jobs
from executor.transport.dispatch import DELIVER
from executor.transport.jobs import decode
from executor.transport.runtime import configure_runtime, get_runtime
from executor.transport.serializer import JSONCommandSerializer, RefusedPayload
from executor.transport.timeouts import StepDeathPenalty
from queue_config import ExecutorSettings, load_settings

log = logging.getLogger("executor.worker")

ALLOWED_FUNCTIONS = frozenset({DELIVER})


@dataclass(frozen=True)
class Rejection:
    """Why a job was refused, and what to record about it."""

    detail: str
    raw: str
    command_type: str | None = None


def screen_job(job: Job, allowed: frozenset[str] = ALLOWED_FUNCTIONS) -> Rejection | None:
    """Check a dequeued job without running, importing or unpickling anything."""
    data = job.data
    raw = _printable(data)
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
    if isinstance(args, list) and len(args) == 1 and kwargs == {}:
        payload = args[0]
    elif args == [] and isinstance(kwargs, dict) and list(kwargs) == ["command"]:
        payload = kwargs["command"]
    else:
        return Rejection(f"{DELIVER} takes exactly one argument, the command", raw)
    kind = payload.get("type") if isinstance(payload, dict) else None
    try:
        decode(payload)
    except InvalidCommand as exc:
        return Rejection(str(exc), raw, kind if kind in COMMAND_TYPES else None)
    return None


def _printable(data: bytes) -> str:
    """The payload as storable text: invalid UTF-8 and NUL (which Postgres text refuses) escaped."""
    text = bytes(data[:10_000]).decode("utf-8", errors="backslashreplace")
    return text.replace("\x00", "\\x00")


if TYPE_CHECKING:
    _Base = BaseWorker
else:
    _Base = object


class _ExecutorWorkerMixin(_Base):
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
        kwargs["serializer"] = JSONCommandSerializer
        super().__init__(queues, *args, **kwargs)

    # --- start-up ----------------------------------------------------------------------------

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

    def teardown(self) -> None:
        if self.leader is not None:
            self.leader.stop()
        super().teardown()  # type: ignore[no-untyped-call]

    # --- screening ---------------------------------------------------------------------------

    def execute_job(self, job: Job, queue: Queue) -> None:
        rejection = screen_job(job, self.allowed_functions)
        if rejection is not None:
            self.reject_job(job, queue, rejection)
            return
        super().execute_job(job, queue)

    def reject_job(self, job: Job, queue: Queue, rejection: Rejection) -> None:
        """Record, log and delete a job that must not run; the worker carries on."""
        detail = f"job {job.id} on queue {queue.name}: {rejection.detail}"[:2000]
        self.log.warning("Worker %s: rejected %s", self.name, detail)
        try:
            get_runtime().ledger.record_invalid(
                rejection.raw, detail, command_type=rejection.command_type
            )
        except Exception:
            self.log.exception(
                "Worker %s: could not record the rejection of job %s", self.name, job.id
            )
        _remove_job(self.connection, job.id, queue)

    def dequeue_job_and_maintain_ttl(
        self, timeout: int | None, max_idle_time: int | None = None
    ) -> tuple[Job, Queue] | None:
        """RQ's dequeue, except that a job hash RQ cannot load is rejected, not fatal."""
        while True:
            try:
                return super().dequeue_job_and_maintain_ttl(timeout, max_idle_time)
            except (redis.RedisError, KeyboardInterrupt, SystemExit):
                raise
            except Exception as exc:
                job_id = getattr(exc, "job_id", None)
                queue = getattr(exc, "queue", None)
                if not isinstance(job_id, str) or not isinstance(queue, Queue):
                    raise
                self._reject_unloadable(job_id, queue, exc)

    def _reject_unloadable(self, job_id: str, queue: Queue, exc: Exception) -> None:
        fields = self.connection.hgetall(Job.key_for(job_id))
        raw = repr({_decoded(k): v[:2_000] for k, v in fields.items()})[:10_000]
        detail = f"job {job_id} on queue {queue.name}: RQ cannot load the job hash: {exc!r}"
        detail = detail[:2000]
        self.log.warning("Worker %s: rejected %s", self.name, detail)
        try:
            get_runtime().ledger.record_invalid(raw, detail)
        except Exception:
            self.log.exception(
                "Worker %s: could not record the rejection of job %s", self.name, job_id
            )
        with self.connection.pipeline() as pipe:
            pipe.delete(Job.key_for(job_id))
            pipe.lrem(queue.key, 0, job_id)
            pipe.lrem(queue.intermediate_queue_key, 0, job_id)
            pipe.execute()


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


def _remove_job(connection: redis.Redis, job_id: str, queue: Queue) -> None:
    with connection.pipeline() as pipe:
        pipe.delete(Job.key_for(job_id))
        pipe.lrem(queue.key, 0, job_id)
        pipe.lrem(queue.intermediate_queue_key, 0, job_id)
        pipe.execute()


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


def _decoded(key: bytes | str) -> str:
    return key.decode(errors="replace") if isinstance(key, bytes) else key
