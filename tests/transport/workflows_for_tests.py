"""Test-only workflows and worker classes, imported by worker processes via PYTHONPATH.

`DuplicatingWorker` turns every push into two independent deliveries of the same command,
the way an at-least-once producer (a retried enqueue, a relay racing a caller) would.
"""

from __future__ import annotations

import time
from typing import Any

from executor.commands.models import BackoffPolicy
from executor.transport.dispatch import Dispatcher, job_id_for
from executor.transport.runtime import get_runtime
from executor.transport.worker import ExecutorWorker
from executor.workflows.definition import StepContext, Workflow

timed = Workflow("t_timed", max_attempts=1, backoff=BackoffPolicy(initial=0))


@timed.step(timeout=1.0)
def overrun(ctx: StepContext) -> None:
    """Ignores its 1 s timeout and swallows every Exception; the job timeout must still stop it."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            time.sleep(30)
        except Exception:  # the point: an ordinary timeout exception would die here
            continue


class DuplicatingDispatcher(Dispatcher):
    def ensure_job(self, command: dict[str, Any], queue: str, **kwargs: Any) -> str:
        result = super().ensure_job(command, queue, **kwargs)
        again = job_id_for(str(command["idempotency_key"])) + "-again"
        self._try_enqueue(again, command, queue, kwargs.get("step_timeout"))
        return result


class DuplicatingWorker(ExecutorWorker):
    def bootstrap(self, *args: Any, **kwargs: Any) -> None:
        super().bootstrap(*args, **kwargs)
        runtime = get_runtime()
        runtime.dispatcher = DuplicatingDispatcher(runtime.redis, runtime.settings, runtime.pool)
        runtime.runner.push = runtime.dispatcher.push
