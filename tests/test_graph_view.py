"""`Graph.to_html`'s SVG, drawn by headless Chromium: every node, edge and token of the pruned graph, on the canvas.

Two attribution graphs of a float64 toy model (`test_features.BUILDERS`' first): one of features
(a ReLU dictionary, `test_features.dictionaries(model, "relu")`), one of heads and MLP outputs (no
dictionaries). Each page is served from localhost and rendered by Chromium (tests/browser.py); the
DOM it returns must hold one ``circle.node`` per node of ``graph.prune()`` (of its kind), one
``line.edge`` per nonzero adjacency entry joining the two nodes' circles, one ``text.token`` per
prompt token, all inside the SVG's viewBox; the screenshot must show ink in each drawn kind's colour.
Screenshots go to ``$TL_LINMAP_FIGURES`` when it is set.
"""

from __future__ import annotations

import math
import os
import re
import struct
import zlib
from html.parser import HTMLParser
from pathlib import Path

import pytest
from browser import render, serve
from test_features import BUILDERS, PROMPT, _quiet, dictionaries

import tl_linmap
from tl_linmap.base.table import visible
from tl_linmap.present.graph_view import STYLE
from tl_linmap.results.graph import KINDS

CASES = ("features", "modules")
#: The window: wide and tall enough for the whole SVG of an 8-token prompt and 2 layers.
WINDOW = (1200, 600)


class Svg(HTMLParser):
    """The SVG's elements in document order: tag, attributes, and the text of their ``<title>`` child."""

    def __init__(self, html: str):
        super().__init__(convert_charrefs=True)
        self.elements, self.stack, self.in_title = [], [], False
        self.feed(html)
        self.close()

    def handle_starttag(self, tag, attrs):
        if tag == "title" and self.stack:
            self.in_title = True
            return
        if tag == "svg" or self.stack:
            element = {"tag": tag, "attrs": dict(attrs), "classes": set((dict(attrs).get("class") or "").split()), "title": "", "text": ""}
            self.elements.append(element)
            self.stack.append(element)

    def handle_endtag(self, tag):
        if tag == "title" and self.in_title:
            self.in_title = False
        elif self.stack and self.stack[-1]["tag"] == tag:
            self.stack.pop()

    def handle_data(self, data):
        if self.stack:
            self.stack[-1]["title" if self.in_title else "text"] += data

    def select(self, tag: str, cls: str | None = None) -> list[dict]:
        return [e for e in self.elements if e["tag"] == tag and (cls is None or cls in e["classes"])]


def png_pixels(path: Path) -> tuple[int, int, int, list[bytearray]]:
    """An 8-bit, non-interlaced RGB(A) PNG decoded with the standard library: width, height, bytes per pixel, rows."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, head = 8, [], None
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == b"IHDR":
            head = struct.unpack(">IIBBBBB", data[pos + 8:pos + 8 + n])
        elif kind == b"IDAT":
            idat.append(data[pos + 8:pos + 8 + n])
        pos += 12 + n
    width, height, depth, colour, _, _, interlace = head
    assert depth == 8 and colour in (2, 6) and not interlace, f"a PNG this decoder does not read: {head}"
    bpp, raw = (3 if colour == 2 else 4), zlib.decompress(b"".join(idat))
    stride, rows, prev = width * (3 if colour == 2 else 4), [], bytearray(width * (3 if colour == 2 else 4))
    for y in range(height):
        start = y * (stride + 1)
        f, line = raw[start], bytearray(raw[start + 1:start + 1 + stride])
        if f == 1:  # Sub
            for i in range(bpp, stride):
                line[i] = (line[i] + line[i - bpp]) & 255
        elif f == 2:  # Up
            line = bytearray((a + b) & 255 for a, b in zip(line, prev))
        elif f == 3:  # Average
            for i in range(stride):
                line[i] = (line[i] + ((line[i - bpp] if i >= bpp else 0) + prev[i]) // 2) & 255
        elif f == 4:  # Paeth
            for i in range(stride):
                a, b, c = (line[i - bpp] if i >= bpp else 0), prev[i], (prev[i - bpp] if i >= bpp else 0)
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(line)
        prev = line
    return width, height, bpp, rows


def _hex(colour: str) -> tuple[int, int, int]:
    return tuple(int(colour[i:i + 2], 16) for i in (1, 3, 5))


@pytest.fixture(scope="module")
def drawn(tmp_path_factory) -> dict:
    """Per case: the graph, its pruning, the rendered SVG's elements, the screenshot, the viewBox."""
    model = next(iter(BUILDERS.values()))()
    tokens = model.to_tokens(PROMPT)
    with _quiet():
        graphs = {
            "features": tl_linmap.attribution_graph(model, tokens, dictionaries=dictionaries(model, "relu"), max_logits=3),
            "modules": tl_linmap.attribution_graph(model, tokens, max_logits=3),
        }
    site = tmp_path_factory.mktemp("graph-view")
    figures = os.environ.get("TL_LINMAP_FIGURES")
    shots = Path(figures) if figures else site
    shots.mkdir(parents=True, exist_ok=True)
    out = {}
    with serve(site) as base:
        for case, graph in graphs.items():
            (site / f"{case}.html").write_text(graph.to_html(), encoding="utf-8")
            png = shots / f"graph_view_{case}.png"
            console = []
            dom = render(base + f"{case}.html", png=png, budget_ms=1000, window=WINDOW, console=console)
            svg = Svg(dom)
            view = [float(v) for v in svg.select("svg")[0]["attrs"]["viewbox"].split()]
            out[case] = {"graph": graph, "pruned": graph.prune(), "svg": svg, "png": png, "view": view, "tokens": tokens, "console": console}
    return out


