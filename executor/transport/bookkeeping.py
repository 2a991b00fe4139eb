"""RQ's bookkeeping for a job of ours, with the round trips that change nothing left out.

`LeanBookkeeping` is mixed into both executor worker classes, before RQ's. Each of its
overrides falls back to RQ's own code for anything but the case it was written for.

Success, in one round trip
--------------------------

RQ's `handle_job_success` is written for every job RQ can hold: it WATCHes the job's
dependents and reads them, then deletes the job through `Job.delete`, which reads the job's
stored status and, twice, its executions (each one a hash of its own) before it removes
them. For one of our jobs that was five to seven round trips, 1.3 ms of a worker's time and
0.7 ms of its CPU (timed inside the workers during `executor bench --peers`).

Our jobs are simpler than RQ's general case. Only the executor enqueues them, and it never
uses `depends_on`, repeats, groups or RQ rate limits. `result_ttl` is 0, and a job has
exactly the one execution this worker created. So the writes RQ would make are known
without reading anything, and we send them as one MULTI/EXEC:
- the worker's counters;
- the execution's removal (`cleanup_execution`, RQ's own);
- the job's hash with its dependents, dependencies and result keys, as `Job.delete` deletes
  them.
A job that is not plain in that sense goes through RQ's own path. Nor is a plain job's last
heartbeat sent once it has succeeded (`handle_execution_ended`): it would land in the hash
deleted one round trip later.

State
-----
A simple worker marks itself idle after each job and again as it starts to listen. A state
this process wrote last, outside a pipeline, is not written again.

`tests/transport/test_bookkeeping.py` runs a job through RQ's worker and through one with
these overrides, and compares the keyspace each leaves behind, key by key. That test fails
first if an RQ release changes what a job's life leaves in Redis.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rq.job import Job, JobStatus
from rq.queue import Queue
from rq.results import Result
from rq.utils import now

if TYPE_CHECKING:
    from rq.worker import BaseWorker

    _Base = BaseWorker
else:
    _Base = object


def plain(job: Job, default_result_ttl: int) -> bool:
    """Whether RQ's success handling would read nothing it does not already know.

    Dependents are not looked for: a worker of ours runs only the executor's own jobs
    (screened to `deliver`), and the executor enqueues none with `depends_on`."""
    return (
        job.get_result_ttl(default_result_ttl) == 0
        and not job.repeats_left
        and not job.group_id
        and not getattr(job, "has_rate_limit", False)
    )


def finish_plain(worker: Any, job: Job, execution: Any) -> None:
    """What `BaseWorker.handle_job_success` leaves in Redis for a plain job, sent at once."""
    with worker.connection.pipeline() as pipe:  # MULTI/EXEC, as RQ's own
        assert job.ended_at is not None
        assert job.started_at is not None
        worker.increment_successful_job_count(pipeline=pipe)
        worker.increment_total_working_time(job.ended_at - job.started_at, pipe)
        worker.cleanup_execution(job, pipeline=pipe, execution=execution)
        pipe.delete(
            job.key,
            job.dependents_key,
            job.dependencies_key,
            Result.get_key(job.id),  # type: ignore[no-untyped-call]
            job.execution_registry.key,
        )
        pipe.execute()


class LeanBookkeeping(_Base):
    """The overrides; see the module docstring."""

    _state_written: str | None = None

    def set_state(self, state: str, pipeline: Any = None) -> None:
        """RQ's, without the second of two writes of the same state in a row: a simple
        worker marks itself idle after each job and again as it starts to listen, a round
        trip a job. A write in a pipeline always goes."""
        if pipeline is None and state == self._state_written:
            self._state = state
            return
        super().set_state(state, pipeline)
        self._state_written = state if pipeline is None else None

    def handle_execution_ended(self, job: Job, queue: Queue, heartbeat_ttl: int) -> None:
        """RQ's, but without the job's last heartbeat when the job has succeeded, is plain
        and has no success callback: the hash that beat would land in is deleted by the
        next round trip (`finish_plain`)."""
        if (
            job.get_status(refresh=False) != JobStatus.FAILED
            and not job.success_callback
            and plain(job, self.default_result_ttl)
        ):
            job.ended_at = now()
            return
        super().handle_execution_ended(job, queue, heartbeat_ttl)

    def handle_job_success(
        self,
        job: Job,
        queue: Queue,
        started_job_registry: Any,
        execution: Any = None,
        **kwargs: Any,
    ) -> None:
        """RQ's bookkeeping for a succeeded job, in one round trip for a plain job of ours
        (`finish_plain`); anything else goes through RQ's own."""
        if execution is not None and not kwargs and plain(job, self.default_result_ttl):
            finish_plain(self, job, execution)
            return
        super().handle_job_success(
            job=job,
            queue=queue,
            started_job_registry=started_job_registry,
            execution=execution,
            **kwargs,
        )
