"""Figures: each plot's content (lines, images, bars, texts) against independently computed values."""

import importlib.util
import sys

import pytest

matplotlib = pytest.importorskip("matplotlib")  # the optional `plot` extra
matplotlib.use("Agg")  # before pyplot: no display in tests

import matplotlib.pyplot as plt
import torch
from conftest import PROMPT

import tl_linmap
from tl_linmap.base.errors import InputError
from tl_linmap.present import plotting
from tl_linmap.present.plotting import (
    plot_component_contributions,
    plot_contribution_heatmap,
    plot_decoded,
    plot_expert_contributions,
    plot_logit_contributions,
    plot_of,
    plot_singular_values,
    plot_spectra,
    token_label,
)


@pytest.fixture(scope="module")
def maps(toy_models):
    return tl_linmap.layer_maps(toy_models["llama"], PROMPT)


@pytest.fixture(scope="module")
def final(maps):
    return maps[list(maps)[-1]]


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def _norms(lm):
    # J_i x_i by a plain batched matmul, not LinearMap.contributions.
    return (lm.operators @ lm.inputs[..., None])[..., 0].norm(dim=-1)


def _tokens(lm):
    return [lm.readout.model.tokenizer.decode([int(t)]) for t in lm.tokens]


def _image_axes(fig):
    return [ax for ax in fig.axes if ax.images]


def test_token_label_makes_tokens_visible():
    assert token_label(" cat") == "␣cat"
    assert token_label("a\nb\tc") == "a↵b⇥c"
    assert token_label("\x1c") == r"\x1c"
    assert token_label("") == "∅"
    assert token_label("$5 $6") == r"\$5␣\$6"  # no mathtext


def test_spectra_has_one_line_per_map_with_its_singular_values(maps):
    fig = plot_spectra(maps)
    ax = fig.axes[0]
    assert len(ax.lines) == len(maps)
    for line, lm in zip(ax.lines, maps.values()):
        assert torch.allclose(torch.as_tensor(line.get_ydata()), torch.linalg.svdvals(lm.operators[-1]))
    assert ax.get_yscale() == "log"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["L0 resid_mid", "L0 resid_post", "L1 resid_mid", "L1 resid_post"]
    colors = [line.get_color() for line in ax.lines]
    assert len(set(colors)) == len(colors)  # a gradient: every depth its own colour


def test_spectra_of_the_stacked_operator_skip_first_and_normalize(maps):
    ax = plot_spectra(maps, "all", skip_first=True, normalize=True).axes[0]
    for line, lm in zip(ax.lines, maps.values()):
        wide = torch.cat(list(lm.operators[1:]), dim=1)  # [J_1 ... J_n] side by side
        values = torch.linalg.svdvals(wide)
        assert torch.allclose(torch.as_tensor(line.get_ydata()), values / values[0])
    assert "J_1" in ax.get_title()
    with_first = plot_spectra(maps, "all").axes[0]
    assert len(with_first.lines[0].get_ydata()) == len(ax.lines[0].get_ydata())  # d_out values either way
    assert not torch.allclose(torch.as_tensor(with_first.lines[0].get_ydata()), torch.as_tensor(ax.lines[0].get_ydata()))


def test_spectra_leave_out_the_rounding_noise_and_keep_every_value_above_it(maps, toy_models):
    # At layer 0, J_0 reaches the last position only through attention's values, so its rank
    # is at most n_key_value_heads * d_head (32 of 64): the rest of its spectrum is rounding noise.
    cfg = toy_models["llama"].cfg
    value_rank = cfg.n_key_value_heads * cfg.d_head
    ax = plot_spectra(maps, 0).axes[0]
    eps = torch.finfo(torch.float64).eps
    for line, (name, lm) in zip(ax.lines, maps.items()):
        operator = lm.operators[0]
        values = torch.linalg.svdvals(operator)
        floor = values.max() * eps * max(operator.shape)  # the standard numerical-rank threshold
        plotted = torch.as_tensor(line.get_ydata())
        assert (plotted >= floor).all()
        assert torch.allclose(plotted, values[values > floor])  # every value above it, in order
        if name.startswith("blocks.0."):
            assert len(plotted) == value_rank < len(values)
        else:
            assert len(plotted) == len(values)  # layer 1 mixes the tokens: full rank, nothing cut
    assert f"{eps * 64:.2g}" in ax.get_xlabel() and "rounding noise" in ax.get_xlabel()


