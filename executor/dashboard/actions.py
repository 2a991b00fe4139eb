"""What operators do: retry, bulk retry, cancel, pause, resume, send an event — each one
command, one handler (a hook URL's event goes the same way).

Every action is a command applied through the same committing handler as everything else
(`Client.apply`, which also pushes the follow-up jobs to Redis so a retried step really
runs). The idempotency key comes from the caller: the HTML forms carry one generated when
the form was rendered, so a double click, a resubmitted form or a refreshed result page
applies once and is reported as "already submitted". Each outcome is turned into one
sentence an operator can act on, plus an HTTP status for the JSON API.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from pydantic import ValidationError

from executor.commands.models import (
    CancelRun,
    Command,
    PauseRun,
    ResumeRun,
    RetryStep,
    SendEvent,
)
from executor.dashboard import queries, rundetail
from executor.dashboard.auth import Principal
from executor.dashboard.metrics import DashboardMetrics
from executor.errors import ConcurrencyKeyTaken, LedgerBusy
from executor.ledger.outcome import Outcome

log = logging.getLogger("executor.dashboard")

Apply = Callable[[Command], Outcome]

_FIRST_OUTCOME = re.compile(r"with outcome (\w+)")
EVENT_ACTIONS = frozenset({"send_event", "hook"})


def new_key(action: str) -> str:
    """A fresh idempotency key for one intent (one rendered form, one API call)."""
    return f"dashboard:{action}:{uuid.uuid4().hex}"


@dataclass(frozen=True)
class ActionResult:
    action: str
    run_id: str
    step_key: str | None
    idempotency_key: str
    applied: bool
    reason: str | None
    detail: str | None
    message: str
    level: str  # "ok", "warn" or "error"
    http_status: int
    run_status: str | None = None
    events: tuple[dict[str, Any], ...] = ()
    holder_run_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "run_id": self.run_id,
            "step_key": self.step_key,
            "idempotency_key": self.idempotency_key,
            "applied": self.applied,
            "reason": self.reason,
            "detail": self.detail,
            "message": self.message,
            "run_status": self.run_status,
            "events": list(self.events),
            "holder_run_id": self.holder_run_id,
        }


@dataclass
class BulkResult:
    idempotency_key: str
    matched: int
    limit: int
    applied: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    refused: int = 0
    errors: int = 0
    results: list[ActionResult] = field(default_factory=list)

    @property
    def truncated(self) -> bool:
        return self.matched >= self.limit

    @property
    def message(self) -> str:
        parts = [f"{self.applied} retried"]
        parts += [f"{n} dropped ({reason})" for reason, n in sorted(self.dropped.items())]
        if self.refused:
            parts.append(f"{self.refused} refused (concurrency key taken)")
        if self.errors:
            parts.append(f"{self.errors} failed with an error")
        text = f"Bulk retry of {self.matched} failed step(s): " + ", ".join(parts)
        if self.truncated:
            text += f" (capped at {self.limit}; run it again for the rest)"
        return text

    @property
    def level(self) -> str:
        if self.errors or self.refused:
            return "error" if not self.applied else "warn"
        return "ok" if self.applied or not self.matched else "warn"

    def to_json(self) -> dict[str, Any]:
        return {
            "idempotency_key": self.idempotency_key,
            "matched": self.matched,
            "limit": self.limit,
            "truncated": self.truncated,
            "applied": self.applied,
            "dropped": self.dropped,
            "refused": self.refused,
            "errors": self.errors,
            "message": self.message,
            "results": [r.to_json() for r in self.results],
        }


class InvalidAction(ValueError):
    """The request could not become a command (bad id, key too long…)."""


class CountChanged(Exception):
    """A bulk retry was told how many steps to expect, and the filter now matches another
    number: nothing was retried (preview again, then confirm)."""

    def __init__(self, expected: int, matched: int) -> None:
        super().__init__(
            f"expected {expected} failed step(s) but the filter now matches {matched}; "
            "nothing was retried"
        )
        self.expected = expected
        self.matched = matched


class Actions:
    def __init__(self, apply: Apply, pool: queries.Pool, metrics: DashboardMetrics) -> None:
        self._apply = apply
        self.pool = pool
        self.metrics = metrics

    # -- one run or step --------------------------------------------------------------------

    def retry(
        self,
        principal: Principal,
        run_id: str,
        step_key: str,
        key: str,
        *,
        seen_attempt: int | None = None,
    ) -> ActionResult:
        command = self._build(
            RetryStep,
            run_id=run_id,
            step_key=step_key,
            idempotency_key=key,
            requested_by=principal.actor,
        )
        return self._run("retry", command, run_id, step_key, seen_attempt)

    def cancel(self, principal: Principal, run_id: str, key: str, reason: str = "") -> ActionResult:
        command = self._build(
            CancelRun, run_id=run_id, idempotency_key=key, reason=_reason(reason, principal)
        )
        return self._run("cancel", command, run_id, None, None)

    def pause(self, principal: Principal, run_id: str, key: str, reason: str = "") -> ActionResult:
        command = self._build(
            PauseRun, run_id=run_id, idempotency_key=key, reason=_reason(reason, principal)
        )
        return self._run("pause", command, run_id, None, None)

    def resume(self, principal: Principal, run_id: str, key: str) -> ActionResult:
        command = self._build(ResumeRun, run_id=run_id, idempotency_key=key)
        return self._run("resume", command, run_id, None, None)

    def send_event(
        self, run_id: str, event: str, payload: Any, key: str, *, action: str = "send_event"
    ) -> ActionResult:
        """Deliver an external event (`action` names who: the API, a form, a hook URL)."""
        command = self._build(
            SendEvent, run_id=run_id, event=event, payload=payload, idempotency_key=key
        )
        return self._run(action, command, run_id, None, None)

    # -- many steps -------------------------------------------------------------------------

    def bulk_retry(
        self,
        principal: Principal,
        f: queries.FailedFilter,
        key: str,
        limit: int,
        *,
        expect: int | None = None,
    ) -> BulkResult:
        """Retry every retryable failed step matching `f` (up to `limit`), oldest first.

        Each step gets a key derived from the bulk key, so submitting the same bulk form
        twice retries each step once. With `expect` (the count a preview showed), a filter
        that now matches another number retries nothing and raises CountChanged.
        """
        if not key or len(key) > 200:
            raise InvalidAction("idempotency_key must be 1..200 characters")
        steps = queries.retryable_failed_steps(self.pool, f, limit)
        if expect is not None and len(steps) != expect:
            raise CountChanged(expect, len(steps))
        result = BulkResult(idempotency_key=key, matched=len(steps), limit=limit)
        for step in steps:
            one = self.retry(
                principal,
                step.run_id,
                step.step_key,
                _derived_key(key, step.run_id, step.step_key),
                seen_attempt=step.attempt,
            )
            result.results.append(one)
            if one.applied:
                result.applied += 1
            elif one.reason == "concurrency_key_taken":
                result.refused += 1
            elif one.reason in ("error", "busy"):
                result.errors += 1
            else:
                reason = one.reason or "unknown"
                result.dropped[reason] = result.dropped.get(reason, 0) + 1
        log.info("bulk retry %s by %s: %s", key, principal.actor, result.message)
        return result

    # -- internals --------------------------------------------------------------------------

    def _build(self, factory: Callable[..., Command], **fields: Any) -> Command:
        try:
            return factory(**fields)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:3]
            )
            raise InvalidAction(problems) from exc

    def _run(
        self,
        action: str,
        command: Command,
        run_id: str,
        step_key: str | None,
        seen_attempt: int | None,
    ) -> ActionResult:
        key = command.idempotency_key
        base: dict[str, Any] = {
            "action": action,
            "run_id": run_id,
            "step_key": step_key,
            "idempotency_key": key,
        }
        started = time.perf_counter()
        label = "error"
        try:
            try:
                outcome = self._apply(command)
            except ConcurrencyKeyTaken as exc:
                label = "concurrency_key_taken"
                return ActionResult(
                    **base,
                    applied=False,
                    reason="concurrency_key_taken",
                    detail=str(exc),
                    message=f"refused: {exc}",
                    level="error",
                    http_status=409,
                    holder_run_id=exc.holder_run_id,
                )
            except LedgerBusy as exc:
                label = "busy"
                return ActionResult(
                    **base,
                    applied=False,
                    reason="busy",
                    detail=str(exc),
                    message="not applied: the ledger is busy; try again in a moment",
                    level="error",
                    http_status=503,
                )
            except Exception as exc:
                log.exception("%s failed", command.describe())
                return self._after_error(base, exc)
            label = "applied" if outcome.applied else str(outcome.reason)
        finally:
            self.metrics.observe_action(action, label, time.perf_counter() - started)
        log.info("%s by dashboard: %s", command.describe(), outcome.summary())
        return self._explain(base, outcome, seen_attempt)

    def _after_error(self, base: dict[str, Any], exc: Exception) -> ActionResult:
        """The command may have committed before the error (say, Redis refused the push):
        the receipt for its key says which, and the outbox relay delivers what committed."""
        try:
            row = queries._fetch_one(
                self.pool,
                "SELECT outcome FROM executor.receipts WHERE idempotency_key = %s",
                (base["idempotency_key"],),
            )
        except Exception:
            row = None
        if row is not None and row["outcome"] == "applied":
            return ActionResult(
                **base,
                applied=True,
                reason=None,
                detail=f"{type(exc).__name__}: {exc}",
                message=(
                    f"{base['action']} committed; handing the follow-up job to the queue failed "
                    f"({type(exc).__name__}), the outbox relay will deliver it"
                ),
                level="warn",
                http_status=200,
            )
        return ActionResult(
            **base,
            applied=False,
            reason="error",
            detail=f"{type(exc).__name__}: {exc}",
            message=f"not applied: {type(exc).__name__}: {exc}",
            level="error",
            http_status=503,
        )

    def _explain(
        self, base: dict[str, Any], outcome: Outcome, seen_attempt: int | None
    ) -> ActionResult:
        action = base["action"]
        events = tuple(asdict(e) for e in outcome.events)
        if outcome.applied:
            return ActionResult(
                **base,
                applied=True,
                reason=None,
                detail=None,
                message=_applied_message(action, base["step_key"], outcome),
                level="ok",
                http_status=200,
                run_status=outcome.run_status,
                events=events,
            )
        reason = outcome.reason or "dropped"
        detail = outcome.detail or ""
        status = 409
        if reason == "duplicate":
            first = _FIRST_OUTCOME.search(detail)
            first_text = f" (first outcome: {first.group(1)})" if first else ""
            message = (
                "dropped: already submitted — this exact request was handled before"
                f"{first_text}; nothing was done twice"
            )
            status = 200
        elif reason == "unknown_entity":
            message = f"dropped: {detail}"
            status = 404
        elif action == "retry":
            message = self._retry_drop_message(base, reason, detail, seen_attempt)
        else:
            message = f"dropped ({reason}): {detail}"
        return ActionResult(
            **base,
            applied=False,
            reason=reason,
            detail=detail,
            message=message,
            level="warn",
            http_status=status,
            run_status=rundetail.run_status(self.pool, base["run_id"]),
        )

    def _retry_drop_message(
        self, base: dict[str, Any], reason: str, detail: str, seen_attempt: int | None
    ) -> str:
        step = rundetail.get_step(self.pool, base["run_id"], base["step_key"])
        if (
            step is not None
            and step.status != "failed"
            and (seen_attempt is None or step.attempt > seen_attempt)
        ):
            return (
                f"dropped: already retried — step {step.step_key} is {step.status} "
                f"at attempt {step.attempt}"
            )
        return f"dropped ({reason}): {detail}"


def _applied_message(action: str, step_key: str | None, outcome: Outcome) -> str:
    if action in EVENT_ACTIONS:
        done = [e.step_key for e in outcome.events if e.type == "step_completed" and e.step_key]
        if done:
            return f"sent: the event completed step {done[0]}"
        return "sent: the event is kept until a step of the run waits for it"
    if action == "retry":
        queued = [e for e in outcome.events if e.type == "step_queued" and e.step_key == step_key]
        attempt = f" as attempt {queued[0].attempt}" if queued and queued[0].attempt else ""
        reopened = any(e.type == "run_resumed" for e in outcome.events)
        return f"retried: step {step_key} queued{attempt}" + (
            "; the failed run is running again" if reopened else ""
        )
    return {
        "cancel": "cancelled: the run and its unfinished steps are cancelled",
        "pause": "paused: nothing more of this run is dispatched until it is resumed",
        "resume": "resumed: the run is running again",
    }.get(action, f"{action}: applied")


def _reason(text: str, principal: Principal) -> str:
    text = " ".join(text.split())[:1500]
    return f"{text} (by {principal.actor})" if text else f"by {principal.actor}"


def _derived_key(bulk_key: str, run_id: str, step_key: str) -> str:
    key = f"{bulk_key}:{run_id}:{step_key}"
    if len(key) <= 300:
        return key
    digest = hashlib.sha256(f"{run_id}\0{step_key}".encode()).hexdigest()[:32]
    return f"{bulk_key}:{digest}"
