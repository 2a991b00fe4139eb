"""A delivery Postgres cannot store as text (NUL, bytes that were not UTF-8) is still recorded
(I2, I8): `record_invalid` stores it escaped instead of failing with DataError."""

from __future__ import annotations

from typing import Any

import pytest

from executor.ledger.handler import Ledger, Pool


def drops(pool: Pool) -> list[dict[str, Any]]:
    with pool.connection() as conn:
        return conn.execute(
            "SELECT reason, detail, raw, command_type, run_id FROM executor.drops ORDER BY drop_id"
        ).fetchall()


@pytest.mark.parametrize(
    ("raw", "detail", "stored_raw", "stored_detail"),
    [
        pytest.param(
            '{"type": "start_step", "run_id": "r\x001"}',
            "run_id contains a NUL: 'r\x001'",
            '{"type": "start_step", "run_id": "r\\x001"}',
            "run_id contains a NUL: 'r\\x001'",
            id="nul",
        ),
        pytest.param(
            b"job \xff\xfe".decode("utf-8", "surrogateescape"),
            b"not UTF-8: \xff".decode("utf-8", "surrogateescape"),
            "job \\udcff\\udcfe",
            "not UTF-8: \\udcff",
            id="lone surrogates",
        ),
        pytest.param("plain", "plain detail", "plain", "plain detail", id="unchanged"),
    ],
)
def test_record_invalid_stores_what_postgres_text_refuses_escaped(
    pool: Pool, raw: str, detail: str, stored_raw: str, stored_detail: str
) -> None:
    outcome = Ledger(pool).record_invalid(raw, detail, command_type="start_step")
    assert outcome.reason == "invalid_payload"
    assert outcome.detail == stored_detail
    assert drops(pool) == [
        {
            "reason": "invalid_payload",
            "detail": stored_detail,
            "raw": stored_raw,
            "command_type": "start_step",
            "run_id": None,
        }
    ]


def test_record_invalid_truncates_a_huge_payload(pool: Pool) -> None:
    Ledger(pool).record_invalid("\x00" * 50_000, "huge")
    (row,) = drops(pool)
    assert row["raw"] == "\\x00" * 10_000
