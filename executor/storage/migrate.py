"""Apply the plain SQL files in `sql/` once each, in filename order.

A session-level advisory lock serialises concurrent `migrate` runs (several workers or a
deploy script starting at once): the second waits, then finds every file recorded and
applies nothing. Each file commits in its own transaction together with its record in
`executor.schema_migrations`, so a failing file leaves the earlier ones applied and itself
not half-applied.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import psycopg

from executor.errors import ConfigurationError

SQL_DIR_ENV = "EXECUTOR_SQL_DIR"

# "executor" in ASCII, as a bigint: fixed so every process and version agrees on it.
MIGRATION_LOCK_KEY = 0x6578656375746F72

_BOOTSTRAP = b"""
CREATE SCHEMA IF NOT EXISTS executor;
CREATE TABLE IF NOT EXISTS executor.schema_migrations (
    name       text PRIMARY KEY,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
"""


def sql_dir() -> Path:
    """The migrations folder: $EXECUTOR_SQL_DIR, else `sql/` at the repository root.

    A copy inside the package is the fallback for non-editable installs.
    """
    override = os.environ.get(SQL_DIR_ENV, "").strip()
    if override:
        path = Path(override)
        if not path.is_dir():
            raise ConfigurationError(f"{SQL_DIR_ENV}={override} is not a directory")
        return path
    package = Path(__file__).resolve().parent.parent
    for candidate in (package.parent / "sql", package / "sql"):
        if candidate.is_dir():
            return candidate
    raise ConfigurationError(
        f"no sql/ folder next to the executor package ({package.parent / 'sql'}); set {SQL_DIR_ENV}"
    )


def migration_files(directory: Path | None = None) -> list[Path]:
    """The `.sql` files to apply, in the order they must be applied."""
    folder = directory if directory is not None else sql_dir()
    files = sorted(p for p in folder.iterdir() if p.suffix == ".sql" and p.is_file())
    if not files:
        raise ConfigurationError(f"no .sql files in {folder}")
    return files


def checksum(path: Path) -> str:
    """Content hash, blind to line endings so a Windows checkout does not look edited."""
    text = path.read_bytes().replace(b"\r\n", b"\n")
    return hashlib.sha256(text).hexdigest()


def migrate(database_url: str) -> list[str]:
    """Apply pending migrations; returns the file names applied by this call (often none)."""
    files = migration_files()
    with psycopg.connect(database_url, autocommit=True) as conn:
        # Released when the connection closes, even if a migration fails.
        conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK_KEY,))
        return _apply_locked(conn, files)


def reset(database_url: str) -> list[str]:
    """Drop the whole `executor` schema and migrate from scratch. For tests only: loses data."""
    files = migration_files()
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK_KEY,))
        conn.execute("DROP SCHEMA IF EXISTS executor CASCADE")
        return _apply_locked(conn, files)


def _apply_locked(conn: psycopg.Connection[Any], files: list[Path]) -> list[str]:
    with conn.transaction():
        conn.execute(_BOOTSTRAP)
    recorded: dict[str, str] = dict(
        conn.execute("SELECT name, checksum FROM executor.schema_migrations").fetchall()
    )
    sums = {path.name: checksum(path) for path in files}
    changed = sorted(name for name, digest in sums.items() if recorded.get(name, digest) != digest)
    if changed:
        raise ConfigurationError(
            f"migration file(s) {', '.join(changed)} changed after being applied "
            "(checksum differs from executor.schema_migrations); restore the applied "
            "version and put the change in a new file"
        )
    applied: list[str] = []
    for path in files:
        if path.name in recorded:
            continue
        with conn.transaction():
            try:
                conn.execute(path.read_bytes())
            except psycopg.Error as exc:
                raise ConfigurationError(f"migration {path.name} failed: {exc}") from exc
            conn.execute(
                "INSERT INTO executor.schema_migrations (name, checksum) VALUES (%s, %s)",
                (path.name, sums[path.name]),
            )
        applied.append(path.name)
    return applied
