"""`executor bench --peers`: ours and each peer on the same workflow, in alternating rounds.

Each round runs every system once, in an order rotated by one each round; each system gets
a fresh database (Postgres peers: their own, on the same server as ours) or a flushed Redis
db of its own (on the same Redis server as ours) for every round. A peer whose library is
missing is skipped with the command that installs it.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
from typing import Any

from benchmarks.common import Context, Round, RoundSpec, flush, rotated, say, summarize, table
from benchmarks.ours import ours_round
from benchmarks.peers import PEERS, SYSTEMS, Peer

DEFAULT_RUNS = 300
STEPS_PER_RUN = 4


def available(peer: Peer) -> str | None:
    """Why the peer cannot run here, or None."""
    if peer.name == "rq":
        return None  # its virtualenv is made on demand
    if importlib.util.find_spec(peer.distribution) is None:
        return f"{peer.distribution} is not installed: pip install -e '.[bench]'"
    return None


def _version(peer: Peer, rounds: list[Round]) -> str:
    if peer.name == "rq":
        return next((r.note.split(" ")[-1] for r in rounds if r.note), "")
    try:
        return importlib.metadata.version(peer.distribution)
    except importlib.metadata.PackageNotFoundError:
        return ""


def run(ctx: Context) -> dict[str, Any]:
    runs = ctx.runs or DEFAULT_RUNS
    unknown = [s for s in ctx.systems if s not in SYSTEMS]
    if unknown:
        raise SystemExit(f"unknown systems {unknown}; choose from {', '.join(SYSTEMS)}")
    systems = [s for s in SYSTEMS if s in ctx.systems]
    skipped: dict[str, str] = {}
    for name in systems:
        if name in PEERS and (why := available(PEERS[name])):
            skipped[name] = why
            say(f"  skipping {name}: {why}")
    systems = [s for s in systems if s not in skipped]
    redis_urls = {
        s: ctx.redis_dbs.claim(s) for s in systems if s == "ours" or PEERS[s].store == "redis"
    }
    results: dict[str, list[Round]] = {s: [] for s in systems}
    for r in range(ctx.rounds):
        for name in rotated(systems, r):
            label = f"peers_r{r}_{name}"
            if name == "ours":
                result = ours_round(
                    ctx.scratch,
                    redis_urls["ours"],
                    workers=ctx.workers,
                    runs=runs,
                    label=label,
                    timeout=ctx.timeout,
                )
            else:
                result = _peer_round(ctx, PEERS[name], redis_urls.get(name), runs, label)
            results[name].append(result)
            say(f"  round {r + 1}: {name:14} {result.runs_per_s:7.1f} runs/s")
            ctx.redis_dbs.refresh()
    return _summary(results, runs, ctx, skipped)


def _peer_round(ctx: Context, peer: Peer, redis_url: str | None, runs: int, label: str) -> Round:
    driver = importlib.import_module(peer.driver)
    if peer.store == "redis":
        assert redis_url is not None
        flush(redis_url)
        url = redis_url
    else:
        url = ctx.scratch.create(label)
    spec = RoundSpec(
        url=url,
        workers=ctx.workers,
        runs=runs,
        timeout=ctx.timeout,
        label=label,
        options=ctx.options,
    )
    try:
        result: Round = driver.run_round(spec)
        return result
    finally:
        if peer.store == "postgres":
            ctx.scratch.drop(url)


def _summary(
    results: dict[str, list[Round]], runs: int, ctx: Context, skipped: dict[str, str]
) -> dict[str, Any]:
    systems: dict[str, Any] = {}
    for name, rounds in results.items():
        s = summarize(rounds)
        if name == "ours":
            s.update(
                label="this project (noop, executor worker)",
                version="",
                durable_completion=True,
                store="postgres",
            )
        else:
            peer = PEERS[name]
            s.update(
                label=peer.label.split(" ")[0],
                version=_version(peer, rounds),
                durable_completion=peer.durable_completion,
                store=peer.store,
                expression=peer.expression,
                guarantees=peer.guarantees,
            )
        systems[name] = s
    if "ours" in systems:
        for s in systems.values():
            s["ratio_ours_to_this"] = systems["ours"]["runs_per_s"] / s["runs_per_s"]
    return {
        "workflow": "first -> (left, right) -> last, no-op steps",
        "runs_per_round": runs,
        "steps_per_run": STEPS_PER_RUN,
        "workers": ctx.workers,
        "rounds": ctx.rounds,
        "systems": systems,
        "skipped": skipped,
    }


def report(result: dict[str, Any]) -> str:
    rows = []
    for s in result["systems"].values():
        name = f"{s['label']} {s['version']}".strip()
        ratio = s.get("ratio_ours_to_this")
        rows.append(
            [
                name,
                s["runs_per_s"],
                s["steps_per_s"],
                s["p50_ms"],
                s["p99_ms"],
                f"{ratio:.2f}x" if ratio is not None else "n/a",
                "yes" if s["durable_completion"] else "no",
            ]
        )
    lines = [
        f"peers: {result['runs_per_round']} runs of {result['workflow']}, one producer, "
        f"{result['workers']} worker processes each, {result['rounds']} alternating rounds "
        "(medians; latency over all runs)",
        table(
            [
                "system",
                "runs/s",
                "steps/s",
                "p50 ms",
                "p99 ms",
                "ours/this",
                "completion durable in Postgres",
            ],
            rows,
        ),
    ]
    for name, why in result["skipped"].items():
        lines.append(f"  skipped {name}: {why}")
    return "\n".join(lines)
