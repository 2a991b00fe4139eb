"""Queue entries RQ cannot turn into a job, caught where RQ 3.0 reads them.

RQ's dequeue trusts what it pops. Three kinds of entry break that trust, and none of them
reached our job screening (`worker.screen_job`) because none of them becomes a `Job`:

- a job id that is not UTF-8: `Queue.dequeue_any` decodes the popped id strictly
  (`rq.utils.as_text`), the UnicodeDecodeError escapes the work loop, and RQ logs "found an
  unhandled exception, quitting" and returns normally, so the process exits 0;
- a job id RQ's `validate_job_id` refuses (a NUL, a space): `Job.fetch` raises ValueError;
- a job hash without `data`: `Job.restore` raises NoSuchJobError and
  `Queue._fetch_dequeued_job` skips the entry as if the job had been deleted, leaving the
  hash in Redis, still `queued`.

`ScreeningQueue` turns each into a `MalformedEntry` carrying the raw id, so the worker can
record it, remove it and take the next job. The checks reuse RQ's own rules
(`parse_job_id`, `validate_job_id`) so an id is refused here exactly when RQ would fail on it.
The same check screens intermediate queues before RQ's maintenance walks them, because
`IntermediateQueue.cleanup` decodes and fetches every id there and fails the same way.
"""

from __future__ import annotations

from typing import Any, cast

import redis
from rq.job import Job, parse_job_id, validate_job_id
from rq.queue import Queue

from executor.errors import ExecutorError


class MalformedEntry(ExecutorError):
    """A queue entry was not a job RQ can load; nothing ran."""

    def __init__(self, queue_key: str, raw_id: bytes, detail: str) -> None:
        self.queue_key = queue_key
        self.raw_id = raw_id
        self.detail = detail
        super().__init__(f"job {printable(raw_id)} on {queue_key}: {detail}")


def printable(data: bytes, limit: int = 10_000) -> str:
    """Bytes as storable, visible text: invalid UTF-8 as \\xNN and NUL (which Postgres text
    refuses) as \\x00."""
    text = bytes(data[:limit]).decode("utf-8", errors="backslashreplace")
    return text.replace("\x00", "\\x00")


def job_key(raw_id: bytes) -> bytes:
    """The job hash key for a raw id, which need not be text."""
    return Job.redis_job_namespace_prefix.encode() + raw_id


def id_problem(raw_id: bytes | str) -> str | None:
    """Why RQ cannot fetch a job by this id, or None if it can try."""
    if isinstance(raw_id, bytes):
        try:
            text = raw_id.decode("utf-8")
        except UnicodeDecodeError as exc:
            return f"the job id is not valid UTF-8 ({exc.reason} at byte {exc.start})"
    else:
        text = raw_id
    try:
        validate_job_id(parse_job_id(text))
    except ValueError as exc:
        return f"RQ refuses the job id: {exc}"
    return None


def hash_problem(fields: dict[bytes, bytes]) -> str:
    """Why RQ skipped an entry whose job hash exists (`fields` is never empty here)."""
    if b"data" not in fields:
        names = ", ".join(sorted(printable(k, 100) for k in fields))[:500]
        return f"the job hash has no `data` field (fields: {names}); it is not a job RQ wrote"
    return "RQ skipped the entry although its job hash exists"


def _screen_popped(result: Any) -> Any:
    if result is None:
        return None
    queue_key, raw_id = result
    queue_key = queue_key.decode() if isinstance(queue_key, bytes) else queue_key
    problem = id_problem(raw_id)
    if problem is not None:
        raw = raw_id if isinstance(raw_id, bytes) else raw_id.encode("utf-8", "surrogateescape")
        raise MalformedEntry(queue_key, raw, problem)
    return result


class ScreeningQueue(Queue):
    """RQ's Queue whose dequeue raises MalformedEntry instead of failing or skipping silently.

    `lpop` / `lmove` are where RQ's dequeue pops an id (with several queues / one);
    `_fetch_dequeued_job` is where it skips an entry whose hash it cannot restore. The last
    is private to RQ: if a later RQ renames it, the "hash without data" worker test fails.
    """

    @classmethod
    def lpop(cls, queue_keys: Any, timeout: int | None, connection: Any = None) -> Any:
        return _screen_popped(super().lpop(queue_keys, timeout, connection=connection))

    @classmethod
    def lmove(cls, connection: Any, queue_key: str, timeout: int | None) -> Any:
        return _screen_popped(super().lmove(connection, queue_key, timeout))

    @classmethod
    def _fetch_dequeued_job(
        cls,
        connection: redis.Redis,
        queue_key: str,
        job_id: str,
        job_class: type[Job] | None = None,
        serializer: Any = None,
        death_penalty_class: Any = None,
    ) -> tuple[Job, Queue] | None:
        found = super()._fetch_dequeued_job(
            connection, queue_key, job_id, job_class, serializer, death_penalty_class
        )
        if found is None:
            raw_id = job_id.encode()
            fields = cast(dict[bytes, bytes], connection.hgetall(job_key(raw_id)))
            if fields:
                raise MalformedEntry(queue_key, raw_id, hash_problem(fields))
        return found
