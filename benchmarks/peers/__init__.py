"""The peers of `executor bench --peers`: one definition each, and how it is expressed.

The workload is the same everywhere: runs of a 4-step fan-out/join of no-op steps,
first -> (left, right) -> last, started by one producer as fast as it can, run by exactly 2
worker processes, on a fresh database or Redis db per round. Each peer uses its own idiom
for the fan-out and the join, and its own timestamps for a run's start and end where it
records them. docs/benchmarks.md says what each peer guarantees.

This module imports nothing outside the standard library: the RQ peer's workers run in a
virtualenv of their own and import `benchmarks.peers.rq_driver` through this package.
"""

from __future__ import annotations

from dataclasses import dataclass

STEPS = ("first", "left", "right", "last")
DEPENDS_ON = {"first": (), "left": ("first",), "right": ("first",), "last": ("left", "right")}


@dataclass(frozen=True)
class Peer:
    name: str  # as --systems spells it
    label: str
    distribution: str  # the package whose version the report prints
    requirement: str  # what the `bench` extra (or the RQ peer's virtualenv) installs
    store: str  # "postgres" or "redis": where its state lives
    durable_completion: bool  # is each step's completion committed to Postgres?
    expression: str  # how the workflow is written in this peer
    guarantees: str  # what it promises, in a line
    driver: str  # module with `run_round(spec: RoundSpec) -> Round`
    worker_module: str  # what its worker processes import

    @property
    def short(self) -> str:
        return self.label.split(" ")[0]


PEERS: dict[str, Peer] = {
    p.name: p
    for p in (
        Peer(
            name="dbos",
            label="DBOS Transact",
            distribution="dbos",
            requirement="dbos>=3.4",
            store="postgres",
            durable_completion=True,
            expression="one @DBOS.workflow calling four @DBOS.step functions in order (left "
            "and right sequentially: a sync workflow has no parallel step idiom short of child "
            "workflows, which would cost more rows); enqueued with DBOSClient on a DBOS queue "
            "(worker_concurrency 8, 50 ms polling); 2 processes, each DBOS.launch()ed with its "
            "own executor id",
            guarantees="workflow status and every step's output are rows in its system "
            "database; an interrupted workflow resumes from its last completed step",
            driver="benchmarks.peers.dbos_peer",
            worker_module="benchmarks.peers.dbos_app",
        ),
        Peer(
            name="procrastinate",
            label="Procrastinate",
            distribution="procrastinate",
            requirement="procrastinate>=3.10",
            store="postgres",
            durable_completion=True,
            expression="four tasks; `first` inserts a join row and defers `left` and `right`; "
            "each decrements the join row (one row-locking UPDATE ... RETURNING) and the one "
            "that reaches zero defers `last`; 2 `run_worker` processes, concurrency 1, "
            "LISTEN/NOTIFY on",
            guarantees="each job's status is a row (todo/doing/succeeded); a deferral is "
            "committed before defer returns; the join's decrement and the deferral of `last` "
            "are two transactions (a crash between them strands that run)",
            driver="benchmarks.peers.procrastinate_peer",
            worker_module="benchmarks.peers.procrastinate_app",
        ),
        Peer(
            name="rq",
            label="RQ 2.12",
            distribution="rq",
            requirement="rq==2.12.0",
            store="redis",
            durable_completion=False,
            expression="four jobs enqueued up front, `left`/`right` with depends_on=first and "
            "`last` with depends_on=[left, right]; 2 SimpleWorkers, JSON serializer; RQ 2.12 "
            "in its own virtualenv, because RQ 3.0 strands depends_on joins when two workers "
            "finish the dependencies at once",
            guarantees="job state lives in Redis only; a flushed or failed Redis loses runs",
            driver="benchmarks.peers.rq_peer",
            worker_module="benchmarks.peers.rq_driver",
        ),
        Peer(
            name="celery",
            label="Celery",
            distribution="celery",
            requirement="celery[redis]>=5.7",
            store="redis",
            durable_completion=False,
            expression="chain(first, chord([left, right], last)) of immutable signatures, Redis "
            "broker and result backend (the chord counts its header in Redis); 2 solo workers "
            "(-P solo -c 1) without gossip, mingle or heartbeat",
            guarantees="messages and results live in Redis only; a chord's join state is a "
            "Redis counter",
            driver="benchmarks.peers.celery_peer",
            worker_module="benchmarks.peers.celery_app",
        ),
    )
}

SYSTEMS = ("ours", *PEERS)
