"""Keeping a running attempt's lease: the heartbeats a runner sends while user code runs.

A beat extends the lease of one attempt, fenced by its delivery's token; a beat that finds
the attempt no longer ours raises the attempt's `lost` flag, which `ctx.heartbeat()` reads.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from executor.ledger.handler import Ledger
from executor.ledger.outcome import StepContext as StepContextInfo

log = logging.getLogger("executor.runner")


class Heartbeats:
    """One thread per runner beats every attempt it is running, each on its own interval.

    A thread of its own per attempt cost more to start and join than a no-op step costs to
    run; this one sleeps until the next beat is due, so a step shorter than the interval
    never beats at all. A new attempt wakes it only when it falls due before the thread
    would wake anyway (idle, the thread wakes once an interval): waking it for every step
    cost a thread switch a step.
    """

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._due: dict[int, tuple[float, float, Callable[[], bool], threading.Event]] = {}
        self._next_id = 0
        self._thread: threading.Thread | None = None
        self._wakes_at = float("-inf")  # while the thread waits: when it will wake
        self._shortest = 60.0  # the shortest interval watched: how long an idle thread waits

    @contextmanager
    def watch(
        self, beat: Callable[[], bool], interval: float, lost: threading.Event
    ) -> Iterator[None]:
        with self._lock:
            self._next_id += 1
            ident = self._next_id
            due = time.monotonic() + interval
            self._due[ident] = (due, interval, beat, lost)
            self._shortest = min(self._shortest, interval)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._loop, name="executor-heartbeat", daemon=True
                )
                self._thread.start()
            elif due < self._wakes_at:
                self._lock.notify()
        try:
            yield
        finally:
            with self._lock:
                self._due.pop(ident, None)

    def _loop(self) -> None:
        while True:
            with self._lock:
                now = time.monotonic()
                ready = [(i, d) for i, d in self._due.items() if d[0] <= now]
                if not ready:
                    # Idle, it still wakes one interval on: an attempt that starts meanwhile
                    # is due after that, and need not wake it.
                    soonest = min((d[0] for d in self._due.values()), default=now + self._shortest)
                    self._wakes_at = soonest
                    self._lock.wait(max(0.0, soonest - now))
                    self._wakes_at = float("-inf")  # not waiting: it looks again before it does
                    continue
                for ident, (_, interval, beat, lost) in ready:
                    self._due[ident] = (now + interval, interval, beat, lost)
            for ident, (_, _, beat, lost) in ready:
                try:
                    if not beat():
                        lost.set()
                        with self._lock:
                            self._due.pop(ident, None)
                except Exception:  # the database may be restarting; the lease has slack
                    log.warning("heartbeat failed; will try again", exc_info=True)


class Lease:
    """One attempt's lease: its heartbeat, and the flag a lost beat raises."""

    def __init__(self, ledger: Ledger, run_id: str, info: StepContextInfo, fence: str) -> None:
        self.ledger, self.run_id, self.info, self.fence = ledger, run_id, info, fence
        self.lost = threading.Event()

    def beat(self) -> bool:
        info = self.info
        extended = self.ledger.extend_lease(self.run_id, info.step_key, info.attempt, self.fence)
        return extended is not None