def test_normalized_spectra_are_cut_at_the_same_relative_floor(maps):
    ax = plot_spectra(maps, 0, normalize=True).axes[0]
    floor = torch.finfo(torch.float64).eps * 64
    for line, lm in zip(ax.lines, maps.values()):
        values = torch.linalg.svdvals(lm.operators[0])
        relative = values / values.max()
        assert torch.allclose(torch.as_tensor(line.get_ydata()), relative[relative > floor])


def test_spectra_draws_into_a_given_ax_and_takes_one_map(final):
    fig, ax = plt.subplots()
    assert plot_spectra(final, 3, ax=ax) is fig
    assert len(ax.lines) == 1
    assert torch.allclose(torch.as_tensor(ax.lines[0].get_ydata()), torch.linalg.svdvals(final.operators[3]))


def test_spectra_of_many_maps_uses_a_colorbar(final):
    many = {f"blocks.{i}.hook_resid_post": final for i in range(12)}
    fig = plot_spectra(many)
    assert len(fig.axes[0].lines) == 12
    assert fig.axes[0].get_legend() is None and len(fig.axes) == 2


def test_spectra_rejects_tokens_outside_the_prompt_or_skipped(maps, final):
    with pytest.raises(InputError):
        plot_spectra(maps, len(final.tokens))
    with pytest.raises(InputError):
        plot_spectra(maps, 0, skip_first=True)


def test_heatmap_separates_the_first_token(maps, final):
    fig = plot_contribution_heatmap(maps)
    sink, main = _image_axes(fig)
    norms = torch.stack([_norms(lm) for lm in maps.values()])
    main_data = torch.as_tensor(main.images[0].get_array())
    assert main_data.shape == (len(maps), len(final.tokens) - 1)
    assert torch.allclose(main_data, norms[:, 1:])
    assert torch.allclose(torch.as_tensor(sink.images[0].get_array()), norms[:, :1])
    assert len(sink.texts) == len(maps)  # the first token's own scale, written out
    assert [t.get_text() for t in main.get_xticklabels()] == [token_label(s) for s in _tokens(final)[1:]]
    assert [t.get_text() for t in sink.get_yticklabels()] == ["L0 resid_mid", "L0 resid_post", "L1 resid_mid", "L1 resid_post"]


def test_heatmap_skip_first_leaves_it_out(maps, final):
    fig = plot_contribution_heatmap(maps, skip_first=True)
    (main,) = _image_axes(fig)
    data = torch.as_tensor(main.images[0].get_array())
    assert data.shape == (len(maps), len(final.tokens) - 1)
    assert torch.allclose(data, torch.stack([_norms(lm)[1:] for lm in maps.values()]))


def test_heatmap_draws_into_a_given_ax(maps, final):
    fig, ax = plt.subplots()
    assert plot_contribution_heatmap(maps, ax=ax) is fig
    assert torch.allclose(torch.as_tensor(ax.images[0].get_array()), torch.stack([_norms(lm)[1:] for lm in maps.values()]))
    (inset,) = ax.child_axes  # the first-token panel, left of ax
    assert torch.allclose(torch.as_tensor(inset.images[0].get_array()), torch.stack([_norms(lm)[:1] for lm in maps.values()]))


def test_logit_bars_are_the_per_token_split_plus_the_constant(final):
    split = final.logit_contributions("a")
    fig = plot_logit_contributions(final, "a")
    ax = fig.axes[0]
    tokens, constant = ax.containers
    assert len(ax.patches) == len(final.tokens) + 1
    assert torch.allclose(torch.tensor([bar.get_height() for bar in tokens]), split.per_token)
    assert constant.patches[0].get_height() == pytest.approx(split.constant)
    assert constant.patches[0].get_hatch() and constant.get_label() == "constant"
    assert "'a'" in ax.get_title() and f"{split.logit:.4g}" in ax.get_title()
    assert sum(bar.get_height() for bar in ax.patches) == pytest.approx(split.logit, abs=1e-9)  # exact split


