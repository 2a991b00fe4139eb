"""Workflows as plain Python: a `Workflow` object and `@wf.step` functions.

A step is a function of one argument, its `StepContext`. Its return value (JSON) is recorded
as the step's output and handed to dependants in `ctx.upstream`. Raising `FatalError` fails
the step at once; any other exception is retried until `max_attempts` is spent.

Durable waits are steps too: `wf.sleep` (a timer), `wf.wait_for` (an external event) and
`wf.child` (a run of another workflow). A worker runs them like any step, and what they
return is a `Suspension`: the ledger then holds the step `sleeping` or `waiting` until the
timer, the event or the child ends it, with no worker involved. `@wf.step(map_over=up)`
runs the function once per element of `up`'s list output, as item steps `name[i]`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar, overload

from executor.commands.models import AwaitChild, AwaitEvent, BackoffPolicy, Sleep, StepSpec
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
    item: Any = None
    """The element of the mapped list this item step runs for (map steps only)."""
    index: int | None = None
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
class Suspension:
    """What a sleep, wait_for or child step returns: the ledger holds the step until then."""

    until: Sleep | AwaitEvent | AwaitChild


@dataclass(frozen=True)
class StepDefinition:
    key: str
    fn: StepFunction
    depends_on: tuple[str, ...]
    max_attempts: int | None
    timeout_seconds: float | None
    backoff: BackoffPolicy | None
    queue: str
    kind: str = "task"
    map_over: str | None = None

    def spec(self, max_attempts: int = 3, backoff: BackoffPolicy | None = None) -> StepSpec:
        """The ledger's view of the step; unset policy falls back to the given defaults."""
        return StepSpec(
            step_key=self.key,
            depends_on=self.depends_on,
            max_attempts=self.max_attempts or max_attempts,
            queue=self.queue,
            timeout_seconds=self.timeout_seconds,
            backoff=self.backoff or backoff or BackoffPolicy(),
            kind=self.kind,  # type: ignore[arg-type]
            map_over=self.map_over,
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
        rate_limit: str | None = None,
        register: bool = True,
    ) -> None:
        """`max_attempts` and `backoff` left unset come from queue_config's retry defaults.

        `rate_limit` ("50/s", "100/m") caps how often steps of this workflow start, across
        every worker; a limited step waits for its turn, unstarted and uncharged.
        """
        from executor.transport.ratelimit import Rate

        self.name = name
        self.queue = queue
        self.rate_limit = None if rate_limit is None else Rate.parse(rate_limit)
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
        depends_on: Iterable[str | StepFunction | StepHandle] = (),
        max_attempts: int | None = None,
        timeout: float | None = None,
        backoff: BackoffPolicy | None = None,
        queue: str | None = None,
        map_over: str | StepFunction | None = None,
    ) -> Callable[[F], F]: ...

    def step(
        self,
        fn: Any = None,
        *,
        key: str | None = None,
        depends_on: Iterable[str | StepFunction | StepHandle] = (),
        max_attempts: int | None = None,
        timeout: float | None = None,
        backoff: BackoffPolicy | None = None,
        queue: str | None = None,
        map_over: str | StepFunction | None = None,
    ) -> Any:
        """Decorator: `@wf.step` or `@wf.step(depends_on=[fetch], max_attempts=5)`.

        With `map_over=up` (which must be among `depends_on`), the function runs once per
        element of `up`'s list output, each an item step with attempts of its own, and
        dependants see this step's output as the list of the items' outputs.
        """

        def decorate(f: F) -> F:
            step_key = key or f.__name__
            over = None if map_over is None else self._ref(map_over)
            self._add(
                step_key,
                f,
                depends_on,
                kind="map" if over is not None else "task",
                map_over=over,
                max_attempts=max_attempts,
                timeout=timeout,
                backoff=backoff,
                queue=queue,
            )
            f.__executor_step__ = step_key  # type: ignore[attr-defined]
            return f

        return decorate(fn) if fn is not None else decorate

    def sleep(
        self,
        key: str,
        *,
        seconds: float | None = None,
        until: Callable[[StepContext], datetime] | None = None,
        depends_on: Iterable[str | StepFunction | StepHandle] = (),
    ) -> StepHandle:
        """A durable timer: the step sleeps `seconds` (database clock) or until `until(ctx)`
        returns, an aware datetime; then it completes with no output."""
        if (seconds is None) == (until is None):
            raise ValueError("sleep takes exactly one of seconds= and until=")

        def fn(ctx: StepContext) -> Suspension:
            if until is None:
                return Suspension(Sleep(seconds=seconds))
            return Suspension(Sleep(wake_at=until(ctx)))

        return self._add(key, fn, depends_on, kind="sleep", max_attempts=1)

    def wait_for(
        self,
        key: str,
        *,
        event: str,
        timeout: float | None = None,
        depends_on: Iterable[str | StepFunction | StepHandle] = (),
        max_attempts: int | None = 1,
    ) -> StepHandle:
        """Wait for `event` sent to the run (`Client.send_event`, a hook URL, the dashboard);
        its payload is the step's output. An event sent earlier is kept until this waits. A
        timeout fails the attempt (retried while attempts are left)."""

        def fn(ctx: StepContext) -> Suspension:
            return Suspension(AwaitEvent(event=event, timeout_seconds=timeout))

        return self._add(key, fn, depends_on, kind="wait", max_attempts=max_attempts)

    def child(
        self,
        key: str,
        *,
        workflow: str,
        input: Callable[[StepContext], Any] | Any = None,
        depends_on: Iterable[str | StepFunction | StepHandle] = (),
        max_attempts: int | None = 1,
    ) -> StepHandle:
        """Start a run of `workflow` (input: a value, or a function of the context) and wait
        for it: its output is this step's output; its failure fails the step."""

        def fn(ctx: StepContext) -> Suspension:
            value = input(ctx) if callable(input) else input
            return Suspension(AwaitChild(workflow=workflow, input=value))

        return self._add(key, fn, depends_on, kind="child", max_attempts=max_attempts)

    def _ref(self, ref: str | StepFunction | StepHandle) -> str:
        if isinstance(ref, str):
            return ref
        if isinstance(ref, StepHandle):
            return ref.key
        return _key_of(self, ref)

    def _add(
        self,
        step_key: str,
        fn: StepFunction,
        depends_on: Iterable[str | StepFunction | StepHandle],
        *,
        kind: str,
        map_over: str | None = None,
        max_attempts: int | None = None,
        timeout: float | None = None,
        backoff: BackoffPolicy | None = None,
        queue: str | None = None,
    ) -> StepHandle:
        if step_key in self.steps:
            raise ValueError(f"workflow {self.name!r} already has a step {step_key!r}")
        deps = tuple(self._ref(d) for d in depends_on)
        for d in deps:
            if d not in self.steps:
                raise ValueError(f"step {step_key!r} depends on undefined step {d!r}")
        if map_over is not None and map_over not in deps:
            raise ValueError(f"step {step_key!r} maps over {map_over!r}, which it must depend on")
        self.steps[step_key] = StepDefinition(
            key=step_key,
            fn=fn,
            depends_on=deps,
            max_attempts=max_attempts or self.max_attempts,
            timeout_seconds=timeout,
            backoff=backoff or self.backoff,
            queue=queue or self.queue,
            kind=kind,
            map_over=map_over,
        )
        return StepHandle(step_key)

    def specs(
        self, *, max_attempts: int = 3, backoff: BackoffPolicy | None = None
    ) -> tuple[StepSpec, ...]:
        if not self.steps:
            raise ExecutorError(f"workflow {self.name!r} has no steps")
        return tuple(s.spec(max_attempts, backoff) for s in self.steps.values())

    def __repr__(self) -> str:
        return f"Workflow({self.name!r}, steps={list(self.steps)})"


@dataclass(frozen=True)
class StepHandle:
    """What `wf.sleep`, `wf.wait_for` and `wf.child` return: name it in `depends_on`."""

    key: str


def _key_of(wf: Workflow, fn: Callable[..., Any]) -> str:
    key = getattr(fn, "__executor_step__", None)
    if not isinstance(key, str):
        raise ValueError(f"{fn!r} is not a step of workflow {wf.name!r}")
    return key
