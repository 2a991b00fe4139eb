"""Jinja2 setup: autoescaping everywhere, bidi controls made visible, and the filters.

Autoescaping stops markup, not deception: a right-to-left override (U+202E) in a step error
or an input would make the text after it read backwards, so a failed `txt.exe` could show as
`exe.txt`. Every value a template prints passes `visible_controls` first, which replaces the
bidi controls with a visible `[U+202E]`.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import jinja2
from markupsafe import Markup

STATUS_TONE = {
    "completed": "ok",
    "running": "info",
    "queued": "info",
    "pending": "muted",
    "paused": "warn",
    "retrying": "warn",
    "sleeping": "info",
    "waiting": "warn",
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


CLIP_CHARS = 20_000


def clip_json(value: Any, limit: int = CLIP_CHARS) -> str:
    """Pretty JSON cut at `limit` characters: a map's output of ten thousand items is a
    page's worth, not megabytes (the API returns it whole)."""
    text = pretty_json(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}\n… ({len(text) - limit:,} more characters; the API has it all)"


_APPROVAL = re.compile(r"(^|[_.:\-])(approve|approved|approval)$", re.IGNORECASE)


def is_approval(name: Any) -> bool:
    """An event whose name says it approves: the run page offers a one-click Approve."""
    return isinstance(name, str) and _APPROVAL.search(name) is not None


def shorten(value: Any, limit: int = 80) -> str:
    text = "" if value is None else str(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def tone(status: str | None) -> str:
    return STATUS_TONE.get(status or "", "muted")


_BIDI = re.compile("[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def visible_controls(value: Any) -> Any:
    """Text with its bidi controls shown as `[U+XXXX]`; markup we made is left alone."""
    if isinstance(value, str) and not isinstance(value, Markup) and _BIDI.search(value):
        return _BIDI.sub(lambda m: f"[U+{ord(m.group()):04X}]", value)
    return value


def urlpart(value: Any) -> str:
    """One path segment: `resize[3]` becomes `resize%5B3%5D`, a `/` could not split it."""
    return quote(str(value), safe="")


def configure_environment(env: jinja2.Environment) -> None:
    env.autoescape = True
    env.finalize = visible_controls
    env.undefined = jinja2.StrictUndefined
    env.filters.update(
        ago=ago,
        ts=ts,
        iso=iso,
        seconds=seconds,
        pretty_json=pretty_json,
        clip_json=clip_json,
        shorten=shorten,
        tone=tone,
        urlpart=urlpart,
    )
    env.globals["tone"] = tone
    env.tests["approval"] = is_approval
