"""The operator verbs: thin argparse wrappers over Client, migrate, verify and friends."""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from typing import Any

from executor.commands.models import CancelRun, PauseRun, ResumeRun, RetryStep, parse
from executor.errors import ExecutorError


def register(sub: Any) -> None:
    def verb(name: str, func: Any, help_: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(func=func)
        return p

    verb("migrate", cmd_migrate, "apply the SQL files in sql/ once each, under an advisory lock")

    p = verb("worker", cmd_worker, "run an RQ worker (our class) on the configured queues")
    p.add_argument("queues", nargs="*", help="queues in priority order (default: configured)")
    p.add_argument("--burst", action="store_true", help="exit when the queues are empty")
    p.add_argument("--worker-class", choices=("simple", "fork"), default=None)
    p.add_argument(
        "--metrics-port",
        type=int,
        metavar="N",
        help="serve Prometheus metrics on this port (one per worker process)",
    )
    p.add_argument("--metrics-host", default="127.0.0.1", help="address for --metrics-port")

    p = verb("submit", cmd_submit, "start a run of WORKFLOW, or enqueue a raw --command")
    p.add_argument("workflow", nargs="?")
    p.add_argument("--input", default="null", help="run input as JSON")
    p.add_argument("--concurrency-key")
    p.add_argument("--concurrency-limit", type=int, default=1, help="runs that may hold the key")
    p.add_argument(
        "--on-conflict",
        choices=("reject", "queue"),
        default="reject",
        help="when every slot of the key is taken: refuse, or wait queued for a slot",
    )
    p.add_argument("--idempotency-key")
    p.add_argument("--command", help="a command as JSON, committed to the outbox for a worker")
    p.add_argument("--wait", type=float, metavar="SECONDS", help="wait for a terminal status")

    p = verb("runs", cmd_runs, "list recent runs, or (--keys) each concurrency key's holders")
    p.add_argument("--status")
    p.add_argument("--workflow")
    p.add_argument("--key", help="only runs of this concurrency key")
    p.add_argument("--keys", action="store_true", help="holders and queue of each key in use")
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--json", action="store_true")

    p = verb("show", cmd_show, "a run's steps and event timeline, drops included")
    p.add_argument("run_id")
    p.add_argument("--json", action="store_true")

    p = verb("retry", cmd_retry, "retry a failed step as a new attempt")
    p.add_argument("run_id")
    p.add_argument("step_key")
    p.add_argument("--idempotency-key", help="repeat a retry safely by reusing its key")
    for name, help_ in (
        ("cancel", "cancel a run and its unfinished steps"),
        ("pause", "stop dispatching new steps of a run"),
        ("resume", "resume a paused run"),
    ):
        p = verb(name, cmd_run_action, help_)
        p.add_argument("run_id")
        p.add_argument("--idempotency-key")
        p.add_argument("--reason")

    from executor.cli import events

    events.register(verb)

    verb("sweep", cmd_sweep, "re-push undecided outbox rows, expire leases, fire timers once")

    p = verb(
        "verify",
        cmd_verify,
        "replay every run's log against the invariants (exit 3: violation, 5: a stuck run)",
    )
    p.add_argument("--json", action="store_true", help="every finding, as JSON")
    p.add_argument("--run", dest="run_id", help="check one run only")

    p = verb("dashboard", cmd_dashboard, "serve the retry dashboard")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--public-metrics", action="store_true", help="serve /metrics without a token")

    p = verb("demo", cmd_demo, "run the demo: workers, ~200 runs, duplicates, a summary")
    p.add_argument("--runs", type=int, default=200)
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--ledger-only", action="store_true", help="the scripted ledger demo only")

    # The benchmarks package owns its options (`executor bench --help` lists them); '+' as
    # the only prefix makes this parser hand every argument through untouched.
    help_ = "measure against baselines and peers, side by side (see docs/benchmarks.md)"
    p = sub.add_parser("bench", help=help_, description=help_, add_help=False, prefix_chars="+")
    p.add_argument("bench_args", nargs="*")
    p.set_defaults(func=cmd_bench)

    verb("config", cmd_config, "print the effective settings")

    from executor.cli import retention, schedules, services

    schedules.register(sub)
    retention.register(sub)
    services.register(sub)


def _urls() -> tuple[str, str]:
    from executor.config import resolve_urls

    return resolve_urls()


def _client() -> Any:
    from executor.client import Client

    db, redis = _urls()
    return Client(db, redis)


def cmd_migrate(args: argparse.Namespace) -> int:
    from executor.storage.migrate import migrate

    db, _ = _urls()
    applied = migrate(db)
    print("applied: " + ", ".join(applied) if applied else "schema is up to date")
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from executor.transport.runtime import get_runtime
    from executor.transport.worker import run_worker
    from queue_config import load_settings

    exporter = None
    if args.metrics_port is not None:
        from executor.observability.metrics import serve

        exporter = serve(args.metrics_port, args.metrics_host, pool=lambda: get_runtime().pool)
    try:
        run_worker(
            load_settings(),
            queues=args.queues or None,
            burst=args.burst,
            worker_class=args.worker_class,
        )
    finally:
        if exporter is not None:
            exporter.close()
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    with _client() as client:
        if args.command:
            job_id = client.submit(parse(args.command))
            print(job_id)
            return 0
        if not args.workflow:
            raise ExecutorError("name a workflow, or pass --command")
        run_id = client.start_run(
            args.workflow,
            json.loads(args.input),
            concurrency_key=args.concurrency_key,
            concurrency_limit=args.concurrency_limit,
            on_conflict=args.on_conflict,
            idempotency_key=args.idempotency_key,
        )
        print(run_id)
        if args.wait:
            view = client.wait(run_id, timeout=args.wait)
            print(view.status)
            return 0 if view.status == "completed" else 1
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    if args.keys:
        return _keys(args)
    clauses, params = [], []
    for column, value in (
        ("status", args.status),
        ("workflow", args.workflow),
        ("concurrency_key", args.key),
    ):
        if value:
            clauses.append(f"{column} = %s")
            params.append(value)
    where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
    with _client() as client, client.pool.connection() as conn:
        rows = conn.execute(
            "SELECT run_id, workflow, status, concurrency_key, concurrency_slot, last_seq, "
            f"parent_run_id, created_at FROM executor.runs {where} "
            "ORDER BY created_at DESC, run_id DESC LIMIT %s",
            (*params, args.limit),
        ).fetchall()
    if args.json:
        print(json.dumps(rows, default=str, indent=2))
        return 0
    _table(
        ["run_id", "workflow", "status", "key", "events", "created"],
        [
            [
                r["run_id"],
                r["workflow"],
                r["status"],
                _key_cell(r),
                r["last_seq"],
                f"{r['created_at']:%H:%M:%S}",
            ]
            for r in rows
        ],
    )
    return 0


def _key_cell(row: dict[str, Any]) -> str:
    if row["concurrency_key"] is None:
        return ""
    slot = row["concurrency_slot"]
    return f"{row['concurrency_key']}" + (f" (slot {slot})" if slot is not None else "")


def _keys(args: argparse.Namespace) -> int:
    """Each key some run holds or waits for: its limit, its holders, its queue (oldest first)."""
    with _client() as client, client.pool.connection() as conn:
        rows = conn.execute(
            "SELECT k.concurrency_key, k.concurrency_limit,"
            " array_agg(r.run_id ORDER BY r.concurrency_slot)"
            "   FILTER (WHERE r.concurrency_slot IS NOT NULL) AS holders,"
            " array_agg(r.run_id ORDER BY r.queue_position)"
            "   FILTER (WHERE r.status = 'queued') AS queued"
            " FROM executor.concurrency_keys k JOIN executor.runs r USING (concurrency_key)"
            " WHERE r.status IN ('queued', 'pending', 'running', 'paused')"
            "   AND (%s::text IS NULL OR k.concurrency_key = %s)"
            " GROUP BY k.concurrency_key, k.concurrency_limit ORDER BY k.concurrency_key"
            " LIMIT %s",
            (args.key, args.key, args.limit),
        ).fetchall()
    if args.json:
        print(json.dumps(rows, default=str, indent=2))
        return 0
    _table(
        ["key", "limit", "holders", "queued (oldest first)"],
        [
            [
                r["concurrency_key"],
                r["concurrency_limit"],
                " ".join(r["holders"] or []),
                " ".join(r["queued"] or []),
            ]
            for r in rows
        ],
    )
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    with _client() as client:
        view = client.get_run(args.run_id)
        if view is None:
            raise ExecutorError(f"no run {args.run_id}")
        with client.pool.connection() as conn:
            events = conn.execute(
                "SELECT seq, type, step_key, attempt, idempotency_key, payload, created_at "
                "FROM executor.events WHERE run_id = %s ORDER BY seq",
                (args.run_id,),
            ).fetchall()
            drops = conn.execute(
                "SELECT drop_id, command_type, step_key, attempt, reason, detail, received_at "
                "FROM executor.drops WHERE run_id = %s ORDER BY drop_id",
                (args.run_id,),
            ).fetchall()
    if args.json:
        doc = {"run": view.model_dump(mode="json"), "events": events, "drops": drops}
        print(json.dumps(doc, default=str, indent=2))
        return 0
    print(f"run {view.run_id}  workflow={view.workflow}  status={view.status}")
    if view.concurrency_key:
        print(f"concurrency key: {view.concurrency_key} (limit {view.concurrency_limit})")
    if view.parent_run_id:
        print(f"child of run {view.parent_run_id}, step {view.parent_step_key}")
    print()
    _table(
        ["step", "kind", "status", "attempt", "depends on", "waits for"],
        [
            [
                s.step_key,
                s.kind,
                s.status,
                f"{s.attempt}/{s.max_attempts}",
                ",".join(s.depends_on),
                _waits_for(s),
            ]
            for s in view.steps
        ],
    )
    print("\ntimeline")
    _table(
        ["seq", "event", "step", "attempt", "at"],
        [
            [
                e["seq"],
                e["type"],
                e["step_key"] or "",
                e["attempt"] or "",
                f"{e['created_at']:%H:%M:%S.%f}"[:-3],
            ]
            for e in events
        ],
    )
    if drops:
        print("\ndropped deliveries")
        _table(
            ["command", "step", "attempt", "reason", "detail"],
            [
                [
                    d["command_type"],
                    d["step_key"] or "",
                    d["attempt"] or "",
                    d["reason"],
                    d["detail"],
                ]
                for d in drops
            ],
        )
    return 0


def _waits_for(step: Any) -> str:
    if step.status not in ("sleeping", "waiting"):
        return f"child run {step.child_run_id}" if step.child_run_id else ""
    if step.child_run_id:
        return f"child run {step.child_run_id}"
    if step.event_name:
        until = f" (until {step.wake_at:%Y-%m-%d %H:%M:%S})" if step.wake_at else ""
        return f"event {step.event_name}{until}"
    if step.wake_at:
        return f"timer {step.wake_at:%Y-%m-%d %H:%M:%S}"
    return "its items" if step.kind == "map" else ""


def _print_outcome(outcome: Any) -> int:
    print(outcome.summary())
    return 0 if outcome.applied else 1


def cmd_retry(args: argparse.Namespace) -> int:
    key = args.idempotency_key or f"cli-retry:{uuid.uuid4().hex}"
    with _client() as client:
        return _print_outcome(
            client.apply(RetryStep(run_id=args.run_id, step_key=args.step_key, idempotency_key=key))
        )


def cmd_run_action(args: argparse.Namespace) -> int:
    key = args.idempotency_key or f"cli-{args.verb}:{uuid.uuid4().hex}"
    command: CancelRun | PauseRun | ResumeRun
    if args.verb == "cancel":
        command = CancelRun(run_id=args.run_id, idempotency_key=key, reason=args.reason)
    elif args.verb == "pause":
        command = PauseRun(run_id=args.run_id, idempotency_key=key, reason=args.reason)
    else:
        command = ResumeRun(run_id=args.run_id, idempotency_key=key)
    with _client() as client:
        return _print_outcome(client.apply(command))


def cmd_sweep(args: argparse.Namespace) -> int:
    from executor.recovery.sweep import sweep_once

    db, redis = _urls()
    report = sweep_once(db, redis)
    print(report)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from executor.config import resolve_database_url
    from executor.ledger.verify import verify
    from executor.storage.db import connect

    with connect(resolve_database_url()) as conn:  # verify reads the ledger only, no Redis
        report = verify(conn, run_id=args.run_id, stop_at_first=not args.json)
    if args.json:
        print(json.dumps(report.as_json(), indent=2, default=str))
        return report.exit_code
    for violation in report.violations:
        print(f"VIOLATION: {violation}", file=sys.stderr)
    shown = 20
    for stuck in report.stuck[:shown]:
        print(f"STUCK: {stuck}", file=sys.stderr)
    if report.stuck_total > shown:
        print(f"STUCK: ... and {report.stuck_total - shown} more runs", file=sys.stderr)
    if report.exit_code == 0:
        print(
            f"ok: {report.runs} runs, {report.events} events, {report.receipts} receipts, "
            f"{report.drops} drops; every step and run history is valid, every delivery "
            "accounted for, rows match the log, no run is stuck"
        )
    return report.exit_code


def cmd_dashboard(args: argparse.Namespace) -> int:
    from executor.dashboard.app import serve

    db, redis = _urls()
    serve(
        host=args.host,
        port=args.port,
        database_url=db,
        redis_url=redis,
        public_metrics=args.public_metrics,
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    if args.ledger_only:
        from executor.cli.ledger_demo import run_ledger_demo

        return run_ledger_demo()
    from executor.cli.demo import run_demo

    return run_demo(runs=args.runs, workers=args.workers)


def cmd_bench(args: argparse.Namespace) -> int:
    try:
        from benchmarks.cli import main as bench_main
    except ImportError as exc:
        if exc.name is None or not exc.name.startswith("benchmarks"):
            raise
        print(
            "executor bench: the benchmarks package is not installed; it ships in the source "
            "tree: clone the repository and pip install -e '.[dev]' (add ',bench' for --peers)",
            file=sys.stderr,
        )
        return 1
    return bench_main(args.bench_args, prog="executor bench")


def cmd_config(args: argparse.Namespace) -> int:
    from queue_config import load_settings

    print(load_settings().render())
    return 0


def _table(headers: list[str], rows: list[list[Any]]) -> None:
    cells = [[str(c) for c in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    widths = [min(w, 60) for w in widths]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print("  ".join(c[:60].ljust(w) for c, w in zip(r, widths, strict=True)))
