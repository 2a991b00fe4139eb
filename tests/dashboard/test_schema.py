"""Schemathesis against the live dashboard (uvicorn, real Postgres and Redis), with an
operator token: no 5xx, and no response that disagrees with /api/openapi.json, for a
bounded number of generated requests per operation (SCHEMATHESIS_EXAMPLES, default 20)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

from executor.dashboard.settings import DashboardSettings

from .conftest import OPERATOR, VIEWER, Seeder, live_server

EXAMPLES = int(os.environ.get("SCHEMATHESIS_EXAMPLES", "20"))
# A pattern cannot say that February has no 30th: such a time matches the schema and is
# refused with the documented 422, which this check would call a rejection of valid data.
EXCLUDED = [positive_data_acceptance]


@pytest.fixture
def api_schema(db_url: str, redis_url: str, seed: Seeder) -> Iterator[Any]:
    for _ in range(2):
        seed.failed_run()
    seed.completed_run()
    dashboard = DashboardSettings(
        database_url=db_url,
        redis_url=redis_url,
        viewer_tokens=(VIEWER,),
        operator_tokens=(OPERATOR,),
        metrics_cache_seconds=0.0,
        # Schemathesis sends wrong tokens on purpose; the limit is tested elsewhere.
        auth_failures_per_minute=1_000_000,
    )
    with live_server(dashboard) as url:
        yield schemathesis.openapi.from_url(f"{url}/api/openapi.json")


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_the_api_keeps_to_its_openapi_description(api_schema: Any, mode: GenerationMode) -> None:
    # Each operation gets its own bounded Hypothesis run (schemathesis' pytest plugin does
    # not load under this pytest, so the loop it would generate is written out here).
    headers = {"Authorization": f"Bearer {OPERATOR}"}
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 12
    skipped: list[str] = []
    for operation in operations:

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy(generation_mode=mode))
        def check(case: Any) -> None:
            case.call_and_validate(headers=headers, excluded_checks=EXCLUDED)

        try:
            check()
        except Unsatisfiable:
            # Nothing of this operation can be made invalid (no parameters, no body).
            assert mode is GenerationMode.NEGATIVE, operation.label
            skipped.append(operation.label)
    assert len(skipped) < len(operations) // 2, skipped
