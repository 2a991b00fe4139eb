"""The runner's heartbeat thread (`executor.workflows.heartbeats`), without a database.

It beats each attempt on its interval, and a new attempt wakes it only when the attempt
falls due before the thread would wake anyway: short steps one after another cost no
thread switch each.
"""

from __future__ import annotations

import threading
from typing import Any

from support.waiting import wait_for

from executor.workflows.heartbeats import Heartbeats


class CountingCondition(threading.Condition):
    notified = 0

    def notify(self, n: int = 1) -> None:
        CountingCondition.notified += 1
        super().notify(n)


def test_steps_one_after_another_wake_the_thread_once() -> None:
    hb = Heartbeats()
    hb._lock = CountingCondition()
    lost = threading.Event()
    with hb.watch(lambda: True, 10.0, lost):  # starts the thread
        pass
    wait_for(lambda: hb._wakes_at > 0, timeout=5, what="the thread to wait for its next beat")
    for _ in range(100):
        with hb.watch(lambda: True, 10.0, lost):
            pass
    assert CountingCondition.notified == 0  # each is due after the thread wakes anyway


def test_an_attempt_due_sooner_than_the_thread_wakes_it_and_is_beaten() -> None:
    hb = Heartbeats()
    beats: list[str] = []
    lost = threading.Event()
    done = threading.Event()

    def slow() -> bool:
        beats.append("slow")
        return True

    def fast() -> Any:
        beats.append("fast")
        done.set()
        return True

    with hb.watch(slow, 30.0, lost):
        wait_for(lambda: hb._wakes_at > 0, timeout=5, what="the thread to wait 30 s")
        with hb.watch(fast, 0.05, lost):
            assert done.wait(5), "the attempt due in 50 ms was not beaten"
    assert "slow" not in beats


def test_a_beat_that_finds_the_attempt_gone_raises_its_flag() -> None:
    hb = Heartbeats()
    lost = threading.Event()
    with hb.watch(lambda: False, 0.02, lost):
        assert lost.wait(5)
