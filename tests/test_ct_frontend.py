# Runs in the TransformerLens 2.18 environment only (circuit-tracer), with headless Chromium and npm:
#     .venv-tl2/bin/python -m pytest tests/test_ct_frontend.py -q
# conftest.py does not collect it where circuit_tracer is not installed.
"""circuit-tracer's own graph browser draws attribution graphs, offline, in headless Chromium.

The model: the tiny random float64 GPT-2-like ReplacementModel of test_replacement.py (ReLU
transcoders), built once. Two graphs of TOKENS, written by ``circuit_tracer.utils.create_graph_files``:
``circuit_tracer.attribute``'s own, and ``tl_linmap.attribution_graph``'s turned into circuit-tracer's
by ``Graph.to_circuit_tracer``. Their adjacency matrices are equal, so the two JSON files must hold
the same nodes and links. The page: circuit-tracer's ``frontend/assets/index.html`` with its CDN
scripts replaced by npm copies (tests/ct_frontend.py), served from localhost, opened with every node
pinned (``pinnedIds``), so that the link graph draws each node's glyph and every edge between drawn
nodes (on a canvas), and the subgraph panel draws every drawn node as a box and every edge as an SVG
path. For each graph, the DOM Chromium returns must hold as many of each as its JSON has, at the
positions of real layouts.
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
from browser import render
from circuit_tracer import attribute
from circuit_tracer.utils import create_graph_files
from ct_frontend import serve_circuit_tracer
from test_replacement import TOKENS, build, gpt2_cfg, transcoder_set
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

import tl_linmap

SLUG = "tiny-gpt2-relu"
SOURCES = ("circuit-tracer", "tl_linmap")
NUMBER = r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?"


def word_tokenizer(folder: Path, vocab_size: int) -> Path:
    """A tokenizer folder ``AutoTokenizer.from_pretrained`` loads offline, spelling id i as ``<i>``
    (as test_replacement's StubTokenizer does): ``create_graph_files`` loads the graph's tokenizer by
    name (``graph.cfg.tokenizer_name``) to write the prompt's tokens."""
    words = Tokenizer(WordLevel({f"<{i}>": i for i in range(vocab_size)}, unk_token="<0>"))
    PreTrainedTokenizerFast(tokenizer_object=words).save_pretrained(folder)
    return folder


def ct_graph(model, source: str):
    """The graph of TOKENS as a ``circuit_tracer.graph.Graph``: circuit-tracer's own, or tl_linmap's converted."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if source == "circuit-tracer":
            return attribute(TOKENS, model, batch_size=256, max_n_logits=3, max_feature_nodes=100_000, verbose=False)
        return tl_linmap.attribution_graph(model, TOKENS, max_logits=3).to_circuit_tracer(scan=model.scan, dtype=torch.float64)


def graph_files(model, source: str, folder: Path) -> dict:
    """The graph of TOKENS from ``source``, written by ``create_graph_files`` into ``folder/data``; its JSON."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # circuit-tracer builds its matrices in the default dtype
    try:
        graph = ct_graph(model, source)
        graph.cfg.tokenizer_name = str(word_tokenizer(folder / "tokenizer", model.cfg.d_vocab))  # graph.cfg is a copy
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            create_graph_files(graph, SLUG, folder / "data", node_threshold=0.8, edge_threshold=0.98)
    finally:
        torch.set_default_dtype(previous)
    return json.loads((folder / "data" / f"{SLUG}.json").read_text())


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> dict:
    """Per source: (folder with ``data/``, the graph JSON), from one model."""
    cfg = gpt2_cfg()
    model = build(cfg, transcoder_set(cfg, "relu", False))
    out = {}
    for source in SOURCES:
        folder = tmp_path_factory.mktemp(source)
        out[source] = folder, graph_files(model, source, folder)
    return out


class Dom(HTMLParser):
    """The elements of an HTML serialization: tag, classes, attributes, own text, ancestors' classes."""

    VOID = frozenset({"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"})

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


def test_both_graph_files_hold_the_same_graph(written):
    (_, ours), (_, theirs) = written["tl_linmap"], written["circuit-tracer"]
    assert [n["node_id"] for n in ours["nodes"]] == [n["node_id"] for n in theirs["nodes"]]
    assert [n["feature_type"] for n in ours["nodes"]] == [n["feature_type"] for n in theirs["nodes"]]
    for key in ("prompt_tokens", "prompt", "scan", "node_threshold"):
        assert ours["metadata"][key] == theirs["metadata"][key], key
    links = {(link["source"], link["target"]): link["weight"] for link in theirs["links"]}
    assert len(links) == len(theirs["links"]) > 0
    ours_links = {(link["source"], link["target"]): link["weight"] for link in ours["links"]}
    assert len(ours_links) == len(ours["links"]) and ours_links.keys() == links.keys()
    gaps = [abs(ours_links[k] - w) for k, w in links.items()]
    assert max(gaps) <= 1e-9, max(gaps)
    # ... and each node's influence on the logits, which create_graph_files computes from the adjacency.
    for a, b in zip(ours["nodes"], theirs["nodes"]):
        assert a["influence"] == pytest.approx(b["influence"], abs=1e-9), a["node_id"]


@pytest.mark.parametrize("source", SOURCES)
def test_circuit_tracer_frontend_draws_the_graph(written, source, tmp_path):
    folder, graph = written[source]
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
    name = "ct_frontend.png" if source == "circuit-tracer" else "ct_frontend_tl_linmap.png"
    png = Path(figures) / name if figures else tmp_path / name
    png.parent.mkdir(parents=True, exist_ok=True)
    console = []
    with serve_circuit_tracer(folder / "data", {"slug": SLUG, "pinnedIds": ",".join(n["node_id"] for n in nodes)}) as url:
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
