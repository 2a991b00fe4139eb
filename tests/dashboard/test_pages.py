"""Every page renders real ledger data, filters and pages by keyset, and escapes everything."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import psycopg
from markupsafe import escape
from starlette.testclient import TestClient

from executor.commands.models import StartStep, StepSpec

from .conftest import XSS, Seeder

LIVE = {"X-Live-Fragment": "1"}


def test_every_page_and_its_live_fragment_renders(viewer: TestClient, seed: Seeder) -> None:
    failed = seed.failed_run()
    seed.completed_run()
    pages = {
        "/runs": "runs-table",
        f"/runs/{failed}": "Event timeline",
        "/failed": "failed-table",
        "/drops": "drops-table",
        "/queues": "Workers",
    }
    for path, marker in pages.items():
        page = viewer.get(path)
        assert page.status_code == 200, path
        assert marker in page.text, path
        assert page.headers["cache-control"] == "no-store"
        fragment = viewer.get(path, headers=LIVE)
        assert fragment.status_code == 200, path
        assert "<html" not in fragment.text, path
        assert marker in fragment.text or path == "/queues", path


def test_a_step_error_with_script_tags_is_shown_as_text(viewer: TestClient, seed: Seeder) -> None:
    run_id = seed.failed_run()
    escaped = str(escape(XSS))
    for path in (f"/runs/{run_id}", "/failed", "/runs", f"/runs/{run_id}?x=1"):
        page = viewer.get(path).text
        assert XSS not in page, path
        assert "<script>alert" not in page, path
    detail = viewer.get(f"/runs/{run_id}").text
    assert escaped in detail
    assert "Traceback (most recent call last)" in detail
    failed = viewer.get("/failed").text
    assert escaped in failed
    # The API returns it verbatim as JSON data.
    steps = viewer.get(f"/api/runs/{run_id}").json()["steps"]
    assert steps[0]["error"]["message"] == XSS


def test_run_detail_shows_graph_steps_events_in_seq_order_and_drops(
    viewer: TestClient, seed: Seeder
) -> None:
    run_id = seed.failed_run()
    # A late start for the failed attempt is dropped as terminal and recorded.
    late = seed.ledger.apply(
        StartStep(run_id=run_id, step_key="fetch", attempt=1, idempotency_key="late-start")
    )
    assert late.reason == "terminal"
    page = viewer.get(f"/runs/{run_id}").text
    assert '<svg class="graph"' in page
    for key in ("fetch", "charge", "ship"):
        assert f'id="step-{key}"' in page
    assert page.index('id="step-fetch"') < page.index('id="step-charge"')
    assert "terminal" in page
    body = viewer.get(f"/api/runs/{run_id}").json()
    seqs = [e["seq"] for e in body["events"]]
    assert seqs == list(range(1, len(seqs) + 1))
    types = [e["type"] for e in body["events"]]
    assert types[:2] == ["run_created", "run_started"]
    assert types[-1] == "run_failed"
    assert [d["reason"] for d in body["drops"]] == ["terminal"]
    tail = viewer.get(f"/api/runs/{run_id}?events_after=5").json()["events"]
    assert [e["seq"] for e in tail] == seqs[5:]


def test_an_unknown_run_is_a_404(viewer: TestClient) -> None:
    assert viewer.get("/runs/nope").status_code == 404
    assert viewer.get("/api/runs/nope").status_code == 404


def test_runs_filter_by_status_workflow_key_time_and_search(
    viewer: TestClient, seed: Seeder
) -> None:
    failed = seed.failed_run("orders")
    done = seed.completed_run("billing")
    keyed = seed.run("billing", concurrency_key="customer-7")

    def ids(query: str) -> set[str]:
        response = viewer.get(f"/api/runs?{query}")
        assert response.status_code == 200, response.text
        return {r["run_id"] for r in response.json()["runs"]}

    assert ids("") == {failed, done, keyed}
    assert ids("status=failed") == {failed}
    assert ids("status=active") == {keyed}
    assert ids("workflow=billing") == {done, keyed}
    assert ids("workflow=billing&status=completed") == {done}
    assert ids("concurrency_key=customer-7") == {keyed}
    assert ids("from=1h") == {failed, done, keyed}
    assert ids("to=1h") == set()
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    assert ids(f"from={future.replace('+', '%2B')}") == set()
    assert ids(f"q={failed[:-2]}") == {failed}
    assert ids("q=run-") == {failed, done, keyed}
    assert ids("q=run%25") == set()
    # The page's search box jumps straight to an exact run id.
    found = viewer.get(f"/runs?q={done}")
    assert found.status_code == 303
    assert found.headers["location"] == f"/runs/{done}"
    assert viewer.get("/api/runs?status=bogus").status_code == 422
    assert viewer.get("/api/runs?from=yesterday-ish").status_code == 422
    page = viewer.get("/runs?from=yesterday-ish")
    assert page.status_code == 400
    assert "neither an ISO time" in page.text


def test_keyset_pagination_walks_every_run_once_both_ways(
    viewer: TestClient, seed: Seeder, db_url: str
) -> None:
    made = [seed.run(steps=(StepSpec(step_key="only"),)) for _ in range(7)]
    # Two runs share a created_at: the run_id tiebreak must keep them apart.
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(
            "UPDATE executor.runs SET created_at = (SELECT created_at FROM executor.runs"
            " WHERE run_id = %s) WHERE run_id = %s",
            (made[2], made[3]),
        )
    seen: list[str] = []
    pages = []
    cursor = ""
    while True:
        body = viewer.get(f"/api/runs?limit=3{cursor}").json()
        pages.append(body)
        seen += [r["run_id"] for r in body["runs"]]
        if not body["next"]:
            break
        cursor = f"&after={body['next']}"
    assert [len(p["runs"]) for p in pages] == [3, 3, 1]
    assert sorted(seen) == sorted(made)
    assert len(seen) == len(set(seen))
    assert pages[0]["prev"] is None
    assert pages[0]["estimated_total"] == 7
    assert pages[0]["total_is_exact"] is True
    # Going back from the last page gives the middle page again.
    back = viewer.get(f"/api/runs?limit=3&before={pages[2]['prev']}").json()
    assert [r["run_id"] for r in back["runs"]] == [r["run_id"] for r in pages[1]["runs"]]
    assert back["next"]
    assert back["prev"]
    assert viewer.get("/api/runs?after=garbage").status_code == 422
    html_page = viewer.get("/runs?limit=3").text
    assert "Older →" in html_page
    assert "after=" in html_page


def test_failed_steps_page_filters(viewer: TestClient, seed: Seeder) -> None:
    a = seed.failed_run("orders")
    b = seed.failed_run("billing")
    seed.completed_run("orders")

    def runs(query: str) -> list[str]:
        return [s["run_id"] for s in viewer.get(f"/api/failed-steps?{query}").json()["steps"]]

    assert runs("") == [b, a]
    assert runs("workflow=orders") == [a]
    assert runs(f"run_id={b}") == [b]
    assert runs("step_key=charge") == []
    assert runs("error=pwned") == [b, a]
    assert runs("error=nothing-like-this") == []
    first = viewer.get("/api/failed-steps?limit=1").json()
    assert [s["run_id"] for s in first["steps"]] == [b]
    second = viewer.get(f"/api/failed-steps?limit=1&after={first['next']}").json()
    assert [s["run_id"] for s in second["steps"]] == [a]


def test_drops_page_filters_by_reason_and_run(viewer: TestClient, seed: Seeder) -> None:
    run_id = seed.failed_run()
    late = StartStep(run_id=run_id, step_key="fetch", attempt=1, idempotency_key="late")
    seed.ledger.apply(late)
    seed.ledger.apply(late)
    seed.ledger.record_invalid("\x80pickle", "not JSON")
    body = viewer.get("/api/drops").json()
    assert [d["reason"] for d in body["drops"]] == ["invalid_payload", "duplicate", "terminal"]
    assert [d["reason"] for d in viewer.get("/api/drops?reason=terminal").json()["drops"]] == [
        "terminal"
    ]
    assert len(viewer.get(f"/api/drops?run_id={run_id}").json()["drops"]) == 2
    page = viewer.get("/drops?reason=invalid_payload")
    assert "Raw payload" in page.text
    assert viewer.get("/api/drops?reason=nope").status_code == 422


def test_queues_page_shows_rq_queues_and_ledger_backlog(operator: TestClient, seed: Seeder) -> None:
    run_id = seed.failed_run()
    retried = operator.post(f"/api/runs/{run_id}/steps/fetch/retry", json={})
    assert retried.json()["applied"] is True
    body = operator.get("/api/queues").json()
    assert body["transport"]["ok"] is True
    depth = {q["name"]: q["queued"] for q in body["transport"]["queues"]}
    assert depth.get("default", 0) >= 1
    assert body["ledger"]["steps_queued"] == 1
    assert "dashboard" in body["pools"]
    page = operator.get("/queues").text
    assert "default" in page
    assert "No workers are registered" in page


def test_pages_survive_redis_being_down(
    settings: object, executor_client: object, seed: Seeder
) -> None:
    from executor.dashboard.app import create_app

    class NoRedis:
        def __init__(self, inner: object) -> None:
            import redis

            self.inner = inner
            self.redis = redis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)

        def apply(self, command: object) -> object:
            return self.inner.apply(command)  # type: ignore[attr-defined]

    app = create_app(settings, backend=NoRedis(executor_client))  # type: ignore[arg-type]
    with TestClient(app, base_url="http://127.0.0.1") as client:
        client.headers["Authorization"] = f"Bearer {settings.viewer_tokens[0]}"  # type: ignore[attr-defined]
        page = client.get("/queues")
        assert page.status_code == 200
        assert "Redis is unavailable" in page.text
        metrics = client.get("/metrics").text
        assert "executor_redis_up 0" in metrics
        assert "executor_database_up 1" in metrics
