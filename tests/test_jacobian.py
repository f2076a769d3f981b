"""Exactness of `linear_map`, checked against computations that do not share its code."""

import dataclasses

import pytest
import torch
from conftest import PROMPT
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tl_linmap
from tl_linmap.base import budget
from tl_linmap.linear import dense as jacobian
from tl_linmap.freeze.capture import run_to_target
from tl_linmap.base.errors import MemoryBudgetError
from tl_linmap.base import guard
from tl_linmap.base.guard import borrowed
from tl_linmap.freeze.hooks import same_path_hooks
from tl_linmap.load.toy import toy_model


@pytest.mark.parametrize("target", ["output", "blocks.0.hook_resid_post", "blocks.1.hook_attn_out", "blocks.0.hook_mlp_out"])
def test_float64_reconstruction_is_exact(model, target):
    lm = tl_linmap.linear_map(model, PROMPT, target=target)
    assert lm.operators.shape == (len(lm.tokens), lm.output.shape[0], model.cfg.d_model)
    assert lm.relative_error() < 1e-12


def test_float32_reconstruction(model):
    lm = tl_linmap.linear_map(model, PROMPT, dtype=torch.float32)
    assert lm.operators.dtype == torch.float32
    assert lm.relative_error() < 1e-4
    assert next(model.parameters()).dtype == torch.float64


def test_operators_vanish_after_target_position(model):
    lm = tl_linmap.linear_map(model, PROMPT, position=4)
    assert lm.operators[5:].abs().max() == 0
    assert lm.operators[:5].abs().amax(dim=(1, 2)).min() > 0


def test_plain_jacobian_is_not_the_detached_one(model):
    """Detaching matters: the ordinary Jacobian neither equals J nor reconstructs y."""
    lm = tl_linmap.linear_map(model, PROMPT)
    tokens = lm.tokens[None]

    def plain(x):
        return run_to_target(model, tokens, lm.target, same_path_hooks(model), x[None])[0, -1]

    with borrowed(model, torch.float64), torch.enable_grad():
        jac = torch.autograd.functional.jacobian(plain, lm.inputs, vectorize=True)
    plain_ops = jac.permute(1, 0, 2)
    assert (plain_ops - lm.operators).norm() > 1e-3 * lm.operators.norm()
    plain_recon = torch.einsum("poi,pi->o", plain_ops, lm.inputs) + lm.bias
    assert (plain_recon - lm.output).norm() > 1e-3 * lm.output.norm()


def test_chunked_jacobian_equals_unchunked(model):
    whole = tl_linmap.linear_map(model, PROMPT)
    chunked = tl_linmap.linear_map(model, PROMPT, rows_per_pass=7)
    assert torch.allclose(whole.operators, chunked.operators, rtol=0, atol=1e-14 * whole.operators.abs().max())


def test_default_chunk_shrinks_to_the_memory_budget(toy_models, monkeypatch):
    model = toy_models["llama"]
    planned = []
    real_jacobian = jacobian._rows
    monkeypatch.setattr(jacobian, "_rows", lambda y, x, chunk, bar: planned.append(chunk) or real_jacobian(y, x, chunk, bar))
    whole = tl_linmap.linear_map(model, PROMPT)
    monkeypatch.setattr(budget, "available_bytes", lambda device: 4 * 2**20)  # 4 MiB free
    small = tl_linmap.linear_map(model, PROMPT)
    assert 1 <= planned[1] < planned[0]
    assert torch.allclose(small.operators, whole.operators, rtol=0, atol=1e-14 * whole.operators.abs().max())


def test_out_of_memory_risk_suggests_a_chunk_size(toy_models, monkeypatch):
    model = toy_models["llama"]
    monkeypatch.setattr(budget, "available_bytes", lambda device: 4 * 2**20)
    with pytest.raises(MemoryBudgetError, match=r"risks running out of memory.*use rows_per_pass=\d+ or less"):
        tl_linmap.linear_map(model, PROMPT, rows_per_pass=64)
    monkeypatch.setattr(budget, "available_bytes", lambda device: 2**16)
    with pytest.raises(MemoryBudgetError, match="The results need"):
        tl_linmap.linear_map(model, PROMPT)


def test_token_ids_and_text_give_the_same_map(toy_models):
    model = toy_models["llama"]
    by_text = tl_linmap.linear_map(model, PROMPT)
    by_ids = tl_linmap.linear_map(model, by_text.tokens.tolist())
    assert torch.equal(by_text.operators, by_ids.operators)


