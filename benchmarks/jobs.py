"""The baseline job for the RQ no-op rounds: what RQ does with no ledger at all."""

from __future__ import annotations


def noop() -> None:
    return None
