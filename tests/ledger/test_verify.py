"""`verify` against hand-built logs (tests/ledger/handlog.py), on a real Postgres.

Each wrong log is otherwise valid, so it fails for one reason, asserted by rule name, run,
step and seq. Each valid shape passes with nothing reported. The logs go in with plain
INSERTs inside a transaction that is rolled back (the schema is widened to the core's new
vocabulary in it); the CLI tests commit theirs, since the CLI opens its own connection.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import psycopg
import pytest
from psycopg.rows import dict_row

from executor.ledger.verify import verify
from tests.ledger.handlog import Conn, E, Log, assert_clean, check, found, out


def diamond(run_id: str = "r1") -> Log:
    """a -> (b, c) -> d, completed: the fan-out/join every other shape starts from."""
    return (
        Log(run_id)
        .create()
        .start({"a": [], "b": ["a"], "c": ["a"], "d": ["b", "c"]}, queue=("a",))
        .run_step("a", 1, E("step_queued", "b", 1), E("step_queued", "c", 1))
        .run_step("b")
        .run_step("c", 1, E("step_queued", "d", 1))
        .run_step("d", 1, E("run_completed", output={"d": out("d")}))
    )


# --- the five wrong logs of issue 7 ----------------------------------------------------------


def test_flags_a_run_completed_while_a_step_is_still_queued(ledger: Conn) -> None:
    log = (
        Log()
        .create()
        .start({"a": [], "b": []}, queue=("a", "b"))
        .run_step("a", 1, E("run_completed", output={"a": out("a"), "b": None}))
    )
    report = check(ledger, log)
    assert found(report) == [("run_completed_early", "r1", "b", 9)]
    assert "step b is queued" in report.violations[0].message


def test_flags_a_dependant_queued_and_completed_before_its_upstream_ran(ledger: Conn) -> None:
    log = (
        Log()
        .create()
        .start({"a": [], "b": ["a"]}, queue=("b",))
        .run_step("b")
        .apply("dispatch:a", E("step_queued", "a", 1))
        .run_step("a", 1, E("run_completed", output={"b": out("b")}))
    )
    report = check(ledger, log)
    assert found(report) == [("dependency_order", "r1", "b", 5)]
    assert "upstream a is pending" in report.violations[0].message


def test_flags_a_step_dispatched_after_another_failed_terminally(ledger: Conn) -> None:
    log = (
        Log()
        .create()
        .start({"a": [], "b": [], "c": ["b"]}, queue=("a", "b"))
        .begin("a")
        .begin("b")
        .fail("a")
        .complete("b", 1, E("step_queued", "c", 1))  # c must stay pending: a failed
        .run_step("c", 1, E("run_failed", error={"message": "step a failed"}))
    )
    report = check(ledger, log)
    assert found(report) == [("dispatch_after_failure", "r1", "c", 12)]
    assert "after step a failed terminally" in report.violations[0].message


def test_flags_a_run_failed_while_a_step_was_still_running(ledger: Conn) -> None:
    log = (
        Log()
        .create()
        .start({"a": [], "b": []}, queue=("a", "b"))
        .begin("a")
        .begin("b")
        .fail("a", 1, E("run_failed", error={"message": "step a failed"}))
    )
    report = check(ledger, log)
    assert found(report) == [("run_failed_early", "r1", "b", 10)]
    assert "step b is running" in report.violations[0].message


def _never_finishes() -> Log:
    return (
        Log()
        .create()
        .start({"a": [], "b": ["a"]}, queue=("a",))
        .run_step("a", 1, E("step_queued", "b", 1))
        .run_step("b")
    )


def test_reports_a_running_run_whose_steps_all_completed_as_stuck(ledger: Conn) -> None:
    report = check(ledger, _never_finishes())
    assert report.ok  # no rule of the log is broken ...
    assert [(s.run_id, s.step_key, s.seq, s.status) for s in report.stuck] == [
        ("r1", None, 10, "running")
    ]  # ... but nothing can ever finish it
    assert report.exit_code == 5


def _cli(db_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "EXECUTOR_DATABASE_URL": db_url}
    return subprocess.run(
        [sys.executable, "-m", "executor", "verify", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_cli_exits_5_on_a_stuck_run_and_3_when_a_rule_is_broken_too(db_url: str) -> None:
    with psycopg.connect(db_url, row_factory=dict_row, autocommit=True) as conn:
        _never_finishes().write(conn)
    done = _cli(db_url)
    assert done.returncode == 5, done.stderr
    assert "STUCK: stuck at run r1 seq 10 (running)" in done.stderr
    as_json = _cli(db_url, "--json")
    assert as_json.returncode == 5
    body = json.loads(as_json.stdout)
    assert body["ok"] is True
    assert body["stuck"][0]["run_id"] == "r1"
    assert body["exit_code"] == 5

    with psycopg.connect(db_url, row_factory=dict_row, autocommit=True) as conn:
        bad = Log("r2").create().start({"a": [], "b": []}, queue=("a", "b"))
        bad.run_step("a", 1, E("run_completed", output={"a": out("a"), "b": None})).write(conn)
    both = _cli(db_url, "--json")
    assert both.returncode == 3
    body = json.loads(both.stdout)
    assert [(v["rule"], v["run_id"], v["step_key"], v["seq"]) for v in body["violations"]] == [
        ("run_completed_early", "r2", "b", 9)
    ]
    assert [s["run_id"] for s in body["stuck"]] == ["r1"]
    first = _cli(db_url)
    assert first.returncode == 3
    assert "VIOLATION: run/run_completed_early violated at run r2 step b seq 9" in first.stderr


def test_cli_says_ok_on_a_clean_ledger(db_url: str) -> None:
    with psycopg.connect(db_url, row_factory=dict_row, autocommit=True) as conn:
        diamond().write(conn)
    done = _cli(db_url)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ok: 1 runs, 19 events, 10 receipts, 0 drops")


# --- valid shapes pass -----------------------------------------------------------------------


def test_a_fan_out_and_join_passes(ledger: Conn) -> None:
    report = check(ledger, diamond())
    assert_clean(report)
    assert (report.runs, report.events, report.receipts) == (1, 19, 10)


def test_retries_with_backoff_pass(ledger: Conn) -> None:
    log = (
        Log()
        .create()
        .start({"a": []}, queue=("a",), max_attempts=3)
        .begin("a")
        .fail("a", 1, retry=True)
        .apply("dispatch_step:r1:a:2", E("step_queued", "a", 2))
        .drop("dispatch_step:r1:a:2", "duplicate")
        .begin("a", 2)
        .drop("complete_step:r1:a:1", "stale_attempt")  # attempt 1's late result
        .complete("a", 2, E("run_completed", output={"a": out("a")}))
    )
    assert_clean(check(ledger, log))


def test_a_manual_retry_reopening_a_failed_run_passes(ledger: Conn) -> None:
    log = (
        Log()
        .create()
        .start({"a": [], "b": ["a"]}, queue=("a",))
        .begin("a")
        .fail("a", 1, E("run_failed", error={"message": "step a failed"}))
        .apply(
            "retry:r1:a",
            E("run_resumed", reason="manual_retry", step_key="a"),
            E("step_queued", "a", 2, manual=True),
        )
        .run_step("a", 2, E("step_queued", "b", 1))
        .run_step("b", 1, E("run_completed", output={"b": out("b")}))
    )
    assert_clean(check(ledger, log))


def test_a_cancel_passes_and_the_late_result_is_dropped_as_terminal(ledger: Conn) -> None:
    log = (
        Log()
        .create()
        .start({"a": [], "b": ["a"]}, queue=("a",))
        .begin("a")
        .apply(
            "cancel:r1",
            E("step_cancelled", "a", 1, reason="operator"),
            E("step_cancelled", "b", 0, reason="operator"),
            E("run_cancelled", reason="operator"),
        )
        .drop("complete_step:r1:a:1", "terminal")
    )
    assert_clean(check(ledger, log))


def test_pause_and_resume_pass(ledger: Conn) -> None:
    log = (
        Log()
        .create()
        .start({"a": [], "b": ["a"]}, queue=("a",))
        .begin("a")
        .apply("pause:r1", E("run_paused", reason="operator"))
        .complete("a")  # a running step may finish while paused; b waits for the resume
        .apply("resume:r1", E("run_resumed", reason="resumed"), E("step_queued", "b", 1))
        .run_step("b", 1, E("run_completed", output={"b": out("b")}))
    )
    assert_clean(check(ledger, log))


def test_many_runs_with_receipts_and_drops_of_runs_that_never_existed(ledger: Conn) -> None:
    """The merge by run_id: ids sort around a run with no row, and NULL ids come last."""
    for run_id in ("a-run", "m-run", "z-run"):
        diamond(run_id).write(ledger)
    ledger.execute(
        "INSERT INTO executor.receipts (idempotency_key, run_id, command_type, command, outcome)"
        " VALUES ('start_step:k-ghost:a:1', 'k-ghost', 'start_step', '{}', 'unknown_entity'),"
        " ('junk', NULL, 'start_step', '{}', 'invalid_payload')"
    )
    ledger.execute(
        "INSERT INTO executor.drops (idempotency_key, run_id, reason, detail) VALUES"
        " ('start_step:k-ghost:a:1', 'k-ghost', 'unknown_entity', 'no run'),"
        " ('start_step:k-ghost:a:1', 'k-ghost', 'duplicate', 'again'),"
        " ('junk', NULL, 'invalid_payload', 'bad'), (NULL, NULL, 'invalid_payload', 'no key')"
    )
    report = verify(ledger)
    assert_clean(report)
    assert (report.runs, report.events, report.receipts, report.drops) == (3, 57, 32, 4)
    assert verify(ledger, run_id="m-run").events == 19


# --- other rules -----------------------------------------------------------------------------


def test_a_fence_mismatch_is_flagged(ledger: Conn) -> None:
    log = Log().create().start({"a": []}, queue=("a",)).begin("a")
    log.apply(
        "complete_step:r1:a:1",
        E("step_completed", "a", 1, fence="job-of-someone-else", output=out("a")),
        E("run_completed", output={"a": out("a")}),
    )
    report = check(ledger, log)
    assert found(report) == [("fence_mismatch", "r1", "a", 6)]
    assert report.violations[0].invariant == "I6"


def test_an_outcome_without_a_fence_is_not_fenced(ledger: Conn) -> None:
    """expire_lease and timers carry no fence: nothing to compare."""
    log = Log().create().start({"a": []}, queue=("a",), max_attempts=2).begin("a")
    log.apply("expire:r1:a:1", E("step_retrying", "a", 1, error={"message": "lease"}))
    log.apply("dispatch_step:r1:a:2", E("step_queued", "a", 2))
    log.run_step("a", 2, E("run_completed", output={"a": out("a")}))
    assert_clean(check(ledger, log))


def test_a_transient_drop_needs_no_receipt_and_its_key_applies_later(ledger: Conn) -> None:
    holder = diamond("holder")
    log = Log("late", concurrency_key="k")
    log.drop("create:late", "key_taken")  # refused while the key was held: key still usable
    log.drop("create:late", "key_taken")
    log.create(concurrency_key="k")  # the same key, applied once the holder finished
    log.drop("dispatch:late", "paused").drop("dispatch:late", "not_due").drop("x:late", "busy")
    log.start({"a": []}, queue=("a",)).run_step("a", 1, E("run_completed", output={"a": out("a")}))
    assert_clean(check(ledger, holder, log))


def test_a_final_drop_without_a_receipt_is_flagged(ledger: Conn) -> None:
    log = diamond().drop("start_step:r1:d:1:late", "terminal", receipt=False)
    assert found(check(ledger, log)) == [("drop_without_receipt", "r1", None, None)]


def test_a_drop_reason_verify_does_not_know_is_flagged(ledger: Conn) -> None:
    """A new reason must be classed final or transient (state.py) before I2 can judge it."""
    log = diamond().drop("start_step:r1:d:1:late", "weird", receipt=False)
    assert found(check(ledger, log)) == [("drop_reason", "r1", None, None)]


def test_a_receipt_recording_a_transient_refusal_is_flagged(ledger: Conn) -> None:
    """The burned-key bug of issue 7: the refusal became the key's fate."""
    log = diamond().drop("create:again", "key_taken", receipt=True)
    assert found(check(ledger, log)) == [("receipt_transient", "r1", None, None)]


