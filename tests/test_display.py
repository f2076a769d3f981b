"""Notebook display: escaped tokens, colours that follow the contributions, aligned numbers."""

import ast
import dataclasses
import re
from html.parser import HTMLParser
from pathlib import Path

import einops
import pytest
import torch

import tl_linmap
from tl_linmap.present import display
from tl_linmap.base.compat import get_act_name

# Markup characters and runs of spaces: the byte-level toy tokenizer makes each its own token.
HOSTILE = "x <b> & y  z"


class Page(HTMLParser):
    """Coloured token spans (text, style, title), table cells (text, class) and <style> text."""

    def __init__(self):
        super().__init__()
        self.spans, self.cells, self.style, self.text = [], [], "", ""
        self._span = self._cell = None
        self._in_style = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "span" and "background-color" in attrs.get("style", ""):
            self._span = ["", attrs["style"], attrs.get("title", "")]
        if tag in ("td", "th"):
            self._cell = ["", attrs.get("class")]
        self._in_style = tag == "style"

    def handle_endtag(self, tag):
        if tag == "span" and self._span is not None:
            self.spans.append(tuple(self._span))
            self._span = None
        if tag in ("td", "th"):
            self.cells.append(tuple(self._cell))
            self._cell = None
        self._in_style = False

    def handle_data(self, data):
        if self._in_style:
            self.style += data
            return
        self.text += data
        for open_element in (self._span, self._cell):
            if open_element is not None:
                open_element[0] += data


def parse(page: str) -> Page:
    parsed = Page()
    parsed.feed(page)
    return parsed


def rgba(style: str) -> tuple[tuple[int, int, int], float]:
    r, g, b, a = re.search(r"background-color:\s*rgba\(([^)]*)\)", style).group(1).split(",")
    return (int(r), int(g), int(b)), float(a)


def shown(token: str) -> str:
    # How a token must read on screen: every space and newline drawn.
    return token.replace(" ", "\u2423").replace("\n", "\u21b5")


def right_aligned(page: Page) -> set[str]:
    return {name for selector, body in re.findall(r"([^{}]+)\{([^}]*)\}", page.style) if "text-align: right" in body
            for name in re.findall(r"\.([\w-]+)", selector)}


def value_cell(page: Page, name: str) -> tuple[str, str]:
    # The cell after the header cell `name` in a two-column facts table.
    index = [text for text, _ in page.cells].index(name)
    return page.cells[index + 1]


def decoded_tokens(model, lm) -> list[str]:
    return [model.tokenizer.decode([int(t)]) for t in lm.tokens]


