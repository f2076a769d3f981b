# Runs in the TransformerLens 2.18 environment only (circuit-tracer), with headless Chromium and npm:
#     .venv-tl2/bin/python -m pytest tests/test_ct_frontend.py -q
"""circuit-tracer's own graph browser draws a graph circuit-tracer attributed, offline, in headless Chromium.

The graph: ``circuit_tracer.attribute`` on the tiny random float64 GPT-2-like ReplacementModel of
test_replacement.py (ReLU transcoders), written by ``circuit_tracer.utils.create_graph_files``. The
page: circuit-tracer's ``frontend/assets/index.html`` with its CDN scripts replaced by npm copies
(tests/ct_frontend.py), served from localhost, opened with every node pinned (``pinnedIds``), so
that the link graph draws each node's glyph and every edge between drawn nodes (on a canvas), and
the subgraph panel draws every drawn node as a box and every edge as an SVG path. The DOM Chromium
returns must hold as many of each as the graph JSON has, at the positions of real layouts.
"""

import json
import math
import os
import re
import warnings
from html.parser import HTMLParser
from pathlib import Path

import pytest

pytest.importorskip("circuit_tracer")

import torch
from circuit_tracer import attribute
from circuit_tracer.utils import create_graph_files
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from browser import render
from ct_frontend import serve_circuit_tracer
from test_replacement import TOKENS, build, gpt2_cfg, transcoder_set

SLUG = "tiny-gpt2-relu"
NUMBER = r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?"


def word_tokenizer(folder: Path, vocab_size: int) -> Path:
    """A tokenizer folder ``AutoTokenizer.from_pretrained`` loads offline, spelling id i as ``<i>``
    (as test_replacement's StubTokenizer does): ``create_graph_files`` loads the graph's tokenizer by
    name (``graph.cfg.tokenizer_name``) to write the prompt's tokens."""
    words = Tokenizer(WordLevel({f"<{i}>": i for i in range(vocab_size)}, unk_token="<0>"))
    PreTrainedTokenizerFast(tokenizer_object=words).save_pretrained(folder)
    return folder


def graph_files(folder: Path) -> dict:
    """circuit-tracer's graph of TOKENS on the tiny model, written by ``create_graph_files``; its JSON."""
    cfg = gpt2_cfg()
    model = build(cfg, transcoder_set(cfg, "relu", False))
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # circuit-tracer builds its matrices in the default dtype
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = attribute(TOKENS, model, batch_size=256, max_n_logits=3, max_feature_nodes=100_000, verbose=False)
            graph.cfg.tokenizer_name = str(word_tokenizer(folder / "tokenizer", cfg.d_vocab))
            create_graph_files(graph, SLUG, folder / "data", node_threshold=0.8, edge_threshold=0.98)
    finally:
        torch.set_default_dtype(previous)
    return json.loads((folder / "data" / f"{SLUG}.json").read_text())


class Dom(HTMLParser):
    """The elements of an HTML serialization: tag, classes, attributes, own text, ancestors' classes."""

    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}

    def __init__(self, html: str):
        super().__init__(convert_charrefs=True)
        self.elements, self.stack = [], []
        self.feed(html)
        self.close()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        element = {"tag": tag, "classes": set((attrs.get("class") or "").split()), "attrs": attrs, "text": "",
                   "within": set().union(*(e["classes"] for e in self.stack))}
        self.elements.append(element)
        if tag not in self.VOID:
            self.stack.append(element)

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag not in self.VOID:
            self.stack.pop()

    def handle_endtag(self, tag):
        while self.stack and self.stack.pop()["tag"] != tag:
            pass

    def handle_data(self, data):
        if self.stack:
            self.stack[-1]["text"] += data

    def select(self, tag: str, within: str, cls: str | None = None) -> list[dict]:
        """Elements ``tag`` (of class ``cls``) inside an element of class ``within``: CSS ``.within tag.cls``."""
        return [e for e in self.elements if e["tag"] == tag and within in e["within"] and (cls is None or cls in e["classes"])]