def test_an_i5_violation_over_the_rows_is_flagged(ledger: Conn) -> None:
    one = Log("one", concurrency_key="dir").create().start({"a": []}, queue=("a",))
    two = Log("two", concurrency_key="dir").create().start({"a": []}, queue=("a",))
    report = check(ledger, one, two)
    assert found(report) == [("concurrency_limit", "two", None, None)]
    assert "2 active runs hold key 'dir' (limit 1)" in report.violations[0].message
    assert verify(ledger, stop_at_first=True).violations_total == 1


def test_a_concurrency_limit_from_the_rows_allows_that_many(ledger: Conn) -> None:
    logs = [
        Log(f"h{i}", concurrency_key="dir", columns={"concurrency_limit": 2}).create()
        for i in range(2)
    ]
    assert_clean(check(ledger, *logs))
    extra = Log("h2", concurrency_key="dir", columns={"concurrency_limit": 2}).create()
    assert found(check(ledger, extra)) == [("concurrency_limit", "h2", None, None)]


def test_rows_that_differ_from_the_replay_are_flagged(ledger: Conn) -> None:
    diamond().write(ledger, steps={"b": {"attempt": 2}}, run={"steps_completed": 3})
    assert sorted(found(verify(ledger))) == [
        ("counter", "r1", None, 19),
        ("step_row", "r1", "b", 19),
    ]


