"""The benchmarks package imports, its definitions are well-formed, its counters count.

No benchmark runs here, and none of the peers (DBOS, Procrastinate, Celery, RQ 2.12) needs to
be installed: their modules are read, not imported.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import sys
from pathlib import Path

import psycopg
import pytest

from benchmarks.peers import DEPENDS_ON, PEERS, STEPS, SYSTEMS

BENCH_MODULES = [
    "benchmarks.cli",
    "benchmarks.common",
    "benchmarks.count",
    "benchmarks.dashboard",
    "benchmarks.e2e",
    "benchmarks.jobs",
    "benchmarks.latency",
    "benchmarks.ledger",
    "benchmarks.ours",
    "benchmarks.width",
    "benchmarks.wire",
    "benchmarks.workflows",
    "benchmarks.peers.compare",
    *(p.driver for p in PEERS.values()),
]


@pytest.mark.parametrize("name", BENCH_MODULES)
def test_bench_module_imports_without_the_peers(name: str) -> None:
    importlib.import_module(name)


def test_every_sub_bench_is_selectable_and_reported() -> None:
    from benchmarks import cli

    benches = cli._sub_benches()
    assert set(benches) == set(cli.NAMES)
    parser = cli.build_parser("executor bench")
    assert cli.selected(parser.parse_args([])) == list(cli.DEFAULT_SET)
    assert cli.selected(parser.parse_args(["--peers"])) == ["peers"]
    assert cli.selected(parser.parse_args(["--width", "10000"])) == []
    assert cli.selected(parser.parse_args(["--what", "width,count", "--peers"])) == [
        "width",
        "count",
        "peers",
    ]
    with pytest.raises(SystemExit):
        cli.selected(parser.parse_args(["--what", "nope"]))


def test_executor_bench_hands_its_arguments_to_the_package(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from executor.cli.main import main

    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: executor bench")
    assert "--peers" in out
    assert "--what" in out


def test_executor_bench_says_how_to_get_a_missing_package(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from executor.cli.main import main

    monkeypatch.setitem(sys.modules, "benchmarks.cli", None)  # import now raises ImportError
    assert main(["bench", "--peers"]) == 1
    assert "pip install -e '.[dev]'" in capsys.readouterr().err


def _functions(module: str) -> set[str]:
    spec = importlib.util.find_spec(module)
    assert spec is not None, f"{module} is missing"
    assert spec.origin is not None
    tree = ast.parse(Path(spec.origin).read_text())
    return {n.name for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}


@pytest.mark.parametrize("name", sorted(PEERS))
def test_peer_definition_is_well_formed(name: str) -> None:
    peer = PEERS[name]
    assert peer.name == name
    assert peer.label
    assert peer.expression
    assert peer.guarantees
    assert peer.store in ("postgres", "redis")
    # Only the Postgres peers commit each step's completion to Postgres.
    assert peer.durable_completion is (peer.store == "postgres")
    assert peer.requirement.split("[")[0].split("=")[0].split(">")[0] == peer.distribution
    driver = importlib.import_module(peer.driver)
    assert callable(driver.run_round)
    # The worker module defines one function per step of the shared workflow.
    assert set(STEPS) <= _functions(peer.worker_module)


def test_the_bench_extra_installs_every_importable_peer() -> None:
    import tomllib

    root = Path(__file__).resolve().parent.parent
    extra = tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert sorted(extra["bench"]) == sorted(p.requirement for p in PEERS.values() if p.name != "rq")


def test_peers_run_the_same_graph_as_our_noop_workflow() -> None:
    from executor.workflows.sample import noop

    assert tuple(noop.steps) == STEPS
    assert {k: s.depends_on for k, s in noop.steps.items()} == DEPENDS_ON
    assert ("ours", *PEERS) == SYSTEMS


def test_width_workflows_are_root_fan_out_join() -> None:
    from benchmarks.workflows import WIDTHS, retry, width_workflows

    for width in WIDTHS:
        wf = width_workflows[width]
        assert len(wf.steps) == width + 2
        assert wf.steps["join"].depends_on == tuple(
            k for k in wf.steps if k not in {"root", "join"}
        )
        assert all(
            s.depends_on == ("root",) for k, s in wf.steps.items() if k not in {"root", "join"}
        )
    backoff = retry.steps["flaky"].backoff
    assert backoff is not None
    assert not backoff.jitter
    assert backoff.initial == backoff.cap == 0.05


def test_resp_commands_are_parsed_across_frames() -> None:
    from benchmarks.wire import _RespConnection

    conn = _RespConnection()
    pipeline = (
        b"*1\r\n$5\r\nMULTI\r\n*3\r\n$4\r\nHSET\r\n$1\r\nk\r\n$1\r\nv\r\n*1\r\n$4\r\nEXEC\r\n"
    )
    conn.feed_front(pipeline[:20])
    conn.feed_front(pipeline[20:])
    assert conn.commands == {"MULTI": 1, "HSET": 1, "EXEC": 1}
    assert conn.round_trips == 1  # the server had not answered between the two writes
    conn.feed_back(b"+OK\r\n")
    conn.feed_front(b"*1\r\n$4\r\nPING\r\n")
    assert conn.round_trips == 2


def test_postgres_counter_counts_statements_round_trips_and_commits(database_url: str) -> None:
    from benchmarks.wire import PostgresCounter

    counter = PostgresCounter(database_url)
    try:
        with psycopg.connect(counter.url, autocommit=True) as conn:
            before = counter.snapshot()
            conn.execute("SELECT 1")
            one = counter.snapshot() - before
            with conn.transaction():
                conn.execute("SELECT 2")
                conn.execute("SELECT 3")
            two = counter.snapshot() - before - one
            with pytest.raises(psycopg.errors.DivisionByZero), conn.transaction():
                conn.execute("SELECT 1 / 0")
            three = counter.snapshot() - before - one - two
    finally:
        counter.close()
    assert (one.statements, one.round_trips, one.commits) == (1, 1, 1)
    assert one.by_statement == {"SELECT 1": 1}
    # BEGIN, two SELECTs, COMMIT: four statements, one commit.
    assert (two.statements, two.commits, two.rollbacks) == (4, 1, 0)
    assert (three.commits, three.rollbacks) == (0, 1)
