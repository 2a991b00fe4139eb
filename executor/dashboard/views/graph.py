"""A layered left-to-right layout of a run's step graph, drawn by the template as SVG.

Layer = longest path from a root; within a layer, steps are ordered by the mean position of
their upstream steps (one barycenter pass), which keeps joins and fan-outs mostly uncrossed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from executor.dashboard.models import ItemCounts, Step

NODE_W = 176
NODE_H = 52
GAP_X = 64
GAP_Y = 18
PAD = 12
MAX_NODES = 400


@dataclass(frozen=True)
class Node:
    step: Step
    x: int
    y: int
    label: str
    sub: str


@dataclass(frozen=True)
class Edge:
    path: str
    status: str  # the upstream step's status: colours completed edges


@dataclass(frozen=True)
class GraphLayout:
    width: int
    height: int
    nodes: list[Node]
    edges: list[Edge]
    node_w: int = NODE_W
    node_h: int = NODE_H


def _label(text: str, limit: int = 22) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _sub(step: Step, items: ItemCounts | None) -> str:
    if step.kind == "map":
        total = items.total if items else (step.items_total or 0)
        done = items.by_status.get("completed", 0) if items else step.items_done
        return f"{step.status} · {done:,}/{total:,} items"
    if step.kind in ("sleep", "wait", "child") and step.status in ("sleeping", "waiting"):
        what = {"sleep": "timer", "wait": f"event {step.event_name}", "child": "child run"}
        return _label(f"{step.status} · {what[step.kind]}", 28)
    return f"{step.status} · attempt {step.attempt}/{step.max_attempts}"


def layout(steps: list[Step], items: Mapping[str, ItemCounts] | None = None) -> GraphLayout | None:
    """None when there is nothing to draw or too much to draw legibly. A map is one node,
    its items counted in it (`items`)."""
    if not steps or len(steps) > MAX_NODES:
        return None
    by_key = {s.step_key: s for s in steps}
    depth: dict[str, int] = {}

    def layer_of(key: str, trail: frozenset[str] = frozenset()) -> int:
        if key in depth:
            return depth[key]
        if key in trail:  # a cycle cannot be recorded, but never loop on bad data
            return 0
        parents = [p for p in by_key[key].depends_on if p in by_key]
        depth[key] = 1 + max((layer_of(p, trail | {key}) for p in parents), default=-1)
        return depth[key]

    layers: dict[int, list[str]] = {}
    for s in sorted(steps, key=lambda s: s.step_key):
        layers.setdefault(layer_of(s.step_key), []).append(s.step_key)

    row: dict[str, float] = {}
    for index in sorted(layers):
        keys = layers[index]
        if index > 0:

            def centre(key: str) -> tuple[float, str]:
                ps = [row[p] for p in by_key[key].depends_on if p in row]
                return (sum(ps) / len(ps) if ps else 0.0, key)

            keys.sort(key=centre)
        for i, key in enumerate(keys):
            row[key] = float(i)

    tallest = max(len(k) for k in layers.values())
    height = PAD * 2 + tallest * NODE_H + (tallest - 1) * GAP_Y
    width = PAD * 2 + len(layers) * NODE_W + (len(layers) - 1) * GAP_X
    pos: dict[str, tuple[int, int]] = {}
    nodes: list[Node] = []
    for index in sorted(layers):
        keys = layers[index]
        column_h = len(keys) * NODE_H + (len(keys) - 1) * GAP_Y
        top = PAD + (height - 2 * PAD - column_h) // 2
        x = PAD + index * (NODE_W + GAP_X)
        for i, key in enumerate(keys):
            y = top + i * (NODE_H + GAP_Y)
            pos[key] = (x, y)
            step = by_key[key]
            sub = _sub(step, (items or {}).get(key))
            nodes.append(Node(step, x, y, _label(key), sub))
    edges: list[Edge] = []
    for s in steps:
        for parent in s.depends_on:
            if parent not in pos:
                continue
            x1, y1 = pos[parent][0] + NODE_W, pos[parent][1] + NODE_H // 2
            x2, y2 = pos[s.step_key][0], pos[s.step_key][1] + NODE_H // 2
            mid = (x1 + x2) // 2
            edges.append(
                Edge(f"M{x1},{y1} C{mid},{y1} {mid},{y2} {x2 - 4},{y2}", by_key[parent].status)
            )
    return GraphLayout(width, height, nodes, edges)