def test_logit_skip_first_and_default_token(final):
    fig, ax = plt.subplots()
    assert plot_logit_contributions(final, skip_first=True, ax=ax) is fig
    top = int(final.readout.logits(final.output, affine=True).argmax())
    split = final.logit_contributions(top)
    assert len(ax.patches) == len(final.tokens)  # one token fewer, plus the constant
    assert torch.allclose(torch.tensor([bar.get_height() for bar in ax.containers[0]]), split.per_token[1:])
    assert f"'{token_label(split.token)}'" in ax.get_title()


def test_logit_takes_a_split_but_not_a_second_token(final):
    split = final.logit_contributions("a")
    ax = plot_logit_contributions(split).axes[0]
    assert len(ax.patches) == len(final.tokens) + 1
    with pytest.raises(InputError):
        plot_logit_contributions(split, "a")


def test_decoded_grid_shows_the_top_tokens_of_each_pair(maps):
    k, top = 2, 3
    fig = plot_decoded(maps, k=k, top=top)
    ax = fig.axes[0]
    assert len(ax.texts) == len(maps) * k
    expected = [row for lm in maps.values() for row in lm.decode(k, top, sources=-1)]
    for text, row in zip(ax.texts, expected):
        cell = text.get_text()
        assert all(token_label(token) in cell.split("\n") for token, _ in row.left)
        assert f"σ_{row.index} " in cell
    shares = torch.as_tensor(ax.images[0].get_array())
    assert shares.shape == (len(maps), k)
    assert torch.allclose(shares.flatten(), torch.tensor([row.share for row in expected], dtype=shares.dtype))


def test_decoded_stacked_skip_first_and_given_ax(maps, final):
    fig, ax = plt.subplots()
    assert plot_decoded(maps, "all", k=2, top=2, skip_first=True, ax=ax) is fig
    assert len(ax.texts) == len(maps) * 2
    expected = [row for lm in maps.values() for row in lm.decode(2, 2, skip_first=True, stacked=True) if row.source == "all"]
    for text, row in zip(ax.texts, expected):
        assert all(token_label(token) in text.get_text().split("\n") for token, _ in row.left)
        assert "from " in text.get_text()
    one = plot_decoded(final, 1, k=3, top=1).axes[0]
    assert len(one.texts) == 3
    with pytest.raises(InputError):
        plot_decoded(maps, 0, skip_first=True)


def test_plotting_imports_without_matplotlib_and_says_how_to_get_it(monkeypatch, final):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules makes import fail
    spec = importlib.util.spec_from_file_location("_plotting_without_matplotlib", plotting.__file__)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))  # the module itself needs no matplotlib
    with pytest.raises(ImportError, match=r"pip install tl_linmap\[plot\]"):
        plotting.plot_spectra(final)


@pytest.fixture(scope="module")
def modules(toy_models):
    return tl_linmap.layer_maps(toy_models["llama"], "The cat", modules=True)


def _above_floor(values, width):
    # The singular values a plot keeps: above σ_0 · eps · max(d_out, d_in).
    return values[values > values[0] * torch.finfo(values.dtype).eps * width]


