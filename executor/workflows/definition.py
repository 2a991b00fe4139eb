"""Workflows as plain Python: a `Workflow` object and `@wf.step` functions.

A step is a function of one argument, its `StepContext`. Its return value (JSON) is recorded
as the step's output and handed to dependants in `ctx.upstream`. Raising `FatalError` fails
the step at once; any other exception is retried until `max_attempts` is spent.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar, overload

from executor.commands.models import BackoffPolicy, StepSpec
from executor.errors import ExecutorError, LeaseLost

StepFunction = Callable[["StepContext"], Any]
F = TypeVar("F", bound=StepFunction)


class FatalError(ExecutorError):
    """The step failed in a way retrying cannot fix; no further attempts are made."""


@dataclass
class StepContext:
    """What a running attempt knows about itself, and its line back to the ledger."""

    run_id: str
    step_key: str
    attempt: int
    max_attempts: int
    input: Any
    upstream: Mapping[str, Any]
    workflow: str
    _lost: threading.Event = field(default_factory=threading.Event, repr=False)
    _beat: Callable[[], bool] | None = field(default=None, repr=False)

    def heartbeat(self) -> None:
        """Extend this attempt's lease now; raise LeaseLost if another attempt superseded it."""
        if self._beat is not None and not self._beat():
            self._lost.set()
        if self._lost.is_set():
            raise LeaseLost(f"{self.run_id}/{self.step_key} attempt {self.attempt} lost its lease")

    @property
    def lease_lost(self) -> bool:
        return self._lost.is_set()


@dataclass(frozen=True)
class StepDefinition:
    key: str
    fn: StepFunction
    depends_on: tuple[str, ...]
    max_attempts: int | None
    timeout_seconds: float | None
    backoff: BackoffPolicy | None
    queue: str

    def spec(self, max_attempts: int = 3, backoff: BackoffPolicy | None = None) -> StepSpec:
        """The ledger's view of the step; unset policy falls back to the given defaults."""
        return StepSpec(
            step_key=self.key,
            depends_on=self.depends_on,
            max_attempts=self.max_attempts or max_attempts,
            queue=self.queue,
            timeout_seconds=self.timeout_seconds,
            backoff=self.backoff or backoff or BackoffPolicy(),
        )


class Workflow:
    """A named graph of steps. Registering is a side effect of defining, like RQ's jobs."""

    def __init__(
        self,
        name: str,
        *,
        queue: str = "default",
        max_attempts: int | None = None,
        backoff: BackoffPolicy | None = None,
        register: bool = True,
    ) -> None:
        """`max_attempts` and `backoff` left unset come from queue_config's retry defaults."""
        self.name = name
        self.queue = queue
        self.max_attempts = max_attempts
        self.backoff = backoff
        self.steps: dict[str, StepDefinition] = {}
        if register:
            from executor.workflows.registry import register as _register

            _register(self)

    @overload
    def step(self, fn: F) -> F: ...

    @overload
    def step(
        self,
        *,
        key: str | None = None,
        depends_on: Iterable[str | StepFunction] = (),
        max_attempts: int | None = None,
        timeout: float | None = None,
        backoff: BackoffPolicy | None = None,
        queue: str | None = None,
    ) -> Callable[[F], F]: ...

    def step(
        self,
        fn: Any = None,
        *,
        key: str | None = None,
        depends_on: Iterable[str | StepFunction] = (),
        max_attempts: int | None = None,
        timeout: float | None = None,
        backoff: BackoffPolicy | None = None,
        queue: str | None = None,
    ) -> Any:
        """Decorator: `@wf.step` or `@wf.step(depends_on=[fetch], max_attempts=5)`."""

        def decorate(f: F) -> F:
            step_key = key or f.__name__
            if step_key in self.steps:
                raise ValueError(f"workflow {self.name!r} already has a step {step_key!r}")
            deps = tuple(d if isinstance(d, str) else _key_of(self, d) for d in depends_on)
            for d in deps:
                if d not in self.steps:
                    raise ValueError(f"step {step_key!r} depends on undefined step {d!r}")
            self.steps[step_key] = StepDefinition(
                key=step_key,
                fn=f,
                depends_on=deps,
                max_attempts=max_attempts or self.max_attempts,
                timeout_seconds=timeout,
                backoff=backoff or self.backoff,
                queue=queue or self.queue,
            )
            f.__executor_step__ = step_key  # type: ignore[attr-defined]
            return f

        return decorate(fn) if fn is not None else decorate

    def specs(
        self, *, max_attempts: int = 3, backoff: BackoffPolicy | None = None
    ) -> tuple[StepSpec, ...]:
        if not self.steps:
            raise ExecutorError(f"workflow {self.name!r} has no steps")
        return tuple(s.spec(max_attempts, backoff) for s in self.steps.values())

    def __repr__(self) -> str:
        return f"Workflow({self.name!r}, steps={list(self.steps)})"


def _key_of(wf: Workflow, fn: Callable[..., Any]) -> str:
    key = getattr(fn, "__executor_step__", None)
    if not isinstance(key, str):
        raise ValueError(f"{fn!r} is not a step of workflow {wf.name!r}")
    return key
