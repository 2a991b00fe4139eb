"""Outbox items as the handler writes them, for tests that push without a ledger."""

from __future__ import annotations

from typing import Any

from executor.commands.models import StartStep
from executor.ledger.outcome import OutboxItem


def start_step_item(
    outbox_id: int = 1, attempt: int = 1, *, step_key: str = "a", **extra: Any
) -> OutboxItem:
    """The outbox row of `start_step` for step `step_key` of run r1, on queue `high`."""
    command = StartStep(run_id="r1", step_key=step_key, attempt=attempt)
    return OutboxItem(
        outbox_id=outbox_id,
        run_id="r1",
        queue="high",
        idempotency_key=command.idempotency_key,
        command=command.model_dump(mode="json"),
        **extra,
    )
