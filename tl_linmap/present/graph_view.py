"""An attribution graph as one self-contained SVG: tokens along the bottom, targets on top, layers between.

Nodes sit above their position, at their layer (heads low in a block, features and errors in the
middle, MLP outputs high); edges are lines whose width is the direct effect's size and whose colour its
sign (blue adds, red takes away). Hovering a node or an edge shows its name and value. No script and no
network: the page renders the same in a notebook, a browser and a saved file.
"""

from __future__ import annotations

import html
from collections.abc import Sequence

from tl_linmap.base.table import visible

#: Each kind's colour and height within its layer's band (0: the block's input, 1: its output).
STYLE = {
    "token": ("#555555", 0.0),
    "head": ("#e69f00", 0.25),
    "feature": ("#009e73", 0.5),
    "error": ("#999999", 0.5),
    "mlp": ("#cc79a7", 0.75),
    "target": ("#0072b2", 0.0),
}
_COLUMN, _MARGIN = 120, 60


def _row(n_layers: int) -> float:
    # A layer's height: the whole graph about 900 px tall, a layer between 22 and 64 px.
    return min(64.0, max(22.0, 900 / (n_layers + 2)))


def _levels(nodes: Sequence[dict], n_layers: int) -> list[float]:
    # Height of each node in layers: tokens below the first block, targets above the last.
    out = []
    for node in nodes:
        kind = node["kind"]
        out.append(-0.5 if kind == "token" else n_layers + 0.5 if kind == "target" else node["layer"] + STYLE[kind][1])
    return out


def _places(nodes: Sequence[dict], n_layers: int) -> list[tuple[float, float, float]]:
    # Nodes sharing a position and height spread side by side within the position's column.
    levels = _levels(nodes, n_layers)
    top = max(levels, default=0.0)
    cells: dict[tuple[int, float], list[int]] = {}
    for i, (node, level) in enumerate(zip(nodes, levels)):
        cells.setdefault((node["position"], level), []).append(i)
    places = [(0.0, 0.0, 0.0)] * len(nodes)
    for (pos, level), members in cells.items():
        gap = min(18.0, (_COLUMN - 20) / max(len(members), 1))
        for j, i in enumerate(members):  # a crowded cell draws smaller nodes rather than overlapping ones
            x = _MARGIN + pos * _COLUMN + _COLUMN / 2 + (j - (len(members) - 1) / 2) * gap
            places[i] = (x, _MARGIN + (top - level) * _row(n_layers), max(0.75, min(6.0, gap / 2 - 0.5)))
    return places


def graph_html(nodes: Sequence[dict], edges: Sequence[tuple[int, int, float]], tokens: Sequence[str], title: str, *, n_layers: int) -> str:
    """The page: `graph_fragment` in an HTML document of its own.

    Args:
        nodes: As for `graph_fragment`.
        edges: As for `graph_fragment`.
        tokens: As for `graph_fragment`.
        title: As for `graph_fragment`.
        n_layers: As for `graph_fragment`.

    Returns:
        An HTML document with one inline SVG.
    """
    body = graph_fragment(nodes, edges, tokens, title, n_layers=n_layers)
    return f'<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title></head><body style="font-family:sans-serif">{body}</body></html>'


def graph_fragment(nodes: Sequence[dict], edges: Sequence[tuple[int, int, float]], tokens: Sequence[str], title: str, *, n_layers: int) -> str:
    """The graph as an HTML fragment (a notebook's cell output): a heading, a legend and one inline SVG.

    Args:
        nodes: Per node: ``kind``, ``layer``, ``position``, ``label``, ``value``.
        edges: ``(source, target, weight)``.
        tokens: The prompt's tokens up to the target position (the columns).
        title: The heading.
        n_layers: The model's blocks (the targets' height).

    Returns:
        A ``<div>``.
    """
    places = _places(nodes, n_layers)
    width = _MARGIN * 2 + _COLUMN * max(len(tokens), 1)
    row = _row(n_layers)
    height = _MARGIN * 2 + row * (n_layers + 1) + 40
    biggest = max((abs(w) for _, _, w in edges), default=1.0) or 1.0
    parts = []
    for s, t, w in sorted(edges, key=lambda e: abs(e[2])):  # strongest drawn last, on top
        (x1, y1, _), (x2, y2, _) = places[s], places[t]
        colour = "#2166ac" if w >= 0 else "#b2182b"
        tip = html.escape(f"{nodes[s]['label']} → {nodes[t]['label']}: {w:+.4g}")
        parts.append(
            f'<line class="edge" x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" stroke="{colour}" '
            f'stroke-width="{0.4 + 5 * abs(w) / biggest:.2f}" stroke-opacity="0.55"><title>{tip}</title></line>'
        )
    n_target = 0
    for node, (x, y, r) in zip(nodes, places):
        colour = STYLE[node["kind"]][0]
        tip = html.escape(f"{node['label']}: {node['value']:+.4g}")
        parts.append(f'<circle class="node kind-{node["kind"]}" cx="{x:.1f}" cy="{y:.1f}" r="{r:.1f}" fill="{colour}" stroke="white"><title>{tip}</title></circle>')
        if node["kind"] == "target":  # staggered: several targets share the last position
            parts.append(f'<text class="target" x="{x:.1f}" y="{y - 10 - 13 * (n_target % 3):.1f}" text-anchor="middle" font-size="11">{html.escape(node["label"])}</text>')
            n_target += 1
    base = _MARGIN + row * (max(_levels(nodes, n_layers), default=0.0) + 0.5) + 22
    for pos, token in enumerate(tokens):
        x = _MARGIN + pos * _COLUMN + _COLUMN / 2
        parts.append(f'<text class="token" x="{x:.1f}" y="{base:.1f}" text-anchor="middle" font-family="monospace" font-size="12">{html.escape(visible(token))}</text>')
    top = max(_levels(nodes, n_layers), default=0.0)
    for layer in range(n_layers):  # each block's band: from its input (below) to its output (above)
        y = _MARGIN + (top - layer - 0.5) * row
        parts.append(f'<text x="8" y="{y:.1f}" font-size="10" fill="#888">L{layer}</text>')
    legend = " ".join(f'<span style="color:{c}">&#9679; {k}</span>' for k, (c, _) in STYLE.items())
    svg = f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height:.0f}" viewBox="0 0 {width} {height:.0f}">{"".join(parts)}</svg>'
    return (
        f'<div class="tl-linmap-graph" style="font-family:sans-serif"><h3 style="margin:.3em 0">{html.escape(title)}</h3>'
        f'<div style="font-size:.85em">{legend} &nbsp; <span style="color:#2166ac">— adds</span> <span style="color:#b2182b">— takes away</span></div>'
        f"{svg}</div>"
    )
