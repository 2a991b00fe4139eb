"""The OpenAPI 3.1 description served at `/api/openapi.json`, written out by hand."""

from __future__ import annotations

from functools import cache
from typing import Any

from executor.commands.state import DROP_REASONS, RUN_STATUSES, STEP_STATUSES
from executor.dashboard.models import Drop, Event, FailedStep, Run, RunSummary, Step


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _query(name: str, description: str, **schema: Any) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": schema or {"type": "string"},
    }


def _path(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}


def _json(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_PAGING = [
    _query("limit", "Rows per page (1..500).", type="integer", minimum=1, maximum=500),
    _query("after", "Cursor from `next`: the page of older rows."),
    _query("before", "Cursor from `prev`: the page of newer rows."),
]
_TIME = "ISO 8601 (naive means UTC) or an age such as 15m, 24h, 7d."

_ERRORS = {
    "401": _json(_ref("Error"), "No or unknown token."),
    "403": _json(_ref("Error"), "The token's role may not do this, or the CSRF token is wrong."),
}

_ACTION_RESPONSES = {
    "200": _json(_ref("ActionResult"), "Applied, or dropped as a duplicate (see `reason`)."),
    "404": _json(_ref("ActionResult"), "No such run or step."),
    "409": _json(_ref("ActionResult"), "Dropped: terminal, invalid transition, key taken."),
    "422": _json(_ref("Error"), "Malformed request."),
    "503": _json(_ref("ActionResult"), "Ledger busy or unreachable; nothing was applied."),
    **_ERRORS,
}

_ACTION_BODY = {
    "required": False,
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "properties": {
                    "idempotency_key": {"type": "string", "maxLength": 300},
                    "reason": {"type": "string", "maxLength": 1500},
                },
            }
        }
    },
}


def _page_schema(field: str, item: str) -> dict[str, Any]:
    return {
        "type": "object",
        "required": [field, "next", "prev"],
        "properties": {
            field: {"type": "array", "items": _ref(item)},
            "next": {"type": ["string", "null"]},
            "prev": {"type": ["string", "null"]},
            "estimated_total": {"type": "integer"},
        },
    }


def _action(summary: str, *params: dict[str, Any]) -> dict[str, Any]:
    return {
        "post": {
            "summary": summary,
            "description": "Needs the operator role. Send an idempotency key (body field or "
            "`Idempotency-Key` header) so that a retried request applies once.",
            "parameters": [
                *params,
                {
                    "name": "Idempotency-Key",
                    "in": "header",
                    "required": False,
                    "schema": {"type": "string"},
                },
            ],
            "requestBody": _ACTION_BODY,
            "responses": _ACTION_RESPONSES,
        }
    }


