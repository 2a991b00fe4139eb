"""`executor schedules ...` end to end through the CLI entry point, on the test database."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from executor.cli.main import main
from executor.storage.db import connect

Cli = Callable[..., tuple[int, str, str]]


@pytest.fixture
def cli(
    db_url: str, redis_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Cli:
    monkeypatch.setenv("EXECUTOR_DATABASE_URL", db_url)
    monkeypatch.setenv("EXECUTOR_REDIS_URL", redis_url)

    def run(*argv: str) -> tuple[int, str, str]:
        code = main(list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    return run


def test_add_list_pause_resume_delete(cli: Cli) -> None:
    code, out, _ = cli(
        "schedules", "add", "nightly", "--cron", "30 2 * * *", "--workflow", "noop",
        "--input", '{"region": "eu"}', "--timezone", "Europe/Berlin", "--catchup", "none",
    )  # fmt: skip
    assert code == 0
    assert out.startswith("added nightly ('30 2 * * *' Europe/Berlin, noop, next ")
    code, out, _ = cli("schedules", "list", "--json")
    [row] = json.loads(out)
    assert (row["name"], row["catchup"], row["input"], row["paused"]) == (
        "nightly", "none", {"region": "eu"}, False,
    )  # fmt: skip
    assert cli("schedules", "pause", "nightly")[1].startswith("paused nightly")
    code, out, _ = cli("schedules", "list")
    assert "paused" in out.splitlines()[2]
    assert cli("schedules", "resume", "nightly")[1].startswith("resumed nightly")
    assert cli("schedules", "delete", "nightly") == (0, "deleted schedule nightly\n", "")
    code, _, err = cli("schedules", "delete", "nightly")
    assert (code, err) == (1, "executor: no schedule named 'nightly'\n")


def test_bad_input_is_refused_with_exit_1(cli: Cli) -> None:
    base = ("schedules", "add", "s", "--workflow", "noop")
    code, _, err = cli(*base, "--cron", "not cron")
    assert code == 1
    assert "cron" in err
    code, _, err = cli(*base, "--cron", "* * * * *", "--input", "[1]")
    assert (code, "JSON object" in err) == (1, True)


def test_backfill_reads_naive_times_in_the_schedule_zone_and_repeats_safely(
    cli: Cli, db_url: str
) -> None:
    cli("schedules", "add", "h", "--cron", "0 * * * *", "--workflow", "noop",
        "--timezone", "Europe/Berlin")  # fmt: skip
    argv = ("schedules", "backfill", "h", "--from", "2025-01-01T00:00", "--to", "2025-01-01T23:00")
    code, out, _ = cli(*argv)
    assert code == 0
    assert out == (
        "backfill of h: 24 tick(s) from 2024-12-31T23:00:00Z to 2025-01-01T22:00:00Z; "
        "started 24, 0 had started before\n"
    )
    assert cli(*argv)[1].endswith("started 0, 24 had started before\n")
    with connect(db_url) as conn:
        n = conn.execute("SELECT count(*) AS n FROM executor.runs").fetchone()
    assert n is not None
    assert n["n"] == 24


def test_trigger_prints_the_run_id(cli: Cli, db_url: str) -> None:
    cli("schedules", "add", "t", "--cron", "0 0 1 1 *", "--workflow", "noop")
    code, out, _ = cli("schedules", "trigger", "t", "--idempotency-key", "k1")
    assert code == 0
    assert cli("schedules", "trigger", "t", "--idempotency-key", "k1")[1] == out
    with connect(db_url) as conn:
        row = conn.execute(
            "SELECT input FROM executor.runs WHERE run_id = %s", (out.strip(),)
        ).fetchone()
    assert row is not None
    assert row["input"]["_schedule"]["name"] == "t"
