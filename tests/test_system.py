"""The frozen system's passes: the trimmed last block changes no number, only the work."""

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from conftest import BIASED, PROMPT

import tl_linmap
from tl_linmap.freeze.capture import at_position, capture
from tl_linmap.base.guard import borrowed
from tl_linmap.freeze.hooks import freeze_hooks, replay_hooks, same_path_hooks
from tl_linmap.freeze.factors import trim_factors, trim_hooks
from tl_linmap.freeze.system import frozen_system, purely_linear, trimmed_block
from tl_linmap.load.toy import toy_model


@pytest.mark.parametrize(
    "names, expected",
    [
        (["ln_final.hook_out"], 3),
        (["blocks.3.hook_resid_post", "blocks.1.attn.hook_z"], 3),
        (["blocks.2.hook_out", "blocks.0.hook_mlp_out"], 2),
        (["ln_final.hook_out", "blocks.3.hook_mlp_out"], None),  # the MLP output needs every position
        (["blocks.3.attn.hook_z"], None),
        (["blocks.3.mlp.hook_out"], None),  # not the block's own hook_out
        (["blocks.3.hook_resid_mid"], None),
        (["blocks.3.hook_out", "ln_final.hook_out"], 3),
        (["unembed.hook_out"], 3),
        (["hook_embed"], None),
        (["embed.hook_out"], None),
    ],
)
def test_trimmed_block(names, expected):
    assert trimmed_block(names, SimpleNamespace(n_layers=4)) == expected
    assert trimmed_block(names, SimpleNamespace(n_layers=4, use_attn_result=True)) is None


def test_frozen_pass_is_the_live_forward_bit_for_bit(model):
    """The system's outputs (from the frozen pass) are the same-path live forward's values."""
    targets = ["output", "blocks.0.hook_resid_post", "blocks.1.attn.hook_z"]
    with frozen_system(model, PROMPT, targets, position=4) as system:
        live = capture(model, system.tokens, system.names, same_path_hooks(model))
        for name in system.names:
            assert torch.equal(system.outputs[name], at_position(live[name], 4, system.tokens.shape[1])[0]), name


def test_a_model_with_attention_results_is_not_trimmed():
    """With use_attn_result the bridge reshapes hook_z to the whole sequence: no trimming, still exact."""
    model = toy_model("llama")
    model.set_use_attn_result(True)
    with frozen_system(model, PROMPT, ["output"]) as system:
        assert system.trim is None
    assert tl_linmap.linear_map(model, PROMPT).relative_error() < 1e-12


def _jacobians(system):
    d = system.x.shape[-1]
    eye = torch.eye(d, dtype=system.x.dtype)
    return {name: system.vjp(name, eye[: system.ys[name].shape[0]]) for name in system.names}


@pytest.mark.parametrize("position", [-1, 4])
def test_trimmed_system_equals_the_whole_one(model, position):
    last = model.cfg.n_layers - 1
    targets = ["output", f"blocks.{last}.hook_resid_post", "blocks.0.hook_resid_post"]
    with frozen_system(model, PROMPT, targets, position=position) as system:
        assert system.trim == last
        trimmed = system.with_graph().with_biases()
        trimmed_jacobians, (trimmed_cols, trimmed_bias) = _jacobians(trimmed), trimmed.push_basis(2, range(5))
        whole = dataclasses.replace(system, trim=None).with_graph()
        with torch.no_grad():
            whole_bias = {name: y[0] for name, y in whole.replay(torch.zeros_like(whole.x)).items()}
        whole_jacobians, (whole_cols, _) = _jacobians(whole), whole.push_basis(2, range(5))
    trimmed, whole = trimmed_jacobians, whole_jacobians
    for name in system.names:
        assert torch.allclose(trimmed[name], whole[name], rtol=0, atol=1e-12 * whole[name].abs().max())
        assert torch.allclose(trimmed_cols[name], whole_cols[name], rtol=0, atol=1e-12 * whole_cols[name].abs().max())
        assert torch.allclose(trimmed_bias[name], whole_bias[name], rtol=0, atol=1e-12 * (1 + whole_bias[name].abs().max()))


def test_a_window_of_the_whole_system_is_the_system(toy_models):
    model = toy_models["llama"]
    with frozen_system(model, PROMPT, ["output"]) as system:
        assert system.window(0, graph=False) is system
        assert system.window(0, graph=True) is not system  # a graph of its own
        assert system.window(0, graph=True).biases is not None  # from the graph's own value
    with frozen_system(model, PROMPT, ["output"], position=4) as system:
        window = system.window(0, graph=False)
        assert window is not system and window.tokens.shape[1] == 5


