"""`python -m executor.dashboard`: the same server as `executor dashboard`."""

from __future__ import annotations

import argparse
import sys

from executor.errors import ExecutorError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m executor.dashboard")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--database-url", default=None)
    parser.add_argument("--redis-url", default=None)
    parser.add_argument(
        "--public-metrics", action="store_true", help="serve /metrics without a token"
    )
    args = parser.parse_args(argv)
    from executor.dashboard.app import serve

    try:
        serve(
            args.host,
            args.port,
            args.database_url,
            args.redis_url,
            public_metrics=args.public_metrics,
        )
    except ExecutorError as exc:
        print(f"executor dashboard: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
