"""Workflows for the real-worker browser tests, imported by the worker through PYTHONPATH.

`open_gate` fails until the file named in the run's input exists: the operator fixes the
world, then retries the step from the dashboard. `dash_onboard` waits for an approval the
operator gives from the run page.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from executor.workflows.definition import FatalError, StepContext, Workflow

gate = Workflow("dash_gate", max_attempts=1)


@gate.step
def prepare(ctx: StepContext) -> dict[str, Any]:
    return {"ready": True}


@gate.step(depends_on=[prepare])
def open_gate(ctx: StepContext) -> dict[str, Any]:
    path = Path(ctx.input["gate"])
    if not path.exists():
        raise FatalError(f"<script>alert(1)</script> gate closed: {path.name} is missing")
    return {"opened_on_attempt": ctx.attempt, "note": path.read_text()}


@gate.step(depends_on=[open_gate])
def finish(ctx: StepContext) -> dict[str, Any]:
    return {"done": True, "after": ctx.upstream["open_gate"]}


# Every durable wait in one run, for the approval test: a map, a timer, an approval, a child.
onboard = Workflow("dash_onboard", max_attempts=1)


@onboard.step
def accounts(ctx: StepContext) -> list[dict[str, Any]]:
    return [{"id": i} for i in range(int(ctx.input["n"]))]


@onboard.step(depends_on=[accounts], map_over=accounts)
def provision(ctx: StepContext) -> dict[str, Any]:
    return {"id": ctx.item["id"], "index": ctx.index}


cool_off = onboard.sleep("cool_off", seconds=0.2, depends_on=[provision])
approval = onboard.wait_for("approval", event="approved", timeout=600, depends_on=[cool_off])
invoice = onboard.child(
    "invoice",
    workflow="dash_invoice",
    input=lambda ctx: {"who": ctx.upstream["approval"]},
    depends_on=[approval],
)


@onboard.step(depends_on=[invoice, provision])
def welcome(ctx: StepContext) -> dict[str, Any]:
    return {"accounts": len(ctx.upstream["provision"]), "invoice": ctx.upstream["invoice"]}


billing = Workflow("dash_invoice", max_attempts=1)


@billing.step
def bill(ctx: StepContext) -> dict[str, Any]:
    return {"billed": ctx.input["who"]}
