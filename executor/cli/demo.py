"""`executor demo`: a few real workers, ~200 runs, injected duplicates, and the proof.

Runs of the `order` sample workflow (parallel branches and a join, a flaky payment step) are
started through the same Client an app uses. A fifth of the launches are sent twice, and
after the runs finish every step's start and completion job is delivered again, late,
through Redis, as a confused producer would; one run in forty is cancelled while it runs.
Then a few runs of `onboard` show the durable primitives: each maps over a list of accounts,
sleeps on a durable timer, waits for an approval (which the demo sends, as an app or a person
on the dashboard would), and starts a child run. The summary shows that each extra delivery
was dropped with a reason and that `verify` finds every log valid.
"""

from __future__ import annotations

import random
import sys
import time
from collections import Counter
from uuid import uuid4

from rq import Queue

from executor.cli.procs import worker_env, worker_processes
from executor.client import Client, RunTimeout
from executor.commands.models import CancelRun, CompleteStep, StartStep, wire
from executor.commands.state import RUN_TERMINAL
from executor.ledger.verify import verify
from executor.storage.db import connect
from executor.transport.dispatch import DELIVER
from executor.transport.serializer import JSONCommandSerializer


def _bar(done: int, total: int, started: float) -> None:
    width = 40
    filled = int(width * done / max(total, 1))
    rate = done / max(time.monotonic() - started, 1e-9)
    line = f"\r  [{'#' * filled}{'.' * (width - filled)}] {done}/{total} runs  {rate:5.1f} runs/s"
    if sys.stderr.isatty():
        sys.stderr.write(line)
        sys.stderr.flush()