def test_trim_hooks_compute_one_position_only(model):
    """The last block's MLP runs on the target position alone, and the block output there is unchanged."""
    last, position = model.cfg.n_layers - 1, 3
    tokens = model.to_tokens(PROMPT)
    names = [f"blocks.{last}.hook_mlp_out", f"blocks.{last}.hook_resid_post"]
    with borrowed(model, torch.float64), torch.no_grad():
        factors = {}
        whole = capture(model, tokens, names, freeze_hooks(model, factors=factors), stop=False)
        cut = trim_factors(model, factors, last, position)
        trimmed = capture(model, tokens, names, replay_hooks(model, cut) + trim_hooks(last, position))
    mlp_out, resid = trimmed[names[0]], trimmed[names[1]]
    assert mlp_out.shape[1] == 1
    expected = whole[names[1]][:, position]
    assert torch.allclose(resid[:, position], expected, rtol=0, atol=1e-12 * expected.abs().max())


def test_purely_linear_is_what_the_replay_at_zero_input_measures(model, family):
    """Where the zero-input replay is skipped (`purely_linear`, graph built), that replay is exactly zero, and only there."""
    linear = purely_linear(model)
    assert linear == (family not in BIASED)
    targets = ["output", "blocks.1.hook_resid_post", "blocks.0.attn.hook_q", "blocks.1.attn.hook_z", "blocks.0.mlp.hook_post",
               "blocks.0.hook_attn_out", "blocks.1.hook_mlp_out", "unembed.hook_out"]
    with frozen_system(model, PROMPT, targets, position=5) as system:
        system = system.with_graph()  # as `linear_maps` does: the graph proves every target depends on the embeddings
        assert system.linear == linear
        forwards = []
        with model.hooks(fwd_hooks=[("hook_embed", lambda act, hook=None: forwards.append(1))]):
            biases = system.with_biases().biases
        assert len(forwards) == (0 if linear else 1)
        zero = capture(model, system.tokens, system.names, replay_hooks(model, system.factors), torch.zeros_like(system.x))
        for name in system.names:
            measured = at_position(zero[name], 5, system.tokens.shape[1])[0]
            assert bool(measured.any()) != linear, name
            torch.testing.assert_close(biases[name], measured, rtol=1e-12, atol=1e-14)  # replays trim, this one not


def test_a_steering_hook_or_an_added_bias_brings_the_affine_part_back():
    """A user's hook may add a vector, and a bias may be bolted on: both are constants the map must keep."""
    model = toy_model("llama")
    assert purely_linear(model)
    push = torch.randn(model.cfg.d_model, dtype=torch.float64)
    with model.hooks(fwd_hooks=[("blocks.0.hook_resid_post", lambda act, hook=None: act + push)]):
        assert not purely_linear(model)
        lm = tl_linmap.linear_map(model, PROMPT)
        assert lm.bias.norm() > 0.1 * lm.output.norm() and lm.relative_error() < 1e-12
    assert purely_linear(model)
    o_proj = model.get_submodule("blocks.1._original_component.self_attn._original_component.o_proj._original_component")
    o_proj.bias = torch.nn.Parameter(torch.randn(model.cfg.d_model, dtype=torch.float64))
    assert not purely_linear(model)
    lm = tl_linmap.linear_map(model, PROMPT)
    assert lm.bias.norm() > 0 and lm.relative_error() < 1e-12


def test_a_frozen_system_is_immutable_and_refuses_use_after_its_block(toy_models):
    model = toy_models["llama"]
    with frozen_system(model, PROMPT, ["output"]) as system:
        with pytest.raises(dataclasses.FrozenInstanceError):
            system.position = 0
        window = system.window(2)
    for use in (lambda: system.replay(system.x), lambda: system.window(1), lambda: window.vjp("ln_final.hook_out", window.x[0, :1, :]),
                lambda: system.with_graph(), lambda: system.push(system.x)):
        with pytest.raises(tl_linmap.LinmapError, match="used after its `with` block ended"):
            use()


def test_matrix_free_operators_refuse_use_after_the_block(toy_models):
    with tl_linmap.matrix_free(toy_models["llama"], PROMPT) as mf:
        op = mf.operator(-1)
    with pytest.raises(tl_linmap.LinmapError, match="used after its `with` block ended"):
        op.matvec(torch.zeros(1, op.system.x.shape[-1], dtype=torch.float64))


def test_every_final_norm_hook_reads_as_the_models_logits(model):
    """ln_final.hook_normalized comes before the norm's weight on a bridge: the readout applies the rest."""
    logits = model(model.to_tokens(PROMPT))[0, -1]
    for target in ("output", "ln_final.hook_normalized"):
        lm = tl_linmap.linear_map(model, PROMPT, target=target)
        read = lm.readout.logits(lm.output, affine=True)
        assert float((read - logits).norm() / logits.norm()) < 1e-5, target  # the plain forward's norm runs in float32
