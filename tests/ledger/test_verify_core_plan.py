"""`verify` on the shapes the core's new vocabulary produces (CORE-PLAN), hand-built.

Queued runs and admission, sleeping and waiting steps, external events, maps and child runs:
each valid shape passes, and each wrong one is flagged by name. The schema is widened to
that vocabulary inside the test's transaction (tests/ledger/handlog.py).
"""

from __future__ import annotations

from executor.ledger.verify import verify
from tests.ledger.handlog import Conn, E, Log, assert_clean, check, fence, found, out, stuck

# --- queued runs -----------------------------------------------------------------------------


def _holder(run_id: str = "holder") -> Log:
    return (
        Log(run_id, concurrency_key="k").create(concurrency_key="k").start({"a": []}, queue=("a",))
    )


def _queued(run_id: str = "q") -> Log:
    return Log(run_id, concurrency_key="k").apply(
        f"create:{run_id}",
        E("run_created", workflow="wf", concurrency_key="k"),
        E("run_queued", concurrency_key="k"),
    )


def test_a_queued_run_admitted_when_the_holder_ends_passes(ledger: Conn) -> None:
    holder = _holder().run_step("a", 1, E("run_completed", output={"a": out("a")}))
    queued = _queued().apply("admit_run:q", E("run_admitted"))
    queued.start({"a": []}, queue=("a",)).run_step(
        "a", 1, E("run_completed", output={"a": out("a")})
    )
    assert_clean(check(ledger, holder, queued))


def test_a_queued_run_waits_while_its_key_is_held_and_can_be_cancelled(ledger: Conn) -> None:
    cancelled = _queued("q2").apply("cancel:q2", E("run_cancelled", reason="operator"))
    assert_clean(check(ledger, _holder(), _queued(), cancelled))


def test_a_queued_run_nobody_holds_the_key_of_is_stuck(ledger: Conn) -> None:
    holder = _holder().run_step("a", 1, E("run_completed", output={"a": out("a")}))
    report = check(ledger, holder, _queued())
    assert report.ok
    assert stuck(report) == [("stuck_queued", "q", None)]
    assert "0 of 1 slots" in report.stuck[0].message


# --- sleeping, waiting, events ---------------------------------------------------------------


def test_a_durable_sleep_passes_and_keeps_its_run_from_being_stuck(ledger: Conn) -> None:
    log = Log().create().start({"nap": []}, queue=("nap",), specs={"nap": {"kind": "sleep"}})
    log.begin("nap").apply(
        "sleep:r1:nap:1",
        E("step_sleeping", "nap", 1, fence=fence("nap", 1), wake_at="2030-01-01T00:00:00Z"),
    )
    assert_clean(check(ledger, log))  # asleep: waiting for its time, not stuck
    log2 = Log("r2").create().start({"nap": []}, queue=("nap",)).begin("nap")
    log2.apply("sleep:r2", E("step_sleeping", "nap", 1, fence=fence("nap", 1)))
    log2.apply(
        "wake:r2",
        E("step_completed", "nap", 1, output=None),
        E("run_completed", output={"nap": None}),
    )
    assert_clean(check(ledger, log2))


def test_an_event_sent_before_its_step_waits_is_consumed_when_it_does(ledger: Conn) -> None:
    log = Log().create().start({"ok": []}, queue=("ok",), specs={"ok": {"kind": "wait"}})
    log.apply("send:r1:approved", E("event_received", event="approved", payload={"by": "x"}))
    log.begin("ok").apply(
        "wait:r1:ok:1",
        E("step_waiting", "ok", 1, fence=fence("ok", 1), event="approved"),
        E("step_completed", "ok", 1, output={"by": "x"}),
        E("run_completed", output={"ok": {"by": "x"}}),
    )
    assert_clean(check(ledger, log))


def test_a_wait_answered_later_or_timed_out_passes(ledger: Conn) -> None:
    log = Log().create().start({"ok": []}, queue=("ok",), max_attempts=2)
    log.begin("ok").apply("wait:r1:ok:1", E("step_waiting", "ok", 1, fence=fence("ok", 1)))
    log.apply("timeout:r1:ok:1", E("step_retrying", "ok", 1, error={"message": "timed out"}))
    log.apply("dispatch_step:r1:ok:2", E("step_queued", "ok", 2))
    log.begin("ok", 2).apply("wait:r1:ok:2", E("step_waiting", "ok", 2, fence=fence("ok", 2)))
    log.apply(
        "send:r1:approved",
        E("event_received", "ok", event="approved", payload=1, consumed_by="ok"),
        E("step_completed", "ok", 2, output=1),
        E("run_completed", output={"ok": 1}),
    )
    assert_clean(check(ledger, log))


def test_an_event_consumed_by_a_step_that_does_not_exist_is_flagged(ledger: Conn) -> None:
    log = Log().create().start({"ok": []}, queue=("ok",))
    log.apply("send:r1:x", E("event_received", event="x", consumed_by="nobody"))
    assert found(check(ledger, log)) == [("unknown_step", "r1", "nobody", 5)]


def test_a_sleep_outcome_under_another_fence_is_flagged(ledger: Conn) -> None:
    log = Log().create().start({"nap": []}, queue=("nap",)).begin("nap")
    log.apply("sleep:r1", E("step_sleeping", "nap", 1, fence="stale-owner"))
    assert found(check(ledger, log)) == [("fence_mismatch", "r1", "nap", 6)]


