"""Matrix-free routes agree with the dense Jacobian route (correctness, not speed)."""

from types import SimpleNamespace

import pytest
import torch
from conftest import PROMPT

import tl_linmap
from tl_linmap.base.budget import WINDOW_ROWS
from tl_linmap.base.guard import hook_count
from tl_linmap.linear.matrix_free import matrix_free, token_contributions


@pytest.fixture
def dense(model):
    return tl_linmap.linear_map(model, PROMPT, position=-3)


@pytest.mark.parametrize("chunk_size", [None, 3])  # 3: passes on windows of the prompt
def test_forward_contributions_equal_the_jacobian_route(model, dense, chunk_size):
    fast = token_contributions(model, PROMPT, position=-3, tokens_per_pass=chunk_size)
    scale = dense.output.norm()
    assert (fast.contributions() - dense.contributions()).norm() < 1e-12 * scale
    assert fast.relative_error() < 1e-12
    assert fast.contributions()[-2:].abs().max() == 0  # tokens after the target position
    assert (fast.bias - dense.bias).norm() <= 1e-12 * (scale + dense.bias.norm()) and torch.equal(fast.output, dense.output)


def test_the_bias_rides_along_the_first_push(toy_models):
    """Plain and frozen forwards, then one push per window; each window's b is its push's extra all-zero row."""
    model = toy_models["gpt2"]  # biases and learned positions: b is far from zero
    batches = []
    with model.hooks(fwd_hooks=[("hook_embed", lambda act, hook=None: batches.append(len(act)))]):
        fast = token_contributions(model, PROMPT)
    n = len(fast.tokens)
    assert n == WINDOW_ROWS + 1  # two windows: tokens 0..31, then token 32 alone
    assert batches == [1, 1, WINDOW_ROWS + 1, 1 + 1]
    dense = tl_linmap.linear_map(model, PROMPT)
    assert (fast.bias - dense.bias).norm() < 1e-12 * dense.bias.norm() and dense.bias.norm() > 0.1 * dense.output.norm()
    assert fast.relative_error() < 1e-12


def test_contributions_in_chunks_of_one_token(toy_models):
    model = toy_models["gpt2"]
    whole = token_contributions(model, PROMPT)
    one_by_one = token_contributions(model, PROMPT, tokens_per_pass=1)
    assert torch.allclose(whole.contributions(), one_by_one.contributions(), rtol=0, atol=1e-13 * whole.output.norm())


def test_matvec_and_rmatvec_apply_the_operator(model, dense):
    with matrix_free(model, PROMPT, position=-3) as mf:
        op = mf.operator(4)
        v = torch.randn(3, model.cfg.d_model, dtype=torch.float64)
        u = torch.randn(3, dense.output.shape[0], dtype=torch.float64)
        jv, jtu = op.matvec(v), op.rmatvec(u)
    scale = dense.operators[4].abs().max() * 10
    assert torch.allclose(jv, v @ dense.operators[4].T, rtol=0, atol=1e-12 * scale)
    assert torch.allclose(jtu, u @ dense.operators[4], rtol=0, atol=1e-12 * scale)
    assert hook_count(model) == 0


@pytest.mark.parametrize("token", [0, 3, -3])
def test_randomized_svd_matches_the_dense_svd(model, dense, token):
    with matrix_free(model, PROMPT, position=-3) as mf:
        svd = mf.svd(token, k=6)
    assert svd.tokens == [token % len(dense.tokens)]
    top = SimpleNamespace(values=svd.values[0], left=svd.left[0], right=svd.right[0])
    u, s, vh = torch.linalg.svd(dense.operators[token])
    assert torch.allclose(top.values, s[:6], rtol=1e-8, atol=0)
    well_separated = (s[:6] - s[1:7]).abs() > 1e-3 * s[0]
    alignment = (top.left @ u[:, :6]).diagonal().abs()
    assert (alignment[well_separated] > 1 - 1e-6).all()
    assert (top.left @ dense.output >= 0).all()  # signed along the output
    op = dense.operators[token]  # each triplet is a singular triplet: J v = σ u and J^T u = σ v
    assert torch.allclose(top.right @ op.T, top.values[:, None] * top.left, atol=1e-6 * s[0])
    assert torch.allclose(top.left @ op, top.values[:, None] * top.right, atol=1e-6 * s[0])


