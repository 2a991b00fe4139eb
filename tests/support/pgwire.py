"""Just enough of the Postgres wire protocol (v3) for the test proxy in `pgproxy`.

Frames are a type byte and a big-endian int32 length that counts itself; the first frame
of a connection has no type byte (a startup, SSL, GSSENC or cancel request).
"""

from __future__ import annotations

import re
import struct

SSL_REQUEST, GSSENC_REQUEST, CANCEL_REQUEST = 80877103, 80877104, 80877102
COMMIT_RE = re.compile(
    r"\s*(COMMIT|END)(\s+(WORK|TRANSACTION))?(\s+AND\s+(NO\s+)?CHAIN)?[\s;]*", re.IGNORECASE
)
_BEGIN_RE = re.compile(r"\s*(BEGIN|START\s+TRANSACTION)\b", re.IGNORECASE)
_ROLLBACK_RE = re.compile(r"\s*(ROLLBACK|ABORT)\b(?!\s+(TO|PREPARED)\b)", re.IGNORECASE)


def is_commit(query: str) -> bool:
    """True if `query` is exactly one COMMIT statement (what the proxy acts on)."""
    return COMMIT_RE.fullmatch(query) is not None


def ends_transaction_scope(query: str) -> bool:
    """A BEGIN or ROLLBACK: the statements before it belong to no later COMMIT."""
    return bool(_BEGIN_RE.match(query) or _ROLLBACK_RE.match(query))


def frame_size(buf: bytearray, startup: bool) -> int | None:
    """Length of the complete message at the start of `buf`, or None if incomplete."""
    if startup:
        if len(buf) < 4:
            return None
        size, least = int(struct.unpack_from("!i", buf)[0]), 8
    else:
        if len(buf) < 5:
            return None
        size, least = 1 + int(struct.unpack_from("!i", buf, 1)[0]), 5
    if size < least:
        raise ConnectionError(f"pgproxy: malformed message (length {size})")
    return size if len(buf) >= size else None


def cstring(data: bytes) -> tuple[bytes, bytes]:
    value, _, rest = data.partition(b"\x00")
    return value, rest


def bind_params(data: bytes) -> tuple[bytes | None, ...]:
    """The parameter values of a Bind message, after its portal and statement names."""
    formats = struct.unpack_from("!h", data)[0]
    offset = 2 + 2 * formats
    count = struct.unpack_from("!h", data, offset)[0]
    offset += 2
    params: list[bytes | None] = []
    for _ in range(count):
        size = struct.unpack_from("!i", data, offset)[0]
        offset += 4
        if size < 0:
            params.append(None)
        else:
            params.append(data[offset : offset + size])
            offset += size
    return tuple(params)


def command_tag(body: bytes) -> str:
    return cstring(body)[0].decode(errors="replace")


def error_text(body: bytes) -> str:
    fields = {f[:1]: f[1:].decode(errors="replace") for f in body.split(b"\x00") if f}
    return f"ERROR {fields.get(b'C', '?')}: {fields.get(b'M', '')}"
