"""The workflow API: definitions, the graph they give the ledger, and configured defaults."""

from __future__ import annotations

import pytest

from executor.commands.models import BackoffPolicy, StartRun
from executor.errors import UnknownWorkflow
from executor.workflows.definition import StepContext, Workflow
from executor.workflows.registry import get_workflow
from executor.workflows.runner import plan_run

wf = Workflow("t_definitions", register=True)


@wf.step
def a(ctx: StepContext) -> int:
    return 1


@wf.step(depends_on=[a], max_attempts=7, backoff=BackoffPolicy(initial=0.5))
def b(ctx: StepContext) -> int:
    return 2


@wf.step(depends_on=["a", b], queue="high", timeout=3)
def c(ctx: StepContext) -> int:
    return 3


def test_steps_keep_their_functions_and_graph() -> None:
    assert a(None) == 1  # type: ignore[arg-type]  # decorating returns the function itself
    specs = {s.step_key: s for s in wf.specs()}
    assert specs["b"].depends_on == ("a",)
    assert specs["c"].depends_on == ("a", "b")
    assert specs["c"].queue == "high"
    assert specs["c"].timeout_seconds == 3


def test_unset_policy_comes_from_configured_defaults() -> None:
    backoff = BackoffPolicy(initial=0.25, cap=2)
    specs = {s.step_key: s for s in wf.specs(max_attempts=5, backoff=backoff)}
    assert specs["a"].max_attempts == 5
    assert specs["a"].backoff == backoff
    assert specs["b"].max_attempts == 7
    assert specs["b"].backoff.initial == 0.5


def test_workflow_level_policy_beats_configuration() -> None:
    strict = Workflow("t_strict", max_attempts=1, register=False)

    @strict.step
    def only(ctx: StepContext) -> None:
        return None

    (spec,) = strict.specs(max_attempts=9)
    assert spec.max_attempts == 1


def test_plan_run_fills_the_graph_and_keeps_the_key() -> None:
    planned = plan_run(
        StartRun.model_construct(
            run_id="r1", workflow="t_definitions", steps=(), idempotency_key="start_run:r1"
        ),
        max_attempts=4,
    )
    assert planned.idempotency_key == "start_run:r1"
    assert [s.step_key for s in planned.steps] == ["a", "b", "c"]
    assert planned.steps[0].max_attempts == 4


def test_definition_errors_are_caught_early() -> None:
    bad = Workflow("t_bad", register=False)
    with pytest.raises(ValueError, match="undefined step"):
        bad.step(depends_on=["missing"])(lambda ctx: None)

    @bad.step
    def x(ctx: StepContext) -> None:
        return None

    with pytest.raises(ValueError, match="already has a step"):
        bad.step(key="x")(lambda ctx: None)


def test_unknown_workflow_names_the_known_ones() -> None:
    assert get_workflow("t_definitions") is wf
    with pytest.raises(UnknownWorkflow, match="t_definitions"):
        get_workflow("no-such-workflow")
