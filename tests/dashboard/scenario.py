"""A realistic morning for an operator: several workflows, every status, failures, drops.

Everything goes through the handler, so the pages show states the executor really reaches.
"""

from __future__ import annotations

from dataclasses import dataclass

from executor.commands.models import (
    BackoffPolicy,
    CompleteStep,
    DispatchStep,
    FailStep,
    PauseRun,
    StartStep,
    StepSpec,
)

from .conftest import Seeder

ORDER_STEPS = (
    StepSpec(step_key="validate", max_attempts=1),
    StepSpec(step_key="reserve_stock", depends_on=("validate",), max_attempts=3),
    StepSpec(
        step_key="charge_card",
        depends_on=("validate",),
        max_attempts=3,
        backoff=BackoffPolicy(initial=0, jitter=False),  # the retry below is due at once
    ),
    StepSpec(step_key="ship", depends_on=("reserve_stock", "charge_card"), max_attempts=1),
    StepSpec(step_key="notify", depends_on=("ship",), max_attempts=2),
)
REPORT_STEPS = (
    StepSpec(step_key="extract", max_attempts=2),
    StepSpec(step_key="transform", depends_on=("extract",), max_attempts=2),
    StepSpec(step_key="load", depends_on=("transform",), max_attempts=1),
)

CARD_TRACEBACK = """Traceback (most recent call last):
  File "shop/workflows.py", line 41, in charge_card
    receipt = gateway.charge(ctx.input["card"], amount=ctx.upstream["validate"]["total"])
  File "shop/payments.py", line 118, in charge
    raise PaymentDeclined(response.code, response.message)
shop.payments.PaymentDeclined: 402 card_declined: insufficient funds"""

SHIP_TRACEBACK = """Traceback (most recent call last):
  File "shop/workflows.py", line 58, in ship
    label = carrier.create_label(address)
  File "shop/carrier.py", line 77, in create_label
    resp.raise_for_status()
httpx.HTTPStatusError: Server error '503 Service Unavailable' for url 'carrier/v2/labels'"""


@dataclass
class Scenario:
    failed_order: str
    failed_ship: str
    completed_order: str
    running_order: str
    paused_report: str


def _fail(seed: Seeder, run_id: str, step: str, attempt: int, error: str, tb: str) -> None:
    seed.start(run_id, step, attempt)
    out = seed.ledger.apply(
        FailStep(
            fence="f",
            run_id=run_id,
            step_key=step,
            attempt=attempt,
            error=error,
            error_type=tb.rsplit("\n", 1)[-1].split(":")[0].rsplit(".", 1)[-1],
            traceback=tb,
            retryable=False,
        )
    )
    assert out.applied, out


def populate(seed: Seeder, prefix: str = "") -> Scenario:
    """About twenty runs across four workflows, with retries, failures and drops."""
    ids: dict[str, str] = {}

    def run(name: str, workflow: str, steps: tuple[StepSpec, ...], key: str | None = None) -> str:
        run_id = f"{prefix}{name}"
        ids[name] = seed.run(workflow, steps=steps, run_id=run_id, concurrency_key=key)
        return run_id

    for i in range(6):
        r = run(f"ord-{1040 + i}", "orders", ORDER_STEPS, key=f"customer-{300 + i}")
        for step in ("validate", "reserve_stock", "charge_card", "ship", "notify"):
            seed.complete(r, step, 1, {"ok": True, "step": step})
    for i in range(3):
        r = run(f"rep-{7 + i:03d}", "reports", REPORT_STEPS)
        for step in ("extract", "transform", "load"):
            seed.complete(r, step, 1, {"rows": 1200 + i})

    # A charge that failed for good after its retries: the classic "find it and retry it".
    failed_order = run("ord-1051", "orders", ORDER_STEPS, key="customer-412")
    seed.complete(failed_order, "validate", 1, {"total": 129.5})
    seed.complete(failed_order, "reserve_stock", 1, {"reserved": 3})
    seed.start(failed_order, "charge_card", 1)
    seed.ledger.apply(
        FailStep(
            fence="f",
            run_id=failed_order,
            step_key="charge_card",
            attempt=1,
            error="gateway timeout",
            error_type="TimeoutError",
            retryable=True,
        )
    )
    seed.ledger.apply(DispatchStep(run_id=failed_order, step_key="charge_card", attempt=2))
    # The first attempt's worker comes back late: dropped as stale, never appended.
    seed.ledger.apply(
        CompleteStep(
            fence="f",
            run_id=failed_order,
            step_key="charge_card",
            attempt=1,
            output={"late": True},
            idempotency_key="complete_step:late-worker",
        )
    )
    _fail(
        seed,
        failed_order,
        "charge_card",
        2,
        "402 card_declined: insufficient funds",
        CARD_TRACEBACK,
    )

    # The shipping carrier was down for a while: three orders failed at `ship`.
    failed_ship = ""
    for i in range(3):
        r = run(f"ord-{1052 + i}", "orders", ORDER_STEPS, key=f"customer-{420 + i}")
        for step in ("validate", "reserve_stock", "charge_card"):
            seed.complete(r, step, 1)
        _fail(seed, r, "ship", 1, "503 Service Unavailable from carrier", SHIP_TRACEBACK)
        failed_ship = failed_ship or r
        # A redelivered job for the same attempt: a duplicate, dropped.
        seed.ledger.apply(StartStep(run_id=r, step_key="ship", attempt=1))
    # A sweeper re-sends a start for a step that already failed for good: terminal, dropped.
    seed.ledger.apply(
        StartStep(
            run_id=failed_ship, step_key="ship", attempt=1, idempotency_key="sweep:ship:resend"
        )
    )

    running_order = run("ord-1055", "orders", ORDER_STEPS, key="customer-431")
    seed.complete(running_order, "validate", 1)
    seed.start(running_order, "reserve_stock", 1)
    seed.start(running_order, "charge_card", 1)

    paused_report = run("rep-010", "reports", REPORT_STEPS)
    seed.complete(paused_report, "extract", 1)
    seed.ledger.apply(
        PauseRun(run_id=paused_report, idempotency_key="pause-rep-010", reason="warehouse upgrade")
    )

    emails = run("mail-2201", "emails", (StepSpec(step_key="render"), StepSpec(step_key="send")))
    seed.complete(emails, "render", 1)
    seed.complete(emails, "send", 1)
    seed.ledger.record_invalid(
        '{"type": "start_step", "run_id": 42}', "run_id: Input should be a valid string"
    )
    seed.ledger.record_invalid("\\x80\\x04\\x95 pickled bytes", "command is not UTF-8 text")
    return Scenario(
        failed_order=failed_order,
        failed_ship=failed_ship,
        completed_order=ids["ord-1040"],
        running_order=running_order,
        paused_report=paused_report,
    )
