"""The transport's side of running dependants in place: budget, timeout re-arm, wire form."""

from __future__ import annotations

import signal

import pytest

from executor.client import Client
from executor.commands.models import CompleteStep, StartRun, parse_obj, unplanned_start, wire
from executor.errors import ExecutorError
from executor.transport import jobs


def test_a_step_run_in_place_gets_a_whole_job_timeout_again() -> None:
    budget, rearm = jobs._in_place_budget(40)
    assert budget == 20
    assert rearm is not None
    previous = signal.signal(signal.SIGALRM, lambda *a: None)
    try:
        signal.alarm(1)
        rearm()
        assert signal.alarm(0) == 40  # the pending alarm was pushed back to a full timeout
    finally:
        signal.signal(signal.SIGALRM, previous)


def test_no_job_timeout_or_the_forking_worker_means_no_continuing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert jobs._in_place_budget(None) == (0.0, None)
    monkeypatch.setattr(jobs, "CONTINUE_IN_PLACE", False)
    assert jobs._in_place_budget(40) == (0.0, None)


def test_unset_optional_fields_stay_off_the_wire() -> None:
    payload = wire(unplanned_start("r1", "wf"))
    assert "continue_on" not in payload
    assert payload["steps"] == []
    done = wire(CompleteStep(fence="f", run_id="r1", step_key="a", attempt=1, output=None))
    assert "continue_on" not in done
    assert parse_obj(done) == CompleteStep(fence="f", run_id="r1", step_key="a", attempt=1)
    assert isinstance(jobs.decode(payload), StartRun)


def test_apps_cannot_promise_to_run_a_step_in_place(db_url: str, redis_url: str) -> None:
    with Client(db_url, redis_url) as client, pytest.raises(ExecutorError, match="continue_on"):
        client.apply(
            CompleteStep(
                fence="f", run_id="r1", step_key="a", attempt=1, output=1, continue_on="default"
            )
        )
