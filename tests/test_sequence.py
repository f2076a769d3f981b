"""Whole-sequence attributions against an independent Jacobian of every position, and the model's own logits."""

from __future__ import annotations

import matplotlib
import pytest
import torch
from conftest import PROMPT
from test_functionals import own_logits
from test_oracle import _embeddings, _frozen_run

import tl_linmap

matplotlib.use("Agg")
A, B = 5, 7


def _every_contribution(model, tokens, target, source="hook_embed"):
    """``C[t, i] = J_{t,i} x_i`` for every target and source position, and ``y_t``, by autograd under the oracle's hooks."""
    x = _embeddings(model, tokens, source)
    f = lambda s: _frozen_run(model, tokens, s, target, source=source).flatten(1)
    with torch.enable_grad():
        jac = torch.autograd.functional.jacobian(f, x, vectorize=True)  # (t, d_out, i, d_in)
    return torch.einsum("toid,id->tio", jac, x), f(x).detach()


@pytest.mark.parametrize("family", ["gpt2", "gemma3", "llama"])
def test_contribution_norms_at_every_position_match_the_oracle(toy_models, family):
    model = toy_models[family]
    att = tl_linmap.sequence_attribution(model, PROMPT, tokens_per_pass=5)  # several windows
    tokens = att.tokens[None]
    contributions, outputs = _every_contribution(model, tokens, "ln_final.hook_out")
    norms = contributions.norm(dim=-1)
    assert att.kind == "norm" and att.positions == list(range(tokens.shape[1]))
    assert float((att.values - norms).norm() / norms.norm()) < 1e-12
    assert torch.equal(att.values.triu(1), torch.zeros_like(att.values))  # causal: nothing from later tokens
    assert torch.allclose(att.output, outputs.norm(dim=-1), rtol=1e-12, atol=0)
    assert att.relative_error < 1e-12


@pytest.mark.parametrize("family", ["gpt2", "qwen2", "gemma3"])
def test_a_logit_difference_at_every_position(toy_models, family):
    """Shares ``w · J_{t,i} x_i`` from the oracle; each row plus its constant is the model's own logit difference there."""
    model = toy_models[family]
    att = tl_linmap.sequence_attribution(model, PROMPT, target=tl_linmap.LogitDiff(A, B))
    tokens = att.tokens[None]
    contributions, _ = _every_contribution(model, tokens, "ln_final.hook_out")
    w = model.W_U.detach()[:, A] - model.W_U.detach()[:, B]
    expected = contributions @ w
    assert float((att.values - expected).norm() / expected.norm()) < 1e-12
    logits = own_logits(model, tokens)
    scale = float(logits.abs().max())
    assert torch.allclose(att.output, logits[:, A] - logits[:, B], rtol=0, atol=1e-12 * scale)
    assert torch.allclose(att.total(), att.output, rtol=0, atol=1e-12 * scale)


def test_from_a_middle_layer_at_every_position(toy_models):
    model, source = toy_models["gpt2"], "blocks.1.hook_resid_pre"
    att = tl_linmap.sequence_attribution(model, PROMPT, target="blocks.1.hook_resid_post", source=source, last=-4)
    contributions, _ = _every_contribution(model, att.tokens[None], "blocks.1.hook_resid_post", source)
    norms = contributions.norm(dim=-1)[: len(att.positions)]
    assert att.source == source and len(att.positions) == att.tokens.shape[0] - 3
    assert float((att.values - norms).norm() / norms.norm()) < 1e-12


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_generated_tokens_are_split_exactly(toy_models, family):
    """Each generated token is the model's argmax there, and its row adds up to the model's own logit of it."""
    model = toy_models[family]
    att = tl_linmap.generation_attribution(model, PROMPT, 4)
    prompt = model.to_tokens(PROMPT)[0]
    n = len(prompt)
    assert torch.equal(att.tokens[:n], prompt) and att.positions == list(range(n - 1, n + 3))
    logits = own_logits(model, att.tokens[None])
    generated = [*att.tokens[n:].tolist(), None]
    for r, position in enumerate(att.positions):
        token = int(logits[position].argmax())
        assert generated[r] in (token, None) and att.predicted[r] == model.tokenizer.decode([token])
        assert float(att.output[r]) == pytest.approx(float(logits[position, token]), abs=1e-12 * float(logits.abs().max()))
    assert torch.allclose(att.total(), att.output, rtol=0, atol=1e-12 * float(logits.abs().max()))
    contributions, _ = _every_contribution(model, att.tokens[None], "ln_final.hook_out")
    ids = [int(logits[p].argmax()) for p in att.positions]
    expected = torch.stack([contributions[p] @ model.W_U.detach()[:, t] for p, t in zip(att.positions, ids)])
    assert float((att.values - expected).norm() / expected.norm()) < 1e-12


def test_table_and_plot(toy_models):
    model = toy_models["llama"]
    att = tl_linmap.sequence_attribution(model, "The cat sat", target=tl_linmap.Logit(A))
    table = att.table(top=2)
    assert [row.position for row in table] == att.positions and all(len(row.top) <= 2 for row in table)
    assert "SequenceAttribution(shares of logit(5)" in repr(att)
    fig = att.plot(skip_first=True)
    shown = fig.axes[0].images[0].get_array()
    assert shown.shape == (len(att.positions), len(att.positions) - 1)
    norms = tl_linmap.sequence_attribution(model, "The cat sat")
    with pytest.raises(tl_linmap.InputError, match="do not add up"):
        norms.total()
    assert tl_linmap.plot_sequence_attribution(norms).axes