def test_gemma_sliding_and_full_attention_layers_are_exact(toy_models):
    model = toy_models["gemma3"]
    _, cache = model.run_with_cache(PROMPT)
    keys_seen = [(cache[f"blocks.{layer}.attn.hook_pattern"][0, 0, -1] > 0).sum().item() for layer in (0, 1)]
    assert keys_seen == [4, len(cache["hook_embed"][0])]  # window of 4, then full attention
    assert tl_linmap.linear_map(model, PROMPT).relative_error() < 1e-12


def test_attention_softcapping_is_frozen_with_the_pattern():
    model = toy_model("gemma3", attn_logit_softcapping=5.0, final_logit_softcapping=30.0)
    assert model.cfg.attn_scores_soft_cap == 5.0
    assert tl_linmap.linear_map(model, PROMPT).relative_error() < 1e-12


def test_processed_weights_stay_exact():
    model = toy_model("gpt2")
    model.enable_compatibility_mode(disable_warnings=True)  # fold_ln, centering, value-bias folding
    assert tl_linmap.linear_map(model, PROMPT).relative_error() < 1e-12


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(min_size=1, max_size=15).filter(str.strip), position=st.integers(-8, -1))  # 15 characters: at most 60 byte tokens + BOS, within n_ctx 64
def test_exact_on_any_prompt(toy_models, text, position):
    for family in ("llama", "gpt2"):
        model = toy_models[family]
        n_tokens = model.to_tokens(text).shape[1]
        lm = tl_linmap.linear_map(model, text, position=max(position, -n_tokens))
        assert lm.relative_error() < 1e-12


# The forward route: basis embeddings pushed through each token's window of the replayed system.

ROUTE_TARGETS = ["output", "blocks.0.hook_resid_post", "blocks.1.hook_mlp_out", "blocks.0.attn.hook_z"]
SHORT = "The cat sat on"  # last position of a short prompt keeps the forward route fast


