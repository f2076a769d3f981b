"""``show()`` and ``show_pattern()``: circuitsvis's views carrying the right tokens and values, tl_linmap's own
HTML without circuitsvis, and the frozen attention pattern the views draw."""

import html
import json
import re
import sys

import einops
import pytest
import torch
from browser import render
from test_display import HOSTILE, parse, rgba, shown

import tl_linmap
from tl_linmap.base.compat import get_act_name
from tl_linmap.present import display, views

LAYER = 1


@pytest.fixture(scope="module")
def maps(toy_models):
    return tl_linmap.layer_maps(toy_models["llama"], HOSTILE, modules=True)


@pytest.fixture(scope="module")
def att(maps, toy_models):
    return tl_linmap.token_attribution(toy_models["llama"], maps, 7)


@pytest.fixture
def circuitsvis():
    # Installed by scripts/install.sh (the `circuitsvis` extra): under CI=true this skip is a failure.
    return pytest.importorskip("circuitsvis")


@pytest.fixture
def without_circuitsvis(monkeypatch):
    # `import circuitsvis` raises ImportError while the entry is None, as where it was never installed.
    monkeypatch.setitem(sys.modules, "circuitsvis", None)


def props(view: views.View) -> tuple[str, dict]:
    """The circuitsvis component a view renders and the props (JSON) it passes it."""
    assert view.backend == "circuitsvis"
    match = re.search(r'CircuitsVis\.render\(\s*"[\w-]+",\s*CircuitsVis\.(\w+),\s*(\{.*\})\s*\)\s*</script>\s*$', view.html, re.DOTALL)
    assert match, "not circuitsvis's inline render call"
    return match.group(1), json.loads(match.group(2))


def decoded(model, lm) -> list[str]:
    return [model.tokenizer.decode([int(t)]) for t in lm.tokens]


def norms_of(lm) -> torch.Tensor:
    return einops.einsum(lm.operators, lm.inputs, "pos d_out d_in, pos d_in -> pos d_out").norm(dim=-1)


def logit_terms(maps, model, token: int) -> torch.Tensor:
    # The token's logit per source token, through the frozen final norm, from the last residual map.
    final = maps[get_act_name("resid_post", model.cfg.n_layers - 1)]
    direction = maps.final_norm.matrix.T @ model.W_U.detach()[:, token].to(final.output)
    return einops.einsum(final.operators, final.inputs, "pos d_out d_in, pos d_in -> pos d_out") @ direction


# --- the frozen pattern ------------------------------------------------------------------


def test_pattern_is_the_models_attention_on_the_prompt(model):
    maps = tl_linmap.linear_maps(model, HOSTILE, [get_act_name("z", LAYER)])
    tokens = maps[get_act_name("z", LAYER)].tokens
    _, cache = model.run_with_cache(tokens[None])
    reference = cache[get_act_name("pattern", LAYER)][0]
    # A plain forward: RMSNorm bridges compute their norm in float32 there (the maps' native gap), hence 1e-6.
    torch.testing.assert_close(maps.pattern(LAYER), reference.to(maps.pattern(LAYER)), atol=1e-6, rtol=0)
    assert torch.equal(maps.pattern(LAYER, 2), maps.pattern(LAYER)[2])
    assert maps.head_splits[LAYER].pattern is maps.pattern(LAYER)


def test_each_prompt_of_a_batch_keeps_its_own_pattern(toy_models):
    model = toy_models["gpt2"]  # LayerNorm: the plain forward is the frozen one, bit for bit
    batch = tl_linmap.linear_maps(model, [HOSTILE, "hello there"], [get_act_name("z", LAYER)])
    for maps in batch:
        tokens = maps[get_act_name("z", LAYER)].tokens
        _, cache = model.run_with_cache(tokens[None])
        torch.testing.assert_close(maps.pattern(LAYER), cache[get_act_name("pattern", LAYER)][0], atol=1e-12, rtol=0)
    assert [len(maps.pattern(LAYER)[0]) for maps in batch] == [len(maps[get_act_name("z", LAYER)].tokens) for maps in batch]


def test_pattern_needs_its_layers_hook_z(toy_models):
    maps = tl_linmap.linear_maps(toy_models["gpt2"], HOSTILE, [get_act_name("z", 0)])
    with pytest.raises(tl_linmap.InputError, match=r"hook_z of layers \[0\].*modules=True"):
        maps.pattern(LAYER)
    with pytest.raises(tl_linmap.InputError, match=r"Layer 0 has 4 heads; head must be an int in \[0, 4\), got 4"):
        maps.show_pattern(0, 4)


