"""Hook URLs: the token that is a third party's only credential, and the key of its sends.

`Client.hook_url(run_id, event)` mints `<run_id>~<secret>` and stores only its SHA-256 with
the run and the event. A request presents the token; the digest of what it presents is
compared, in constant time and without stopping at the first match, with the digests stored
for the run the token names. Nothing else is looked up, so a token can only ever send its
one event to its one run, and every way of being wrong (no such run, a wrong secret, a
token of another shape) reads the same: `None`, which the route answers with one 404.

The idempotency key of a send is the sender's `Idempotency-Key` when it gives one, else a
digest of the body: a webhook redelivered byte for byte is a duplicate, two different
bodies are two events. Either way the key is namespaced by the hook's digest, so a sender
cannot pick a key that some other command of the ledger will need.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass

from executor.commands.models import IDENTIFIER_PATTERN
from executor.dashboard.auth import as_bytes
from executor.dashboard.queries import Pool, _fetch

MAX_BODY_BYTES = 64 * 1024
MAX_TOKEN_LENGTH = 500
MAX_KEY_LENGTH = 200
HOOKS_PER_RUN = 1000
"""Hooks compared per request; `hook_url` is called per integration, not per event."""

_RUN_ID = re.compile(IDENTIFIER_PATTERN)
_KEY = re.compile(r"^[\x21-\x7e]{1,200}$")


@dataclass(frozen=True)
class Hook:
    run_id: str
    event: str
    digest: str

    @property
    def name(self) -> str:
        """Names the hook in keys, limits and logs; not the token, useless for making one."""
        return self.digest[:24]


def digest(token: str) -> str:
    return hashlib.sha256(as_bytes(token)).hexdigest()


def find(pool: Pool, token: str) -> Hook | None:
    """The hook `token` opens, or None however it is wrong."""
    run_id, tilde, secret = token.rpartition("~")
    if not tilde or not secret or len(token) > MAX_TOKEN_LENGTH or not _RUN_ID.fullmatch(run_id):
        return None
    presented = digest(token).encode()
    rows = _fetch(
        pool,
        "SELECT token_sha256, event FROM executor.hooks WHERE run_id = %s LIMIT %s",
        (run_id, HOOKS_PER_RUN),
    )
    found: str | None = None
    for row in rows:
        if hmac.compare_digest(str(row["token_sha256"]).encode(), presented) and found is None:
            found = str(row["event"])
    return None if found is None else Hook(run_id, found, presented.decode())


class BadKey(ValueError):
    """An `Idempotency-Key` header a hook will not use."""


def idempotency_key(hook: Hook, header: str | None, body: bytes) -> str:
    if header is not None:
        if not _KEY.fullmatch(header):
            raise BadKey(
                f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} printable ASCII characters"
            )
        return f"hook:{hook.name}:key:{header}"
    return f"hook:{hook.name}:body:{hashlib.sha256(body).hexdigest()}"
