"""Fixtures shared by the ledger tests."""

from tests.ledger.handlog import ledger

__all__ = ["ledger"]
