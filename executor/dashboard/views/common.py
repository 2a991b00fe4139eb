"""Helpers shared by the HTML pages and the JSON API: parameters, rendering, flash messages."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from datetime import UTC, date, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from executor.dashboard.auth import current_principal
from executor.dashboard.context import DashboardContext
from executor.dashboard.queries import Cursor, PageRequest
from executor.dashboard.sessions import FLASH_COOKIE, Session

LIVE_HEADER = "x-live-fragment"
_RELATIVE = re.compile(r"\s*([0-9]{1,5})\s*([smhdw])\s*")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class BadParameter(ValueError):
    """A query parameter that cannot mean anything (a bad date, a bad cursor, a NUL)."""


def current_session(request: Request) -> Session:
    session: Session = request.state.session
    return session


def ctx(request: Request) -> DashboardContext:
    context: DashboardContext = request.app.state.ctx
    return context


def is_live(request: Request) -> bool:
    return request.headers.get(LIVE_HEADER) == "1"


# --- parameters ----------------------------------------------------------------------------


def text_param(params: Mapping[str, str], name: str, limit: int = 500) -> str | None:
    value = params.get(name, "").strip()
    if not value:
        return None
    if "\x00" in value:
        raise BadParameter(f"{name} contains a NUL character")
    if len(value) > limit:
        raise BadParameter(f"{name} is longer than {limit} characters")
    return value


def time_param(
    params: Mapping[str, str], name: str, now: datetime | None = None
) -> datetime | None:
    """ISO 8601 (`2024-05-01T12:00`, naive means UTC) or a relative age: `15m`, `24h`, `7d`."""
    raw = params.get(name, "").strip()
    if not raw:
        return None
    if len(raw) > 64:
        raise BadParameter(f"{name} is longer than 64 characters")
    return parse_time(raw, name, now)


def parse_time(raw: str, name: str = "time", now: datetime | None = None) -> datetime:
    rel = _RELATIVE.fullmatch(raw)
    if rel:
        seconds = int(rel.group(1)) * _UNITS[rel.group(2)]
        return (now or datetime.now(UTC)) - timedelta(seconds=seconds)
    try:
        value = datetime.fromisoformat(raw.replace("Z", "+00:00"))
        # In UTC now, so a time at the end of the calendar fails here, not in the driver.
        return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)
    except (ValueError, OverflowError) as exc:
        raise BadParameter(
            f"{name}: {raw!r} is neither an ISO time nor an age like 15m, 24h, 7d"
        ) from exc


def int_param(params: Mapping[str, str], name: str, default: int, lo: int, hi: int) -> int:
    raw = params.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise BadParameter(f"{name} must be an integer") from exc
    return max(lo, min(hi, value))


def page_request(
    params: Mapping[str, str], kinds: tuple[type, ...], default_limit: int = 50
) -> PageRequest:
    limit = int_param(params, "limit", default_limit, 1, 500)
    after = params.get("after", "").strip()
    before = params.get("before", "").strip()
    try:
        return PageRequest(
            limit=limit,
            after=Cursor.decode(after, kinds) if after else None,
            before=Cursor.decode(before, kinds) if before and not after else None,
        )
    except ValueError as exc:
        raise BadParameter(str(exc)) from exc


def query_string(params: Mapping[str, Any], **changes: Any) -> str:
    """The current filter with some parameters changed (None removes one)."""
    merged = {k: v for k, v in params.items() if v not in (None, "")}
    for k, v in changes.items():
        if v in (None, ""):
            merged.pop(k, None)
        else:
            merged[k] = v
    return ("?" + urlencode(merged)) if merged else ""


def safe_next(target: str | None, default: str) -> str:
    """Only same-site absolute paths: `/runs?x` yes, `//evil.example` and `https://…` no."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return default
    return target


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"{text[:40]} is too large for a JSON number here")
    return value


def loads(body: bytes | str) -> Any:
    """JSON as RFC 8259 has it: no NaN or Infinity, no number that overflows to infinity
    (Python's decoder takes all three, and Postgres' jsonb none). Raises JSONDecodeError."""
    try:
        return json.loads(body, parse_constant=_no_constant, parse_float=_finite)
    except json.JSONDecodeError:
        raise
    except RecursionError as exc:
        raise json.JSONDecodeError("JSON nested too deeply", "", 0) from exc
    except UnicodeDecodeError as exc:
        raise json.JSONDecodeError("the body is not UTF-8", "", exc.start) from exc
    except ValueError as exc:
        raise json.JSONDecodeError(str(exc), "", 0) from exc


# --- rendering -----------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


class JSON(JSONResponse):
    def render(self, content: Any) -> bytes:
        return json.dumps(
            content, default=_jsonable, ensure_ascii=False, allow_nan=False, separators=(",", ":")
        ).encode("utf-8")


def json_error(status: int, error: str, detail: str, **extra: Any) -> JSON:
    return JSON({"error": error, "detail": detail, **extra}, status_code=status)


def render(
    request: Request,
    template: str,
    context: dict[str, Any] | None = None,
    *,
    status_code: int = 200,
) -> Response:
    c = ctx(request)
    principal = current_principal(request)
    session = current_session(request)
    values: dict[str, Any] = {
        "principal": principal,
        "can_act": principal is not None and principal.role >= 2,
        "csrf_token": c.sessions.csrf_token(session),
        "refresh_seconds": c.settings.refresh_seconds,
        "now": datetime.now(UTC),
        "path": request.url.path,
        "current_url": request.url.path + (f"?{request.url.query}" if request.url.query else ""),
        "flash": None,
    }
    raw_flash = request.cookies.get(FLASH_COOKIE)
    if raw_flash and not is_live(request):
        values["flash"] = c.sessions.load_flash(raw_flash)
    values.update(context or {})
    response = c.templates.TemplateResponse(request, template, values, status_code=status_code)
    response.headers["cache-control"] = "no-store"
    if raw_flash and not is_live(request):
        response.delete_cookie(FLASH_COOKIE, path="/", httponly=True, samesite="strict")
    return response


def set_flash(request: Request, response: Response, level: str, message: str, **extra: Any) -> None:
    """A one-shot message for the next page, signed so it cannot be forged by a link."""
    c = ctx(request)
    value = c.sessions.dump_flash({"level": level, "message": message[:1500], **extra})
    response.set_cookie(
        FLASH_COOKIE,
        value,
        max_age=120,
        path="/",
        httponly=True,
        samesite="strict",
        secure=c.settings.secure_cookies or request.url.scheme == "https",
    )
