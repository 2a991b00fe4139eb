"""Workflows shipped for the demo, the benchmark and tests.

`order` has parallel branches and a join, and a flaky step whose failure rate comes from the
run's input, so the demo shows retries without any hidden switch.
"""

from __future__ import annotations

import random
from typing import Any

from executor.commands.models import BackoffPolicy
from executor.workflows.definition import FatalError, StepContext, Workflow

order = Workflow("order", max_attempts=4, backoff=BackoffPolicy(initial=0.05, cap=0.5))


@order.step
def validate(ctx: StepContext) -> dict[str, Any]:
    data = ctx.input if isinstance(ctx.input, dict) else {}
    if data.get("items", 1) <= 0:
        raise FatalError("an order needs at least one item")
    return {"order_id": data.get("order_id", ctx.run_id), "items": data.get("items", 1)}


@order.step(depends_on=[validate])
def reserve_stock(ctx: StepContext) -> dict[str, Any]:
    return {"reserved": ctx.upstream["validate"]["items"]}


@order.step(depends_on=[validate], max_attempts=5)
def charge_card(ctx: StepContext) -> dict[str, Any]:
    data = ctx.input if isinstance(ctx.input, dict) else {}
    if random.random() < float(data.get("flake", 0.0)):
        raise ConnectionError(f"payment gateway timed out (attempt {ctx.attempt})")
    return {"charged": True, "attempt": ctx.attempt}


@order.step(depends_on=[reserve_stock, charge_card])
def ship(ctx: StepContext) -> dict[str, Any]:
    return {
        "shipped": ctx.upstream["reserve_stock"]["reserved"],
        "paid_on_attempt": ctx.upstream["charge_card"]["attempt"],
    }


noop = Workflow("noop", max_attempts=1)


@noop.step
def first(ctx: StepContext) -> None:
    return None


@noop.step(depends_on=[first])
def left(ctx: StepContext) -> None:
    return None


@noop.step(depends_on=[first])
def right(ctx: StepContext) -> None:
    return None


@noop.step(depends_on=[left, right])
def last(ctx: StepContext) -> None:
    return None


sleepy = Workflow("sleepy", max_attempts=3, backoff=BackoffPolicy(initial=0.05, cap=0.2))


@sleepy.step
def nap(ctx: StepContext) -> dict[str, Any]:
    """Sleeps in small slices with heartbeats, so tests can kill a worker mid-step."""
    import time

    seconds = float(ctx.input.get("seconds", 1.0)) if isinstance(ctx.input, dict) else 1.0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        ctx.heartbeat()
        time.sleep(0.05)
    return {"slept": seconds, "attempt": ctx.attempt}


# Every durable primitive in one workflow: a map over a list, a durable timer, an approval
# sent from outside, and a child run of another workflow.
onboard = Workflow("onboard", max_attempts=3, backoff=BackoffPolicy(initial=0.05, cap=0.5))


@onboard.step
def accounts(ctx: StepContext) -> list[dict[str, Any]]:
    count = int(ctx.input.get("accounts", 3)) if isinstance(ctx.input, dict) else 3
    return [{"id": f"acct-{i}"} for i in range(count)]


@onboard.step(depends_on=[accounts], map_over=accounts)
def provision(ctx: StepContext) -> dict[str, Any]:
    """One item step per account: `ctx.item` is the element, `ctx.index` its place."""
    return {"id": ctx.item["id"], "index": ctx.index}


cool_off = onboard.sleep("cool_off", seconds=1, depends_on=[provision])
approval = onboard.wait_for("approval", event="approved", timeout=86_400, depends_on=[cool_off])
invoice = onboard.child(
    "invoice",
    workflow="invoice",
    input=lambda ctx: {"who": ctx.upstream["approval"]},
    depends_on=[approval],
)

billing = Workflow("invoice", max_attempts=2)


@billing.step
def bill(ctx: StepContext) -> dict[str, Any]:
    return {"billed": ctx.input["who"]}