# --- with circuitsvis ----------------------------------------------------------------------


def test_a_maps_tokens_carry_their_contribution_norms(maps, toy_models, circuitsvis):
    lm = maps[get_act_name("resid_post", 1)]
    view = lm.show()
    component, given = props(view)
    assert component == "ColoredTokens"
    # circuitsvis writes tokens into the page as HTML: they go in escaped, so "<bos>" stays text.
    assert given["tokens"] == [html.escape(t, quote=False) for t in decoded(toy_models["llama"], lm)]
    norms = norms_of(lm)
    assert given["values"] == pytest.approx(norms.tolist(), rel=1e-12)
    assert (given["minValue"], given["maxValue"]) == (0.0, pytest.approx(float(norms.max()), rel=1e-12))
    # Offline: the script is inline; the CDN variant is kept beside it.
    assert "unpkg.com" not in view.html and "unpkg.com/circuitsvis" in view.cdn_html
    assert len(view.html) > 1_000_000 and view._repr_html_() is view.html


def test_linear_maps_offer_every_maps_norms(maps, toy_models, circuitsvis):
    component, given = props(maps.show())
    assert component == "ColoredTokensMulti" and given["labels"] == list(maps)
    expected = torch.stack([norms_of(lm) for lm in maps.values()], dim=1)
    assert torch.allclose(torch.tensor(given["values"], dtype=expected.dtype), expected, rtol=1e-12, atol=0)
    two = [get_act_name("attn_out", 0), get_act_name("mlp_out", 1)]
    assert props(maps.show(two))[1]["labels"] == two


def test_attribution_columns_are_the_logit_its_components_and_largest_heads(maps, att, toy_models, circuitsvis):
    component, given = props(att.show())
    assert component == "ColoredTokensMulti"
    values = torch.tensor(given["values"], dtype=torch.float64)
    labels = given["labels"]
    n_components, n_heads = len(att.per_component), display.TOP_HEADS
    assert labels[0] == f"logit of {att.token!r}" and labels[1 : 1 + n_components] == list(att.per_component)
    expected = logit_terms(maps, toy_models["llama"], 7)
    torch.testing.assert_close(values[:, 0], expected, rtol=1e-9, atol=1e-12)
    # The components split each token's term exactly: their columns add up to the first.
    torch.testing.assert_close(values[:, 1 : 1 + n_components].sum(1), expected, rtol=1e-9, atol=1e-12)
    totals = {name: float(v.sum()) for name, v in ((f"L{l}H{h}", v) for (l, h), v in att.per_head.items())}
    largest = sorted(totals, key=lambda name: -abs(totals[name]))[:n_heads]
    assert labels[1 + n_components :] == largest
    assert values[:, 1 + n_components :].sum(0).tolist() == pytest.approx([totals[name] for name in largest], rel=1e-12)


def test_logit_split_is_signed_on_a_symmetric_scale(maps, att, toy_models, circuitsvis):
    component, given = props(att.logit_split().show())
    expected = logit_terms(maps, toy_models["llama"], 7)
    assert component == "ColoredTokens" and given["values"] == pytest.approx(expected.tolist(), rel=1e-9, abs=1e-12)
    scale = float(expected.abs().max())
    assert given["maxValue"] == pytest.approx(scale) and given["minValue"] == pytest.approx(-scale)
    assert min(given["values"]) < 0 < max(given["values"])  # both colours are in play


def test_show_pattern_draws_the_frozen_pattern(maps, toy_models, circuitsvis):
    model = toy_models["llama"]
    tokens = maps[get_act_name("z", LAYER)].tokens
    _, cache = model.run_with_cache(tokens[None])
    reference = cache[get_act_name("pattern", LAYER)][0]
    component, given = props(maps.show_pattern(LAYER))
    assert component == "AttentionHeads" and given["attentionHeadNames"] == [f"L{LAYER}H{h}" for h in range(4)]
    # A canvas draws the tokens as text: they go in as decoded.
    assert given["tokens"] == decoded(model, maps[get_act_name("z", LAYER)])
    torch.testing.assert_close(torch.tensor(given["attention"], dtype=reference.dtype), reference, atol=1e-6, rtol=0)
    component, one = props(maps.show_pattern(LAYER, 3))
    assert component == "AttentionPattern" and one["attention"] == given["attention"][3]


