"""Jinja2 setup: autoescaping everywhere, and the filters the templates use."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import jinja2

STATUS_TONE = {
    "completed": "ok",
    "running": "info",
    "queued": "info",
    "pending": "muted",
    "paused": "warn",
    "retrying": "warn",
    "failed": "bad",
    "cancelled": "muted",
    "applied": "ok",
}


def ago(value: datetime | None, now: datetime | None = None) -> str:
    """`12s ago`, `5m ago`, `3h ago`, `2d ago` (or `in 5s` for future times)."""
    if value is None:
        return ""
    now = now or datetime.now(UTC)
    seconds = (now - value).total_seconds()
    future = seconds < 0
    seconds = abs(seconds)
    if seconds < 60:
        text = f"{int(seconds)}s"
    elif seconds < 3600:
        text = f"{int(seconds // 60)}m"
    elif seconds < 86400:
        text = f"{int(seconds // 3600)}h {int(seconds % 3600 // 60)}m"
    else:
        text = f"{int(seconds // 86400)}d {int(seconds % 86400 // 3600)}h"
    return f"in {text}" if future else f"{text} ago"


def ts(value: datetime | None) -> str:
    if value is None:
        return ""
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def iso(value: datetime | None) -> str:
    return "" if value is None else value.astimezone(UTC).isoformat()


def seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 1:
        return f"{value * 1000:.0f} ms"
    if value < 120:
        return f"{value:.1f} s"
    if value < 7200:
        return f"{value / 60:.0f} min"
    return f"{value / 3600:.1f} h"


def pretty_json(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False, default=str)


def shorten(value: Any, limit: int = 80) -> str:
    text = "" if value is None else str(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def tone(status: str | None) -> str:
    return STATUS_TONE.get(status or "", "muted")


def configure_environment(env: jinja2.Environment) -> None:
    env.autoescape = True
    env.undefined = jinja2.StrictUndefined
    env.filters.update(
        ago=ago,
        ts=ts,
        iso=iso,
        seconds=seconds,
        pretty_json=pretty_json,
        shorten=shorten,
        tone=tone,
    )
    env.globals["tone"] = tone
