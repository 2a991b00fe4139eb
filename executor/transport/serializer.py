"""The RQ serializer for everything we put in Redis: UTF-8 JSON, and nothing else.

RQ's default serializer is pickle, and unpickling runs code named by the bytes: anyone who
can write to Redis could run anything in a worker. RQ's own `JSONSerializer` would be enough
for encoding, but its `loads` hands a decode failure back as a bare UnicodeDecodeError, so a
pickled job hash shows up as a puzzle in the logs. This one says what it refused and why,
and recognises pickle bytes by their opcodes without ever unpickling them.

Use it with RQ's tools by dotted path:
`--serializer executor.transport.serializer.JSONCommandSerializer`.
"""

from __future__ import annotations

import json
from typing import Any

from executor.errors import ExecutorError

# Protocol 2+ pickles start with PROTO (0x80) and the protocol number.
_PICKLE_PROTO = 0x80


class RefusedPayload(ExecutorError, ValueError):
    """A job payload was not UTF-8 JSON; it was refused without being interpreted."""


def describe_non_json(data: bytes) -> str | None:
    """Why `data` cannot be one of our payloads, or None if it may be JSON."""
    if not data:
        return "empty payload"
    if data[0] == _PICKLE_PROTO and len(data) > 1 and data[1] <= 5:
        return (
            f"pickled payload (pickle protocol {data[1]}) refused: "
            "jobs must be JSON, we never unpickle"
        )
    stripped = data.rstrip()
    if stripped.endswith(b".") and stripped[:1] in b"(cS]}IVNLFKM\x80":
        # Protocol 0/1 pickles are ASCII and end with STOP ("."); no JSON text ends with ".".
        return "pickled payload (pickle protocol 0/1) refused: jobs must be JSON, we never unpickle"
    return None


class JSONCommandSerializer:
    """RQ `Serializer` protocol: `dumps(obj) -> bytes`, `loads(bytes) -> obj`, JSON only."""

    @staticmethod
    def dumps(obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()

    @staticmethod
    def loads(data: bytes | bytearray | memoryview | str) -> Any:
        if isinstance(data, str):
            text = data
        else:
            raw = bytes(data)
            reason = describe_non_json(raw)
            if reason is not None:
                raise RefusedPayload(reason)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise RefusedPayload(
                    f"payload is not UTF-8 text ({exc}); jobs must be JSON"
                ) from exc
        try:
            return json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise RefusedPayload(f"payload is not valid JSON: {exc}") from exc
