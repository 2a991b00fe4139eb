"""The API's request and response bodies: one pydantic model validates, serialises and
writes the OpenAPI schema of each.

Request bodies are strict and closed: `true` is not an integer, `"false"` is not a boolean,
an unknown field is an error, out of range is a 422 (never clamped), and every text field
refuses NUL (which Postgres cannot store). The row models of `dashboard.models` are the
response items, so a page and its endpoint cannot disagree about what a field means.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, JsonValue, model_validator

from executor.commands.models import COMMAND_TYPES, IDENTIFIER_PATTERN, STEP_KEY_PATTERN
from executor.commands.state import DROP_REASONS, RUN_STATUSES
from executor.dashboard.models import (
    ChildRun,
    Drop,
    Event,
    FailedStep,
    ItemCounts,
    LedgerHealth,
    Run,
    RunSummary,
    Step,
    TransportSnapshot,
)

NO_NUL = r"^[^\x00]*$"
CURSOR = r"^[A-Za-z0-9_\-]*$"
# ISO 8601 (a date, or a date and time; naive means UTC) or an age such as 15m, 24h, 7d.
_HM = r"([01][0-9]|2[0-3]):[0-5][0-9]"
TIME = (
    r"^([0-9]{1,5}[smhdw]"
    r"|[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"
    rf"([T ]{_HM}(:[0-5][0-9](\.[0-9]{{1,6}})?)?(Z|[+\-]{_HM})?)?)$"
)
TIME_HELP = "ISO 8601 (naive means UTC) or an age such as 15m, 24h, 7d."
RUN_ID_HELP = (
    "1-200 characters: letters, digits and `_ . : -`, starting with a letter, digit or `_`."
)
STEP_KEY_HELP = "Like a run id, and may also hold `[` `]` (map items such as `resize[3]`)."

if TYPE_CHECKING:
    RunStatusFilter = str
    DropReason = str
    CommandType = str
else:
    RunStatusFilter = Literal[(*RUN_STATUSES, "active")]
    DropReason = Literal[DROP_REASONS]
    CommandType = Literal[COMMAND_TYPES]

Text = Annotated[str, Field(min_length=1, max_length=200, pattern=NO_NUL)]
IdempotencyKey = Annotated[
    str,
    Field(
        min_length=1,
        max_length=300,
        pattern=NO_NUL,
        description="Send one so that a retried request applies once; the same key again is "
        "reported as a duplicate.",
    ),
]
Reason = Annotated[str, Field(max_length=1500, pattern=NO_NUL)]


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


# --- requests ---------------------------------------------------------------------------------


class ReasonRequest(_Body):
    """Cancel or pause: both fields optional; the reason is recorded with the event."""

    idempotency_key: IdempotencyKey | None = None
    reason: Reason = ""


class ResumeRequest(_Body):
    idempotency_key: IdempotencyKey | None = None


class RetryRequest(_Body):
    idempotency_key: IdempotencyKey | None = None
    attempt: (
        Annotated[
            int,
            Field(
                ge=1,
                le=1_000_000,
                description="The attempt you saw fail: a drop then says whether someone else "
                "retried it already.",
            ),
        ]
        | None
    ) = None


class SendEventRequest(_Body):
    """An external event: its payload becomes the output of the step that waits for it."""

    payload: JsonValue = Field(default=None, description="Any JSON value (default null).")
    idempotency_key: IdempotencyKey | None = None


class FailedStepsFilter(_Body):
    workflow: Text | None = None
    step_key: Annotated[str, Field(max_length=200, pattern=STEP_KEY_PATTERN)] | None = None
    run_id: Annotated[str, Field(max_length=200, pattern=IDENTIFIER_PATTERN)] | None = None
    from_: Annotated[str | None, Field(alias="from", max_length=64, pattern=TIME)] = None
    to: Annotated[str | None, Field(max_length=64, pattern=TIME)] = None
    error: Text | None = None

    @property
    def empty(self) -> bool:
        return all(v is None for v in self.model_dump().values())

    def as_params(self) -> dict[str, str]:
        return {k: v for k, v in self.model_dump(by_alias=True).items() if v is not None}


class BulkRetryRequest(_Body):
    """Retry the failed steps a filter matches, or all of them with `"all": true`.

    `dry_run` only counts and lists them. `expect` is the count a preview showed: if the
    filter now matches another number, nothing is retried (409).
    """

    filter: FailedStepsFilter | None = None
    all: bool = False
    dry_run: bool = False
    limit: (
        Annotated[
            int, Field(ge=1, le=500, description="At most this many steps (default: all, to 500).")
        ]
        | None
    ) = None
    expect: Annotated[int, Field(ge=0, le=500)] | None = None
    idempotency_key: Annotated[str, Field(min_length=1, max_length=200, pattern=NO_NUL)] | None = (
        None
    )

    @model_validator(mode="after")
    def _explicit(self) -> Self:
        has_filter = self.filter is not None and not self.filter.empty
        if self.all and has_filter:
            raise ValueError('give a filter or "all": true, not both')
        if not self.all and not has_filter:
            raise ValueError('a bulk retry needs a non-empty filter, or "all": true')
        return self


# --- responses --------------------------------------------------------------------------------


class FieldError(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class ErrorBody(BaseModel):
    """Every refusal: a machine-readable `error`, a sentence for a person, and for 422 the
    fields at fault."""

    error: str
    detail: str
    errors: list[FieldError] = []


class Me(BaseModel):
    role: Literal["viewer", "operator"]
    token: str = Field(description="The fingerprint of the token, never the token.")
    via: Literal["session", "bearer"]


class _Page(BaseModel):
    next: str | None = Field(description="Cursor for the page of older rows (`after`).")
    prev: str | None = Field(description="Cursor for the page of newer rows (`before`).")


class RunsPage(_Page):
    runs: list[RunSummary]
    estimated_total: int | None = None
    total_is_exact: bool = False


class FailedStepsPage(_Page):
    steps: list[FailedStep]


class DropsPage(_Page):
    drops: list[Drop]


class RunDetail(BaseModel):
    run: Run
    steps: list[Step] = Field(description="The steps of the graph; a map's items are not here.")
    items: dict[str, ItemCounts] = Field(
        description="Each map's items by status; list them with …/steps/{map}/items."
    )
    failed_items: list[Step] = Field(description="The first failed items of the maps.")
    children: list[ChildRun] = Field(description="Runs started by this run's child steps.")
    children_more: bool
    events: list[Event]
    events_more: bool
    drops: list[Drop]
    drops_more: bool


class ItemsPage(BaseModel):
    map_step: Step
    counts: ItemCounts
    items: list[Step]
    next_after: int | None = Field(description="Pass as `after` for the next page.")


class QueuesBody(BaseModel):
    transport: TransportSnapshot
    ledger: LedgerHealth
    pools: dict[str, dict[str, int]]


class ActionResponse(BaseModel):
    action: str
    run_id: str
    step_key: str | None
    idempotency_key: str
    applied: bool
    reason: str | None
    detail: str | None
    message: str
    run_status: str | None
    events: list[dict[str, Any]]
    holder_run_id: str | None


class HookResponse(BaseModel):
    """What became of a hook's send: `applied`, `duplicate` (this key was sent before), or
    `terminal` (the run has ended; the hook will never apply again)."""

    outcome: str
    event: str
    idempotency_key: str
    message: str


class BulkPreview(BaseModel):
    dry_run: Literal[True] = True
    matched: int
    limit: int
    truncated: bool
    steps: list[FailedStep]


class BulkResult(BaseModel):
    dry_run: Literal[False] = False
    idempotency_key: str
    matched: int
    limit: int
    truncated: bool
    applied: int
    dropped: dict[str, int]
    refused: int
    errors: int
    message: str
    results: list[ActionResponse]


class SessionsEnded(BaseModel):
    ended: int = Field(description="Browser sessions ended, this one included if any.")