def test_display_imports_only_the_table_module():
    tree = ast.parse(Path(display.__file__).read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert {name for name in imported if name.startswith("tl_linmap")} == {"tl_linmap.base.table"}


def test_tokens_html_escapes_and_shows_whitespace():
    tokens = [" Paris", "<a&b>", "\n", "x"]
    page = display.tokens_html(tokens, [0.1, -0.4, 0.0, 0.2], signed=True)
    assert "<a&b>" not in page and "&lt;a&amp;b&gt;" in page
    spans = parse(page).spans
    assert [text for text, _, _ in spans] == [shown(t) for t in tokens]
    colours = [rgba(style) for _, style, _ in spans]
    assert colours[0][0] == colours[3][0] != colours[1][0]  # positive hue, negative hue
    assert colours[2][1] == 0 and colours[1][1] > colours[3][1] > colours[0][1]


def test_tokens_html_needs_one_value_per_token():
    with pytest.raises(ValueError, match="2 tokens but 1 values"):
        display.tokens_html(["a", "b"], [1.0])


def test_linear_map_colours_follow_the_contribution_norms(model):
    lm = tl_linmap.linear_map(model, HOSTILE)
    page = display.linear_map_html(lm)
    tokens = decoded_tokens(model, lm)
    assert ">&lt;</span>" in page and ">&amp;</span>" in page  # the prompt's markup is text, not tags
    spans = parse(page).spans
    assert [text for text, _, _ in spans] == [shown(t) for t in tokens]
    norms = einops.einsum(lm.operators, lm.inputs, "pos d_out d_in, pos d_in -> pos d_out").norm(dim=-1)
    alphas = torch.tensor([rgba(style)[1] for _, style, _ in spans], dtype=norms.dtype)
    assert torch.allclose(alphas / alphas.max(), norms / norms.max(), atol=2e-3)
    distinct = (norms[:, None] - norms[None, :]) > 0.01 * norms.max()
    assert ((alphas[:, None] > alphas[None, :]) == distinct)[distinct].all()
    in_titles = [float(re.search(r"= (\S+),", title).group(1)) for _, _, title in spans]
    assert in_titles == pytest.approx(norms.tolist(), rel=1e-3)


def test_linear_map_facts_are_the_maps_own(toy_models):
    model = toy_models["gpt2"]
    lm = tl_linmap.linear_map(model, HOSTILE)
    page = parse(display.linear_map_html(lm))
    pos, d_out, d_in = lm.operators.shape
    assert value_cell(page, "operators J")[0] == f"{pos} \u00d7 {d_out} \u00d7 {d_in}"
    assert value_cell(page, "target")[0] == lm.target
    text, cls = value_cell(page, "relative error")
    assert float(text) < 1e-12 and cls in right_aligned(page)
    # A map whose output is 1% off shows an error of 0.01 / 1.01.
    off = parse(display.linear_map_html(dataclasses.replace(lm, output=lm.output * 1.01)))
    assert float(value_cell(off, "relative error")[0]) == pytest.approx(0.01 / 1.01, rel=1e-3)
    assert value_cell(page, "position")[0].startswith(f"{len(lm.tokens) - 1} ")


def test_linear_map_text_is_short_and_has_no_tensors(toy_models):
    lm = tl_linmap.linear_map(toy_models["llama"], HOSTILE)
    text = display.linear_map_text(lm)
    assert "tensor(" not in text and len(text.splitlines()) == 2 and lm.target in text
    assert f"{lm.relative_error():.2e}" in text


@pytest.fixture(scope="module")
def maps(toy_models):
    return tl_linmap.layer_maps(toy_models["llama"], HOSTILE, modules=True)


def test_linear_maps_list_every_target_with_its_error(maps, toy_models):
    # One map made wrong by a known amount: its output scaled by 1 + k/100 gives an error of (k/100) / (1 + k/100).
    broken = "blocks.0.hook_mlp_out"
    shown_maps = dict(maps) | {broken: dataclasses.replace(maps[broken], output=maps[broken].output * 1.03)}
    page = parse(display.linear_maps_html(shown_maps))
    texts = [text for text, _ in page.cells]
    start = texts.index("relative_error") + 1
    rows = [page.cells[i : i + 3] for i in range(start, len(page.cells), 3)]
    assert [row[0][0] for row in rows] == list(maps)
    for (name, d_out, error), lm in zip(rows, maps.values()):
        expected = pytest.approx(0.03 / 1.03, rel=1e-3) if name[0] == broken else pytest.approx(0, abs=1e-12)
        assert float(error[0]) == expected and int(d_out[0]) == lm.output.shape[-1]
        assert {d_out[1], error[1]} <= right_aligned(page)
    last = list(maps.values())[-1]
    assert [text for text, _, _ in page.spans] == [shown(t) for t in decoded_tokens(toy_models["llama"], last)]
    assert len(display.linear_maps_text(maps).splitlines()) == 3 + len(maps)


def test_attribution_colours_are_signed_and_follow_the_logit_shares(maps, toy_models):
    model = toy_models["llama"]
    att = tl_linmap.token_attribution(model, maps, 7)
    tokens = decoded_tokens(model, maps[list(maps)[-1]])
    page = parse(display.attribution_html(att, tokens))
    assert [text for text, _, _ in page.spans] == [shown(t) for t in tokens]
    colours = [rgba(style) for _, style, _ in page.spans]
    # The logit through the frozen final norm, per source token, from the last residual map.
    final = maps[get_act_name("resid_post", model.cfg.n_layers - 1)]
    direction = maps.final_norm.matrix.T @ model.W_U.detach()[:, 7].to(final.output)
    per_token = einops.einsum(final.operators, final.inputs, "pos d_out d_in, pos d_in -> pos d_out") @ direction
    positive = [hue for (hue, _), v in zip(colours, per_token) if v > 0]
    negative = [hue for (hue, _), v in zip(colours, per_token) if v < 0]
    assert positive and negative and not set(positive) & set(negative)
    assert len(set(positive)) == len(set(negative)) == 1
    alphas = torch.tensor([a for _, a in colours], dtype=per_token.dtype)
    assert torch.allclose(alphas / alphas.max(), per_token.abs() / per_token.abs().max(), atol=2e-3)


def test_attribution_component_totals_add_up_to_the_logit(maps, toy_models):
    att = tl_linmap.token_attribution(toy_models["llama"], maps, 7)
    page = parse(display.attribution_html(att))
    texts = [text for text, _ in page.cells]
    rows = [page.cells[i : i + 2] for i in range(texts.index("total") + 1, len(page.cells), 2)]
    assert [name for (name, _), _ in rows][:-2] == list(att.per_component)
    assert all(cls in right_aligned(page) for _, (_, cls) in rows)
    totals = [float(text) for _, (text, _) in rows]
    assert sum(totals) == pytest.approx(att.logit, abs=1e-3 * sum(abs(t) for t in totals))
    assert [text for text, _, _ in page.spans] == [shown(t) for t in decoded_tokens(toy_models["llama"], maps[next(iter(maps))])]
    text = display.attribution_text(att)
    assert "tensor(" not in text and "largest heads: L" in text


def test_logit_split_displays_with_its_own_sources(toy_models):
    lm = tl_linmap.linear_map(toy_models["llama"], HOSTILE)
    split = lm.logit_contributions(7)
    page = parse(display.attribution_html(split))
    assert [text for text, _, _ in page.spans] == [shown(t) for t in decoded_tokens(toy_models["llama"], lm)]
    assert [text for text, _ in page.cells] == ["component", "total", "constant", f"{split.constant:.4g}"]
