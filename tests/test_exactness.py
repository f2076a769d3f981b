"""One tolerance per dtype and one check, applied to every result that claims exactness."""

import dataclasses

import pytest
import torch
from conftest import PROMPT

import tl_linmap
from tl_linmap.freeze import hooks
from tl_linmap.base.exactness import TOLERANCES, check_exact, relative, tolerance


def test_float64_bound_is_1e_12_and_narrower_dtypes_are_looser():
    assert tolerance(torch.float64) == 1e-12
    assert tolerance(torch.float64) < tolerance(torch.float32) < tolerance(torch.bfloat16)
    assert set(TOLERANCES) >= {torch.float64, torch.float32, torch.float16, torch.bfloat16}


def test_check_names_the_error_and_fails_on_nan():
    assert check_exact(1e-13, torch.float64, "x") == 1e-13
    with pytest.raises(tl_linmap.FreezeError, match=r"misses the model's output by 2.00e-12 \(tolerance 1e-12 in float64\)"):
        check_exact(2e-12, torch.float64, "blocks.0.hook_resid_post")
    with pytest.raises(tl_linmap.FreezeError, match="by nan"):
        check_exact(float("nan"), torch.float64, "x")


def test_relative_of_zero_vectors():
    zero = torch.zeros(3)
    assert relative(zero, zero) == 0.0
    assert relative(torch.ones(3), zero) == float("inf")


@pytest.fixture
def pattern_left_live(monkeypatch):
    """A freeze rule without effect: the replay leaves every attention pattern live."""
    real = hooks._replace_fn
    monkeypatch.setattr(hooks, "_replace_fn", lambda factor: (lambda act, hook=None: None) if factor.ndim == 4 else real(factor))


@pytest.mark.parametrize("route", ["rows", "columns"])
def test_every_dense_map_is_checked(toy_models, pattern_left_live, route):
    model = toy_models["llama"]
    with pytest.raises(tl_linmap.FreezeError, match="misses the model's output"):
        tl_linmap.linear_map(model, PROMPT, route=route)
    with pytest.raises(tl_linmap.FreezeError, match="misses the model's output"):
        tl_linmap.layer_maps(model, PROMPT, route=route)


def test_contributions_and_matrix_free_are_checked(toy_models, pattern_left_live):
    model = toy_models["llama"]
    with pytest.raises(tl_linmap.FreezeError):
        tl_linmap.token_contributions(model, PROMPT)
    with pytest.raises(tl_linmap.FreezeError):
        with tl_linmap.matrix_free(model, PROMPT):
            pass


def test_head_maps_are_checked(toy_models):
    maps = tl_linmap.layer_maps(toy_models["gpt2"], PROMPT, modules=True)
    assert len(maps.heads(1)) == toy_models["gpt2"].cfg.n_heads  # the real heads pass
    z = maps["blocks.1.attn.hook_z"]
    maps.maps["blocks.1.attn.hook_z"] = dataclasses.replace(z, operators=z.operators * 1.001)
    with pytest.raises(tl_linmap.FreezeError, match="hook_result"):
        maps.heads(1)


def test_float32_results_are_checked_against_the_float32_bound(toy_models):
    lm = tl_linmap.linear_map(toy_models["gemma3"], PROMPT, dtype=torch.float32)
    assert 0 < lm.check() < tolerance(torch.float32)
