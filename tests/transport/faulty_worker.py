"""A worker with a bug planted where it runs inside RQ's work loop, for the exit-status test.

Importable in worker processes through PYTHONPATH (tests/transport), like workflows_for_tests.
"""

from __future__ import annotations

from rq.job import Job
from rq.queue import Queue

from executor.transport.worker import ExecutorWorker, Rejection


class PlantedBug(RuntimeError):
    pass


class BuggyRejectWorker(ExecutorWorker):
    """Rejecting a job raises, as an unforeseen bug in our code or a library's would."""

    def reject_job(self, job: Job, queue: Queue, rejection: Rejection) -> None:
        raise PlantedBug(f"planted bug while rejecting {job.id}")
