"""Workflow definitions, the registry workers load them into, and the step runner."""

from executor.workflows.definition import FatalError, StepContext, Workflow
from executor.workflows.registry import all_workflows, get_workflow, load_modules

__all__ = ["FatalError", "StepContext", "Workflow", "all_workflows", "get_workflow", "load_modules"]