def translate(element: dict) -> tuple[float, float]:
    """The (x, y) of a ``transform="translate(x,y)"`` attribute."""
    x, y = re.fullmatch(rf"translate\(({NUMBER}),\s*({NUMBER})\)", element["attrs"]["transform"]).groups()
    return float(x), float(y)


def test_circuit_tracer_frontend_draws_the_graph(tmp_path):
    graph = graph_files(tmp_path)
    nodes, links, meta = graph["nodes"], graph["links"], graph["metadata"]
    # The page hides nodes above its pruning threshold (the graph's node_threshold) but embeddings and logits.
    shown = {n["node_id"] for n in nodes if n["feature_type"] in ("embedding", "logit") or n["influence"] <= meta["node_threshold"]}
    shown_links = [link for link in links if link["source"] in shown and link["target"] in shown]
    logits = [n["clerp"].split('"')[1] for n in nodes if n["feature_type"] == "logit"]
    features = [n for n in nodes if n["node_id"] in shown and n["feature_type"] == "cross layer transcoder"]
    assert len(logits) == 3 and meta["prompt_tokens"] == [f"<{t}>" for t in TOKENS.tolist()]
    assert features and len(shown_links) > len(shown) and len(shown) >= len(nodes) - 2  # a real graph, barely pruned
    assert len({(link["source"], link["target"]) for link in shown_links}) == len(shown_links)  # no parallel links

    figures = os.environ.get("TL_LINMAP_FIGURES")
    png = Path(figures) / "ct_frontend.png" if figures else tmp_path / "ct_frontend.png"
    png.parent.mkdir(parents=True, exist_ok=True)
    console = []
    with serve_circuit_tracer(tmp_path / "data", {"slug": SLUG, "pinnedIds": ",".join(n["node_id"] for n in nodes)}) as url:
        html = render(url, png=png, console=console)
    errors = [line for line in console if "Uncaught" in line or "rror" in line]
    assert not errors, errors
    dom = Dom(html)

    # The link graph: one glyph per shown node, each at its own place, the prompt's tokens along the
    # bottom and the logits' tokens at the top.
    glyphs = dom.select("text", "link-graph", "node")
    assert len(glyphs) == len(shown)
    places = {translate(g) for g in glyphs}
    assert len(places) == len(shown) and all(map(math.isfinite, sum(places, ())))
    assert [e["text"] for e in dom.select("text", "prompt-token")] == meta["prompt_tokens"]
    labels = {e["text"] for e in dom.select("text", "link-graph")}
    assert set(logits) <= labels
    # ... and its edges on a canvas (pinned nodes' links: the second of the four canvases).
    ink = json.loads(re.search(r'data-canvas-ink="([^"]*)"', html).group(1))
    canvases = dom.select("canvas", "link-graph")
    area = int(canvases[1]["attrs"]["width"]) * int(canvases[1]["attrs"]["height"])
    assert len(ink) == len(canvases) == 4 and 0 < ink[1] < area / 2, ink

    # The subgraph: a box per pinned (shown) node and an SVG path per link between them.
    assert len(dom.select("div", "subgraph", "supernode-container")) == len(shown)
    paths = dom.select("path", "subgraph", "link-path")
    assert len(paths) == len(shown_links)
    ends = [re.fullmatch(rf"M({NUMBER}),({NUMBER}) L({NUMBER}),({NUMBER})", p["attrs"].get("d", "")) for p in paths]
    assert all(ends) and all(math.isfinite(float(v)) for m in ends for v in m.groups())
    assert sum(m.group(1, 2) != m.group(3, 4) for m in ends) == len(paths)  # drawn between two places
    assert all(float(p["attrs"]["stroke-width"]) > 0 for p in paths)
    assert png.stat().st_size > 10_000
