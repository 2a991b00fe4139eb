"""Commands: the only way anything asks for a run or step to change.

Commands cross process boundaries as JSON inside RQ jobs, so they are strict, frozen and
closed (`extra="forbid"`): a job that does not match exactly is rejected whole rather than
half-understood. Commands the system generates itself get a deterministic idempotency key
derived from type, run, step and attempt, so a redelivered job carries the same key and is
recognised as a duplicate. Commands from people and apps (creating a run, a manual retry,
cancel, pause, resume) must carry a key chosen by the caller, because two clicks on "retry"
are one intent only if the caller says so.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, ClassVar, Literal, Self

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    TypeAdapter,
    model_validator,
)

from executor.errors import InvalidCommand

# Run ids, step keys, workflow and queue names appear in URLs, logs and job ids. They start
# with a letter, digit or `_` (so never `.`, `..` or something a CLI reads as an option) and
# hold no path separator; step keys may also hold `[` `]`, for map items such as `resize[3]`.
IDENTIFIER_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.:\-]{0,199}$"
STEP_KEY_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.:\[\]\-]{0,199}$"
Identifier = Annotated[str, Field(min_length=1, max_length=200, pattern=IDENTIFIER_PATTERN)]
StepKey = Annotated[str, Field(min_length=1, max_length=200, pattern=STEP_KEY_PATTERN)]
TRACEPARENT_PATTERN = r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$"
Fence = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_\-]+$")]
"""The token of one delivery: who owns a started attempt."""
Key = Annotated[str, Field(min_length=1, max_length=300)]
Attempt = Annotated[int, Field(ge=1, le=1_000_000)]
MAX_STEPS = 100_000
"""Steps a run's graph may declare (map items are not counted: they come from data)."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class BackoffPolicy(_Model):
    """Exponential backoff with full jitter and a cap, in seconds."""

    initial: Annotated[float, Field(ge=0, le=86_400)] = 1.0
    multiplier: Annotated[float, Field(ge=1, le=100)] = 2.0
    cap: Annotated[float, Field(ge=0, le=86_400)] = 60.0
    jitter: bool = True


class StepSpec(_Model):
    """A step as the ledger records it when a run starts (the workflow code stays in workers).

    `kind` tells the ledger what the step does once a worker has run it: a `task` completes
    with its result; `sleep`, `wait` and `child` suspend until a timer, an event or a child
    run ends them. A `map` never reaches a worker: when `map_over` completes, the ledger
    creates one `item` step per element of its output.
    """

    step_key: StepKey
    depends_on: tuple[StepKey, ...] = ()
    max_attempts: Annotated[int, Field(ge=1, le=1000)] = 3
    queue: Identifier = "default"
    timeout_seconds: Annotated[float, Field(gt=0, le=86_400)] | None = None
    backoff: BackoffPolicy = BackoffPolicy()
    kind: Literal["task", "sleep", "wait", "child", "map"] = "task"
    map_over: Identifier | None = None

    @model_validator(mode="after")
    def _map_names_its_upstream(self) -> Self:
        if (self.kind == "map") != (self.map_over is not None):
            raise ValueError("a map step, and only a map step, names map_over")
        if self.map_over is not None and self.map_over not in self.depends_on:
            raise ValueError(f"map_over {self.map_over!r} must be one of depends_on")
        return self


class _CommandBase(_Model):
    run_id: Identifier
    idempotency_key: Key

    @model_validator(mode="after")
    def _no_nul(self) -> Self:
        # Valid JSON, valid Python, but Postgres text and jsonb cannot hold U+0000: refuse
        # it here, where the refusal is recorded, rather than in the middle of a commit.
        for name, value in self.__dict__.items():
            if contains_nul(value):
                raise ValueError(
                    f"{name} contains a NUL character (U+0000), which cannot be stored"
                )
        return self

    def describe(self) -> str:
        return f"{self.type} run={self.run_id}"  # type: ignore[attr-defined]


def field_of(command: BaseModel, name: str, default: Any = None) -> Any:
    """A field some command types have and others lack. `getattr` with a default costs
    pydantic's miss path (an AttributeError raised and caught, ~3.6 µs) when the field is
    absent, several times a command on the handler's hot path; fields live in `__dict__`."""
    return command.__dict__.get(name, default)