def test_a_run_failed_without_any_failure_is_flagged(ledger: Conn) -> None:
    log = Log().create().start({"a": []}, queue=("a",)).begin("a")
    log.apply("expire:r1:a:1", E("step_failed", "a", 1, error={}), E("run_failed"))
    assert_clean(check(ledger, log))
    other = Log("r2").create().start({"a": []}, queue=("a",))
    other.apply("cancel-ish", E("step_cancelled", "a", 1), E("run_failed"))
    assert found(check(ledger, other)) == [("run_failed_without_failure", "r2", None, 6)]


def test_a_failed_run_reopened_without_its_manual_retry_is_flagged(ledger: Conn) -> None:
    log = Log().create().start({"a": []}, queue=("a",)).begin("a")
    log.fail("a", 1, E("run_failed"))
    log.apply("retry:r1:a", E("run_resumed", reason="manual_retry", step_key="a"))
    assert found(check(ledger, log)) == [("reopen_without_retry", "r1", None, 8)]


def test_a_broken_step_history_stops_that_runs_replay(ledger: Conn) -> None:
    """The late start of the original bug report: one I1 violation, nothing cascading."""
    log = diamond()
    log.apply("start_step:r1:d:1:late", E("step_started", "d", 1))
    report = check(ledger, log)
    assert found(report) == [("after_terminal_run", "r1", "d", 20)]
    assert report.violations[0].invariant == "I1"


