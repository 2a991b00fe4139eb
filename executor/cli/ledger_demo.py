"""`executor demo --ledger-only`: one scripted run, delivered the way a real queue delivers.

No workers: the script plays two workers and a sweeper sending duplicate, reordered and late
commands straight into the handler, then prints the log, the drops, and `verify`.
"""

from __future__ import annotations

import uuid

from executor.commands.models import (
    BackoffPolicy,
    CompleteStep,
    CreateRun,
    DispatchStep,
    FailStep,
    StartRun,
    StartStep,
    StepSpec,
)
from executor.ledger.handler import Ledger
from executor.ledger.verify import verify
from executor.storage.db import connect, open_pool


def run_ledger_demo() -> int:
    from executor.config import resolve_urls
    from executor.storage.migrate import migrate

    db, _ = resolve_urls()
    migrate(db)
    run = f"demo-{uuid.uuid4().hex[:8]}"
    a, b = "worker-a", "worker-b"  # the fences of two deliveries
    pool = open_pool(db, name="ledger-demo", max_size=2)
    ledger = Ledger(pool)
    now = BackoffPolicy(initial=0, jitter=False)
    script: list[tuple[str, object]] = [
        (
            "app creates the run",
            CreateRun(
                run_id=run, workflow="order", input={"items": 2}, idempotency_key=f"create:{run}"
            ),
        ),
        (
            "producer retries the enqueue",
            CreateRun(
                run_id=run, workflow="order", input={"items": 2}, idempotency_key=f"create:{run}"
            ),
        ),
        (
            "a worker plans the steps",
            StartRun(
                run_id=run,
                workflow="order",
                steps=(
                    StepSpec(step_key="validate"),
                    StepSpec(
                        step_key="charge", depends_on=("validate",), max_attempts=3, backoff=now
                    ),
                    StepSpec(step_key="reserve", depends_on=("validate",)),
                    StepSpec(step_key="ship", depends_on=("charge", "reserve")),
                ),
            ),
        ),
        (
            "worker A starts validate",
            StartStep(run_id=run, step_key="validate", attempt=1, fence=a),
        ),
        (
            "the job is redelivered to worker B",
            StartStep(run_id=run, step_key="validate", attempt=1, fence=b),
        ),
        (
            "worker A completes validate",
            CompleteStep(run_id=run, step_key="validate", attempt=1, fence=a, output={"ok": True}),
        ),
        ("worker A starts charge", StartStep(run_id=run, step_key="charge", attempt=1, fence=a)),
        (
            "charge fails: gateway timeout",
            FailStep(
                run_id=run,
                step_key="charge",
                attempt=1,
                fence=a,
                error="gateway timed out",
                error_type="TimeoutError",
            ),
        ),
        (
            "attempt 3 dispatched ahead of attempt 2 (reordered)",
            DispatchStep(run_id=run, step_key="charge", attempt=3),
        ),
        (
            "backoff elapsed: attempt 2 dispatched",
            DispatchStep(run_id=run, step_key="charge", attempt=2),
        ),
        (
            "worker B starts charge attempt 2",
            StartStep(run_id=run, step_key="charge", attempt=2, fence=b),
        ),
        (
            "attempt 1's worker wakes up late and reports success",
            CompleteStep(
                run_id=run, step_key="charge", attempt=1, fence=a, output={"charged": True}
            ),
        ),
        (
            "attempt 2 completes",
            CompleteStep(
                run_id=run, step_key="charge", attempt=2, fence=b, output={"charged": True}
            ),
        ),
        ("reserve starts", StartStep(run_id=run, step_key="reserve", attempt=1, fence=a)),
        (
            "reserve completes",
            CompleteStep(
                run_id=run, step_key="reserve", attempt=1, fence=a, output={"reserved": 2}
            ),
        ),
        ("ship starts", StartStep(run_id=run, step_key="ship", attempt=1, fence=a)),
        (
            "ship completes: the run completes",
            CompleteStep(run_id=run, step_key="ship", attempt=1, fence=a, output={"shipped": True}),
        ),
        (
            "a late redelivery starts ship again",
            StartStep(
                run_id=run,
                step_key="ship",
                attempt=1,
                fence=b,
                idempotency_key=f"start_step:{run}:ship:1:late",
            ),
        ),
        (
            "the sweeper re-sends the completion",
            CompleteStep(run_id=run, step_key="ship", attempt=1, fence=a, output={"shipped": True}),
        ),
    ]
    print(f"scripted run {run}: {len(script)} deliveries\n")
    for i, (what, command) in enumerate(script, 1):
        outcome = ledger.apply(command)  # type: ignore[arg-type]
        verdict = (
            "applied  " + " ".join(e.type for e in outcome.events)
            if outcome.applied
            else f"DROPPED  {outcome.reason}: {outcome.detail}"
        )
        print(f"{i:>2}. {what:<52} {verdict}")
    pool.close()

    with connect(db) as conn:
        print("\nevent log")
        for e in conn.execute(
            "SELECT seq, type, step_key, attempt FROM executor.events "
            "WHERE run_id = %s ORDER BY seq",
            (run,),
        ):
            step = f"{e['step_key']}#{e['attempt']}" if e["step_key"] else ""
            print(f"  {e['seq']:>3}  {e['type']:<15} {step}")
        print("\ndrops by reason")
        for d in conn.execute(
            "SELECT reason, count(*) AS n FROM executor.drops "
            "WHERE run_id = %s GROUP BY reason ORDER BY reason",
            (run,),
        ):
            print(f"  {d['reason']:<20} {d['n']}")
        report = verify(conn, run_id=run)
    print(
        "\nverify: "
        + (
            "ok — every step history is a valid path, seq is gapless, every delivery accounted for"
            if report.ok
            else f"VIOLATION {report.violations[0]}"
        )
    )
    return 0 if report.ok else 3
