"""Workflows known to this process, and importing the modules that define them."""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from typing import TYPE_CHECKING

from executor.errors import UnknownWorkflow

if TYPE_CHECKING:
    from executor.workflows.definition import Workflow

_workflows: dict[str, Workflow] = {}


def register(workflow: Workflow) -> None:
    existing = _workflows.get(workflow.name)
    if existing is not None and existing is not workflow:
        raise ValueError(f"two workflows are named {workflow.name!r}")
    _workflows[workflow.name] = workflow


def get_workflow(name: str) -> Workflow:
    try:
        return _workflows[name]
    except KeyError:
        known = ", ".join(sorted(_workflows)) or "none"
        raise UnknownWorkflow(
            f"no workflow {name!r} in this process (known: {known}); "
            "add its module to EXECUTOR_WORKFLOW_MODULES"
        ) from None


def all_workflows() -> dict[str, Workflow]:
    return dict(_workflows)


def load_modules(names: Iterable[str]) -> None:
    """Import the configured workflow modules; defining a Workflow registers it."""
    for name in names:
        if name:
            importlib.import_module(name)
