"""Run ids and step keys have a documented character set: nothing that breaks a URL path."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from executor.commands.models import CreateRun, RetryStep, StartRun, StepSpec


@pytest.mark.parametrize("run_id", [".", "..", "...", "a/b", "a\\b", "-rf", "m[3]", "", "a b"])
def test_run_ids_that_would_break_a_path_are_refused(run_id: str) -> None:
    with pytest.raises(ValidationError):
        CreateRun(run_id=run_id, workflow="w", idempotency_key="k")


@pytest.mark.parametrize("step_key", [".", "..", "a/b", "[3]", "-x"])
def test_step_keys_that_would_break_a_path_are_refused(step_key: str) -> None:
    with pytest.raises(ValidationError):
        StepSpec(step_key=step_key)
    with pytest.raises(ValidationError):
        RetryStep(run_id="r1", step_key=step_key, idempotency_key="k")


def test_dots_inside_names_and_map_item_brackets_stay_allowed() -> None:
    assert CreateRun(run_id="v1.2:x-y_z", workflow="w.v2", idempotency_key="k").run_id
    retry = RetryStep(run_id="r1", step_key="resize[3]", idempotency_key="k")
    assert retry.step_key == "resize[3]"
    # A workflow's own steps may not take bracketed keys: those name a map's items.
    with pytest.raises(ValidationError, match="brackets name map items only"):
        StartRun(
            run_id="r1",
            workflow="w",
            steps=(StepSpec(step_key="a"), StepSpec(step_key="a[3]", depends_on=("a",))),
        )
