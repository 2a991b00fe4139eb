"""The RQ peer, run by an interpreter with RQ 2.x: its jobs, its workers and its producer.

Standalone on purpose (only rq, redis and the standard library): it runs in the virtualenv
`benchmarks.peers.rq_peer` makes, where this project is not installed. Its workers import
the job functions below as `rq_driver.<name>`, with this file's folder on PYTHONPATH.

    python rq_driver.py REDIS_URL --runs 300 --workers 2 --timeout 600

Prints one JSON object: elapsed seconds, each run's latency (RQ's own created_at of `first`
to ended_at of `last`), the RQ version, and how many runs were left unfinished.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any


def first(run_id: str) -> None:
    return None


def left(run_id: str) -> None:
    return None


def right(run_id: str) -> None:
    return None


def last(run_id: str) -> None:
    return None


def main(argv: list[str] | None = None) -> int:
    import rq
    from redis import Redis
    from rq import Queue, Worker
    from rq.job import Job
    from rq.serializers import JSONSerializer

    parser = argparse.ArgumentParser()
    parser.add_argument("redis_url")
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args(argv)

    redis = Redis.from_url(args.redis_url)
    queue = Queue("bench", connection=redis, serializer=JSONSerializer)
    here = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "PYTHONPATH": here}
    command = [
        sys.executable,
        "-m",
        "rq.cli",
        "worker",
        "-w",
        "rq.worker.SimpleWorker",
        "-u",
        args.redis_url,
        "-S",
        "rq.serializers.JSONSerializer",
        "-q",
        "bench",
    ]
    procs = [
        subprocess.Popen(command, env=env, stdout=sys.stderr, stderr=sys.stderr)
        for _ in range(args.workers)
    ]
    out: dict[str, Any] = {"rq_version": rq.__version__}
    try:
        deadline = time.monotonic() + 60
        while len(Worker.all(connection=redis)) < args.workers:
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                raise SystemExit("RQ workers did not come up")
            time.sleep(0.05)
        started = time.monotonic()
        runs = []
        for i in range(args.runs):
            run_id = f"run-{i}"
            a = queue.enqueue("rq_driver.first", run_id)
            b = queue.enqueue("rq_driver.left", run_id, depends_on=a)
            c = queue.enqueue("rq_driver.right", run_id, depends_on=a)
            d = queue.enqueue("rq_driver.last", run_id, depends_on=[b, c])
            runs.append((a.id, d.id))
        last_ids = [d for _, d in runs]
        deadline = started + args.timeout
        finished = 0
        while True:
            pipe = redis.pipeline(transaction=False)
            for job_id in last_ids:
                pipe.hget(Job.key_for(job_id), "status")
            statuses = pipe.execute()
            finished = sum(s == b"finished" for s in statuses)
            if finished == len(last_ids) or time.monotonic() > deadline:
                break
            time.sleep(0.05)  # as often as every other system's batch is polled
        out["elapsed_s"] = time.monotonic() - started
        out["unfinished"] = len(last_ids) - finished
        latencies = []
        for a_id, d_id in runs:
            a_job, d_job = Job.fetch_many([a_id, d_id], connection=redis, serializer=JSONSerializer)
            if a_job and d_job and a_job.created_at and d_job.ended_at:
                latencies.append((d_job.ended_at - a_job.created_at).total_seconds())
        out["latencies_s"] = latencies
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                # RQ's worker with redis-py 8 may wait out its pub/sub listener's 60 s on
                # the way out (executor/transport/worker.py, subscribe); the round is over.
                p.kill()
                p.wait()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
