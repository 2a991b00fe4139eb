"""Queues and workers as RQ records them in Redis, read without changing anything.

Registry counts are read with `cleanup=False` (RQ's default cleanup moves jobs between
registries, which a monitoring page must not do), and job payloads are never deserialized:
a worker's current job is shown by id and the plain-text `description` field of its hash.
Redis is transport only, so when it is down the page says so and everything else works.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from redis import Redis
from redis.exceptions import RedisError
from rq import Queue, Worker
from rq.job import Job

from executor.dashboard.models import QueueInfo, TransportSnapshot, WorkerInfo

log = logging.getLogger("executor.dashboard")


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def snapshot(
    redis: Redis | None,
    *,
    configured: Sequence[str] = (),
    now: datetime | None = None,
) -> TransportSnapshot:
    """Every queue RQ knows (plus the configured ones, even before their first job), its
    registries, and every live worker with its current job."""
    if redis is None:
        return TransportSnapshot(ok=False, error="no Redis connection configured")
    now = now or datetime.now(UTC)
    try:
        queues = [
            QueueInfo(
                name=q.name,
                queued=q.count,
                started=q.started_job_registry.get_job_count(cleanup=False),
                failed=q.failed_job_registry.get_job_count(cleanup=False),
                scheduled=q.scheduled_job_registry.get_job_count(cleanup=False),
                deferred=q.deferred_job_registry.get_job_count(cleanup=False),
                finished=q.finished_job_registry.get_job_count(cleanup=False),
            )
            for q in _queues(redis, configured)
        ]
        workers = [_worker(w, redis, now) for w in Worker.all(connection=redis)]
    except (RedisError, OSError) as exc:
        log.warning("Redis unavailable for the dashboard: %s", exc)
        return TransportSnapshot(ok=False, error=f"{type(exc).__name__}: {exc}")
    workers.sort(key=lambda w: w.name)
    return TransportSnapshot(ok=True, queues=queues, workers=workers)


def _queues(redis: Redis, configured: Sequence[str]) -> list[Queue]:
    known = {q.name: q for q in Queue.all(connection=redis)}
    for name in configured:
        known.setdefault(name, Queue(name, connection=redis))
    return [known[name] for name in sorted(known)]


def _worker(worker: Any, redis: Redis, now: datetime) -> WorkerInfo:
    job_id = worker.get_current_job_id()
    description = None
    if job_id:
        description = _text(redis.hget(Job.key_for(job_id), "description"))
    heartbeat: datetime | None = worker.last_heartbeat
    if heartbeat is not None and heartbeat.tzinfo is None:
        heartbeat = heartbeat.replace(tzinfo=UTC)
    birth: datetime | None = worker.birth_date
    if birth is not None and birth.tzinfo is None:
        birth = birth.replace(tzinfo=UTC)
    return WorkerInfo(
        name=str(worker.name),
        state=str(worker.get_state()),
        queues=list(worker.queue_names()),
        hostname=_text(worker.hostname),
        pid=worker.pid,
        current_job_id=job_id,
        current_job=description,
        last_heartbeat=heartbeat,
        heartbeat_age_seconds=(now - heartbeat).total_seconds() if heartbeat else None,
        birth_date=birth,
        successful_jobs=int(worker.successful_job_count or 0),
        failed_jobs=int(worker.failed_job_count or 0),
    )