def test_singular_values_of_an_svd_are_each_operators_spectrum(modules):
    lm = modules["blocks.1.hook_resid_post"]
    ax = plot_singular_values(lm.svd(k=2)).axes[0]
    *tokens, stacked = ax.lines
    assert len(tokens) == len(lm.tokens)
    for line, operator in zip(tokens, lm.operators):
        assert torch.allclose(torch.as_tensor(line.get_ydata()), _above_floor(torch.linalg.svdvals(operator), 64))
    wide = torch.cat(list(lm.operators), dim=1)  # [J_0 ... J_n] side by side
    assert stacked.get_linestyle() == "--"
    assert torch.allclose(torch.as_tensor(stacked.get_ydata()), _above_floor(torch.linalg.svdvals(wide), wide.shape[1]))
    labels = [f"{i} {token_label(t)}" for i, t in enumerate(_tokens(lm))] + ["stacked"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == labels
    normalized = plot_singular_values(lm.svd(), normalize=True).axes[0]
    assert all(line.get_ydata()[0] == pytest.approx(1.0) for line in normalized.lines)


def test_singular_values_of_many_tokens_and_of_a_matrix_free_svd(final, toy_models):
    fig = plot_singular_values(final.svd(k=1))
    assert len(fig.axes[0].lines) == len(final.tokens) + 1 and len(fig.axes) == 2  # a colorbar keys the tokens
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["stacked"]
    with tl_linmap.matrix_free(toy_models["llama"], "The cat") as mf:
        top = mf.svd(-1, k=3)
    exact = torch.linalg.svdvals(tl_linmap.linear_map(toy_models["llama"], "The cat").operators[-1])[:3]
    (line,) = plot_singular_values(top).axes[0].lines  # one operator, no stacked one
    assert torch.allclose(torch.as_tensor(line.get_ydata()), exact, rtol=1e-6)
    with pytest.raises(InputError, match="takes an OperatorSVD"):
        plot_singular_values(final)


def test_component_bars_are_each_modules_part_of_the_logit(modules, toy_models):
    model = toy_models["llama"]
    att = tl_linmap.token_attribution(model, modules, "a")
    ax = plot_component_contributions(att).axes[0]
    parts, constants = ax.containers
    # Each module's part: its map's J_i x_i through the frozen final norm and W_U's column of "a".
    direction = modules.final_norm.matrix.T @ model.W_U.detach()[:, model.tokenizer.encode("a")[-1]].to(modules.final_norm.matrix)
    expected = [float(((modules[name].operators @ modules[name].inputs[..., None])[..., 0] @ direction).sum()) for name in att.per_component]
    assert [bar.get_height() for bar in parts] == pytest.approx(expected, abs=1e-10)
    assert [bar.get_height() for bar in constants] == pytest.approx([att.constant, att.unembed_bias], abs=1e-12)
    assert all(bar.get_hatch() for bar in constants)
    assert sum(bar.get_height() for bar in ax.patches) == pytest.approx(att.logit, abs=1e-10)
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == ["L0 resid_pre", "L0 attn_out", "L0 mlp_out", "L1 attn_out", "L1 mlp_out", "constant", "b_U"]
    with pytest.raises(InputError, match="takes an Attribution"):
        plot_component_contributions(modules["blocks.1.hook_resid_post"].logit_contributions("a"))


def test_expert_heatmap_is_each_experts_part_of_each_token(final):
    from tl_linmap.load.toy import toy_model
    from tl_linmap.methods.experts import expert_contributions

    split = expert_contributions(toy_model("qwen2_moe"), "The cat", 1)
    live = split.position + 1
    ax = plot_expert_contributions(split).axes[0]
    assert torch.allclose(torch.as_tensor(ax.images[0].get_array()), split.values[:, :live].norm(dim=-1))
    assert [t.get_text() for t in ax.get_yticklabels()] == [f"expert {e}" for e in split.experts]
    assert [t.get_text() for t in ax.get_xticklabels()] == [token_label(t) for t in split.str_tokens[:live]]
    with_rest = torch.as_tensor(plot_expert_contributions(split, rest=True).axes[0].images[0].get_array())
    assert with_rest.shape == (len(split.experts) + 1, live)
    assert torch.allclose(with_rest[-1], split.rest[:live].norm(dim=-1))
    with pytest.raises(InputError, match="takes an ExpertContributions"):
        plot_expert_contributions(final)


def test_plot_of_names_the_kinds_a_result_offers():
    assert plot_of(None, {"spectra": "plot_spectra", "decoded": "plot_decoded"}) is plot_spectra
    assert plot_of("decoded", {"spectra": "plot_spectra", "decoded": "plot_decoded"}) is plot_decoded
    with pytest.raises(InputError, match="kind must be one of 'spectra', 'decoded', got 'heat'"):
        plot_of("heat", {"spectra": "plot_spectra", "decoded": "plot_decoded"})
