"""The baseline job for `executor bench`: what RQ does with no ledger at all."""

from __future__ import annotations


def noop() -> None:
    return None