@cache
def openapi_document() -> dict[str, Any]:
    schemas: dict[str, Any] = {
        name: model.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, model in (
            ("RunSummary", RunSummary),
            ("Run", Run),
            ("Step", Step),
            ("Event", Event),
            ("Drop", Drop),
            ("FailedStep", FailedStep),
        )
    }
    schemas["Error"] = {
        "type": "object",
        "required": ["error", "detail"],
        "properties": {"error": {"type": "string"}, "detail": {"type": "string"}},
    }
    schemas["ActionResult"] = {
        "type": "object",
        "properties": {
            "action": {"type": "string", "enum": ["retry", "cancel", "pause", "resume"]},
            "run_id": {"type": "string"},
            "step_key": {"type": ["string", "null"]},
            "idempotency_key": {"type": "string"},
            "applied": {"type": "boolean"},
            "reason": {
                "type": ["string", "null"],
                "description": "Why it was not applied: a drop reason "
                f"({', '.join(DROP_REASONS)}), concurrency_key_taken, busy or error.",
            },
            "detail": {"type": ["string", "null"]},
            "message": {"type": "string", "description": "One sentence for a person."},
            "run_status": {"type": ["string", "null"]},
            "events": {"type": "array", "items": {"type": "object"}},
            "holder_run_id": {"type": ["string", "null"]},
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "step-executor retry dashboard",
            "version": "1",
            "description": "Runs, steps, events and drops from the Postgres ledger; queues and "
            "workers from RQ; retry, bulk retry, cancel, pause and resume through the ledger's "
            "one committing handler. Viewer tokens read; operator tokens also act.",
        },
        "security": [{"bearer": []}],
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": schemas,
        },
        "paths": {
            "/api/runs": {
                "get": {
                    "summary": "List runs, newest first (keyset pagination)",
                    "parameters": [
                        _query(
                            "status",
                            "A run status or `active` (pending, running, paused).",
                            type="string",
                            enum=[*RUN_STATUSES, "active"],
                        ),
                        _query("workflow", "Exact workflow name."),
                        _query("concurrency_key", "Exact concurrency key."),
                        _query("from", f"Created at or after. {_TIME}"),
                        _query("to", f"Created before. {_TIME}"),
                        _query("q", "Run id or run id prefix."),
                        *_PAGING,
                    ],
                    "responses": {"200": _json(_page_schema("runs", "RunSummary")), **_ERRORS},
                }
            },
            "/api/runs/{run_id}": {
                "get": {
                    "summary": "One run: steps, events in seq order, drops",
                    "parameters": [
                        _path("run_id"),
                        _query(
                            "events_after",
                            "Only events with seq greater than this (to tail the log).",
                            type="integer",
                        ),
                    ],
                    "responses": {
                        "200": _json(
                            {
                                "type": "object",
                                "properties": {
                                    "run": _ref("Run"),
                                    "steps": {"type": "array", "items": _ref("Step")},
                                    "events": {"type": "array", "items": _ref("Event")},
                                    "events_more": {"type": "boolean"},
                                    "drops": {"type": "array", "items": _ref("Drop")},
                                    "drops_more": {"type": "boolean"},
                                },
                            }
                        ),
                        "404": _json(_ref("Error"), "No such run."),
                        **_ERRORS,
                    },
                }
            },
            "/api/runs/{run_id}/cancel": _action("Cancel a run", _path("run_id")),
            "/api/runs/{run_id}/pause": _action("Pause a running run", _path("run_id")),
            "/api/runs/{run_id}/resume": _action("Resume a paused run", _path("run_id")),
            "/api/runs/{run_id}/steps/{step_key}/retry": _action(
                "Retry a failed step as a new attempt", _path("run_id"), _path("step_key")
            ),
            "/api/retry": {
                "post": {
                    "summary": "Bulk retry of the failed steps matching a filter",
                    "description": "Retries up to `limit` failed steps whose run is failed or "
                    "running, oldest first. Each step's key derives from the request's key, so "
                    "repeating the request retries each step once. `dry_run` lists the steps.",
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "properties": {
                                        "filter": {
                                            "type": "object",
                                            "properties": {
                                                k: {"type": "string"}
                                                for k in (
                                                    "workflow",
                                                    "step_key",
                                                    "run_id",
                                                    "from",
                                                    "to",
                                                    "error",
                                                )
                                            },
                                            "additionalProperties": False,
                                        },
                                        "idempotency_key": {"type": "string", "maxLength": 200},
                                        "limit": {"type": "integer", "minimum": 1},
                                        "dry_run": {"type": "boolean"},
                                    },
                                }
                            }
                        },
                    },
                    "responses": {
                        "200": _json({"type": "object"}, "Counts of retried and dropped steps."),
                        "422": _json(_ref("Error"), "Malformed request."),
                        **_ERRORS,
                    },
                }
            },
            "/api/failed-steps": {
                "get": {
                    "summary": "Failed steps across runs, most recent failure first",
                    "parameters": [
                        _query("workflow", "Exact workflow name."),
                        _query("step_key", "Exact step key."),
                        _query("run_id", "Exact run id."),
                        _query("from", f"Failed at or after. {_TIME}"),
                        _query("to", f"Failed before. {_TIME}"),
                        _query("error", "Substring of the error message."),
                        *_PAGING,
                    ],
                    "responses": {"200": _json(_page_schema("steps", "FailedStep")), **_ERRORS},
                }
            },
            "/api/drops": {
                "get": {
                    "summary": "Dropped deliveries across runs, newest first",
                    "parameters": [
                        _query("reason", "Drop reason.", type="string", enum=list(DROP_REASONS)),
                        _query("command_type", "Command type, e.g. start_step."),
                        _query("run_id", "Exact run id."),
                        _query("from", f"Received at or after. {_TIME}"),
                        *_PAGING,
                    ],
                    "responses": {"200": _json(_page_schema("drops", "Drop")), **_ERRORS},
                }
            },
            "/api/queues": {
                "get": {
                    "summary": "RQ queues and workers, ledger backlog, connection pool stats",
                    "responses": {"200": _json({"type": "object"}), **_ERRORS},
                }
            },
            "/api/me": {
                "get": {
                    "summary": "The caller's role and token fingerprint",
                    "responses": {"200": _json({"type": "object"}), **_ERRORS},
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics (text format 0.0.4)",
                    "responses": {"200": {"description": "Prometheus text"}, **_ERRORS},
                }
            },
        },
        "x-step-statuses": list(STEP_STATUSES),
    }