@pytest.fixture(params=CASES)
def case(request, drawn):
    return drawn[request.param]


def _centres(svg: Svg) -> list[tuple[float, float]]:
    return [(float(c["attrs"]["cx"]), float(c["attrs"]["cy"])) for c in svg.select("circle", "node")]


def test_every_node_edge_and_token_is_drawn_on_the_canvas(case):
    graph, pruned, svg = case["graph"], case["pruned"], case["svg"]
    assert not [line for line in case["console"] if "Uncaught" in line or "rror" in line]
    x0, y0, width, height = case["view"]
    assert (x0, y0) == (0, 0) and width > 0 and height > 0
    assert len(svg.select("svg")) == 1

    # One circle per node of the pruned graph, of its kind, in the graph's order; each at its own place.
    circles = svg.select("circle", "node")
    assert len(circles) == len(pruned) < len(graph)
    kinds = [KINDS[int(k)] for k in pruned.nodes[:, 0]]
    assert [next(c for c in e["classes"] if c.startswith("kind-")) for e in circles] == [f"kind-{k}" for k in kinds]
    centres = _centres(svg)
    assert len(set(centres)) == len(centres)
    for (x, y), c in zip(centres, circles):
        r = float(c["attrs"]["r"])
        assert math.isfinite(x) and math.isfinite(y) and r > 0
        assert x0 <= x - r and x + r <= x0 + width and y0 <= y - r and y + r <= y0 + height, (x, y, case["view"])

    # One line per nonzero adjacency entry, between the circles of its two nodes.
    lines = svg.select("line", "edge")
    rows, cols = pruned.adjacency.nonzero(as_tuple=True)
    assert len(lines) == len(rows) > 0
    index = {xy: i for i, xy in enumerate(centres)}
    ends = []
    for line in lines:
        a = tuple(float(line["attrs"][k]) for k in ("x1", "y1", "x2", "y2"))
        assert all(map(math.isfinite, a))
        assert all(x0 <= x <= x0 + width for x in a[::2]) and all(y0 <= y <= y0 + height for y in a[1::2])
        assert (a[0], a[1]) in index and (a[2], a[3]) in index, "an edge that does not end at drawn nodes"
        assert float(line["attrs"]["stroke-width"]) > 0
        ends.append(frozenset((index[a[:2]], index[a[2:]])))
    assert sorted(map(sorted, ends)) == sorted(sorted((int(t), int(s))) for t, s in zip(rows, cols))

    # The prompt's tokens along the bottom, as the page spells them, below every node.
    texts = svg.select("text", "token")
    assert len(texts) == case["tokens"].shape[1] == len(graph.str_tokens)
    assert [t["text"] for t in texts] == [visible(s) for s in graph.str_tokens]
    for t in texts:
        x, y = float(t["attrs"]["x"]), float(t["attrs"]["y"])
        assert x0 < x < x0 + width and max(y for _, y in centres) < y <= y0 + height

    # The screenshot: ink, and each drawn kind's fill colour in it.
    w, h, bpp, pixels = png_pixels(case["png"])
    assert (w, h) == WINDOW
    ink = sum(1 for row in pixels for i in range(0, len(row), bpp) if min(row[i:i + 3]) < 245)
    assert 5_000 < ink < w * h / 4, ink
    for kind in set(kinds):
        rgb = _hex(STYLE[kind][0])
        n = sum(1 for row in pixels for i in range(0, len(row), bpp) if all(abs(row[i + j] - rgb[j]) <= 8 for j in range(3)))
        assert n >= 30 * kinds.count(kind), (kind, n)


def test_edges_run_from_source_to_target_with_their_weights(case):
    pruned, svg = case["pruned"], case["svg"]
    index = {xy: i for i, xy in enumerate(_centres(svg))}
    lines = svg.select("line", "edge")
    biggest = float(pruned.adjacency.abs().max())
    for line in lines:
        a = [float(line["attrs"][k]) for k in ("x1", "y1", "x2", "y2")]
        s, t = index[tuple(a[:2])], index[tuple(a[2:])]
        w = float(pruned.adjacency[t, s])
        assert w != 0, f"edge {pruned.label(s)} -> {pruned.label(t)} is not in the graph"
        assert float(re.search(r": ([-+][^:]*)$", line["title"]).group(1)) == pytest.approx(w, rel=1e-3)
        assert line["attrs"]["stroke"] == ("#2166ac" if w >= 0 else "#b2182b")
        assert float(line["attrs"]["stroke-width"]) == pytest.approx(0.4 + 5 * abs(w) / biggest, abs=0.006)
