"""What the pages and the API show of durable waits, maps, child runs and queued runs."""

from __future__ import annotations

import re
import time

import pytest
from starlette.testclient import TestClient

from executor.commands.models import CompleteStep, StartStep
from executor.commands.state import DROP_REASONS, RUN_STATUSES, STEP_STATUSES

from .conftest import OPERATOR, Seeder, csrf_of, keys_of
from .waits import FENCE, approval_run, map_run, parent_with_child, queued_runs, sleeping_run


def test_a_sleeping_step_shows_its_timer(viewer: TestClient, seed: Seeder) -> None:
    run_id = sleeping_run(seed, seconds=3600)
    page = viewer.get(f"/runs/{run_id}").text
    assert "timer: wakes" in page
    assert re.search(r"in (59m|1h 0m)", page)
    assert "timer at" in page  # the timeline's step_sleeping event says so too
    step = viewer.get(f"/api/runs/{run_id}").json()["steps"][0]
    assert (step["kind"], step["status"]) == ("sleep", "sleeping")
    assert step["wake_at"] is not None


def test_a_child_run_links_to_its_parent_and_the_parent_to_its_child(
    viewer: TestClient, seed: Seeder
) -> None:
    parent, child = parent_with_child(seed)
    page = viewer.get(f"/runs/{parent}").text
    assert f'href="/runs/{child}"' in page
    assert "Child runs" in page
    assert "waits for child run" in page
    child_page = viewer.get(f"/runs/{child}").text
    assert f'href="/runs/{parent}#step-invoice"' in child_page
    assert "step invoice" in child_page
    body = viewer.get(f"/api/runs/{parent}").json()
    assert [c["run_id"] for c in body["children"]] == [child]
    assert body["children"][0]["parent_step_key"] == "invoice"
    assert body["steps"][0]["child_run_id"] == child
    run = viewer.get(f"/api/runs/{child}").json()["run"]
    assert (run["parent_run_id"], run["parent_step_key"]) == (parent, "invoice")


def test_a_map_of_ten_thousand_items_keeps_the_run_page_small_and_fast(
    viewer: TestClient, seed: Seeder
) -> None:
    run_id = map_run(seed, 10_000, fail=(7, 9_999), done=3)
    viewer.get(f"/runs/{run_id}")  # warm the pool and the templates
    started = time.perf_counter()
    page = viewer.get(f"/runs/{run_id}")
    elapsed = time.perf_counter() - started
    assert page.status_code == 200
    print(f"run page with a 10,000-item map: {elapsed * 1000:.0f} ms, {len(page.text)} bytes")
    assert elapsed < 2.0
    assert len(page.text) < 300_000
    text = page.text
    assert "10,000 items" in text
    for shown in ("9,995 queued", "3 completed", "2 failed"):
        assert shown in text
    assert text.count('<tr id="step-provision[') == 2  # only the failed items, not 10,000 rows
    assert f'href="/runs/{run_id}/steps/provision/items?status=failed"' in text
    assert ">Retry<" not in text  # a viewer's page
    as_operator = viewer.get(f"/runs/{run_id}", headers={"Authorization": f"Bearer {OPERATOR}"})
    assert as_operator.text.count(">Retry<") == 2
    assert "3/10,000 items" in text  # the graph's map node

    api = viewer.get(f"/api/runs/{run_id}").json()
    assert [s["step_key"] for s in api["steps"]] == ["accounts", "provision", "report"]
    assert api["items"]["provision"]["total"] == 10_000
    assert api["items"]["provision"]["by_status"] == {"completed": 3, "failed": 2, "queued": 9_995}
    assert [s["step_key"] for s in api["failed_items"]] == ["provision[7]", "provision[9999]"]


