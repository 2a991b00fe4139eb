"""`executor schedules add|list|pause|resume|delete|trigger|backfill` (docs/schedules.md)."""

from __future__ import annotations

import argparse
import json
from datetime import datetime
from typing import Any

from executor.errors import ExecutorError
from executor.schedules.model import CATCHUP_MODES, InvalidSchedule, utc_iso, zone


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "schedules",
        help="cron schedules: add, list, pause, resume, delete, trigger, backfill",
        description="Cron schedules. The sweep leader of the running workers starts each "
        "tick's run exactly once.",
    )
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")

    def action(name: str, func: Any, help_: str) -> argparse.ArgumentParser:
        a: argparse.ArgumentParser = actions.add_parser(name, help=help_, description=help_)
        a.set_defaults(func=func)
        return a

    a = action("add", cmd_add, "create a schedule; its first tick is the next one from now")
    a.add_argument("name")
    a.add_argument("--cron", required=True, help='a cron expression, e.g. "0 3 * * *"')
    a.add_argument("--workflow", required=True)
    a.add_argument("--input", default="{}", help="the runs' input, a JSON object")
    a.add_argument("--timezone", default="UTC", help="IANA zone the cron is read in")
    a.add_argument("--catchup", choices=CATCHUP_MODES, default="latest")
    a.add_argument("--paused", action="store_true", help="create it paused")

    a = action("list", cmd_list, "every schedule with its last and next tick")
    a.add_argument("--json", action="store_true")

    for name, help_ in (
        ("pause", "start no more ticks until resumed"),
        ("resume", "start ticks again, from the next one (ticks while paused are skipped)"),
        ("delete", "remove a schedule (the runs it started stay)"),
    ):
        action(name, cmd_change, help_).add_argument("name")

    a = action("trigger", cmd_trigger, "start one run of the schedule now, outside its ticks")
    a.add_argument("name")
    a.add_argument("--idempotency-key", help="repeat a trigger safely by reusing its key")

    a = action("backfill", cmd_backfill, "start every past tick in a range that has not started")
    a.add_argument("name")
    a.add_argument("--from", dest="start", required=True, metavar="T", help="ISO time")
    a.add_argument("--to", dest="end", required=True, metavar="T", help="ISO time, inclusive")


def _client() -> Any:
    from executor.client import Client

    return Client()


def cmd_add(args: argparse.Namespace) -> int:
    try:
        data = json.loads(args.input)
    except json.JSONDecodeError as exc:
        raise InvalidSchedule(f"--input is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise InvalidSchedule("--input must be a JSON object")
    with _client() as client:
        schedule = client.create_schedule(
            args.name,
            args.cron,
            args.workflow,
            data,
            timezone=args.timezone,
            catchup=args.catchup,
            paused=args.paused,
        )
    print(f"added {schedule.describe()}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from executor.cli.ops import _table

    with _client() as client:
        schedules = client.list_schedules()
    if args.json:
        print(json.dumps([s.model_dump(mode="json") for s in schedules], indent=2))
        return 0
    _table(
        ["name", "cron", "timezone", "workflow", "catchup", "state", "last tick", "next tick"],
        [
            [
                s.name,
                s.cron,
                s.timezone,
                s.workflow,
                s.catchup,
                "paused" if s.paused else "active",
                utc_iso(s.last_tick) if s.last_tick else "-",
                "-" if s.paused else utc_iso(s.next_tick),
            ]
            for s in schedules
        ],
    )
    return 0


def cmd_change(args: argparse.Namespace) -> int:
    with _client() as client:
        if args.action == "delete":
            client.delete_schedule(args.name)
            print(f"deleted schedule {args.name}")
            return 0
        change = client.pause_schedule if args.action == "pause" else client.resume_schedule
        print(f"{args.action}d {change(args.name).describe()}")
    return 0


def cmd_trigger(args: argparse.Namespace) -> int:
    with _client() as client:
        print(client.trigger_schedule(args.name, idempotency_key=args.idempotency_key))
    return 0


def cmd_backfill(args: argparse.Namespace) -> int:
    with _client() as client:
        schedule = client.get_schedule(args.name)
        if schedule is None:
            raise ExecutorError(f"no schedule named {args.name!r}")
        start = _moment(args.start, schedule.timezone)
        end = _moment(args.end, schedule.timezone)
        report = client.backfill_schedule(args.name, start, end)
    print(
        f"backfill of {args.name}: {len(report.ticks)} tick(s) from {utc_iso(start)} to "
        f"{utc_iso(end)}; started {report.started}, {report.duplicates} had started before"
    )
    return 0


def _moment(text: str, timezone: str) -> datetime:
    """An ISO time; one without an offset is read in the schedule's zone, as its cron is."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError as exc:
        raise InvalidSchedule(f"{text!r} is not an ISO 8601 time") from exc
    return moment if moment.tzinfo else moment.replace(tzinfo=zone(timezone))
