"""`executor` — one argparse tree; each verb lives in the module that owns its job."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from executor.errors import ExecutorError

# Exit codes a script can rely on.
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_VIOLATION = 3
EXIT_CONFLICT = 4
EXIT_STUCK = 5  # verify: no rule broken, but a run cannot move


def build_parser() -> argparse.ArgumentParser:
    from executor.cli import ops

    p = argparse.ArgumentParser(
        prog="executor",
        description="A message-queue-driven step executor: RQ workers, a Postgres ledger.",
    )
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")
    ops.register(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        code: int = args.func(args)
    except KeyboardInterrupt:
        return 130
    except ExecutorError as exc:
        from executor.errors import ConcurrencyKeyTaken

        print(f"executor: {exc}", file=sys.stderr)
        return EXIT_CONFLICT if isinstance(exc, ConcurrencyKeyTaken) else EXIT_ERROR
    return code