def test_a_maps_items_are_paged_in_index_order(viewer: TestClient, seed: Seeder) -> None:
    run_id = map_run(seed, 120, fail=(5, 61), done=2)
    url = f"/api/runs/{run_id}/steps/provision/items"
    first = viewer.get(url, params={"limit": 50}).json()
    assert [s["item_index"] for s in first["items"]] == list(range(50))
    assert first["next_after"] == 49
    assert first["counts"]["total"] == 120
    second = viewer.get(url, params={"limit": 50, "after": 49}).json()
    assert second["items"][0]["item_index"] == 50
    last = viewer.get(url, params={"limit": 50, "after": 99}).json()
    assert len(last["items"]) == 20
    assert last["next_after"] is None
    failed = viewer.get(url, params={"status": "failed"}).json()
    assert [s["step_key"] for s in failed["items"]] == ["provision[5]", "provision[61]"]
    assert viewer.get(f"/api/runs/{run_id}/steps/accounts/items").status_code == 404
    assert viewer.get(f"/api/runs/{run_id}/steps/provision/items?status=asleep").status_code == 422

    page = viewer.get(f"/runs/{run_id}/steps/provision/items").text
    assert page.count('<tr id="step-provision[') == 50  # the page size
    assert "?after=49" in page
    filtered = viewer.get(f"/runs/{run_id}/steps/provision/items?status=failed").text
    assert filtered.count('<tr id="step-provision[') == 2
    assert viewer.get(f"/runs/{run_id}/steps/nope/items").status_code == 404
    assert viewer.get(f"/runs/{run_id}/steps/provision/items?status=asleep").status_code == 400


def test_a_failed_item_is_retried_from_the_items_page(
    operator_browser: TestClient, seed: Seeder
) -> None:
    run_id = map_run(seed, 3, fail=(1,))
    page = operator_browser.get(f"/runs/{run_id}/steps/provision/items?status=failed").text
    (key,) = [k for k in keys_of(page) if k.startswith("dashboard:retry:")]
    response = operator_browser.post(
        f"/runs/{run_id}/steps/provision%5B1%5D/retry",
        data={"csrf_token": csrf_of(page), "idempotency_key": key, "confirmed": "1"},
    )
    assert response.status_code == 303
    items = operator_browser.get(f"/api/runs/{run_id}/steps/provision/items").json()["items"]
    assert (items[1]["status"], items[1]["attempt"]) == ("queued", 2)


def test_a_map_completes_and_its_output_is_clipped_on_the_page(
    viewer: TestClient, seed: Seeder
) -> None:
    run_id = map_run(seed, 3, done=3)
    assert seed.ledger.apply(
        StartStep(run_id=run_id, step_key="report", attempt=1, fence=FENCE)
    ).applied
    assert seed.ledger.apply(
        CompleteStep(fence=FENCE, run_id=run_id, step_key="report", attempt=1, output="x" * 30_000)
    ).applied
    page = viewer.get(f"/runs/{run_id}").text
    assert "more characters; the API has it all" in page
    provision = next(
        s for s in viewer.get(f"/api/runs/{run_id}").json()["steps"] if s["step_key"] == "provision"
    )
    assert provision["output"] == [{"id": 0}, {"id": 1}, {"id": 2}]


