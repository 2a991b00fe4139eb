"""A message-queue-driven step executor: RQ workers, a Postgres ledger, exactly one history.

Apps use `Client`; workflow modules use `Workflow`, `StepContext` and `FatalError`.
"""

from executor.client import Client, RunView, StepView
from executor.commands import parse
from executor.commands.models import BackoffPolicy
from executor.errors import ConcurrencyKeyTaken, ExecutorError, InvalidCommand, LeaseLost
from executor.workflows.definition import FatalError, StepContext, Workflow

__all__ = [
    "BackoffPolicy",
    "Client",
    "ConcurrencyKeyTaken",
    "ExecutorError",
    "FatalError",
    "InvalidCommand",
    "LeaseLost",
    "RunView",
    "StepContext",
    "StepView",
    "Workflow",
    "parse",
]

__version__ = "0.1.0"
