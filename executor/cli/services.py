"""`executor services status|stop`: the embedded Postgres and Redis, seen and stopped."""

from __future__ import annotations

import argparse
import json
from typing import Any


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "services",
        help="status or stop of the embedded Postgres and Redis",
        description="The embedded Postgres and Redis that commands start when "
        "EXECUTOR_DATABASE_URL / EXECUTOR_REDIS_URL are unset: what runs where, and stop.",
    )
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, func, help_ in (
        ("status", cmd_status, "what is running: pids, sockets, URLs, data folders"),
        ("stop", cmd_stop, "stop them (data stays on disk; the next command starts them again)"),
    ):
        a = actions.add_parser(name, help=help_, description=help_)
        a.set_defaults(func=func)
        a.add_argument(
            "--data-dir", help="the data folder (default: $EXECUTOR_DATA_DIR, else ./.executor)"
        )
        if name == "status":
            a.add_argument("--json", action="store_true")


def cmd_status(args: argparse.Namespace) -> int:
    from executor.storage.services import status

    found = status(args.data_dir)
    if args.json:
        print(json.dumps([s.as_json() for s in found], indent=2))
    else:
        print("\n".join(str(s) for s in found))
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    from executor.storage.embedded import resolve_data_dir
    from executor.storage.services import stop

    stopped = stop(args.data_dir)
    where = resolve_data_dir(args.data_dir)
    print(f"stopped {' and '.join(stopped)}" if stopped else f"nothing was running in {where}")
    return 0
