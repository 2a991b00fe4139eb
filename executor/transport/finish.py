"""RQ's bookkeeping after a job of ours succeeded, in one round trip.

RQ's `handle_job_success` is written for every job RQ can hold: it WATCHes the job's
dependents and reads them, then deletes the job through `Job.delete`, which reads the job's
stored status and, twice, its executions (each one a hash of its own) before it removes
them. For one of our jobs that is five to seven round trips and about 0.7 ms of a worker's
CPU, more than a fifth of a step in place (measured in `executor bench --peers`).

Our jobs are simpler than RQ's general case. Only the executor enqueues them, and it never
uses `depends_on`, repeats, groups or RQ rate limits. `result_ttl` is 0, and a job has
exactly the one execution this worker created. So the writes RQ would make are known
without reading anything, and we send them as one MULTI/EXEC:
- the worker's counters;
- the execution's removal (`cleanup_execution`, RQ's own);
- the job's hash with its dependents, dependencies and result keys, as `Job.delete` deletes
  them.
A job that is not plain in that sense goes through RQ's own path.
`tests/transport/test_finish.py` compares the keyspace left behind with RQ's, key by key.
That test fails first if an RQ release changes what success leaves behind.
"""

from __future__ import annotations

from typing import Any

from rq.job import Job
from rq.results import Result


def plain(job: Job, default_result_ttl: int) -> bool:
    """Whether RQ's success handling would read nothing it does not already know."""
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
