"""`executor prune`: delete terminal runs older than a duration (docs/retention.md)."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from typing import Any


def register(sub: Any) -> None:
    help_ = "delete terminal runs last updated before a cutoff, with all their rows"
    p: argparse.ArgumentParser = sub.add_parser("prune", help=help_, description=help_)
    p.set_defaults(func=cmd_prune)
    p.add_argument(
        "--older-than", required=True, metavar="DURATION", help="30d, 12h, 90m, 45s or 2w"
    )
    p.add_argument("--dry-run", action="store_true", help="count what would go; delete nothing")
    p.add_argument("--batch-size", type=int, default=500, help="runs per transaction")
    p.add_argument("--json", action="store_true")


def cmd_prune(args: argparse.Namespace) -> int:
    from executor.config import resolve_database_url
    from executor.retention import parse_duration, prune
    from executor.storage.db import open_pool

    older_than = parse_duration(args.older_than)
    pool = open_pool(resolve_database_url(), name="prune", max_size=2)
    try:
        report = prune(pool, older_than, dry_run=args.dry_run, batch_size=args.batch_size)
    finally:
        pool.close()
    if args.json:
        doc = asdict(report)
        doc["runs_per_second"] = report.runs_per_second
        print(json.dumps(doc, default=str, indent=2))
    else:
        print(report)
    return 0
