"""Replay every run's log against the invariants; the ledger's own auditor.

Per step (I1: each history is a path of the step state machine, one start and one outcome
per attempt; I6: an outcome carries its attempt's start fence) and per run (dependency
order; run_completed only when every step completed, with the outputs of the final steps;
run_failed only after a terminal step failure with nothing queued or running; nothing
dispatched after a terminal failure except by a manual retry, which alone reopens a failed
run), plus I2 (receipts and drops account for every delivery), I4 (gapless seq), I5 over the
current rows, and the stored rows equal to the replay. Runs that break no rule but cannot
move (I7) are reported apart as stuck.

The replay is written independently of `executor.commands.machine`: it only knows the state
machines as DESIGN.md draws them (the tables in rules.py), so a bug in the handler's
decisions cannot hide by being repeated in the checker.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.pq import TransactionStatus

from executor.ledger.verify.report import StopVerify, Stuck, VerifyReport, Violation
from executor.ledger.verify.scan import Scan

__all__ = ["Stuck", "VerifyReport", "Violation", "verify"]


def verify(
    conn: psycopg.Connection[Any], *, run_id: str | None = None, stop_at_first: bool = False
) -> VerifyReport:
    """Check one run (`run_id`) or the whole ledger, streaming, in one snapshot.

    On an idle connection verify opens its own REPEATABLE READ READ ONLY transaction, so a
    verify running beside live workers sees rows, events, receipts and the outbox as of the
    same instant. Inside a transaction the caller already opened, it reads in that one.
    """
    report = VerifyReport(stop_at_first=stop_at_first)
    own = conn.info.transaction_status == TransactionStatus.IDLE
    with conn.transaction():
        if own:
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        scan = Scan(conn, report, run_id)
        try:
            scan.runs()
            scan.concurrency()
            scan.children()
        except StopVerify:
            pass
    return report
