"""A workflow only some workers know: imported by name in the tests that need it."""

from __future__ import annotations

from executor.workflows.definition import StepContext, Workflow

late = Workflow("t_late", max_attempts=1)


@late.step
def hello(ctx: StepContext) -> str:
    return f"hello {ctx.input['who']}"
