"""A pipeline's step graph as SVG: layers top to bottom; each box lists the artifacts its step reads.

Edges between neighbouring rows are curves. An output read further down travels on a bus: one
vertical lane on the left per producing step, with a branch into each consumer, so nothing crosses a
box and a producer feeding eight steps (the data step) draws one lane, not eight.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from html import escape

from skillbook.run.pipeline import refs_in  # the same reference syntax the pipeline runner resolves

NODE_W, NODE_H = 212, 62  # px; room for "data-preparation" and a line of inputs
GAP_X, GAP_Y = 28, 48
LANE = 14  # horizontal spacing of the bus lanes on the left
RUN = 12  # vertical spacing of horizontal runs inside one gap between rows
PAD = 12
INPUT_CHARS = 32  # the inputs line is cut here (the full list is in the box's tooltip)


@dataclass
class Edge:
    src: str
    dst: str
    outputs: list[str]


def edges(steps: list[dict]) -> list[Edge]:
    """One edge per (producer, consumer) pair, listing the outputs it carries, in step order."""
    found: dict[tuple[str, str], Edge] = {}
    for step in steps:
        for src, out in refs_in(step.get("config", {})):
            edge = found.setdefault((src, step["id"]), Edge(src, step["id"], []))
            if out not in edge.outputs:
                edge.outputs.append(out)
    return list(found.values())


def layers(steps: list[dict], graph: list[Edge]) -> dict[str, int]:
    """Longest-path layering: a step sits one row below the deepest step it reads from."""
    order = [s["id"] for s in steps]
    layer = {sid: 0 for sid in order}
    for sid in order:  # steps only refer to earlier steps, so one pass in file order suffices
        for e in graph:
            if e.dst == sid and e.src in layer:
                layer[sid] = max(layer[sid], layer[e.src] + 1)
    return layer


def _inputs_line(sid: str, graph: list[Edge]) -> str:
    outs = [o for e in graph if e.dst == sid for o in e.outputs]
    text = "← " + ", ".join(dict.fromkeys(outs)) if outs else ""
    return text if len(text) <= INPUT_CHARS else text[: INPUT_CHARS - 1] + "…"


@dataclass
class Layout:
    """Where everything goes: box corners, bus lanes, the heights of horizontal runs, edge ends."""

    graph: list[Edge]
    skips: list[Edge]  # edges that jump over a row: they travel on their producer's bus
    buses: list[str]  # producers with a bus, in lane order (one lane each)
    pos: dict[str, tuple[float, float]]  # step id -> top-left corner of its box
    run_y: dict[tuple[str, str], float]  # ("out", src) / ("in", "src>dst") -> y of that horizontal run
    x_out: dict[str, float]  # "src>dst" for curves, "bus:src" for a bus -> x where it leaves its box
    x_in: dict[str, float]  # "src>dst" -> x where it enters its box
    width: float
    height: float


def layout(steps: list[dict]) -> Layout:
    """Rows from `layers`, a lane per bus on the left, gaps tall enough for the runs they hold."""
    graph = [e for e in edges(steps) if e.src in {s["id"] for s in steps}]
    layer = layers(steps, graph)
    rows: dict[int, list[str]] = {}
    for s in steps:
        rows.setdefault(layer[s["id"]], []).append(s["id"])
    skips = [e for e in graph if layer[e.dst] - layer[e.src] > 1]
    buses = list(dict.fromkeys(e.src for e in skips))  # one lane per producer
    # Horizontal runs inside each gap: a bus leaving its producer's row, a branch entering a consumer's row.
    runs: dict[int, list[tuple[str, str]]] = {}
    for src in buses:
        runs.setdefault(layer[src], []).append(("out", src))
    for e in skips:
        runs.setdefault(layer[e.dst] - 1, []).append(("in", f"{e.src}>{e.dst}"))
    gap = {r: max(GAP_Y, RUN * (len(runs.get(r, [])) + 1)) for r in rows}
    top = {0: PAD}
    for r in range(1, len(rows)):
        top[r] = top[r - 1] + NODE_H + gap[r - 1]
    run_y = {
        key: top[r] + NODE_H + gap[r] * (i + 1) / (len(items) + 1)
        for r, items in runs.items()
        for i, key in enumerate(items)
    }
    left = PAD + LANE * len(buses) + (PAD if buses else 0)
    widest = max(len(r) for r in rows.values())
    width = left + widest * NODE_W + (widest - 1) * GAP_X + PAD
    height = top[len(rows) - 1] + NODE_H + PAD
    pos: dict[str, tuple[float, float]] = {}
    for row, ids in rows.items():
        span = len(ids) * NODE_W + (len(ids) - 1) * GAP_X
        x0 = left + ((width - left - PAD) - span) / 2
        for i, sid in enumerate(ids):
            pos[sid] = (x0 + i * (NODE_W + GAP_X), top[row])
    x_out, x_in = _edge_ends(graph, skips, buses, pos)
    return Layout(graph, skips, buses, pos, run_y, x_out, x_in, width, height)


def _edge_ends(
    graph: list[Edge], skips: list[Edge], buses: list[str], pos: dict[str, tuple[float, float]]
) -> tuple[dict[str, float], dict[str, float]]:
    """Where edges leave and enter a box: spread over its width so arrows do not overlap."""
    x_out: dict[str, float] = {}
    x_in: dict[str, float] = {}
    for sid in pos:
        outs = [f"{e.src}>{e.dst}" for e in graph if e.src == sid and e not in skips] + (
            [f"bus:{sid}"] if sid in buses else []
        )
        ins = [f"{e.src}>{e.dst}" for e in graph if e.dst == sid]
        for keys, table in ((outs, x_out), (ins, x_in)):
            for i, key in enumerate(keys):
                table[key] = pos[sid][0] + NODE_W * (i + 1) / (len(keys) + 1)
    return x_out, x_in


def _bus_paths(lay: Layout) -> list[str]:
    """Each bus: down out of its producer, left to its lane, down to the last branch."""
    parts = []
    for i, src in enumerate(lay.buses):
        lane, x1, y1 = PAD + LANE * i, lay.x_out[f"bus:{src}"], lay.pos[src][1] + NODE_H
        bottom = max(lay.run_y[("in", f"{e.src}>{e.dst}")] for e in lay.skips if e.src == src)
        parts.append(
            f'<path class="dag-bus" d="M{x1:.0f},{y1:.0f} V{lay.run_y[("out", src)]:.0f} H{lane:.0f} V{bottom:.0f}"/>'
        )
    return parts


def _edge_paths(lay: Layout) -> list[str]:
    """A curve between neighbouring rows; a branch off its bus for an edge that skips rows."""
    parts = []
    for e in lay.graph:
        key = f"{e.src}>{e.dst}"
        x2, y2 = lay.x_in[key], lay.pos[e.dst][1]
        if e in lay.skips:
            lane, y = PAD + LANE * lay.buses.index(e.src), lay.run_y[("in", key)]
            d = f"M{lane:.0f},{y:.0f} H{x2:.0f} V{y2 - 1:.0f}"
        else:
            x1, y1 = lay.x_out[key], lay.pos[e.src][1] + NODE_H
            mid = (y1 + y2) / 2
            d = f"M{x1:.0f},{y1:.0f} C{x1:.0f},{mid:.0f} {x2:.0f},{mid:.0f} {x2:.0f},{y2 - 1:.0f}"
        parts.append(
            f'<g class="dag-edge"><title>{escape(e.src)} → {escape(e.dst)}: {escape(", ".join(e.outputs))}</title>'
            f'<path d="{d}" marker-end="url(#arrow)"/></g>'
        )
    return parts


def _node(s: dict, lay: Layout, link: str | None) -> str:
    """One step's box: id, skill (and preset), the inputs line, a tooltip with every input."""
    x, y = lay.pos[s["id"]]
    cx = x + NODE_W / 2
    sub = s["skill"] + (f" · {s['preset']}" if s.get("preset") else "")
    reads = ", ".join(f"{o} ← {e.src}" for e in lay.graph if e.dst == s["id"] for o in e.outputs)
    node = (
        f"<title>{escape(s['id'])}: runs {escape(sub)}{'; reads ' + escape(reads) if reads else ''}</title>"
        f'<rect x="{x:.0f}" y="{y:.0f}" width="{NODE_W}" height="{NODE_H}" rx="8"/>'
        f'<text class="dag-id" x="{cx:.0f}" y="{y + 20:.0f}">{escape(s["id"])}</text>'
        f'<text class="dag-skill" x="{cx:.0f}" y="{y + 36:.0f}">{escape(sub)}</text>'
        f'<text class="dag-in" x="{cx:.0f}" y="{y + 53:.0f}">{escape(_inputs_line(s["id"], lay.graph))}</text>'
    )
    node = f'<a href="{escape(link)}">{node}</a>' if link else node
    return f'<g class="dag-node" id="node-{escape(s["id"])}">{node}</g>'


def svg(steps: list[dict], href: Callable[[dict], str | None] = lambda step: None, title: str = "pipeline") -> str:
    """The graph as an inline SVG element; `href(step)` gives each node's link (or None)."""
    lay = layout(steps)
    parts = [
        f'<svg class="dag" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {lay.width:.0f} {lay.height:.0f}" '
        f'width="{lay.width:.0f}" height="{lay.height:.0f}" role="img" aria-label="{escape(title)}">',
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
        'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" class="dag-arrow"/></marker></defs>',
        *_bus_paths(lay),
        *_edge_paths(lay),
        *(_node(s, lay, href(s)) for s in steps),
        "</svg>",
    ]
    return "\n".join(parts)