# --- maps ------------------------------------------------------------------------------------

MAP = {"kind": "map", "map_over": "u"}


def _mapped(items: int) -> Log:
    """u -> m (a map over u's list) -> z, up to u's completion fanning out `items` items."""
    log = Log().create()
    log.start({"u": [], "m": ["u"], "z": ["m"]}, queue=("u",), specs={"m": MAP})
    fan = [E("step_waiting", "m", 0, items=items)]
    fan += [E("step_created", f"m[{i}]", 0, parent="m", index=i) for i in range(items)]
    fan += [E("step_queued", f"m[{i}]", 1) for i in range(items)]
    if not items:
        fan = [E("step_completed", "m", 0, output=[]), E("step_queued", "z", 1)]
    return log.run_step("u", 1, *fan)


def _finish(log: Log) -> Log:
    return log.run_step("z", 1, E("run_completed", output={"z": out("z")}))


def test_a_map_over_a_list_passes(ledger: Conn) -> None:
    log = _mapped(3).run_step("m[0]").run_step("m[1]").begin("m[2]")
    log.complete(
        "m[2]",
        1,
        E("step_completed", "m", 0, output=[out(f"m[{i}]") for i in range(3)]),
        E("step_queued", "z", 1),
    )
    assert_clean(check(ledger, _finish(log)))


def test_a_map_over_an_empty_list_completes_at_once(ledger: Conn) -> None:
    assert_clean(check(ledger, _finish(_mapped(0))))


def test_a_map_over_something_not_a_list_fails_from_pending(ledger: Conn) -> None:
    log = Log().create()
    log.start({"u": [], "m": ["u"]}, queue=("u",), specs={"m": MAP})
    log.run_step("u", 1, E("step_failed", "m", 1, error={"type": "MapOverNotAList"}))
    log.apply("x", E("run_failed", error={"message": "step m failed"}))
    assert_clean(check(ledger, log))
    task = Log("r2").create().start({"a": []}).apply("x2", E("step_failed", "a", 1, error={}))
    assert found(check(ledger, task)) == [("transition", "r2", "a", 4)]


def test_a_map_completed_before_its_items_is_flagged(ledger: Conn) -> None:
    log = _mapped(2).run_step("m[0]", 1, E("step_completed", "m", 0, output=[]))
    assert found(check(ledger, log)) == [("map_incomplete", "r1", "m", 16)]


def test_an_item_queued_before_its_maps_upstream_completed_is_flagged(ledger: Conn) -> None:
    log = Log().create()
    log.start({"u": [], "m": ["u"]}, queue=("u",), specs={"m": MAP})
    log.apply(
        "early",
        E("step_created", "m[0]", 0, parent="m", index=0),
        E("step_queued", "m[0]", 1),
    )
    assert found(check(ledger, log)) == [
        ("dependency_order", "r1", "m[0]", 6),
        ("dependency_order", "r1", "m[0]", 7),
    ]


def test_a_map_left_waiting_after_its_last_item_is_stuck(ledger: Conn) -> None:
    log = _mapped(2).run_step("m[0]").run_step("m[1]")
    report = check(ledger, log)
    assert report.ok
    assert stuck(report) == [("stuck", "r1", "m")]


# --- child runs ------------------------------------------------------------------------------


def _parent() -> Log:
    log = Log("p").create().start({"c": []}, queue=("c",), specs={"c": {"kind": "child"}})
    return log.begin("c").apply(
        "complete_step:p:c:1", E("step_waiting", "c", 1, fence=fence("c", 1), child_run_id="ch")
    )


def _child() -> Log:
    log = Log("ch").create(parent_run_id="p", parent_step_key="c", parent_attempt=1)
    return log.start({"x": []}, queue=("x",))


def test_a_child_run_ending_its_parent_step_passes(ledger: Conn) -> None:
    child = _child().run_step("x", 1, E("run_completed", output={"x": out("x")}))
    parent = _parent().apply(
        "child_done:ch",
        E("step_completed", "c", 1, output={"x": out("x")}),
        E("run_completed", output={"c": {"x": out("x")}}),
    )
    assert_clean(check(ledger, parent, child))
    assert_clean(verify(ledger, run_id="ch"))


def test_a_parent_step_completed_before_its_child_run_is_flagged(ledger: Conn) -> None:
    parent = _parent().apply("early", E("step_completed", "c", 1, output=None))
    assert found(check(ledger, parent, _child())) == [("child_link", "p", "c", None)]


def test_a_parent_step_still_waiting_on_an_ended_child_is_stuck(ledger: Conn) -> None:
    child = _child().run_step("x", 1, E("run_completed", output={"x": out("x")}))
    report = check(ledger, _parent(), child)
    assert report.ok
    assert stuck(report) == [("stuck", "p", "c")]
    assert "waits on child run ch, which is completed" in report.stuck[0].message


def test_a_child_of_a_step_that_does_not_exist_is_flagged(ledger: Conn) -> None:
    orphan = Log("ch").create(parent_run_id="p", parent_step_key="nope", parent_attempt=1)
    assert found(check(ledger, _parent(), orphan)) == [("child_link", "ch", None, None)]


def test_an_event_type_no_table_knows_is_flagged(ledger: Conn) -> None:
    log = Log().create().apply("x", E("run_teleported"))
    assert found(check(ledger, log)) == [("unknown_event", "r1", None, 2)]
