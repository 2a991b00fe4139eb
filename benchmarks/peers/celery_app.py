"""The Celery peer: four tasks, run as chain(first, chord([left, right], last)).

BENCH_CELERY_URL=redis://... celery -A benchmarks.peers.celery_app worker -P solo ...
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from celery import Celery
from celery.signals import worker_ready

QUEUE = "bench"


def celery_url(url: str) -> str:
    """Kombu spells a unix-socket Redis `redis+socket://PATH?virtual_host=DB`."""
    parts = urlsplit(url)
    if parts.scheme != "unix":
        return url
    db = dict(parse_qsl(parts.query)).get("db", "0")
    return f"redis+socket://{parts.path}?virtual_host={db}"


def make_app(url: str) -> Celery:
    """One app per round: broker and result backend on the round's Redis db."""
    celery = Celery("bench", broker=celery_url(url), backend=celery_url(url))
    celery.conf.update(
        task_default_queue=QUEUE,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
    )
    for step in (first, left, right, last):
        celery.task(name=f"bench.{step.__name__}")(step)
    return celery


def first(run_id: str) -> None:
    return None


def left(run_id: str) -> None:
    return None


def right(run_id: str) -> None:
    return None


def last(run_id: str) -> None:
    return None


def workflow(celery: Celery, run_id: str) -> Any:
    from celery import chain, chord

    sig = {
        n: celery.signature(f"bench.{n}", args=(run_id,), immutable=True)
        for n in ("first", "left", "right", "last")
    }
    return chain(sig["first"], chord([sig["left"], sig["right"]], sig["last"]))


app = make_app(os.environ.get("BENCH_CELERY_URL", "redis://127.0.0.1:6379/0"))


@worker_ready.connect
def _ready(**_: Any) -> None:
    ready = os.environ.get("BENCH_READY_DIR")
    if ready:
        (Path(ready) / str(os.getpid())).touch()
