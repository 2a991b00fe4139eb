"""`executor send RUN EVENT`: deliver an external event to a run, as an app would."""

from __future__ import annotations

import argparse
import json
import uuid
from collections.abc import Callable
from typing import Any

from executor.errors import ExecutorError


def register(verb: Callable[..., argparse.ArgumentParser]) -> None:
    p = verb("send", cmd_send, "send an external event to a run (a waiting step consumes it)")
    p.add_argument("run_id")
    p.add_argument("event")
    p.add_argument("--payload", default="null", help="the event's payload as JSON")
    p.add_argument(
        "--idempotency-key", help="repeat a send safely by reusing its key (default: a new one)"
    )


def cmd_send(args: argparse.Namespace) -> int:
    from executor.cli.ops import _client

    try:
        payload: Any = json.loads(args.payload)
    except ValueError as exc:
        raise ExecutorError(f"--payload is not JSON: {exc}") from exc
    key = args.idempotency_key or f"cli-send:{uuid.uuid4().hex}"
    with _client() as client:
        outcome = client.send_event(args.run_id, args.event, payload, idempotency_key=key)
    print(outcome.summary())
    return 0 if outcome.applied else 1