def run_demo(*, runs: int = 200, workers: int = 3, timeout: float = 120.0) -> int:
    from executor.config import resolve_urls
    from executor.storage.migrate import migrate

    db, redis_url = resolve_urls()
    migrate(db)
    print(f"starting {workers} worker processes; submitting {runs} runs of workflow 'order'")
    env = worker_env(db, redis_url)
    with worker_processes(workers, db, redis_url, env=env), Client(db, redis_url) as client:
        watermark = _last_drop_id(client)
        started = time.monotonic()
        run_ids: list[str] = []
        for i in range(runs):
            key = f"demo-order-{started:.0f}-{i}"
            args = {"order_id": f"A{i:04d}", "items": 1 + i % 3, "flake": 0.35}
            run_ids.append(client.start_run("order", args, idempotency_key=key))
            if random.random() < 0.2:
                client.start_run("order", args, idempotency_key=key)  # the producer retries
            if i % 40 == 39:
                # An operator cancels a run in flight: its running attempt's result is late.
                client.apply(CancelRun(run_id=run_ids[-3], idempotency_key=f"{key}-cancel"))
        done = 0
        deadline = started + timeout
        while done < runs and time.monotonic() < deadline:
            counts = client.status_counts(run_ids)
            done = sum(counts.get(s, 0) for s in RUN_TERMINAL)
            _bar(done, runs, started)
            time.sleep(0.2)
        elapsed = time.monotonic() - started
        if sys.stderr.isatty():
            sys.stderr.write("\n")

        before = _drop_count(client)
        late = _redeliver_late(client, run_ids[: max(1, runs // 4)])
        _wait_for_drops(client, before + late)
        by_status = Counter(client.status_counts(run_ids))
        onboarded = _onboard(client, count=max(2, runs // 40), timeout=timeout)

    with connect(db) as conn:
        steps = conn.execute(
            "SELECT count(*) AS steps, coalesce(sum(attempt - 1) FILTER (WHERE attempt > 1), 0) "
            "AS retries FROM executor.steps WHERE run_id = ANY(%s)",
            (run_ids,),
        ).fetchone()
        drops = conn.execute(
            "SELECT reason, count(*) AS n FROM executor.drops WHERE drop_id > %s "
            "GROUP BY reason ORDER BY reason",
            (watermark,),
        ).fetchall()
        report = verify(conn)
    assert steps is not None
    print()
    print("runs by status")
    for status in ("completed", "failed", "cancelled", "running", "pending", "paused"):
        if by_status.get(status):
            print(f"  {status:<20} {by_status[status]:>6}")
    print(f"steps                  {steps['steps']:>6}")
    print(f"retries                {steps['retries']:>6}")
    print("dropped deliveries")
    for d in drops:
        print(f"  {d['reason']:<20} {d['n']:>6}")
    print(
        f"steps per second       {steps['steps'] / elapsed:>8.1f}  ({elapsed:.1f}s for {runs} runs)"
    )
    print(
        f"onboard runs           {onboarded['completed']:>6} completed of {onboarded['runs']}: "
        f"{onboarded['items']} mapped items, {onboarded['approvals']} approvals sent, "
        f"{onboarded['children']} child runs"
    )
    if report.ok:
        print(f"verify                 ok ({report.runs} runs, {report.events} events)")
    else:
        print(f"verify                 VIOLATION {report.violations[0]}")
    unfinished = runs - sum(by_status[s] for s in ("completed", "failed", "cancelled"))
    onboard_ok = onboarded["completed"] == onboarded["runs"]
    return 0 if report.ok and unfinished == 0 and onboard_ok else 1


def _onboard(client: Client, *, count: int, timeout: float) -> dict[str, int]:
    """Start `onboard` runs, approve each once its approval step waits, wait for the ends."""
    print(f"\nstarting {count} runs of 'onboard' (map, timer, approval, child run)")
    run_ids = [client.start_run("onboard", {"accounts": 2 + i % 4}) for i in range(count)]
    approved: set[str] = set()
    deadline = time.monotonic() + timeout
    while len(approved) < count and time.monotonic() < deadline:
        with client.pool.connection() as conn:
            waiting = conn.execute(
                "SELECT run_id FROM executor.steps WHERE run_id = ANY(%s)"
                " AND step_key = 'approval' AND status = 'waiting'",
                (run_ids,),
            ).fetchall()
        for row in waiting:
            if row["run_id"] not in approved:
                client.send_event(
                    row["run_id"], "approved", "demo", idempotency_key=f"approve:{row['run_id']}"
                )
                approved.add(row["run_id"])
        time.sleep(0.1)
    completed = 0
    for run_id in run_ids:
        try:
            view = client.wait(run_id, timeout=max(1.0, deadline - time.monotonic()))
        except RunTimeout:
            continue
        completed += view.status == "completed"
    with client.pool.connection() as conn:
        found = conn.execute(
            "SELECT count(*) FILTER (WHERE kind = 'item') AS items,"
            " count(child_run_id) AS children FROM executor.steps WHERE run_id = ANY(%s)",
            (run_ids,),
        ).fetchone()
    assert found is not None
    return {
        "runs": count,
        "completed": completed,
        "items": int(found["items"]),
        "approvals": len(approved),
        "children": int(found["children"]),
    }


def _redeliver_late(client: Client, run_ids: list[str]) -> int:
    """Send every finished attempt's start and completion again, through Redis.

    Each goes out as a new RQ job (a fresh job id), as a producer that lost track would send
    it, so RQ's own job-id dedupe cannot hide it: the ledger must catch it.
    """
    sent = 0
    with client.pool.connection() as conn:
        rows = conn.execute(
            "SELECT run_id, step_key, attempt, output, queue, fence FROM executor.steps "
            "WHERE run_id = ANY(%s) AND status = 'completed'",
            (run_ids,),
        ).fetchall()
    for r in rows:
        run_id, step_key, attempt = r["run_id"], r["step_key"], r["attempt"]
        queue = Queue(r["queue"], connection=client.redis, serializer=JSONCommandSerializer)
        for command in (
            StartStep(run_id=run_id, step_key=step_key, attempt=attempt),
            CompleteStep(
                run_id=run_id,
                step_key=step_key,
                attempt=attempt,
                fence=r["fence"],
                output=r["output"],
            ),
        ):
            queue.enqueue(DELIVER, wire(command), job_id=f"late-{uuid4().hex}")
            sent += 1
    return sent


def _last_drop_id(client: Client) -> int:
    with client.pool.connection() as conn:
        row = conn.execute("SELECT coalesce(max(drop_id), 0) AS n FROM executor.drops").fetchone()
    return int(row["n"]) if row else 0


def _drop_count(client: Client) -> int:
    with client.pool.connection() as conn:
        row = conn.execute("SELECT count(*) AS n FROM executor.drops").fetchone()
    return int(row["n"]) if row else 0


def _wait_for_drops(client: Client, target: int, timeout: float = 30.0) -> None:
    """Wait until the workers have taken every late job and recorded its drop."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _drop_count(client) < target:
        time.sleep(0.1)
