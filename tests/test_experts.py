"""Mixtures of experts (tl_linmap.experts) against an independent oracle.

The oracle is ``torch.autograd.functional.jacobian`` of the model under freeze hooks written in
this file: every norm scale and attention pattern detached, each router's weights detached at the
bridge's ``hook_expert_weights``, Qwen2-MoE's shared expert gates detached at their hook points,
and every experts module's ``act_fn`` output detached by a PyTorch forward hook registered here,
with Hugging Face's eager experts set through Hugging Face's own ``set_experts_implementation``.
None of tl_linmap's rules, hooks, replays or windows is used.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import einops
import pytest
import torch
from conftest import PROMPT
from test_oracle import _frozen_ratio
from torch import Tensor

import tl_linmap
import tl_linmap.experts
from tl_linmap.base.compat import get_act_name
from tl_linmap.base.errors import UnsupportedArchitectureError
from tl_linmap.load.toy import toy_model

MOE_FAMILIES = ["glm4_moe_lite", "minimax_m2", "mixtral", "olmoe", "qwen2_moe", "qwen3_moe"]

#: The oracle's own table: norms with a hook_scale in every block, and the block's other gates.
_QK = ("attn.q_norm", "attn.k_norm")
ORACLE_NORMS = {"glm4_moe_lite": ("attn.kv_a_layernorm",), "minimax_m2": _QK, "mixtral": (), "olmoe": _QK, "qwen2_moe": (), "qwen3_moe": _QK}
ORACLE_GATES = {"qwen2_moe": ("mlp.shared_expert.hook_pre", "mlp.shared_expert_gate.hook_out"), "glm4_moe_lite": ("mlp.shared_experts.hook_pre",)}
#: Components wrapping an RMS norm without hook_scale, frozen as the ratio of their output to their input.
ORACLE_RATIOS = {"glm4_moe_lite": ("attn.q_a_layernorm",)}
#: Blocks whose MLP is dense (a gated MLP, its gate pre-activation detached) in a stack of routed ones.
ORACLE_DENSE = {"glm4_moe_lite": (0,)}

DTYPES = [pytest.param(torch.float64, 1e-12, id="float64"), pytest.param(torch.float32, 1e-4, id="float32")]


def _targets(n_layers: int) -> list[str]:
    per_layer = [get_act_name(kind, layer) for layer in range(n_layers) for kind in ("resid_post", "attn_out", "mlp_out")]
    return ["output", *per_layer]


@pytest.fixture(scope="module")
def moe_models():
    return {family: toy_model(family) for family in MOE_FAMILIES}


@pytest.fixture(params=MOE_FAMILIES)
def moe_family(request):
    return request.param


def _detach(act: Tensor, hook=None) -> Tensor:
    return act.detach()


def _hf_layers(model):
    # Those with experts (a dense block of a mixed stack has none).
    return [layer for layer in model.original_model.model.layers if hasattr(layer.mlp, "experts")]


def _experts(hf_layer):
    experts = hf_layer.mlp.experts
    return getattr(experts, "original_component", experts)  # Qwen2-MoE's experts are wrapped by the bridge


def _oracle_run(model, family: str, tokens: Tensor, x: Tensor, target: str, freeze_experts: bool = True, extra=()) -> Tensor:
    hooks = [("hook_embed", lambda act, hook=None: x[None]), ("ln_final.hook_scale", _detach)]
    for layer in range(model.cfg.n_layers):
        hooks += [(get_act_name("scale", layer, norm), _detach) for norm in ("ln1", "ln2", *ORACLE_NORMS[family])]
        hooks.append((get_act_name("pattern", layer), _detach))
        if layer in ORACLE_DENSE.get(family, ()):
            hooks.append((get_act_name("pre", layer), _detach))
        else:
            hooks.append((f"blocks.{layer}.mlp.gate.hook_expert_weights", _detach))
            hooks += [(f"blocks.{layer}.{gate}", _detach) for gate in ORACLE_GATES.get(family, ())]
        for part in ORACLE_RATIOS.get(family, ()):
            hooks += _frozen_ratio(layer, f"blocks.{layer}.{part}.hook_in", f"blocks.{layer}.{part}.hook_out")
    seen = {}
    hooks += [*extra, (target, lambda act, hook=None: seen.update(act=act))]
    hf = model.original_model
    saved = hf.get_experts_implementation()
    handles = []
    try:
        hf.set_experts_implementation("eager")
        if freeze_experts:
            handles = [_experts(layer).act_fn.register_forward_hook(lambda m, i, out: out.detach()) for layer in _hf_layers(model)]
        with warnings.catch_warnings(), model.hooks(fwd_hooks=hooks):
            warnings.filterwarnings("ignore", message="A forward hook edited hook_scale")
            model(tokens)
    finally:
        for handle in handles:
            handle.remove()
        hf.set_experts_implementation(saved)
    return seen["act"][0]


def _oracle(model, family: str, tokens: Tensor, target: str, position: int, freeze_experts: bool = True, extra=()):
    x = _embeddings(model, tokens)

    def f(x: Tensor) -> Tensor:
        return _oracle_run(model, family, tokens, x, target, freeze_experts, extra)[position].flatten()

    with torch.enable_grad():
        y = f(x).detach()
        jac = torch.autograd.functional.jacobian(f, x, vectorize=True)
    operators = einops.rearrange(jac, "d_out pos d_in -> pos d_out d_in")
    return operators, y - einops.einsum(operators, x, "pos d_out d_in, pos d_in -> d_out"), y


def _embeddings(model, tokens: Tensor) -> Tensor:
    seen = {}
    with model.hooks(fwd_hooks=[("hook_embed", lambda act, hook=None: seen.update(x=act.detach().clone()))]):
        hf = model.original_model
        saved = hf.get_experts_implementation()
        try:
            hf.set_experts_implementation("eager")
            model(tokens)
        finally:
            hf.set_experts_implementation(saved)
    return seen["x"][0]


def _gap(a: Tensor, b: Tensor, scale: Tensor | None = None) -> float:
    return ((a.double() - b.double()).norm() / (b.norm() if scale is None else scale)).item()


def _assert_oracle(lm, model, family: str, rtol: float) -> dict[str, float]:
    tokens = model.to_tokens(PROMPT)
    operators, bias, output = _oracle(model, family, tokens, lm.target, lm.position)
    gaps = {
        "J": _gap(lm.operators, operators),
        "b": _gap(lm.bias, bias, torch.maximum(bias.norm(), output.norm())),
        "output": _gap(lm.output, output),
    }
    assert all(gap <= rtol for gap in gaps.values()), f"{family} {lm.target}: {gaps} (bound {rtol:.0e})"
    return gaps


@pytest.mark.parametrize("route", ["rows", "columns"])
def test_float64_matches_the_oracle(moe_models, moe_family, route):
    # "columns" pushes batches of basis embeddings: the routing and the experts' calls tiled over the batch.
    model = moe_models[moe_family]
    targets = _targets(model.cfg.n_layers)
    maps = tl_linmap.linear_maps(model, PROMPT, targets, route=route)
    assert len(maps) == len(targets)
    for name in maps:  # "output" is the final norm's output hook
        assert maps[name].operators.dtype == torch.float64
        _assert_oracle(maps[name], model, moe_family, 1e-12)


def test_float32_is_near_the_float64_oracle(moe_family):
    model = toy_model(moe_family)  # its own: a float32 borrow must not touch the shared models
    lm = tl_linmap.linear_map(model, PROMPT, dtype=torch.float32)
    assert lm.operators.dtype == torch.float32
    _assert_oracle(lm, model, moe_family, 1e-4)


def test_the_experts_activation_must_be_frozen(moe_models):
    # With only the routers frozen, the experts' SiLU stays live: the oracle's J changes, so the
    # module hook on act_fn is what makes the map exact (and the oracle can tell).
    model = moe_models["mixtral"]
    tokens = model.to_tokens(PROMPT)
    lm = tl_linmap.linear_map(model, PROMPT)
    live, _, _ = _oracle(model, "mixtral", tokens, lm.target, lm.position, freeze_experts=False)
    assert _gap(lm.operators, live) > 1e-3


def test_router_and_experts_rules(moe_models):
    rules = tl_linmap.rules.rules_for(moe_models["qwen2_moe"])
    kinds = {rule.kind for rule in rules}
    assert {"router", "shared expert gate", "experts"} <= kinds
    assert not tl_linmap.hooks.windowable(moe_models["qwen2_moe"])  # nor trimmed


def _state(model) -> tuple:
    hf = model.original_model
    acts = [_experts(layer).act_fn for layer in _hf_layers(model)]
    params = [(name, p.dtype, p.detach().clone()) for name, p in model.named_parameters()]
    return hf.get_experts_implementation(), sum(len(a._forward_hooks) for a in acts), params


def _assert_same(before: tuple, after: tuple) -> None:
    assert before[:2] == after[:2]
    assert [(n, d) for n, d, _ in before[2]] == [(n, d) for n, d, _ in after[2]]
    assert all(torch.equal(a, b) for (_, _, a), (_, _, b) in zip(before[2], after[2]))


def test_the_model_comes_back_bit_for_bit(moe_models):
    model = moe_models["qwen3_moe"]
    before = _state(model)
    tl_linmap.linear_map(model, PROMPT, dtype=torch.float32)
    _assert_same(before, _state(model))

    def boom(act, hook=None):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"), model.hooks(fwd_hooks=[("blocks.1.hook_mlp_out", boom)]):
        tl_linmap.linear_map(model, PROMPT)
    _assert_same(before, _state(model))


def test_frozen_runs_the_model_in_float64(moe_models):
    # Hugging Face's grouped expert kernel refuses float64; inside `frozen` the experts run eagerly.
    model = moe_models["mixtral"]
    tokens = model.to_tokens(PROMPT)
    with tl_linmap.frozen(model):
        logits = model(tokens)
    assert logits.dtype == torch.float64 and torch.isfinite(logits).all()


def test_entry_points_run_on_a_mixture_of_experts(moe_models):
    model = moe_models["olmoe"]
    lm = tl_linmap.linear_map(model, PROMPT)
    maps = tl_linmap.layer_maps(model, PROMPT, layers=[1], modules=True)
    assert _gap(maps["blocks.1.hook_mlp_out"].operators, tl_linmap.linear_map(model, PROMPT, target="blocks.1.hook_mlp_out").operators) <= 1e-12
    contributions = tl_linmap.token_contributions(model, PROMPT)  # windows that replay the whole prompt
    assert _gap(contributions.contributions(), lm.contributions()) <= 1e-12
    with tl_linmap.matrix_free(model, PROMPT) as mf:
        vectors = torch.randn(3, model.cfg.d_model, dtype=torch.float64)
        assert _gap(mf.operator(2).matvec(vectors), vectors @ lm.operators[2].T) <= 1e-12
        assert _gap(mf.operator(2).rmatvec(vectors), vectors @ lm.operators[2]) <= 1e-12


def test_gpt_oss_is_refused_with_its_reason():
    model = toy_model("gpt_oss")
    with pytest.raises(UnsupportedArchitectureError, match="clamped SwiGLU"):
        tl_linmap.linear_map(model, PROMPT)


def test_expert_contributions_match_the_oracle(moe_models):
    # The oracle's split: its router weights of the last block detached and kept for one expert
    # only (the bridge re-routes to the kept column; a zero weight carries nothing), minus none
    # kept. The one factor after that block, the final norm's scale, is the full forward's.
    model, layer = moe_models["qwen2_moe"], 1
    split = tl_linmap.experts.expert_contributions(model, PROMPT, layer)
    lm = tl_linmap.linear_map(model, PROMPT)
    tokens = model.to_tokens(PROMPT)
    x = _embeddings(model, tokens)
    recorded = {}
    _oracle_run(model, "qwen2_moe", tokens, x, lm.target, extra=[("ln_final.hook_scale", lambda act, hook=None: recorded.update(scale=act.detach()))])

    def kept(experts: list[int]):
        def hook(act: Tensor, hook=None) -> Tensor:
            mask = torch.zeros(act.shape[-1], dtype=act.dtype)
            mask[experts] = 1
            return act.detach() * mask

        extra = [(f"blocks.{layer}.mlp.gate.hook_expert_weights", hook), ("ln_final.hook_scale", lambda act, hook=None: recorded["scale"])]
        operators, _, _ = _oracle(model, "qwen2_moe", tokens, lm.target, lm.position, extra=extra)
        return einops.einsum(operators, x, "pos d_out d_in, pos d_in -> pos d_out")

    none = kept([])
    scale = lm.contributions().norm()
    assert len(split.experts) > 1
    for j, expert in enumerate(split.experts):
        assert _gap(split.values[j], kept([expert]) - none, scale) <= 1e-12
    assert _gap(split.contributions(), lm.contributions()) <= 1e-12
    assert split.norms().shape == (len(split.experts), tokens.shape[1])


def test_expert_contributions_refuse_a_block_without_router(moe_models):
    with pytest.raises(tl_linmap.InputError, match="mixture-of-experts router"):
        tl_linmap.experts.expert_contributions(moe_models["mixtral"], PROMPT, 7)
