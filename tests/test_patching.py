"""Detached attribution patching against independent computations.

Every oracle here is written in this file: the freeze hooks come from `tests/test_oracle.py`'s
own table (none of tl_linmap's hooks or rules), each patch is a hook of this file, and
derivatives are taken by autograd with respect to a scalar ``eps`` scaling one patch, one
cell at a time (tl_linmap differentiates once with respect to every activation instead).

- the detached prediction of a patch is ``d metric / d eps`` of the model under the oracle's
  freeze hooks with ``a_clean + eps · (a_corrupted − a_clean)`` at the patched cell;
- it is the *exact* effect of the patch on the clean run's frozen system: a forward with every
  factor replaced by the clean run's (recorded and substituted here) and the corrupted
  activation patched in, any patch at one hook point (every position of ``resid_pre`` 0, a
  head at all positions);
- gradient mode is the same derivative with nothing frozen;
- the layouts have the shapes of ``transformer_lens.patching``'s functions, and on the bundled
  SmolLM2 the predictions are compared with those functions' true patching (slow).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
from test_oracle import ORACLE_FREEZES, oracle_hooks
from torch import Tensor

import tl_linmap
from tl_linmap.base.compat import get_act_name
from tl_linmap.load.datasets import prompt_pairs
from tl_linmap.results.patching import LAYOUTS, correlation
from tl_linmap.methods.patching import attribution_patching
from tl_linmap.load.toy import toy_model

FAMILIES = ["llama", "gpt2", "gemma3"]
CLEAN, CORRUPTED = "The cat sat on the mat", "The dog sat in the hat"  # equal lengths (one token per byte)
ANSWER, WRONG = "a", "b"
_NORM_EDIT_WARNING = "A forward hook edited hook_scale"


@pytest.fixture(scope="module")
def toys():
    return {family: toy_model(family, dtype=torch.float64) for family in FAMILIES}


def _ids(model) -> tuple[int, int]:
    return tuple(int(model.to_tokens(t, prepend_bos=False)[0, 0]) for t in (ANSWER, WRONG))


def _metric(model, logits: Tensor) -> Tensor:
    a, b = _ids(model)
    return logits[0, -1, a] - logits[0, -1, b]


def _forward(model, tokens: Tensor, hooks: list) -> Tensor:
    with warnings.catch_warnings(), model.hooks(fwd_hooks=hooks):
        warnings.filterwarnings("ignore", message=_NORM_EDIT_WARNING)
        return model(tokens)


def _same_path(model) -> list:
    # Every norm scale replaced by a copy of itself: the bridge's own float64 norm path, all live.
    freeze = ORACLE_FREEZES[model.cfg.architecture]
    names = ["ln_final.hook_scale"] + [get_act_name("scale", layer, norm) for layer in range(model.cfg.n_layers) for norm in freeze.norms]
    return [(name, lambda act, hook=None: act.clone()) for name in names]


def _activations(model, tokens: Tensor, names: list[str]) -> dict[str, Tensor]:
    seen = {}

    def grab(name):
        def hook(act, hook=None):
            seen[name] = act.detach().clone()

        return hook

    _forward(model, tokens, _same_path(model) + [(name, grab(name)) for name in names])
    return seen


def _cell_patch(name: str, index: tuple, delta: Tensor, eps: Tensor) -> tuple[str, Callable]:
    # act[:, *index] += eps * delta[*index]: index picks positions (and heads) of the patch.
    def hook(act, hook=None):
        mask = torch.zeros_like(act)
        mask[(slice(None), *index)] = 1
        return act + eps * mask * delta

    return name, hook


def _directional(model, tokens, name, index, delta, freeze: bool) -> float:
    # d metric / d eps at eps = 0: the linear prediction of patching that cell, by autograd.
    eps = torch.zeros((), dtype=torch.float64, requires_grad=True)
    hooks = (oracle_hooks(model) if freeze else _same_path(model)) + [_cell_patch(name, index, delta, eps)]
    with torch.enable_grad():
        metric = _metric(model, _forward(model, tokens, hooks))
        return torch.autograd.grad(metric, eps, allow_unused=True)[0].item() if metric.requires_grad else 0.0


# Cells checked per layout: (layout, act, cells as (layer, index into the activation after the batch axis)).
def _cells(model, n: int) -> list[tuple[str, str, int, tuple, tuple]]:
    # Returns (layout, act, layer, index into the activation, index into the result).
    L, H = model.cfg.n_layers, model.cfg.n_heads
    cells = []
    for layout in ("resid_pre", "attn_out", "mlp_out"):
        cells += [(layout, layout, layer, (pos,), (layer, pos)) for layer in range(L) for pos in range(n)]
    cells += [("attn_head_out_all_pos", "z", layer, (slice(None), h), (layer, h)) for layer in range(L) for h in range(H)]
    cells += [("attn_head_out_by_pos", "z", L - 1, (pos, 1), (L - 1, pos, 1)) for pos in range(n)]
    cells += [("attn_head_v_by_pos", "v", 0, (pos, 0), (0, pos, 0)) for pos in range(n)]
    cells += [("block_every", "mlp_out", 0, (n - 1,), (2, 0, n - 1))]
    return cells


def _gap(predicted: Tensor, oracle: Tensor) -> float:
    return ((predicted - oracle).abs().max() / oracle.abs().max()).item()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["detached", "gradient"])
def test_every_cell_matches_the_directional_derivative(toys, family, mode):
    model = toys[family]
    result = attribution_patching(model, CLEAN, CORRUPTED, (ANSWER, WRONG), mode=mode)
    tokens, corrupted = model.to_tokens(CLEAN), model.to_tokens(CORRUPTED)
    n = tokens.shape[1]
    cells = _cells(model, n)
    names = sorted({get_act_name(act, layer) for _, act, layer, _, _ in cells})
    clean_acts, corrupted_acts = _activations(model, tokens, names), _activations(model, corrupted, names)
    predicted, oracle = [], []
    for layout, act, layer, index, cell in cells:
        name = get_act_name(act, layer)
        delta = corrupted_acts[name] - clean_acts[name]
        oracle.append(_directional(model, tokens, name, index, delta, freeze=mode == "detached"))
        predicted.append(result[layout][cell].item())
    predicted, oracle = torch.tensor(predicted, dtype=torch.float64), torch.tensor(oracle, dtype=torch.float64)
    assert oracle.abs().max() > 1e-6  # the patches move the metric: the check is not of zeros
    assert _gap(predicted, oracle) < 1e-12


@pytest.mark.parametrize("family", FAMILIES)
def test_queries_and_keys_are_predicted_to_do_nothing_only_when_detached(toys, family):
    # The frozen system holds the attention pattern fixed, and q and k reach the metric only through it.
    model = toys[family]
    detached = attribution_patching(model, CLEAN, CORRUPTED, (ANSWER, WRONG), layouts=["attn_head_q_by_pos", "attn_head_k_all_pos"])
    gradient = attribution_patching(model, CLEAN, CORRUPTED, (ANSWER, WRONG), layouts=["attn_head_q_by_pos", "attn_head_k_all_pos"], mode="gradient")
    for layout in detached.values:
        assert not detached[layout].any()
        assert gradient[layout].any()  # small on random weights, but there


def _factor_hooks(model, record: dict, replay: bool) -> list:
    # The oracle's factors (its ORACLE_FREEZES table), recorded from a run or substituted into one.
    freeze = ORACLE_FREEZES[model.cfg.architecture]
    names = ["ln_final.hook_scale"]
    for layer in range(model.cfg.n_layers):
        names += [get_act_name("scale", layer, norm) for norm in freeze.norms] + [get_act_name("pattern", layer)]
        names += [get_act_name("pre", layer)] if freeze.gated else []

    def substitute(name):
        def hook(act, hook=None):
            if replay:
                return record[name]
            record[name] = act.detach().clone()
            return record[name]  # a new tensor at hook_scale: the bridge's float64 norm path

        return hook

    hooks = [(name, substitute(name)) for name in names]
    if not freeze.gated:
        for layer in range(model.cfg.n_layers):
            hooks += _ratio_hooks(record, layer, replay)
    return hooks


def _ratio_hooks(record: dict, layer: int, replay: bool) -> list:
    pre_name, post_name = get_act_name("pre", layer), get_act_name("post", layer)
    live = {}

    def keep(pre, hook=None):
        live["pre"] = pre

    def post(act, hook=None):
        pre = live.pop("pre")
        if not replay:
            record[post_name] = (act / pre).detach()
        return pre * record[post_name]

    return [(pre_name, keep), (post_name, post)]


def _patch_hook(name: str, index: tuple, source: Tensor) -> tuple[str, Callable]:
    def hook(act, hook=None):
        act = act.clone()
        act[(slice(None), *index)] = source[(slice(None), *index)]
        return act

    return name, hook


@pytest.mark.parametrize("family", FAMILIES)
def test_the_prediction_is_the_patch_of_the_frozen_clean_system(toys, family):
    """Patching the clean run with its factors held at their clean values moves the metric by exactly J·Δa."""
    model = toys[family]
    tokens, corrupted = model.to_tokens(CLEAN), model.to_tokens(CORRUPTED)
    n, L = tokens.shape[1], model.cfg.n_layers
    result = attribution_patching(model, CLEAN, CORRUPTED, (ANSWER, WRONG), layouts=["resid_pre", "mlp_out", "attn_head_out_all_pos"])
    factors: dict = {}
    baseline = _metric(model, _forward(model, tokens, _factor_hooks(model, factors, replay=False))).item()
    replayed = _metric(model, _forward(model, tokens, _factor_hooks(model, factors, replay=True))).item()
    assert replayed == baseline

    patches = [  # (act, layer, index into the activation, predicted)
        ("resid_pre", 0, (slice(None),), result["resid_pre"][0].sum()),  # the whole stream at layer 0
        ("resid_pre", L - 1, (slice(None),), result["resid_pre"][L - 1].sum()),
        ("resid_pre", 1, (n - 3,), result["resid_pre"][1, n - 3]),
        ("mlp_out", 0, (slice(2, n),), result["mlp_out"][0, 2:].sum()),
        ("z", 1, (slice(None), 2), result["attn_head_out_all_pos"][1, 2]),
    ]
    sources = _activations(model, corrupted, sorted({get_act_name(act, layer) for act, layer, _, _ in patches}))
    exact, predicted = [], []
    for act, layer, index, prediction in patches:
        name = get_act_name(act, layer)
        hooks = _factor_hooks(model, factors, replay=True) + [_patch_hook(name, index, sources[name])]
        exact.append(_metric(model, _forward(model, tokens, hooks)).item() - baseline)
        predicted.append(prediction.item())
    exact, predicted = torch.tensor(exact, dtype=torch.float64), torch.tensor(predicted, dtype=torch.float64)
    assert exact.abs().min() > 1e-6
    assert _gap(predicted, exact) < 1e-12
    assert result.clean_metric == pytest.approx(baseline, abs=1e-12)


@pytest.mark.parametrize("family", FAMILIES)
def test_metrics_are_the_runs_own(toys, family):
    model = toys[family]
    result = attribution_patching(model, CLEAN, CORRUPTED, (ANSWER, WRONG), layouts=["resid_pre"])
    for tokens, value in ((CLEAN, result.clean_metric), (CORRUPTED, result.corrupted_metric)):
        assert value == pytest.approx(_metric(model, _forward(model, model.to_tokens(tokens), _same_path(model))).item(), abs=1e-12)


def test_a_dict_metric_is_its_linear_combination(toys):
    model = toys["llama"]
    a, b = _ids(model)
    pair = attribution_patching(model, CLEAN, CORRUPTED, (ANSWER, WRONG), layouts=["resid_pre"])
    combined = attribution_patching(model, CLEAN, CORRUPTED, {ANSWER: 2.0, WRONG: -2.0, "c": 0.5}, layouts=["resid_pre"])
    single = attribution_patching(model, CLEAN, CORRUPTED, {"c": 1}, layouts=["resid_pre"])
    expected = 2 * pair["resid_pre"] + 0.5 * single["resid_pre"]
    assert _gap(combined["resid_pre"], expected) < 1e-12
    assert str(pair.metric) == "logit('a') - logit('b')" and (a, b) == pair.metric.tokens


def test_the_readouts_of_functionals_are_the_metrics(toys):
    # One definition of a logit metric: the short forms are LogitDiff and LogitCombination.
    model = toys["llama"]
    short = attribution_patching(model, CLEAN, CORRUPTED, (ANSWER, WRONG), layouts=["resid_pre"])
    readout = attribution_patching(model, CLEAN, CORRUPTED, tl_linmap.LogitDiff(ANSWER, WRONG), layouts=["resid_pre"])
    combination = attribution_patching(model, CLEAN, CORRUPTED, {ANSWER: 1.0, WRONG: -1.0}, layouts=["resid_pre"])
    assert isinstance(short.metric.readout, tl_linmap.LogitDiff)
    assert torch.equal(short["resid_pre"], readout["resid_pre"]) and torch.equal(short["resid_pre"], combination["resid_pre"])
    one = attribution_patching(model, CLEAN, CORRUPTED, tl_linmap.Logit(ANSWER), layouts=["resid_pre"])
    other = attribution_patching(model, CLEAN, CORRUPTED, tl_linmap.Logit(WRONG), layouts=["resid_pre"])
    assert _gap(one["resid_pre"] - other["resid_pre"], short["resid_pre"]) < 1e-12


def test_layouts_have_transformer_lens_shapes(toys):
    import transformer_lens.patching as tl_patching

    model = toys["llama"]  # grouped-query attention: k and v have fewer heads
    tokens, corrupted = model.to_tokens(CLEAN)[:, :4], model.to_tokens(CORRUPTED)[:, :4]
    result = attribution_patching(model, tokens, corrupted, (ANSWER, WRONG))
    _, cache = model.run_with_cache(corrupted)
    for name, layout in LAYOUTS.items():
        expected = getattr(tl_patching, layout.function)(model, tokens, cache, result.metric)
        assert result[name].shape == expected.shape, name


@pytest.mark.parametrize("family", FAMILIES)
def test_positions_before_the_first_difference_predict_nothing(toys, family):
    # Causal attention: those activations are the same in both runs, so every prediction there is 0.
    model = toys[family]
    result = attribution_patching(model, CLEAN, CORRUPTED, (ANSWER, WRONG), layouts=["block_every", "attn_head_out_by_pos"])
    tokens, corrupted = model.to_tokens(CLEAN)[0], model.to_tokens(CORRUPTED)[0]
    first = int((tokens != corrupted).nonzero()[0])
    assert first > 0
    assert not result["block_every"][..., :first].any() and result["block_every"][..., first:].any()
    assert not result["attn_head_out_by_pos"][:, :first].any()


def test_the_model_comes_back_untouched(toys):
    model = toys["gemma3"]
    before = {name: p.detach().clone() for name, p in model.state_dict().items()}
    attribution_patching(model, CLEAN, CORRUPTED, (ANSWER, WRONG), dtype=torch.float32)
    attribution_patching(model, CLEAN, CORRUPTED, (ANSWER, WRONG), mode="gradient")
    after = model.state_dict()
    assert all(torch.equal(after[name], value) and after[name].dtype == value.dtype for name, value in before.items())
    assert tl_linmap.guard.hook_count(model) == 0


def test_compare_reads_transformer_lens_results(toys):
    model = toys["llama"]
    result = attribution_patching(model, CLEAN, CORRUPTED, (ANSWER, WRONG), layouts=["resid_pre"])
    truth = result.patched("resid_pre") + torch.linspace(0, 1, result["resid_pre"].numel()).reshape(result["resid_pre"].shape)
    row = result.compare("resid_pre", truth)
    miss = truth - result.clean_metric - result["resid_pre"]
    assert row.relative_error == pytest.approx((miss.norm() / (truth - result.clean_metric).norm()).item())
    assert row.worst_cell == (model.cfg.n_layers - 1, result["resid_pre"].shape[1] - 1)
    assert row.correlation == pytest.approx(correlation(result["resid_pre"], truth))
    assert result.compare("resid_pre", result.patched("resid_pre")).relative_error == pytest.approx(0, abs=1e-15)
    assert len(result.compare_all({"resid_pre": truth})) == 1


def test_correlation_is_pearson():
    a = torch.tensor([1.0, 2.0, 3.0, 5.0], dtype=torch.float64)
    b = torch.tensor([2.0, 1.0, 4.0, 4.0], dtype=torch.float64)
    expected = torch.corrcoef(torch.stack([a, b]))[0, 1].item()
    assert correlation(a, b) == pytest.approx(expected, abs=1e-12)
    assert correlation(a, torch.ones(4)) != correlation(a, torch.ones(4))  # nan for a constant


def test_plot_draws_every_layout(toys, tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    result = attribution_patching(toys["llama"], CLEAN, CORRUPTED, (ANSWER, WRONG))
    for layout in LAYOUTS:
        fig = result.plot(layout)
        image = fig.axes[0].images[0].get_array()
        assert image.size == result[layout].numel(), layout
        matplotlib.pyplot.close(fig)


def test_bundled_pairs_are_complete():
    pairs = prompt_pairs()
    assert len(pairs) >= 4 and len({p.name for p in pairs}) == len(pairs)
    assert all(p.clean != p.corrupted and p.answer != p.wrong for p in pairs)


# --- the bundled model against transformer_lens.patching (true activation patching) ---

SLOW_LAYOUTS = ["resid_pre", "attn_out", "mlp_out", "attn_head_out_all_pos"]


@pytest.fixture(scope="module")
def smollm2():
    return tl_linmap.load_model("smollm2")


@pytest.mark.slow
def test_bundled_pairs_have_equal_lengths_and_one_token_answers(smollm2):
    for pair in prompt_pairs():
        assert smollm2.to_tokens(pair.clean).shape == smollm2.to_tokens(pair.corrupted).shape, pair.name
        for token in pair.metric:
            assert smollm2.to_tokens(token, prepend_bos=False).shape[1] == 1, (pair.name, token)
        with torch.no_grad():
            assert smollm2.tokenizer.decode(smollm2(pair.clean)[0, -1].argmax()) == pair.answer, pair.name
            assert smollm2.tokenizer.decode(smollm2(pair.corrupted)[0, -1].argmax()) == pair.wrong, pair.name


def true_patching(model, pair, layouts) -> tuple[dict[str, Tensor], float]:
    """Noising by ``transformer_lens.patching``: the clean run with the corrupted run's activations.

    Args:
        model: The model.
        pair: A `tl_linmap.datasets.PromptPair`.
        layouts: Layout names.

    Returns:
        The metric of each patched run per layout, and the unpatched clean run's metric.
    """
    import transformer_lens.patching as tl_patching

    metric = tl_linmap.patching.logit_metric(model, pair.metric)
    clean, corrupted = model.to_tokens(pair.clean), model.to_tokens(pair.corrupted)
    with torch.no_grad():
        _, cache = model.run_with_cache(corrupted)
        baseline = metric(model(clean)).item()
        # The roles swapped: transformer_lens patches its clean_cache into its corrupted_tokens' run.
        return {layout: getattr(tl_patching, LAYOUTS[layout].function)(model, clean, cache, metric) for layout in layouts}, baseline


@pytest.mark.slow
def test_bundled_model_against_transformer_lens_patching(smollm2):
    pair = prompt_pairs()[0]  # France -> Italy
    truth, baseline = true_patching(smollm2, pair, SLOW_LAYOUTS)
    results = {mode: attribution_patching(smollm2, pair.clean, pair.corrupted, pair.metric, layouts=SLOW_LAYOUTS, mode=mode) for mode in ("detached", "gradient")}
    rows = [results[mode].compare(layout, truth[layout], baseline=baseline) for layout in SLOW_LAYOUTS for mode in results]
    print()
    print(tl_linmap.Table(rows))
    detached = results["detached"]
    # The clean metric is the model's own (up to its float32 norms against the float64 run).
    assert detached.clean_metric == pytest.approx(baseline, abs=1e-3)
    # Where a patch cannot reach the last position (the last block's outputs at earlier positions)
    # both the prediction and true patching are exactly zero.
    last = smollm2.cfg.n_layers - 1
    for layout in ("attn_out", "mlp_out"):
        assert not detached[layout][last, :-1].any()
        assert not (truth[layout][last, :-1] - baseline).any()
    # Correlations are reported above; measured 0.79-0.97 (detached) on this pair: assert only sanity.
    assert all(row.correlation > 0.5 for row in rows if row.mode == "detached")
