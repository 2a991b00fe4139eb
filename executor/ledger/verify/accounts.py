"""I2 for one run: every event under an applied receipt, every refusal recorded once.

Rules (DESIGN "Final and transient drops"): an applied receipt covers exactly the events
first_seq..last_seq its key produced; a final refusal leaves a receipt whose outcome is the
reason and a drop row; a transient refusal (key_taken, paused, not_due, busy) leaves a drop
row and no receipt, so its key stays usable and may be applied later, and so does a worker's
refusal to plan a run (a workflow it does not know or cannot plan); a duplicate is a drop
row of a key that has a receipt. A receipt never records a transient reason.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import psycopg
from psycopg.rows import dict_row

from executor.ledger.verify.state import FINAL_DROPS, TRANSIENT_DROPS, Event

# (rule, message, step_key, seq)
Report = Callable[[str, str, str | None, int | None], None]

_RECEIPT_BY_KEY = (
    "SELECT run_id, outcome, first_seq, last_seq FROM executor.receipts WHERE idempotency_key = %s"
)


class RunAccounts:
    """Receipts and drops filed under one run_id (or under none), checked against its log."""

    def __init__(
        self,
        run_id: str | None,
        receipts: Iterable[dict[str, Any]],
        conn: psycopg.Connection[Any],
        report: Report,
    ) -> None:
        self.run_id = run_id
        self.receipts = {r["idempotency_key"]: r for r in receipts}
        self.conn = conn
        self.report = report
        self.event_keys: Counter[str] = Counter()
        self._elsewhere: dict[str, dict[str, Any] | None] = {}

    def _receipt(self, key: str) -> dict[str, Any] | None:
        """This run's receipt for `key`, else the one filed under another run (one lookup)."""
        found = self.receipts.get(key)
        if found is not None:
            return found
        if key not in self._elsewhere:
            with self.conn.cursor(row_factory=dict_row) as cur:
                self._elsewhere[key] = cur.execute(_RECEIPT_BY_KEY, (key,)).fetchone()
        return self._elsewhere[key]

    def event(self, ev: Event) -> None:
        self.event_keys[ev.key] += 1
        receipt = self._receipt(ev.key)
        if receipt is None or receipt["outcome"] != "applied":
            self.report(
                "receipt_missing",
                f"event {ev.type} has no applied receipt for its key",
                ev.step_key,
                ev.seq,
            )
        elif receipt["run_id"] != self.run_id:
            self.report(
                "receipt_missing",
                f"event {ev.type}'s receipt is filed under run {receipt['run_id']}",
                ev.step_key,
                ev.seq,
            )
        elif not (receipt["first_seq"] or 0) <= ev.seq <= (receipt["last_seq"] or -1):
            self.report(
                "receipt_range", f"event {ev.type} lies outside its receipt", ev.step_key, ev.seq
            )

    def _planning_refusal(self, key: str, reason: str, command_type: str | None) -> bool:
        """A start_run of a run that exists, refused as `unknown_entity` (a workflow the
        planning worker does not know) or `invalid_payload` (a graph it cannot plan), with no
        receipt of that refusal: recorded by the worker before the handler saw it, and as
        transient as `busy`, so a worker with other code can still start the run under the
        same key (the handler itself says `unknown_entity` to a start_run only when its run
        does not exist, and records its own `invalid_payload` refusals in a receipt)."""
        if command_type != "start_run" or reason not in ("unknown_entity", "invalid_payload"):
            return False
        if not self.event_keys:
            return False
        receipt = self._receipt(key)
        return receipt is None or receipt["outcome"] == "applied"

    def finish(self, drops: Iterable[dict[str, Any]]) -> int:
        """Check the drops and the receipts; returns how many drop rows there were."""
        dropped: Counter[tuple[str, str]] = Counter()
        count = 0
        for d in drops:
            count += 1
            key, reason = d["idempotency_key"], d["reason"]
            if key is None:
                continue  # never became a command (I8): nothing to pair it with
            dropped[(key, reason)] += 1
            if reason in TRANSIENT_DROPS or self._planning_refusal(
                key, reason, d.get("command_type")
            ):
                continue
            if reason not in FINAL_DROPS:
                self.report(
                    "drop_reason",
                    f"drop of key {key} has reason {reason!r}, neither final nor transient",
                    d["step_key"],
                    None,
                )
                continue
            receipt = self._receipt(key)
            if receipt is None:
                self.report(
                    "drop_without_receipt",
                    f"final drop ({reason}) of key {key} has no receipt",
                    d["step_key"],
                    None,
                )
            elif reason != "duplicate" and receipt["outcome"] != reason:
                self.report(
                    "drop_receipt_mismatch",
                    f"drop of key {key} says {reason}, its receipt says {receipt['outcome']}",
                    d["step_key"],
                    None,
                )
        for key, r in self.receipts.items():
            outcome = r["outcome"]
            if outcome == "applied":
                if r["first_seq"] is None or r["last_seq"] is None:
                    self.report(
                        "receipt_event_count",
                        f"applied key {key} names no seqs",
                        r["step_key"],
                        None,
                    )
                    continue
                expected = r["last_seq"] - r["first_seq"] + 1
                if self.event_keys[key] != expected:
                    self.report(
                        "receipt_event_count",
                        f"key {key} applied with {expected} events but "
                        f"{self.event_keys[key]} found",
                        r["step_key"],
                        r["first_seq"],
                    )
            elif outcome in TRANSIENT_DROPS:
                self.report(
                    "receipt_transient",
                    f"key {key} has a receipt for the transient refusal {outcome}: "
                    "its key is burned",
                    r["step_key"],
                    None,
                )
            elif dropped[(key, outcome)] < 1:
                self.report(
                    "receipt_without_drop",
                    f"dropped key {key} has no drop record",
                    r["step_key"],
                    None,
                )
        return count
