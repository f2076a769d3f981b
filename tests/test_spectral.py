"""Reading vectors and operators: SVD signs, token decoding, dimensionality measures."""

import math

import numpy as np
import pytest
import torch
from conftest import PROMPT

import tl_linmap
from tl_linmap.reading.tokens import nearest_tokens, top_tokens, unembed
from tl_linmap.reading.spectral import effective_rank, energy_rank, stable_rank


def test_energy_rank_on_known_spectra():
    values = torch.tensor([3.0, 2.0, 1.0, 0.0])  # energies 9, 4, 1 of 14
    assert energy_rank(values, 0.5) == 1  # 9/14 = 0.64
    assert energy_rank(values, 0.9) == 2  # 13/14 = 0.93
    assert energy_rank(values, 0.99) == 3
    assert energy_rank(values.flip(0), 0.9) == 2  # order does not matter


def test_stable_and_effective_rank_on_known_spectra():
    flat = torch.ones(8)
    assert stable_rank(flat) == pytest.approx(8)
    assert effective_rank(flat) == pytest.approx(8)
    rank_one = torch.tensor([5.0, 0.0, 0.0])
    assert stable_rank(rank_one) == pytest.approx(1)
    assert effective_rank(rank_one) == pytest.approx(1)
    two = torch.tensor([3.0, 1.0])
    assert effective_rank(two) == pytest.approx(math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))))


def test_top_singular_reconstructs_and_is_signed_along_the_output(toy_models):
    lm = tl_linmap.linear_map(toy_models["llama"], PROMPT)
    operator = lm.operators[-1]
    with pytest.warns(DeprecationWarning, match="top_singular is deprecated"):
        full = tl_linmap.top_singular(operator, operator.shape[0], output=lm.output)
    rebuilt = full.left.T @ torch.diag(full.values) @ full.right
    assert torch.allclose(rebuilt, operator, atol=1e-12 * operator.abs().max())
    assert (full.left @ lm.output >= 0).all()
    assert torch.allclose(full.values, torch.linalg.svdvals(operator))


def test_unembed_matches_the_model_logits(toy_models):
    model = toy_models["gpt2"]  # has an unembedding bias
    lm = tl_linmap.linear_map(model, PROMPT)
    with torch.no_grad():
        logits = model(lm.tokens[None])[0, -1]
    assert torch.allclose(unembed(model, lm.output), logits, atol=1e-10 * logits.abs().max())
    assert top_tokens(model, lm.output, 1)[0][0] == model.tokenizer.decode([int(logits.argmax())])


def test_nearest_tokens_finds_a_token_from_its_own_embedding(toy_models):
    model = toy_models["llama"]
    token = model.to_tokens("Q", prepend_bos=False)[0, 0]
    best, cosine = nearest_tokens(model, model.W_E[token].detach(), 1)[0]
    assert best == "Q" and cosine == pytest.approx(1.0)


# --- SVD, decoding, dimensionality and logit splits of maps ---------------------------------

LAST = "blocks.1.hook_resid_post"  # the toys have two layers


@pytest.fixture(scope="module")
def llama_maps(toy_models):
    return tl_linmap.layer_maps(toy_models["llama"], PROMPT, layers=[0, 1])


def test_svd_values_match_independent_svdvals_and_pairs_point_along_the_output(toy_models):
    lm = tl_linmap.linear_map(toy_models["qwen3"], PROMPT, position=-3)
    svd = lm.svd(k=4)
    live = lm.operators[: lm.position + 1]
    assert svd.values.shape[0] == lm.position + 1  # tokens after the target have no operator
    assert torch.allclose(svd.values, torch.linalg.svdvals(live), rtol=1e-12, atol=0)
    # u_j = J v_j / σ_j: the pairs are singular pairs of the operator itself
    for i in (0, lm.position):
        assert torch.allclose(svd.right[i] @ live[i].T, svd.values[i, :4, None] * svd.left[i], atol=1e-10)
    assert (torch.einsum("pkd,d->pk", svd.left, lm.output) >= 0).all()


def test_stacked_svd_and_skip_first(toy_models):
    lm = tl_linmap.linear_map(toy_models["gpt2"], PROMPT)
    wide = torch.cat(list(lm.operators), dim=1)  # [J_0 ... J_n]
    assert torch.allclose(lm.svd().stacked.values, torch.linalg.svdvals(wide), rtol=1e-12, atol=0)
    without = lm.svd(k=2, skip_first=True).stacked
    assert torch.allclose(without.values, torch.linalg.svdvals(torch.cat(list(lm.operators[1:]), dim=1)), rtol=1e-12, atol=0)
    assert without.right.shape == (2, len(lm.tokens) - 1, lm.inputs.shape[1])
    assert (without.left @ lm.output >= 0).all()


def test_decode_reads_left_vectors_through_the_unembedding_and_right_ones_through_the_embeddings(toy_models):
    model = toy_models["llama"]
    lm = tl_linmap.linear_map(model, PROMPT)  # the final norm's output: read by W_U alone
    u, s, vh = torch.linalg.svd(lm.operators[-1])
    sign = torch.sign(u[:, 0] @ lm.output)
    logits = sign * u[:, 0] @ model.W_U.detach().double()
    embeddings = model.W_E.detach().double()
    cosines = (embeddings @ (sign * vh[0]) / (embeddings.norm(dim=-1) * vh[0].norm())).nan_to_num(-1.0)  # zero rows
    (row,) = lm.decode(k=1, top=3, sources=-1)
    assert row.source == len(lm.tokens) - 1 and row.index == 0 and row.sigma == pytest.approx(float(s[0]))
    assert [t for t, _ in row.left] == [model.tokenizer.decode([int(i)]) for i in logits.topk(3).indices]
    assert row.left[0][1] == pytest.approx(float(logits.max()))
    assert row.right[0][1] == pytest.approx(float(cosines.max()))
    assert row.share == pytest.approx(float(s[0] ** 2 / s.pow(2).sum()))


