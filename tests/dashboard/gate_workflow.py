"""Workflows for the real-worker browser tests, imported by the worker through PYTHONPATH.

`open_gate` fails until the file named in the run's input exists: the operator fixes the
world, then retries the step from the dashboard. (The approval test uses `t_onboard`, from
tests/transport/workflows_for_tests.py.)
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
