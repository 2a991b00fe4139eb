"""Another database or Redis db on the same server, keeping the URL in the form it was given.

The form matters to callers outside psycopg (SQLAlchemy-based DBOS, kombu), which take URLs
only; the test suite and the benchmarks both give each session or round its own database
and db index this way.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, quote, urlencode, urlsplit

import psycopg


def with_database(url: str, dbname: str) -> str:
    """The same server and credentials, another database; keeps URL form when given a URL."""
    parts = urlsplit(url)
    if parts.scheme not in ("postgres", "postgresql"):
        return psycopg.conninfo.make_conninfo(url, dbname=dbname)
    query = f"?{parts.query}" if parts.query else ""
    return f"{parts.scheme}://{parts.netloc}/{quote(dbname)}{query}"


def with_redis_db(url: str, db: int) -> str:
    """The same Redis server, another db index (path for redis://, `?db=` for unix://)."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "db"]
    path = parts.path
    if parts.scheme == "unix":
        query.append(("db", str(db)))
    else:
        path = f"/{db}"
    encoded = f"?{urlencode(query)}" if query else ""
    return f"{parts.scheme}://{parts.netloc}{path}{encoded}"