def test_queued_runs_their_place_and_the_keys_page(operator: TestClient, seed: Seeder) -> None:
    ids = queued_runs(seed, "tenant-7", limit=2, n=5)
    other = queued_runs(seed, "tenant-8", limit=1, n=1)
    queued = operator.get("/api/runs", params={"status": "queued"}).json()["runs"]
    assert {r["run_id"] for r in queued} == set(ids[2:])
    page = operator.get("/runs?status=queued").text
    assert all(run_id in page for run_id in ids[2:])
    assert "queued</a>" in operator.get("/runs").text  # the status chip

    run_page = operator.get(f"/runs/{ids[3]}").text
    assert "position 2 of 3" in run_page
    assert 'action="/runs/' + ids[3] + '/cancel"' in run_page  # a queued run can be cancelled

    body = operator.get("/api/concurrency-keys").json()
    by_key = {k["concurrency_key"]: k for k in body["keys"]}
    assert set(by_key) == {"tenant-7", "tenant-8"}
    seven = by_key["tenant-7"]
    assert (seven["concurrency_limit"], seven["holding"], seven["queued_total"]) == (2, 2, 3)
    assert [h["run_id"] for h in seven["holders"]] == ids[:2]
    assert [h["slot"] for h in seven["holders"]] == [0, 1]
    assert [q["run_id"] for q in seven["queued"]] == ids[2:]  # oldest first
    assert by_key["tenant-8"]["holders"][0]["run_id"] == other[0]
    one = operator.get("/api/concurrency-keys", params={"limit": 1}).json()
    assert [k["concurrency_key"] for k in one["keys"]] == ["tenant-7"]
    assert one["next"] == "tenant-7"
    rest = operator.get("/api/concurrency-keys", params={"after": one["next"]}).json()
    assert [k["concurrency_key"] for k in rest["keys"]] == ["tenant-8"]
    only = operator.get("/api/concurrency-keys", params={"key": "tenant-8"}).json()
    assert [k["concurrency_key"] for k in only["keys"]] == ["tenant-8"]

    keys_page = operator.get("/keys").text
    for shown in ("tenant-7", "2 / 2", "full"):
        assert shown in keys_page
    assert keys_page.index(ids[2]) < keys_page.index(ids[3]) < keys_page.index(ids[4])
    assert "No run holds or waits for key nope" in operator.get("/keys?key=nope").text

    # Cancelling a queued run takes it out of the queue.
    cancelled = operator.post(f"/api/runs/{ids[2]}/cancel", json={"idempotency_key": "c-q"})
    assert cancelled.json()["applied"] is True
    seven = operator.get("/api/concurrency-keys", params={"key": "tenant-7"}).json()["keys"][0]
    assert [q["run_id"] for q in seven["queued"]] == ids[3:]


def test_the_queues_page_and_metrics_count_every_status(viewer: TestClient, seed: Seeder) -> None:
    sleeping_run(seed)
    approval_run(seed)
    map_run(seed, 3)
    queued_runs(seed, "k", limit=1, n=3)
    page = viewer.get("/queues").text
    for label in ("Steps sleeping", "Steps waiting", "Runs queued"):
        assert label in page
    health = viewer.get("/api/queues").json()["ledger"]
    assert (health["steps_sleeping"], health["steps_waiting"], health["runs_queued"]) == (1, 2, 2)
    metrics = viewer.get("/metrics").text
    assert 'executor_runs{status="queued"} 2.0' in metrics
    assert 'executor_steps{status="sleeping"} 1.0' in metrics
    assert 'executor_steps{status="waiting"} 2.0' in metrics  # the approval and the map
    for status in RUN_STATUSES:
        assert f'executor_runs{{status="{status}"}}' in metrics
    for status in STEP_STATUSES:
        assert f'executor_steps{{status="{status}"}}' in metrics
    for reason in DROP_REASONS:
        assert f'executor_drops_total{{reason="{reason}"}}' in metrics


@pytest.mark.parametrize("status", [*RUN_STATUSES, "active"])
def test_every_run_status_is_a_filter(viewer: TestClient, status: str) -> None:
    assert viewer.get("/api/runs", params={"status": status}).status_code == 200
    page = viewer.get("/runs", params={"status": status})
    assert page.status_code == 200
    if status != "active":
        assert f"?status={status}" in page.text


@pytest.mark.parametrize("reason", DROP_REASONS)
def test_every_drop_reason_is_a_filter(viewer: TestClient, reason: str) -> None:
    assert viewer.get("/api/drops", params={"reason": reason}).status_code == 200
    page = viewer.get("/drops", params={"reason": reason})
    assert page.status_code == 200
    assert f'class="chip active" href="/drops?reason={reason}"' in page.text


def test_active_includes_queued_runs(viewer: TestClient, seed: Seeder) -> None:
    ids = queued_runs(seed, "k", limit=1, n=2)
    done = seed.completed_run()
    active = {r["run_id"] for r in viewer.get("/api/runs?status=active").json()["runs"]}
    assert set(ids) <= active
    assert done not in active