def contains_nul(value: Any) -> bool:
    """True if a NUL character hides anywhere in a JSON-like value, keys included."""
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(contains_nul(k) or contains_nul(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return any(contains_nul(v) for v in value)
    if isinstance(value, BaseModel):
        return any(contains_nul(v) for _, v in value)
    return False


def _key_from(command: BaseModel, *parts: str) -> str:
    """`<type>:<run>:<step>:<attempt>`: readable in the dashboard, equal on redelivery."""
    return ":".join(str(getattr(command, p)) for p in ("type", *parts))


class _SystemStepCommand(_CommandBase):
    # Filled in after validation when absent. A "before" validator would do it earlier, but
    # it makes pydantic validate JSON input in Python mode, where strict tuples refuse lists.
    idempotency_key: Key = Field(default="", validate_default=False)
    step_key: StepKey
    attempt: Attempt

    _key_parts: ClassVar[tuple[str, ...]] = ("run_id", "step_key", "attempt")

    @model_validator(mode="after")
    def _default_key(self) -> Self:
        if not self.idempotency_key:
            object.__setattr__(self, "idempotency_key", _key_from(self, *self._key_parts))
        return self

    def describe(self) -> str:
        return f"{self.type} run={self.run_id} step={self.step_key} attempt={self.attempt}"  # type: ignore[attr-defined]


class CreateRun(_CommandBase):
    """Create a run in `pending`; a worker that knows the workflow then starts it.

    With a `concurrency_key`, at most `concurrency_limit` runs hold the key at once (the
    first launch of a key in use fixes the limit). A launch finding every slot taken is
    refused (`on_conflict="reject"`, a transient `key_taken` naming a holder) or waits in
    `queued` until a holder ends (`"queue"`), oldest first. `parent_*` are set only by the
    ledger itself, for a child run.
    """

    type: Literal["create_run"] = "create_run"
    workflow: Identifier
    input: JsonValue = None
    concurrency_key: Annotated[str, Field(min_length=1, max_length=500)] | None = None
    concurrency_limit: Annotated[int, Field(ge=1, le=10_000)] = 1
    on_conflict: Literal["reject", "queue"] = "reject"
    parent_run_id: Identifier | None = None
    parent_step_key: StepKey | None = None
    parent_attempt: Attempt | None = None
    # W3C trace context of the caller, stored with the run: every step span is its child.
    traceparent: Annotated[str, Field(pattern=TRACEPARENT_PATTERN)] | None = None


class StartRun(_CommandBase):
    """pending → running: record the step graph and queue the steps with no upstream.

    `continue_on`, as for CompleteStep: the worker that plans the run will run one root step
    of that queue itself, started in this same transaction.
    """

    type: Literal["start_run"] = "start_run"
    idempotency_key: Key = Field(default="", validate_default=False)
    workflow: Identifier
    steps: tuple[StepSpec, ...] = Field(min_length=1, max_length=MAX_STEPS)
    continue_on: Identifier | None = None
    fence: Fence | None = None

    @model_validator(mode="after")
    def _graph_is_closed(self) -> StartRun:
        if not self.idempotency_key:
            object.__setattr__(self, "idempotency_key", _key_from(self, "run_id"))
        keys = [s.step_key for s in self.steps]
        if len(set(keys)) != len(keys):
            raise ValueError("step keys must be unique")
        known = set(keys)
        for s in self.steps:
            missing = set(s.depends_on) - known
            if missing:
                raise ValueError(f"step {s.step_key!r} depends on unknown {sorted(missing)}")
            if "[" in s.step_key:
                raise ValueError(f"step key {s.step_key!r}: brackets name map items only")
        _check_acyclic(self.steps)
        return self


def unplanned_start(run_id: str, workflow: str) -> StartRun:
    """The start_run job a new run gets: no steps yet, a worker that knows `workflow` plans it.

    Not valid as it stands (a start_run needs steps), so it is built without validation and
    only ever sent as a job; the worker fills the graph in before applying it.
    """
    return StartRun.model_construct(
        run_id=run_id,
        idempotency_key=f"start_run:{run_id}",
        workflow=workflow,
        steps=(),
        continue_on=None,
        fence=None,
    )


class DispatchStep(_SystemStepCommand):
    """retrying → queued: dispatch the next attempt once its backoff has elapsed."""

    type: Literal["dispatch_step"] = "dispatch_step"


class StartStep(_SystemStepCommand):
    """queued → running for one attempt; the job that carries it then runs the step.

    `fence` is the token of the delivery (set by the worker that received the job, not by
    whoever enqueued it): the step records it as the attempt's owner, so the same delivery
    retrying after a lost answer is recognised and runs the step, and nobody else can.
    """

    type: Literal["start_step"] = "start_step"
    fence: Fence | None = None
    workflow: Identifier | None = None
    """The run's workflow, so a worker can apply its rate limit before starting anything."""


class _OwnerCommand(_SystemStepCommand):
    """An outcome from the delivery that owns the attempt; its key includes the fence, so an
    outcome from anyone else cannot use up the owner's key."""

    fence: Fence
    _key_parts: ClassVar[tuple[str, ...]] = ("run_id", "step_key", "attempt", "fence")


class CompleteStep(_OwnerCommand):
    """running → completed; ready dependants are queued.

    `continue_on` names the queue of the job that ran the step: the sender will run one
    dependant this completion makes ready, routed to that queue and without a timeout of its
    own, itself, so the same transaction also starts it and no job is enqueued for it.
    `continue_with` names a step of the run the sender was handed earlier (queued, its job
    kept back because the queue was busy): if no dependant continues, that one is started
    here instead, if it is still queued.
    """

    type: Literal["complete_step"] = "complete_step"
    output: JsonValue = None
    continue_on: Identifier | None = None
    continue_with: StepKey | None = None


class FailStep(_OwnerCommand):
    """running → retrying (budget left and retryable) or failed."""

    type: Literal["fail_step"] = "fail_step"
    error: Annotated[str, Field(max_length=100_000)]
    error_type: Annotated[str, Field(max_length=500)] = "Exception"
    traceback: Annotated[str, Field(max_length=200_000)] | None = None
    retryable: bool = True


class ExpireLease(_SystemStepCommand):
    """The reaper's verdict on an attempt whose worker stopped heartbeating.

    The key includes the lease deadline the reaper saw, so a verdict dropped because a
    heartbeat extended the lease does not use up the key of the next, real expiry.
    """

    type: Literal["expire_lease"] = "expire_lease"
    observed_lease: Annotated[str, Field(min_length=1, max_length=64)]

    _key_parts: ClassVar[tuple[str, ...]] = ("run_id", "step_key", "attempt", "observed_lease")


class Sleep(_Model):
    """Sleep for `seconds` from the database's clock, or until `wake_at`."""

    kind: Literal["sleep"] = "sleep"
    seconds: Annotated[float, Field(ge=0, le=366 * 86_400)] | None = None
    wake_at: AwareDatetime | None = None

    @model_validator(mode="after")
    def _one_of(self) -> Self:
        if (self.seconds is None) == (self.wake_at is None):
            raise ValueError("a sleep names exactly one of seconds and wake_at")
        return self


class AwaitEvent(_Model):
    """Wait for an external event sent to the run; its payload becomes the step's output."""

    kind: Literal["event"] = "event"
    event: Identifier
    timeout_seconds: Annotated[float, Field(gt=0, le=366 * 86_400)] | None = None


class AwaitChild(_Model):
    """Start a run of `workflow` and wait for it; its output becomes the step's output."""

    kind: Literal["child"] = "child"
    workflow: Identifier
    input: JsonValue = None


class SuspendStep(_OwnerCommand):
    """running → sleeping or waiting: the owner ran the step and it now waits for time, an
    event or a child run, which end it through `wake_step`, `send_event`, `child_finished`."""

    type: Literal["suspend_step"] = "suspend_step"
    until: Annotated[Sleep | AwaitEvent | AwaitChild, Field(discriminator="kind")]


class WakeStep(_SystemStepCommand):
    """A timer fired: a sleeping step completes; a waiting step's timeout fails the attempt."""

    type: Literal["wake_step"] = "wake_step"


class ChildFinished(_SystemStepCommand):
    """A child run ended: its parent step completes with the child's output or fails."""

    type: Literal["child_finished"] = "child_finished"
    child_run_id: Identifier
    status: Literal["completed", "failed", "cancelled"]
    output: JsonValue = None
    error: JsonValue = None


class SendEvent(_CommandBase):
    """An external event for a run: consumed by a step waiting for it, else kept until one
    waits. The caller's key makes a repeated send a duplicate."""

    type: Literal["send_event"] = "send_event"
    event: Identifier
    payload: JsonValue = None

    def describe(self) -> str:
        return f"send_event run={self.run_id} event={self.event}"


class RetryStep(_CommandBase):
    """Manual retry: failed → queued as a new attempt; reopens a failed run."""

    type: Literal["retry_step"] = "retry_step"
    step_key: StepKey
    requested_by: Annotated[str, Field(max_length=200)] | None = None

    def describe(self) -> str:
        return f"retry_step run={self.run_id} step={self.step_key}"


class CancelRun(_CommandBase):
    type: Literal["cancel_run"] = "cancel_run"
    reason: Annotated[str, Field(max_length=2000)] | None = None


class PauseRun(_CommandBase):
    type: Literal["pause_run"] = "pause_run"
    reason: Annotated[str, Field(max_length=2000)] | None = None


class ResumeRun(_CommandBase):
    type: Literal["resume_run"] = "resume_run"


Command = Annotated[
    CreateRun
    | StartRun
    | DispatchStep
    | StartStep
    | CompleteStep
    | FailStep
    | ExpireLease
    | RetryStep
    | CancelRun
    | PauseRun
    | ResumeRun
    | SuspendStep
    | WakeStep
    | ChildFinished
    | SendEvent,
    Field(discriminator="type"),
]

COMMAND_TYPES: tuple[str, ...] = (
    "create_run",
    "start_run",
    "dispatch_step",
    "start_step",
    "complete_step",
    "fail_step",
    "expire_lease",
    "retry_step",
    "cancel_run",
    "pause_run",
    "resume_run",
    "suspend_step",
    "wake_step",
    "child_finished",
    "send_event",
)

_adapter: TypeAdapter[Command] = TypeAdapter(Command)


def parse(raw: str | bytes) -> Command:
    """The one entry point from the wire. Raises InvalidCommand with a readable reason."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidCommand(f"command is not UTF-8 text: {exc}") from exc
    try:
        return _adapter.validate_json(raw, strict=True)
    except ValueError as exc:
        raise InvalidCommand(_explain(exc)) from exc


def parse_obj(obj: Any) -> Command:
    """Parse an already-decoded JSON value (RQ's JSON serializer hands us dicts)."""
    try:
        text = json.dumps(obj, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidCommand(f"command is not JSON-serialisable: {exc}") from exc
    return parse(text)


def dump(command: Command) -> str:
    return command.model_dump_json(exclude_none=True)


def wire(command: Command) -> dict[str, Any]:
    """The JSON object a job carries. Unset optional fields are left out, so a worker one
    version behind, which does not know a newer optional field, still accepts the job."""
    return command.model_dump(mode="json", exclude_none=True)


def _explain(exc: ValueError) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        parts = []
        for err in errors()[:5]:
            loc = ".".join(str(p) for p in err.get("loc", ())) or "<root>"
            parts.append(f"{loc}: {err.get('msg')}")
        return "invalid command: " + "; ".join(parts)
    return f"invalid command: {exc}"


def _check_acyclic(steps: tuple[StepSpec, ...]) -> None:
    deps = {s.step_key: set(s.depends_on) for s in steps}
    done: set[str] = set()
    while deps:
        ready = [k for k, d in deps.items() if d <= done]
        if not ready:
            raise ValueError(f"dependency cycle among {sorted(deps)}")
        for k in ready:
            done.add(k)
            del deps[k]
