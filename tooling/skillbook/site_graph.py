"""A pipeline's step graph as SVG: layers top to bottom, each edge labelled with the artifact it carries."""

from __future__ import annotations

from dataclasses import dataclass
from html import escape

from .pipeline import REF_RE

NODE_W, NODE_H = 184, 52  # px; wide enough for "data-preparation" in the node font
GAP_X, GAP_Y = 28, 56
LANE = 12  # horizontal spacing of the lanes that carry edges skipping a layer
PAD = 12


@dataclass
class Edge:
    src: str
    dst: str
    outputs: list[str]


def refs_in(value) -> list[tuple[str, str]]:
    """Every `${steps.<id>.<output>}` reference inside a config value (nested lists and dicts too)."""
    if isinstance(value, str):
        return REF_RE.findall(value)
    if isinstance(value, dict):
        return [r for v in value.values() for r in refs_in(v)]
    if isinstance(value, list):
        return [r for v in value for r in refs_in(v)]
    return []


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


def svg(steps: list[dict], href=lambda step: None, title: str = "pipeline") -> str:
    """The graph as an inline SVG element; `href(step)` gives each node's link (or None)."""
    graph = [e for e in edges(steps) if e.src in {s["id"] for s in steps}]
    layer = layers(steps, graph)
    rows: dict[int, list[str]] = {}
    for s in steps:
        rows.setdefault(layer[s["id"]], []).append(s["id"])
    skips = [e for e in graph if layer[e.dst] - layer[e.src] > 1]
    # Each skip edge runs along the gap below its source row and the gap above its target row; every such
    # horizontal run gets its own height in the gap, and a crowded gap grows, so runs and labels never overlap.
    runs: dict[int, list[tuple[Edge, str]]] = {}  # gap below row r -> [(edge, "out" | "in")]
    for e in skips:
        runs.setdefault(layer[e.src], []).append((e, "out"))
        runs.setdefault(layer[e.dst] - 1, []).append((e, "in"))
    gap = {r: max(GAP_Y, 15 * (len(runs.get(r, [])) + 1)) for r in rows}
    top = {0: PAD}
    for r in range(1, len(rows)):
        top[r] = top[r - 1] + NODE_H + gap[r - 1]
    run_y = {(id(e), kind): top[r] + NODE_H + gap[r] * (i + 1) / (len(items) + 1)
             for r, items in runs.items() for i, (e, kind) in enumerate(items)}
    left = PAD + LANE * len(skips) + (PAD if skips else 0)
    widest = max(len(r) for r in rows.values())
    width = left + widest * NODE_W + (widest - 1) * GAP_X + PAD
    height = top[len(rows) - 1] + NODE_H + PAD
    pos: dict[str, tuple[float, float]] = {}
    for row, ids in rows.items():
        span = len(ids) * NODE_W + (len(ids) - 1) * GAP_X
        x0 = left + ((width - left - PAD) - span) / 2
        for i, sid in enumerate(ids):
            pos[sid] = (x0 + i * (NODE_W + GAP_X), top[row])

    # Spread the ends of several edges on one node so their arrows do not overlap.
    def spread(ids: list[str], key: str) -> dict[tuple[str, str], float]:
        out = {}
        for sid in ids:
            mine = [e for e in graph if getattr(e, key) == sid]
            for i, e in enumerate(mine):
                out[(e.src, e.dst)] = pos[sid][0] + NODE_W * (i + 1) / (len(mine) + 1)
        return out

    ids = [s["id"] for s in steps]
    x_out, x_in = spread(ids, "src"), spread(ids, "dst")
    parts = [f'<svg class="dag" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width:.0f} {height:.0f}" '
             f'width="{width:.0f}" height="{height:.0f}" role="img" aria-label="{escape(title)}">',
             '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
             'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" class="dag-arrow"/></marker></defs>']
    for e in graph:
        (sx, sy), (dx, dy) = pos[e.src], pos[e.dst]
        x1, y1 = x_out[(e.src, e.dst)], sy + NODE_H
        x2, y2 = x_in[(e.src, e.dst)], dy
        label = ", ".join(e.outputs)
        if e in skips:  # down a lane on the left, so the edge never crosses a node
            lane = PAD + LANE * skips.index(e)
            below, above = run_y[(id(e), "out")], run_y[(id(e), "in")]
            d = f"M{x1:.0f},{y1:.0f} V{below:.0f} H{lane:.0f} V{above:.0f} H{x2:.0f} V{y2 - 1:.0f}"
            lx, ly, anchor = x2 - 4, above - 3, "end"
        else:
            mid = (y1 + y2) / 2
            d = f"M{x1:.0f},{y1:.0f} C{x1:.0f},{mid:.0f} {x2:.0f},{mid:.0f} {x2:.0f},{y2 - 1:.0f}"
            lx, ly, anchor = (x1 + x2) / 2 + 6, mid + 4, "start"
        parts.append(f'<g class="dag-edge"><title>{escape(e.src)} → {escape(e.dst)}: {escape(label)}</title>'
                     f'<path d="{d}" marker-end="url(#arrow)"/>'
                     f'<text x="{lx:.0f}" y="{ly:.0f}" text-anchor="{anchor}">{escape(label)}</text></g>')
    for s in steps:
        x, y = pos[s["id"]]
        sub = s["skill"] + (f" · {s['preset']}" if s.get("preset") else "")
        node = (f'<rect x="{x:.0f}" y="{y:.0f}" width="{NODE_W}" height="{NODE_H}" rx="8"/>'
                f'<text class="dag-id" x="{x + NODE_W / 2:.0f}" y="{y + 22:.0f}">{escape(s["id"])}</text>'
                f'<text class="dag-skill" x="{x + NODE_W / 2:.0f}" y="{y + 40:.0f}">{escape(sub)}</text>')
        link = href(s)
        node = f'<a href="{escape(link)}">{node}</a>' if link else node
        parts.append(f'<g class="dag-node" id="node-{escape(s["id"])}">{node}</g>')
    parts.append("</svg>")
    return "\n".join(parts)
