"""Workflows only the benchmarks run; bench workers import them via EXECUTOR_WORKFLOW_MODULES.

A workflow's graph is static, so each width gets its own: `bench_width_<W>` is
root -> W parallel no-op steps -> join. `bench_retry` fails its only step once and retries it
after a fixed 50 ms backoff, to time the gap between an attempt's end and the next start.
`bench_sleep` is one durable sleep, to time how late its timer fires.
"""

from __future__ import annotations

from executor.commands.models import BackoffPolicy
from executor.workflows.definition import StepContext, Workflow

WIDTHS = (10, 100, 400, 1000, 10_000)
RETRY_BACKOFF_S = 0.05
SLEEP_S = 0.2


def width_workflow_name(width: int) -> str:
    return f"bench_width_{width}"


def _noop(ctx: StepContext) -> None:
    return None


def _fan_out(width: int) -> Workflow:
    wf = Workflow(width_workflow_name(width), max_attempts=1)
    wf.step(key="root")(_noop)
    digits = len(str(width - 1))
    keys = [f"p{i:0{digits}d}" for i in range(width)]
    for key in keys:
        wf.step(key=key, depends_on=["root"])(_noop)
    wf.step(key="join", depends_on=keys)(_noop)
    return wf


width_workflows = {w: _fan_out(w) for w in WIDTHS}


retry = Workflow(
    "bench_retry",
    max_attempts=2,
    backoff=BackoffPolicy(
        initial=RETRY_BACKOFF_S, multiplier=1.0, cap=RETRY_BACKOFF_S, jitter=False
    ),
)


class FirstAttemptFails(Exception):
    """Raised by attempt 1 of `bench_retry` on purpose."""


@retry.step
def flaky(ctx: StepContext) -> dict[str, int]:
    if ctx.attempt == 1:
        raise FirstAttemptFails("attempt 1 fails on purpose")
    return {"attempt": ctx.attempt}


sleeper = Workflow("bench_sleep", max_attempts=1)
sleeper.sleep("nap", seconds=SLEEP_S)