def test_stop_at_first_and_one_run_only(ledger: Conn) -> None:
    bad = [Log(f"r{i}").create().start({"a": []}, queue=("a",)) for i in range(3)]
    for log in bad:
        log.apply(f"x:{log.run_id}", E("run_completed", output={"a": None}))
    check(ledger, *bad)
    assert verify(ledger).violations_total == 3
    assert verify(ledger, stop_at_first=True).violations_total == 1
    assert [v.run_id for v in verify(ledger, run_id="r1").violations] == ["r1"]


def _planning_refusal(conn: Conn, run_id: str, reason: str = "unknown_entity") -> None:
    conn.execute(
        "INSERT INTO executor.drops (idempotency_key, run_id, command_type, reason, detail)"
        " VALUES (%s, %s, 'start_run', %s, 'this worker cannot plan it')",
        (f"start_run:{run_id}", run_id, reason),
    )


@pytest.mark.parametrize("reason", ["unknown_entity", "invalid_payload"])
def test_a_worker_refusing_to_plan_a_run_keeps_the_key_usable(ledger: Conn, reason: str) -> None:
    """A workflow the worker does not know, or a graph it cannot plan: recorded by the worker
    with no receipt, so a worker with other code can start the run later under the same key."""
    waiting = Log("waiting").create()
    started = Log("started").create()
    started.start({"a": []}, queue=("a",)).run_step(
        "a", 1, E("run_completed", output={"a": out("a")})
    )
    for log in (waiting, started):
        log.write(ledger)
        _planning_refusal(ledger, log.run_id, reason)
    assert_clean(verify(ledger))


def test_an_unknown_entity_refusal_without_a_receipt_of_a_run_that_never_existed_is_flagged(
    ledger: Conn,
) -> None:
    _planning_refusal(ledger, "ghost")
    assert found(verify(ledger)) == [("drop_without_receipt", "ghost", None, None)]


def test_a_planning_refusal_disagreeing_with_a_final_receipt_is_flagged(ledger: Conn) -> None:
    log = Log().create().drop("start_run:r1", "invalid_payload")  # the handler's own, receipted
    log.write(ledger)
    _planning_refusal(ledger, "r1", "unknown_entity")
    assert found(verify(ledger)) == [("drop_receipt_mismatch", "r1", None, None)]