def _relative_diff(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("prompt, position", [(SHORT, -1), (PROMPT, 6)])
def test_forward_route_equals_backward_route(model, prompt, position):
    backward = tl_linmap.linear_maps(model, prompt, ROUTE_TARGETS, position=position, route="rows")
    forward = tl_linmap.linear_maps(model, prompt, ROUTE_TARGETS, position=position, route="columns")
    assert forward.keys() == backward.keys()
    for name, lm in forward.items():
        assert lm.operators.shape == backward[name].operators.shape
        assert _relative_diff(lm.operators, backward[name].operators) < 1e-12
        assert not lm.operators[lm.position + 1 :].any()
        assert torch.equal(lm.bias, backward[name].bias) and torch.equal(lm.output, backward[name].output)
        assert lm.relative_error() < 1e-12


def test_forward_route_float32_keeps_backward_accuracy(toy_models):
    """A large affine part (GPT-2's learned positions and biases) does not swamp F(e) − b."""
    model = toy_models["gpt2"]
    exact = tl_linmap.linear_map(model, SHORT, route="rows").operators
    for route in ("rows", "columns"):
        lm = tl_linmap.linear_map(model, SHORT, dtype=torch.float32, route=route)
        assert lm.relative_error() < 1e-5
        assert _relative_diff(lm.operators.double(), exact) < 1e-6


def test_forward_route_chunks_and_memory_budget(toy_models, monkeypatch):
    model = toy_models["llama"]
    whole = tl_linmap.linear_map(model, SHORT, route="columns")
    chunked = tl_linmap.linear_map(model, SHORT, route="columns", rows_per_pass=24)
    assert torch.allclose(whole.operators, chunked.operators, rtol=0, atol=1e-14 * whole.operators.abs().max())
    planned = []
    real_plan = jacobian.plan_columns
    monkeypatch.setattr(jacobian, "plan_columns", lambda *args, **kw: planned.append(real_plan(*args, **kw)) or planned[-1])
    monkeypatch.setattr(budget, "available_bytes", lambda device: 4 * 2**20)  # 4 MiB free
    small = tl_linmap.linear_map(model, SHORT, route="columns")
    assert 1 <= planned[0] <= planned[-1] and planned[0] < model.cfg.d_model  # longer windows, fewer rows
    assert torch.allclose(small.operators, whole.operators, rtol=0, atol=1e-14 * whole.operators.abs().max())
    with pytest.raises(MemoryBudgetError, match=r"risks running out of memory.*use rows_per_pass=\d+ or less"):
        tl_linmap.linear_map(model, SHORT, route="columns", rows_per_pass=64)
    monkeypatch.setattr(budget, "available_bytes", lambda device: 2**16)
    with pytest.raises(MemoryBudgetError, match="The results need"):
        tl_linmap.linear_map(model, SHORT, route="columns")


def test_forward_route_rejects_a_target_without_embedding_dependence(toy_models):
    with pytest.raises(tl_linmap.InputError, match="does not depend on the token embeddings"):
        tl_linmap.linear_map(toy_models["llama"], SHORT, target="blocks.0.ln1.hook_scale", route="columns")


def test_unknown_route_is_an_input_error(toy_models):
    with pytest.raises(tl_linmap.InputError, match=r"route must be one of 'auto', 'rows', 'columns', got 'sideways'"):
        tl_linmap.linear_map(toy_models["llama"], SHORT, route="sideways")


@pytest.mark.parametrize("route", ["rows", "columns"])
def test_progress_bar_counts_both_routes(toy_models, capsys, route):
    model = toy_models["llama"]
    lm = tl_linmap.linear_map(model, SHORT, route=route, progress=True)
    total = model.cfg.d_model * (len(lm.tokens) if route == "columns" else 1)
    err = capsys.readouterr().err
    assert f"detached Jacobian {route}" in err and f"{total}/{total}" in err


def test_auto_route_picks_forward_for_many_targets(toy_models, monkeypatch):
    model = toy_models["llama"]
    kinds = ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post")
    targets = [f"blocks.{layer}.hook_{kind}" for layer in range(2) for kind in kinds]
    expected = tl_linmap.linear_maps(model, "Hi", targets, route="rows")
    monkeypatch.setattr(jacobian, "_rows", lambda *args: pytest.fail("auto took the backward route"))
    auto = tl_linmap.linear_maps(model, "Hi", targets)
    for name, lm in auto.items():
        assert _relative_diff(lm.operators, expected[name].operators) < 1e-12


def test_a_map_that_reconstructs_nan_is_not_exact(toy_models):
    """NaN compares false with any tolerance: the check must fail on it, not pass it."""
    lm = tl_linmap.linear_map(toy_models["llama"], SHORT)
    broken = dataclasses.replace(lm, operators=lm.operators * float("nan"))
    with pytest.raises(tl_linmap.FreezeError, match="misses the model's output by nan"):
        broken.check()
    assert lm.check() < 1e-12  # the real one passes


@pytest.mark.parametrize(("old", "new"), [("backward", "rows"), ("forward", "columns")])
def test_old_route_names_and_chunk_size_still_work_with_a_warning(toy_models, old, new):
    model = toy_models["llama"]
    current = tl_linmap.linear_map(model, SHORT, route=new, rows_per_pass=16)
    with pytest.warns(DeprecationWarning, match=f'route="{old}" is deprecated'):
        with pytest.warns(DeprecationWarning, match="chunk_size= is deprecated"):
            legacy = tl_linmap.linear_map(model, SHORT, route=old, chunk_size=16)
    assert torch.equal(legacy.operators, current.operators)
    with pytest.raises(tl_linmap.InputError, match="rows_per_pass= only"):
        tl_linmap.linear_map(model, SHORT, rows_per_pass=8, chunk_size=8)


def test_linear_maps_returns_linear_maps(toy_models):
    maps = tl_linmap.linear_maps(toy_models["llama"], SHORT, ["output", "blocks.0.hook_resid_post"])
    assert isinstance(maps, tl_linmap.LinearMaps)
    assert list(maps) == ["ln_final.hook_out", "blocks.0.hook_resid_post"]
    assert maps.final_norm is maps.norms["ln_final"]


def test_auto_route_keeps_the_rows_route_where_a_cast_copy_would_not_fit(monkeypatch):
    """A float32 model mapped in float64: the rows route's graph holds one cast block, not a copy of them all,
    so auto takes the rows route even where such a copy would not fit, with the same map."""
    model = toy_model("llama", dtype=torch.float32, d_model=64, d_mlp=1024, n_layers=4)  # wide blocks, small maps
    target, prompt = "blocks.0.hook_attn_out", "The cat sat"  # shallow and wide: auto takes the rows route
    routes, real = [], jacobian._rows
    monkeypatch.setattr(jacobian, "_rows", lambda *args: routes.append("rows") or real(*args))
    rows = tl_linmap.linear_map(model, prompt, target=target)
    assert routes == ["rows"]
    cast = sum(p.numel() for block in model.blocks for p in block.parameters()) * 8
    monkeypatch.setattr(budget, "available_bytes", lambda device: cast)  # a graph's quarter of it: no room for a copy
    recasts, recast = [], guard._Recast.tensor
    monkeypatch.setattr(guard._Recast, "tensor", lambda self: recasts.append(1) or recast(self))
    auto = tl_linmap.linear_map(model, prompt, target=target)
    assert routes == ["rows", "rows"] and recasts  # the graph cast its weights again instead of keeping them
    assert torch.equal(auto.operators, rows.operators)