def test_readout_of_the_last_residual_stream_gives_the_models_logits(toy_models, family):
    # ln_final frozen at the target position is ln_final itself at that position.
    model = toy_models[family]
    lm = tl_linmap.linear_map(model, PROMPT, target=f"blocks.{model.cfg.n_layers - 1}.hook_resid_post")
    with torch.no_grad():
        logits = model(lm.tokens[None])[0, -1]
    assert torch.allclose(lm.readout.logits(lm.output, affine=True), logits, atol=1e-6 * logits.abs().max())


def test_decode_options_select_operators(llama_maps):
    lm = llama_maps[LAST]
    n = len(lm.tokens)
    rows = lm.decode(k=2, top=1)
    assert [r.source for r in rows] == [i for i in range(n) for _ in range(2)]
    assert {r.source for r in lm.decode(k=1, top=1, skip_first=True)} == set(range(1, n))
    stacked = [r for r in lm.decode(k=2, top=1, sources=[], stacked=True)]
    assert [r.source for r in stacked] == ["all", "all"]
    table = llama_maps.decode(k=1, top=2, sources=-1)
    assert [r.target for r in table] == [n for n in llama_maps]  # one row per residual map


def test_decode_refuses_vectors_outside_the_residual_stream(toy_models):
    lm = tl_linmap.linear_map(toy_models["llama"], PROMPT, target="blocks.0.attn.hook_z")
    with pytest.raises(tl_linmap.InputError, match="residual stream"):
        lm.decode(k=1)


def _numpy_ranks(operator):
    # Independent of tl_linmap.spectral: numpy's SVD and the definitions written out.
    s = np.linalg.svd(operator.numpy(), compute_uv=False)
    energy = np.cumsum(s**2) / np.sum(s**2)
    p = s / s.sum()
    p = p[p > 0]
    return dict(
        norm=float(np.sqrt(np.sum(s**2))), stable_rank=float(np.sum(s**2) / s[0] ** 2),
        effective_rank=float(np.exp(-np.sum(p * np.log(p)))),
        rank90=int(np.argmax(energy >= 0.9 - 1e-12)) + 1, rank99=int(np.argmax(energy >= 0.99 - 1e-12)) + 1,
    )


def test_dimensionality_rows_match_independent_ranks(llama_maps):
    lm = llama_maps[LAST]
    rows = lm.dimensionality()
    assert [r.source for r in rows] == list(range(len(lm.tokens))) + ["all"]
    for i in (0, 3, len(lm.tokens) - 1):
        expected = _numpy_ranks(lm.operators[i])
        assert {k: getattr(rows[i], k) for k in expected} == pytest.approx(expected, rel=1e-9)
    (summary,) = lm.dimensionality(skip_first=True, per_token=False)
    expected = _numpy_ranks(torch.cat(list(lm.operators[1:]), dim=1))
    assert {k: getattr(summary, k) for k in expected} == pytest.approx(expected, rel=1e-9)
    assert len(llama_maps.dimensionality(per_token=False)) == len(llama_maps)  # one row per map


@pytest.mark.parametrize("family_name", ["llama", "gpt2"])
def test_logit_split_sums_to_the_models_own_logit(toy_models, family_name):
    model = toy_models[family_name]  # gpt2: biases, learned positions, b_U
    lm = tl_linmap.linear_map(model, PROMPT)
    with torch.no_grad():
        logits = model(lm.tokens[None])[0, -1]
    token = int(logits.argmax())
    split = lm.logit_contributions(token)
    assert split.logit == pytest.approx(float(logits[token]), abs=1e-6)
    assert split.total() == pytest.approx(split.logit, abs=1e-10)
    assert torch.allclose(split.per_token, lm.contributions() @ model.W_U.detach().double()[:, token])
    forward = tl_linmap.token_contributions(model, PROMPT).logit_contributions(token)  # the forward route too
    assert torch.allclose(forward.per_token, split.per_token, atol=1e-10)


def test_logit_split_of_an_intermediate_layer_is_the_exact_logit_lens(llama_maps, toy_models):
    """The logit lens of layer 0, with ln_final's scale frozen at the final residual's RMS, written out by hand."""
    model = toy_models["llama"]
    lm = llama_maps["blocks.0.hook_resid_post"]
    split = lm.logit_contributions(7)
    _, cache = model.run_with_cache(lm.tokens[None])
    final = cache[LAST][0, -1]
    norm = model.original_model.model.norm
    scale = torch.sqrt(final.pow(2).mean() + norm.variance_epsilon)
    expected = (norm.weight * lm.output / scale) @ model.W_U[:, 7]
    assert split.logit == pytest.approx(float(expected), rel=1e-6)  # the plain forward's norm runs in float32
    assert split.total() == pytest.approx(split.logit, abs=1e-10)


def test_decode_gives_a_zero_operator_no_share(toy_models):
    # blocks.0.hook_resid_pre at the last position reads only the last token: every other operator is zero.
    maps = tl_linmap.layer_maps(toy_models["llama"], PROMPT, layers=[0], modules=True)
    rows = maps.decode(targets=["blocks.0.hook_resid_pre"])
    zero = maps["blocks.0.hook_resid_pre"].operators.flatten(1).norm(dim=1) == 0
    assert zero[:-1].all() and not zero[-1]
    for row in rows:
        assert (row.share is None) == bool(zero[row.source]), row
        assert row.share is None or 0 < row.share <= 1 + 1e-12
