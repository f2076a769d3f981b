"""Linear readouts as targets: J, b and the split of a logit difference against the oracle and the model's own logits."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import PROMPT
from test_oracle import _NORM_EDIT_WARNING, oracle_hooks, target_oracle

import tl_linmap
from tl_linmap.linear import dense as jacobian
from tl_linmap.base.compat import get_act_name

A, B = 5, 7  # two vocabulary ids of the toy tokenizer


def own_logits(model, tokens):
    # The model's own logits in float64, norms on the frozen path (the oracle's hooks change no value).
    with warnings.catch_warnings(), model.hooks(fwd_hooks=oracle_hooks(model)), torch.no_grad():
        warnings.filterwarnings("ignore", message=_NORM_EDIT_WARNING)
        return model(tokens)[0]


def _logit_covector(model, coefficients=None):
    # Σ_k a_k (W_U[:, k], b_U[k]), written out here (default: the difference A - B).
    coefficients = coefficients or {A: 1.0, B: -1.0}
    w = sum(a * model.W_U.detach()[:, k] for k, a in coefficients.items())
    b_u = getattr(model, "b_U", None)
    return w, 0.0 if b_u is None else float(sum(a * b_u[k] for k, a in coefficients.items()))


@pytest.mark.parametrize("route", ["rows", "columns"])
def test_readout_maps_match_the_oracle(model, route):
    """A logit difference at the output and a direction in a middle layer: ``w J`` and ``w·b + c`` from the oracle."""
    tokens = model.to_tokens(PROMPT)
    position = tokens.shape[1] - 2
    hook = "blocks.0.hook_resid_post"
    v = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    diff, probe = tl_linmap.LogitDiff(A, B), tl_linmap.Direction(hook, v, label="probe")
    maps = tl_linmap.linear_maps(model, PROMPT, [diff, probe], position=position, route=route)
    assert list(maps) == [diff.name, "probe"]
    w, c = _logit_covector(model)
    for readout, target, covector, constant in ((diff, "ln_final.hook_out", w, c), (probe, hook, v, 0.0)):
        lm, oracle = maps[readout], target_oracle(model, tokens, target, position)
        assert lm.operators.shape == (tokens.shape[1], 1, model.cfg.d_model)
        expected = torch.einsum("d,pde->pe", covector, oracle.operators)
        assert float((lm.operators[:, 0] - expected).norm() / expected.norm()) < 1e-12
        scale = float(covector.norm() * oracle.output.norm())
        assert abs(float(lm.bias[0]) - float(covector @ oracle.bias + constant)) < 1e-12 * scale
        assert lm.relative_error() < 1e-12
    logits = own_logits(model, tokens)[position]
    assert float(maps[diff].output[0]) == pytest.approx(float(logits[A] - logits[B]), abs=1e-12 * float(logits.abs().max()))


def test_a_scalar_readout_costs_one_reverse_row(model, monkeypatch):
    rows = []
    real = jacobian.vjp
    monkeypatch.setattr(jacobian, "vjp", lambda y, x, r: rows.append(len(r)) or real(y, x, r))
    lm = tl_linmap.linear_map(model, PROMPT, target=tl_linmap.LogitDiff(A, B), route="rows")
    assert rows == [1] and lm.operators.shape[1] == 1


def test_token_attribution_of_a_logit_difference_sums_to_the_models(model):
    """Tokens x layers x modules x heads: every split adds up to the model's own logit difference."""
    maps = tl_linmap.layer_maps(model, PROMPT, modules=True)
    tokens = maps["blocks.0.hook_resid_pre"].tokens[None]
    logits = own_logits(model, tokens)[-1]
    att = tl_linmap.token_attribution(model, maps, tl_linmap.LogitDiff(A, B))
    scale = float(logits.abs().max())
    assert att.logit == pytest.approx(float(logits[A] - logits[B]), abs=1e-12 * scale)
    assert att.total() == pytest.approx(att.logit, abs=1e-12 * scale)
    assert float(sum(part.sum() for part in att.per_component.values())) + att.constant + att.unembed_bias == pytest.approx(att.logit, abs=1e-12 * scale)
    one, other = (tl_linmap.token_attribution(model, maps, t) for t in (A, B))
    assert torch.allclose(att.per_token, one.per_token - other.per_token, rtol=0, atol=1e-12 * scale)
    for layer in range(model.cfg.n_layers):
        heads = sum(att.per_head[(layer, h)] for h in range(model.cfg.n_heads))
        module = att.per_component[get_act_name("attn_out", layer)]
        assert torch.allclose(heads, module, rtol=0, atol=1e-12 * scale)


def test_logit_contributions_take_a_readout(model):
    lm = tl_linmap.linear_map(model, PROMPT, target="blocks.1.hook_resid_post")
    split = lm.logit_contributions(tl_linmap.LogitDiff(A, B))
    one, other = lm.logit_contributions(A), lm.logit_contributions(B)
    assert torch.allclose(split.per_token, one.per_token - other.per_token, rtol=0, atol=1e-12 * float(one.per_token.abs().max()))
    assert split.logit == pytest.approx(one.logit - other.logit, abs=1e-12 * abs(one.logit))
    assert split.total() == pytest.approx(split.logit, abs=1e-12 * abs(one.logit))


def test_a_combination_of_logits_matches_the_oracle(model):
    """Any ``{token: coefficient}`` combination at the output: ``w J``, ``w·b + c`` and the value from independent computations."""
    coefficients = {A: 2.0, B: -0.5, 3: 1.0}
    combination = tl_linmap.functionals.LogitCombination(coefficients)
    tokens = model.to_tokens(PROMPT)
    lm = tl_linmap.linear_map(model, PROMPT, target=combination)
    oracle = target_oracle(model, tokens, "ln_final.hook_out", tokens.shape[1] - 1)
    w, c = _logit_covector(model, coefficients)
    expected = torch.einsum("d,pde->pe", w, oracle.operators)
    assert float((lm.operators[:, 0] - expected).norm() / expected.norm()) < 1e-12
    assert abs(float(lm.bias[0]) - float(w @ oracle.bias + c)) < 1e-12 * float(w.norm() * oracle.output.norm())
    logits = own_logits(model, tokens)[-1]
    own = sum(a * float(logits[k]) for k, a in coefficients.items())
    assert float(lm.output[0]) == pytest.approx(own, abs=1e-12 * float(logits.abs().max()))