def test_randomized_svd_warns_when_it_stops_early(toy_models):
    with matrix_free(toy_models["gpt2"], PROMPT) as mf, pytest.warns(UserWarning, match="stopped after 30 directions"):
        mf.svd(-1, k=6, max_iter=2)


def test_operator_after_the_target_position_is_refused(toy_models):
    from tl_linmap.base.errors import InputError

    with matrix_free(toy_models["llama"], PROMPT, position=3) as mf, pytest.raises(InputError, match="after the target position"):
        mf.operator(5)


def test_a_matrix_free_svd_decodes_like_a_dense_one(toy_models):
    """One SVD type: the matrix-free top pairs read as the same tokens as the dense route's."""
    model = toy_models["llama"]
    dense = tl_linmap.linear_map(model, PROMPT).decode(k=2, top=3, sources=-3)
    with matrix_free(model, PROMPT) as mf:
        free = mf.svd(-3, k=2).decode(k=2, top=3)
    assert [(r.source, r.index, [t for t, _ in r.left], [t for t, _ in r.right]) for r in free] == [
        (r.source, r.index, [t for t, _ in r.left], [t for t, _ in r.right]) for r in dense
    ]
    assert all(abs(a.sigma - b.sigma) < 1e-8 * b.sigma for a, b in zip(free, dense))
    assert all(r.share is None for r in free)  # only the top values are known


def test_matrix_free_probe_catches_a_freeze_without_effect(toy_models, monkeypatch):
    """The probe at the start of matrix_free fails when a factor stays live (here: no pattern is frozen)."""
    from tl_linmap.freeze import hooks
    from tl_linmap.base.errors import FreezeError

    real = hooks._replace_fn
    monkeypatch.setattr(hooks, "_replace_fn", lambda factor: (lambda act, hook=None: None) if factor.ndim == 4 else real(factor))
    with pytest.raises(FreezeError, match="misses the model's output"):
        with matrix_free(toy_models["llama"], PROMPT):
            pass


def test_contributions_are_checked(toy_models, monkeypatch):
    from tl_linmap.freeze import hooks
    from tl_linmap.base.errors import FreezeError

    real = hooks._replace_fn
    monkeypatch.setattr(hooks, "_replace_fn", lambda factor: (lambda act, hook=None: None) if factor.ndim == 4 else real(factor))
    with pytest.raises(FreezeError, match="misses the model's output"):
        token_contributions(toy_models["llama"], PROMPT)
    assert token_contributions(toy_models["llama"], PROMPT, check=False).relative_error() > 1e-6


@pytest.mark.parametrize("family", ["gpt2", "gemma3", "llama"])
def test_push_forward_carries_a_middle_layers_singular_vectors_to_the_output(toy_models, family):
    """``J_i u`` for the top singular vectors of an earlier layer's operator, against the oracle's J from that layer."""
    from test_oracle import target_oracle

    model, source, at = toy_models[family], "blocks.0.hook_resid_post", 5
    middle = tl_linmap.linear_map(model, PROMPT, target=source, position=at)
    u = middle.svd(k=3).left[at]  # (3, d_model): the top left singular vectors of J_at, at position `at`
    pushed = tl_linmap.push_forward(model, PROMPT, u, source=source, source_position=at)
    oracle = target_oracle(model, middle.tokens[None], "ln_final.hook_out", middle.tokens.shape[0] - 1, source)
    expected = u @ oracle.operators[at].T
    assert float((pushed.values - expected).norm() / expected.norm()) < 1e-12
    assert pushed.source == source and pushed.source_position == at
    assert len(pushed.top_tokens(4)) == 3 and len(pushed.top_tokens(4)[0]) == 4
