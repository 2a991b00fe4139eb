"""One root for every error the executor raises; each docstring is what a user is told."""

from __future__ import annotations


class ExecutorError(Exception):
    """The step executor failed."""


class ConfigurationError(ExecutorError):
    """The executor is misconfigured."""


class InvalidCommand(ExecutorError, ValueError):
    """A command did not match its schema; it was rejected and changed nothing."""


class ConcurrencyKeyTaken(ExecutorError):
    """Another active run holds this concurrency key."""

    def __init__(self, concurrency_key: str, holder_run_id: str) -> None:
        self.concurrency_key = concurrency_key
        self.holder_run_id = holder_run_id
        super().__init__(
            f"concurrency key {concurrency_key!r} is held by run {holder_run_id} "
            "(pending, running or paused); wait for it to finish or cancel it"
        )


class ConcurrencyLimitConflict(ExecutorError):
    """This launch names another limit than the runs that use the concurrency key now."""

    def __init__(self, concurrency_key: str, limit_in_use: int, asked: int) -> None:
        self.concurrency_key = concurrency_key
        self.limit_in_use = limit_in_use
        self.asked = asked
        super().__init__(
            f"concurrency key {concurrency_key!r} is in use with concurrency_limit="
            f"{limit_in_use}; this launch asks for {asked} (a key's limit is fixed by the "
            "launch that first uses it, until no run holds or waits for it)"
        )


class LedgerBusy(ExecutorError):
    """The ledger kept hitting serialization failures or deadlocks; the command was not applied."""


class UnknownWorkflow(ExecutorError):
    """No workflow of that name is registered in this process."""


class InvalidWorkflow(ExecutorError):
    """This process's definition of the workflow cannot be planned into a run."""


class StepTimeout(BaseException):
    """The step ran past its timeout and was interrupted.

    A BaseException so that a step's own `except Exception` cannot swallow it.
    """


class LeaseLost(BaseException):
    """This attempt's lease was taken over; the step function must stop.

    A BaseException so that a step's own `except Exception` cannot swallow it.
    """
