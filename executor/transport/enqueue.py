"""RQ's unique enqueue for many jobs in one round trip.

RQ enqueues one job at a time: `Queue.enqueue_job(job, unique=True)` sends the queue's
registration (a SADD in a MULTI) and then RQ's unique-enqueue script, two round trips a job.
A step that fans out to 1,000 steps pushes 1,000 jobs while its worker runs nothing else,
and the relay re-offers every row of a backlog it finds due. Both come through here: the
same script with the arguments RQ gives it, for every job, in one non-transactional
pipeline per CHUNK jobs. Each job stays atomic (the script is); the batch need not be, since
a job id enqueued twice is one job.

RQ has no public batch form of its unique enqueue (`enqueue_many` is not unique), so this
uses RQ's own pieces: `Queue._prepare_for_queue`, `rq.scripts._build_hset_args` and
`rq.scripts.get_unique_enqueue_script`, present in every RQ this project supports
(2.8, which brought unique enqueues, to 3.0). `tests/transport/test_enqueue.py` checks that a
job enqueued here is the hash RQ itself writes, so an RQ release that changes them fails
there first. Where they are missing, AVAILABLE is false and `enqueue` falls back to RQ's
one-at-a-time call.

The script is called by its digest (EVALSHA) rather than through redis-py's `Script`,
which would add a SCRIPT EXISTS round trip to every pipeline; a server that lost its
scripts (a restart, SCRIPT FLUSH) answers NOSCRIPT, and the chunk is sent again after
loading it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis
from redis.exceptions import NoScriptError
from rq import scripts as rq_scripts
from rq.exceptions import DuplicateJobError
from rq.job import Job
from rq.queue import Queue

AVAILABLE = (
    hasattr(rq_scripts, "get_unique_enqueue_script")
    and hasattr(rq_scripts, "_build_hset_args")
    and hasattr(Queue, "_prepare_for_queue")
)

CHUNK = 500
"""Jobs a pipeline: bounds the client's buffer and how long Redis serves one client."""


def enqueue(connection: redis.Redis, jobs: Sequence[tuple[Queue, Job]]) -> list[bool]:
    """Enqueue each job at the back of its queue unless its id exists; True where it was.

    Raises the first Redis error; chunks before the failing one are enqueued."""
    if not AVAILABLE:
        return [_one_at_a_time(queue, job) for queue, job in jobs]
    script = rq_scripts.get_unique_enqueue_script(connection)  # type: ignore[no-untyped-call]
    enqueued: list[bool] = []
    for start in range(0, len(jobs), CHUNK):
        chunk = jobs[start : start + CHUNK]
        answers = _send(connection, script.sha, chunk)
        if any(isinstance(a, NoScriptError) for a in answers):
            script.sha = connection.script_load(script.script)
            answers = _send(connection, script.sha, chunk)
        for answer in answers:
            if isinstance(answer, Exception):
                raise answer
        enqueued.extend(answer == 1 for answer in answers[len(answers) - len(chunk) :])
    return enqueued


def _send(connection: redis.Redis, sha: str, chunk: Sequence[tuple[Queue, Job]]) -> list[Any]:
    pipe = connection.pipeline(transaction=False)
    for key in dict.fromkeys(queue.key for queue, _ in chunk):
        pipe.sadd(Queue.redis_queues_keys, key)
    for queue, job in chunk:
        queue._prepare_for_queue(job)
        ttl = job.ttl if job.ttl is not None else -1
        fields = rq_scripts._build_hset_args(job)  # type: ignore[no-untyped-call]
        pipe.evalsha(sha, 2, job.key, queue.key, job.id, "R", ttl, *fields)
    answers: list[Any] = pipe.execute(raise_on_error=False)
    return answers


def _one_at_a_time(queue: Queue, job: Job) -> bool:
    try:
        queue.enqueue_job(job, unique=True)
    except DuplicateJobError:
        return False
    return True
