"""The checks every step command passes first: the step exists, is not over, and the
delivery is aimed at its current attempt and owns it (I6). Shared by the machine and by
what ends a wait."""

from __future__ import annotations

from executor.commands.state import RUN_TERMINAL, STEP_TERMINAL, StepRow
from executor.commands.transition import Drop, Transition


def get_step(t: Transition, step_key: str) -> StepRow:
    step = t.step(step_key)
    if step is None:
        raise Drop("unknown_entity", f"run {t.run.run_id} has no step {step_key!r}")
    return step


def attempt_step(
    t: Transition, step_key: str, attempt: int, expected: str, fence: str | None = None
) -> StepRow:
    """Fence a step command by attempt and owner; terminal and stale checks come first."""
    step = get_step(t, step_key)
    if step.status in STEP_TERMINAL:
        raise Drop("terminal", f"step {step_key} is {step.status} (attempt {step.attempt})")
    if t.run.status in RUN_TERMINAL:
        raise Drop("terminal", f"run is {t.run.status}")
    if attempt < step.attempt:
        raise Drop("stale_attempt", f"attempt {attempt} superseded by attempt {step.attempt}")
    if attempt > step.attempt:
        raise Drop(
            "invalid_transition",
            f"attempt {attempt} was never dispatched (current attempt {step.attempt})",
        )
    if step.status == "retrying":
        # The attempt already ended (failed, or its lease expired); the next one is only
        # waiting out its backoff, so this is a superseded attempt's late command (I6).
        raise Drop("stale_attempt", f"attempt {attempt} already ended; a retry is scheduled")
    if fence is not None and step.fence is not None and step.fence != fence:
        raise Drop(
            "stale_attempt",
            f"delivery {fence} does not own attempt {attempt} (its owner is {step.fence})",
        )
    if step.status != expected:
        raise Drop(
            "invalid_transition",
            f"step {step_key} attempt {attempt} is {step.status}, not {expected}",
        )
    return step
