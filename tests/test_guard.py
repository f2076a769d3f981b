"""The user's model comes out of tl_linmap as it went in, also after an error half-way."""

import pytest
import torch

import tl_linmap
from tl_linmap import maps
from tl_linmap.errors import InputError
from tl_linmap.guard import borrowed, hook_count

from conftest import PROMPT


def _snapshot(model):
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "dtypes": {k: v.dtype for k, v in model.state_dict().items()},
        "flags": [p.requires_grad for p in model.parameters()],
        "training": [m.training for m in model.modules()],
        "cfg_dtype": model.cfg.dtype,
        "hooks": hook_count(model),
    }


def _assert_same(model, before):
    after = _snapshot(model)
    assert after["dtypes"] == before["dtypes"]
    assert all(torch.equal(after["state"][k], v) for k, v in before["state"].items())
    assert after["flags"] == before["flags"]
    assert after["training"] == before["training"]
    assert after["cfg_dtype"] == before["cfg_dtype"]
    assert after["hooks"] == before["hooks"] == 0


def _user_state(model):
    """A model in an unusual state: float32, training mode, mixed requires_grad flags."""
    model.train()
    for i, p in enumerate(model.parameters()):
        p.requires_grad_(i % 2 == 0)
    return _snapshot(model)


@pytest.mark.parametrize("route", ["backward", "forward"])
def test_model_untouched_after_success(fresh_llama, route):
    before = _user_state(fresh_llama)
    lm = tl_linmap.linear_map(fresh_llama, PROMPT, route=route)
    assert lm.operators.dtype == torch.float64 and lm.relative_error() < 1e-12
    _assert_same(fresh_llama, before)


@pytest.mark.parametrize(("route", "step"), [("backward", "_jacobian"), ("forward", "_columns")])
def test_model_untouched_after_error_midway(fresh_llama, monkeypatch, route, step):
    before = _user_state(fresh_llama)

    def fail(*args, **kwargs):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(maps, step, fail)  # after the model was cast and hooked
    with pytest.raises(RuntimeError, match="simulated"):
        tl_linmap.linear_map(fresh_llama, PROMPT, route=route)
    _assert_same(fresh_llama, before)


def test_model_untouched_after_bad_input(fresh_llama):
    before = _user_state(fresh_llama)
    with pytest.raises(InputError):
        tl_linmap.linear_map(fresh_llama, PROMPT, target="blocks.0.hook_nonsense")
    _assert_same(fresh_llama, before)


def test_borrowed_restores_buffers_and_parameters(fresh_llama):
    before = _snapshot(fresh_llama)
    with borrowed(fresh_llama, torch.float64):
        assert all(v.dtype == torch.float64 for v in fresh_llama.state_dict().values() if v.is_floating_point())
        assert not any(p.requires_grad for p in fresh_llama.parameters())
    _assert_same(fresh_llama, before)


def test_result_is_the_same_with_a_float32_model(fresh_llama):
    """Widening float32 weights to float64 gives the exact map of those weights."""
    lm = tl_linmap.linear_map(fresh_llama, PROMPT)
    assert lm.relative_error() < 1e-12
