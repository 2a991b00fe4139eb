"""Starlette's TestClient, imported without its warning about `httpx`.

Starlette 1.x prefers the `httpx2` fork for its TestClient and warns on first import; the
suite turns warnings into errors, so whichever test module imports it first would fail.
"""

from __future__ import annotations

import warnings

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*httpx2", category=UserWarning)
    from starlette.testclient import TestClient

__all__ = ["TestClient"]