def test_circuitsvis_draws_offline_with_the_tokens_and_signs(maps, att, toy_models, circuitsvis, tmp_path):
    split = att.logit_split()
    page = tmp_path / "split.html"
    page.write_text(f"<!doctype html><html><body>{split.show().html}</body></html>")
    dom = render(page.as_uri(), budget_ms=5000)
    spans = re.findall(r'<span style="display: inline-block; background-color: rgb\((\d+), (\d+), (\d+)\);[^"]*">(.*?)</span>', dom)
    tokens = decoded(toy_models["llama"], maps[get_act_name("z", LAYER)])
    assert [html.unescape(text).replace("\xa0", " ") for *_, text in spans] == tokens  # "<bos>" as text
    colours = torch.tensor([[int(c) for c in rgb] for *rgb, _ in spans], dtype=torch.float64)
    values = split.per_token
    positive, negative = values > 0, values < 0
    assert (colours[positive, 2] >= colours[positive, 0]).all() and (colours[negative, 0] >= colours[negative, 2]).all()
    for sign in (positive, negative):  # the larger |value|, the further from white
        paleness, size = colours[sign].sum(1), values[sign].abs()
        distinct = (size[:, None] - size[None, :]) > 0.05 * float(values.abs().max())
        assert ((paleness[:, None] < paleness[None, :]) | ~distinct).all()


def test_tokens_that_would_end_the_script_are_drawn_as_tokens(circuitsvis, tmp_path):
    tokens = ["a", "</script>", "<!--", "</SCRIPT >", "b"]
    view = views.colored_tokens(tokens, torch.tensor([[1.0], [-2.0], [0.5], [0.0], [3.0]]), ["v"], signed=True, html=lambda: "")
    page = tmp_path / "hostile.html"
    page.write_text(f"<!doctype html><html><body>{view.html}</body></html>")
    dom = render(page.as_uri(), budget_ms=5000)
    texts = re.findall(r'<span style="display: inline-block; background-color: [^"]*">(.*?)</span>', dom)
    assert [html.unescape(t).replace("\xa0", " ") for t in texts] == tokens


# --- without circuitsvis -------------------------------------------------------------------


def test_without_circuitsvis_results_show_their_own_html(maps, att, without_circuitsvis):
    lm = maps[get_act_name("resid_post", 1)]
    for result in (lm, att, att.logit_split()):
        view = result.show()
        assert view.backend == "html" and view.html == result._repr_html_() and view.cdn_html is None
        assert "<script" not in view.html
    with pytest.raises(tl_linmap.InputError, match=r"pip install 'tl_linmap\[circuitsvis\]'.*backend='html'"):
        lm.show(backend="circuitsvis")


def test_without_circuitsvis_maps_show_a_row_of_tokens_per_map(maps, toy_models, without_circuitsvis):
    view = maps.show()
    page = parse(view.html)
    n = len(next(iter(maps.values())).tokens)
    rows = [page.spans[i : i + n] for i in range(0, len(page.spans), n)]
    assert [text for text, _ in page.cells[::2]] == list(maps) and len(rows) == len(maps)
    for row, lm in zip(rows, maps.values()):
        assert [text for text, _, _ in row] == [shown(t) for t in decoded(toy_models["llama"], lm)]
        alphas = torch.tensor([rgba(style)[1] for _, style, _ in row], dtype=torch.float64)
        norms = norms_of(lm)
        assert torch.allclose(alphas / alphas.max(), norms / norms.max(), atol=2e-3)


def test_without_circuitsvis_a_pattern_is_a_table_per_head(maps, toy_models, without_circuitsvis):
    tokens = maps[get_act_name("z", LAYER)].tokens
    _, cache = toy_models["llama"].run_with_cache(tokens[None])
    reference = cache[get_act_name("pattern", LAYER)][0]
    view = maps.show_pattern(LAYER)
    assert view.backend == "html" and "<script" not in view.html
    cells = re.findall(r'background-color:rgba\(\d+,\d+,\d+,([\d.]+)\)" title="(L\d+H\d+) (\d+):[^"]*? \u2192 (\d+):[^"]*: ([\d.]+)"', view.html)
    n = len(tokens)
    assert len(cells) == 4 * n * n
    for alpha, name, q, k, weight in cells:
        expected = float(reference[int(name[3:]), int(q), int(k)])
        assert float(weight) == pytest.approx(expected, abs=1e-4)
        assert float(alpha) == pytest.approx(display.MAX_ALPHA * expected, abs=1e-3)
    assert {name for _, name, *_ in cells} == {f"L{LAYER}H{h}" for h in range(4)}
    assert views.resolve_backend(None) == "html"


def test_backends_are_checked(maps):
    with pytest.raises(tl_linmap.InputError, match="backend must be 'circuitsvis', 'html' or None"):
        maps.show(backend="plotly")
