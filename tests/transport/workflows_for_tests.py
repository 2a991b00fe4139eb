"""Test-only workflows and worker classes, imported by worker processes via PYTHONPATH.

`DuplicatingWorker` turns every push into two independent deliveries of the same command,
the way an at-least-once producer (a retried enqueue, a relay racing a caller) would.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from executor.commands.models import BackoffPolicy
from executor.ledger.outcome import OutboxItem
from executor.transport.dispatch import Dispatcher, job_id_for
from executor.transport.runtime import get_runtime
from executor.transport.worker import ExecutorWorker
from executor.workflows.definition import FatalError, StepContext, Workflow

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
    def push_items(self, items: Sequence[OutboxItem]) -> list[int]:
        pushed = super().push_items(items)
        for item in items:
            again = job_id_for(item.idempotency_key) + "-again"
            self._try_enqueue(again, item.command, item.queue, item.timeout_seconds)
        return pushed


class DuplicatingWorker(ExecutorWorker):
    def bootstrap(self, *args: Any, **kwargs: Any) -> None:
        super().bootstrap(*args, **kwargs)
        runtime = get_runtime()
        runtime.dispatcher = DuplicatingDispatcher(runtime.redis, runtime.settings, runtime.pool)
        runtime.runner.push = runtime.dispatcher.push


# Every durable wait in one workflow: a map, a timer, an approval, a child run, a join.
onboard = Workflow("t_onboard", max_attempts=2, backoff=BackoffPolicy(initial=0))


@onboard.step
def accounts(ctx: StepContext) -> list[dict[str, Any]]:
    return [{"id": i} for i in range(int(ctx.input["n"]))]


@onboard.step(depends_on=[accounts], map_over=accounts)
def provision(ctx: StepContext) -> dict[str, Any]:
    return {"id": ctx.item["id"], "index": ctx.index}


cool_off = onboard.sleep("cool_off", seconds=0.5, depends_on=[provision])
approval = onboard.wait_for("approval", event="approved", timeout=120, depends_on=[cool_off])
invoice = onboard.child(
    "invoice",
    workflow="t_invoice",
    input=lambda ctx: {"who": ctx.upstream["approval"]},
    depends_on=[approval],
)


@onboard.step(depends_on=[invoice, provision])
def welcome(ctx: StepContext) -> dict[str, Any]:
    return {"accounts": len(ctx.upstream["provision"]), "invoice": ctx.upstream["invoice"]}


billing = Workflow("t_invoice", max_attempts=1)


@billing.step
def bill(ctx: StepContext) -> dict[str, Any]:
    if ctx.input["who"] == "nobody":
        raise FatalError("no one to bill")
    return {"billed": ctx.input["who"]}


# Sixty item steps under a workflow rate limit of 20 starts a second, across all workers.
limited = Workflow("t_limited", max_attempts=1, rate_limit="20/s")


@limited.step
def many(ctx: StepContext) -> list[int]:
    return list(range(int(ctx.input["n"])))


@limited.step(depends_on=[many], map_over=many)
def each(ctx: StepContext) -> int:
    return int(ctx.item)


# A durable timer and then a step: fires once, whatever happens to workers and Redis.
napper = Workflow("t_nap", max_attempts=1)
nap = napper.sleep("nap", seconds=3)


@napper.step(depends_on=[nap])
def woke(ctx: StepContext) -> dict[str, Any]:
    return {"woke": ctx.attempt}


# A map over a list of any length, and the sum of its items' outputs.
fan = Workflow("t_fan", max_attempts=1)


@fan.step
def numbers(ctx: StepContext) -> list[int]:
    return list(range(int(ctx.input["n"])))


@fan.step(depends_on=[numbers], map_over=numbers)
def square(ctx: StepContext) -> int:
    return int(ctx.item) ** 2


@fan.step(depends_on=[square])
def total(ctx: StepContext) -> dict[str, int]:
    return {"items": len(ctx.upstream["square"]), "sum": sum(ctx.upstream["square"])}


# One root, WIDE parallel steps, one join: WIDE + 2 steps in one run's graph.
WIDE = 10_000
wide = Workflow("t_wide", max_attempts=1)


@wide.step
def root(ctx: StepContext) -> int:
    return 1


def _branch(ctx: StepContext) -> int:
    return int(ctx.upstream["root"])


for _i in range(WIDE):
    wide.step(key=f"p{_i}", depends_on=["root"])(_branch)


@wide.step(depends_on=[f"p{i}" for i in range(WIDE)])
def join(ctx: StepContext) -> dict[str, int]:
    return {"branches": len(ctx.upstream), "sum": sum(ctx.upstream.values())}


# A gate nobody opens unless told: runs that stay alive until an event or a cancel.
gated = Workflow("t_gate", max_attempts=1)
gate = gated.wait_for("gate", event="open")


@gated.step(depends_on=[gate])
def through(ctx: StepContext) -> Any:
    return ctx.upstream["gate"]


# A parent whose child waits for an event nobody sends: cancel the parent mid-flight.
parent = Workflow("t_parent", max_attempts=1)
kid = parent.child("kid", workflow="t_gate", input={})


@parent.step(depends_on=[kid])
def after_kid(ctx: StepContext) -> Any:
    return ctx.upstream["kid"]


# A sleep until a time the step computes from its input, then a wait nobody answers: the
# wait's timeout fails the run (one attempt).
deadline = Workflow("t_deadline", max_attempts=1)
until = deadline.sleep(
    "until",
    until=lambda ctx: datetime.fromisoformat(str(ctx.input["until"])),
)
deadline.wait_for("reply", event="reply", timeout=0.5, depends_on=[until])
