"""Job timeouts that a step's own `except Exception` cannot swallow.

RQ raises `JobTimeoutException`, an ordinary Exception, from a SIGALRM handler inside the
job. A step that catches Exception (most retry loops do) would eat it and run on past its
timeout. Ours raises `StepTimeout`, a BaseException, which only the runner catches.
"""

from __future__ import annotations

import contextlib
from types import FrameType

from rq.timeouts import JobTimeoutException, UnixSignalDeathPenalty

from executor.errors import StepTimeout


class StepDeathPenalty(UnixSignalDeathPenalty):
    def handle_death_penalty(self, signum: int, frame: FrameType | None) -> None:
        if self._exception is JobTimeoutException:
            raise StepTimeout(f"step exceeded its timeout ({self._timeout} seconds)")
        super().handle_death_penalty(signum, frame)  # type: ignore[no-untyped-call]

    def cancel_death_penalty(self) -> None:
        # The alarm may fire after the job body returned, while RQ cancels it; RQ ignores its
        # own timeout there, and the job is done, so ignore ours too.
        with contextlib.suppress(StepTimeout):
            super().cancel_death_penalty()  # type: ignore[no-untyped-call]
