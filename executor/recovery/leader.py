"""The leader: one process of the deployment fires timers and runs the sweep.

Every worker process runs a `Leader` thread. Each tries, on a connection of its own, to take
a session-level advisory lock; the one that holds it leads until its connection ends — a
killed process loses it with its socket, and another takes over within one retry interval.
The leader fires due timers and starts due schedule ticks every `timer_interval` (so a
sleep ends within about that of its time), and runs the relay, the reaper and retention
every `sweep_interval`.

A thread, not RQ's maintenance hook between jobs, so a worker busy in a long step (or a
chain run in place) still leads on time.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Any

import psycopg

from executor.recovery.reaper import fire_timers
from executor.recovery.sweep import SWEEP_LOCK_KEY, SweepContext, sweep_work

log = logging.getLogger("executor.leader")


class Leader:
    def __init__(
        self,
        context: SweepContext,
        database_url: str,
        *,
        timer_interval: float = 0.25,
        retry_interval: float = 1.0,
    ) -> None:
        self.context = context
        self.database_url = database_url
        self.timer_interval = timer_interval
        self.retry_interval = retry_interval
        self.leading = False
        self._conn: psycopg.Connection[Any] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="executor-leader", daemon=True)
        self._next_sweep = 0.0
        self._next_check = 0.0

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
        self._drop_connection()

    def _loop(self) -> None:
        while not self._stop.is_set():
            wait = self.retry_interval
            try:
                if self._lead():
                    wait = self.tick()
            except Exception as exc:
                log.warning("leader: %s; trying again", exc)
                self._drop_connection()
            self._stop.wait(wait)

    def _lead(self) -> bool:
        if self._conn is None or self._conn.closed:
            self.leading = False
            self._conn = psycopg.connect(self.database_url, autocommit=True)
        if not self.leading:
            row = self._conn.execute(
                "SELECT pg_try_advisory_lock(%s)", (SWEEP_LOCK_KEY,)
            ).fetchone()
            self.leading = bool(row and row[0])
            if self.leading:
                log.info("leader: this process now fires timers and runs the sweep")
        elif time.monotonic() >= self._next_check:
            self._conn.execute("SELECT 1")  # still connected, so still holding the lock
            self._next_check = time.monotonic() + self.retry_interval * 5
        return self.leading

    def tick(self) -> float:
        """One leader pass; returns how long to wait before the next."""
        ctx = self.context
        fire_timers(ctx.pool, ctx.ledger, ctx.dispatcher)
        if time.monotonic() >= self._next_sweep:  # the sweep starts due ticks too
            report = sweep_work(ctx)
            if report.did_work:
                log.info("leader: %s", report)
            self._next_sweep = time.monotonic() + ctx.settings.sweep_interval
        return self.timer_interval

    def _drop_connection(self) -> None:
        self.leading = False
        if self._conn is not None:
            with contextlib.suppress(Exception):  # closing a broken socket
                self._conn.close()
            self._conn = None
