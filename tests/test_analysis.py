"""Reading vectors and operators: SVD signs, token decoding, dimensionality measures."""

import math

import pytest
import torch

import tl_linmap
from tl_linmap.analysis import effective_rank, energy_rank, nearest_tokens, stable_rank, top_singular, top_tokens, unembed

from conftest import PROMPT


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
    full = top_singular(operator, operator.shape[0], output=lm.output)
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
