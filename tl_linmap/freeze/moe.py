"""Mixture-of-experts layers: the router's choice and weights, and the experts' activations, frozen.

A sparse MLP computes, for each token, ``Σ_{e ∈ top-k(x)} w_e(x) · E_e(x)`` where each expert
``E_e(x) = (act(x W_gate,e) ⊙ x W_up,e) W_down,e`` is a gated MLP. Its input-dependent factors:

- the router's choice and weights, both at the bridge's ``MoERouterBridge`` hook points
  (``hook_expert_weights``, ``(tokens, experts)``, and ``hook_expert_indices``, ``(tokens, k)``):
  detached, the weights are constants and the selection is replayed as recorded;
- every expert's activated gate ``act(x W_gate,e)``: Hugging Face's experts (one module
  holding every expert's weights) have no TransformerLens hook point inside, so it is frozen
  at the output of their ``act_fn`` module by a PyTorch forward hook. That is the one place
  tl_linmap hooks a module rather than a hook point (`tl_linmap.freeze.apply.applied` registers and
  removes it with the hook-point hooks);
- any other gate of the block: a shared expert's gate pre-activation (``shared_expert.hook_pre``)
  and Qwen2-MoE's ``sigmoid(x w)`` shared-expert gate (its linear's ``hook_out``).

With all of them frozen each token's MLP output is the frozen-weighted sum of its experts'
linear-in-x outputs. The experts then run through Hugging Face's eager loop (`eager`): its
grouped kernel refuses float64, and only the eager loop calls ``act_fn`` once per expert, in an
order the recorded routing fixes (`Experts` replays rely on it).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from tl_linmap.base.errors import FreezeError, UnsupportedArchitectureError
from tl_linmap.freeze.rules import Detach, Experts

_ROUTER = "MoERouterBridge"


_ROUTER_HOOKS = ("hook_expert_weights", "hook_expert_indices")


def _class_names(module) -> set[str]:
    return {cls.__name__ for cls in type(module).__mro__}


def _unwrap(module: nn.Module) -> nn.Module:
    while isinstance(getattr(module, "original_component", None), nn.Module):
        module = module.original_component
    return module


def _is_experts(module: nn.Module) -> bool:
    # Hugging Face's `@use_experts_implementation` gives every experts class `_apply_gate` and a config.
    return hasattr(type(module), "_apply_gate") and hasattr(module, "config")


def experts_modules(mlp) -> list[nn.Module]:
    """The Hugging Face experts modules inside one mixture-of-experts block.

    Args:
        mlp: A block's ``MoEBridge``.

    Returns:
        Every module of the wrapped block holding a stack of experts (one for the models here).
    """
    return [module for module in _unwrap(mlp).modules() if _is_experts(module)]


def _check_experts(arch: str, path: str, experts: nn.Module) -> None:
    from transformers.integrations import moe

    owner = type(experts)
    if getattr(owner, "_apply_gate", None) is not moe._default_apply_gate:
        raise UnsupportedArchitectureError(
            f"{arch}: {path} ({owner.__name__}) computes its experts' activation inline in its own "
            f"{owner.__name__}._apply_gate, with no module or hook point inside, so its input-dependent "
            "factors cannot be frozen through hooks."
        )
    if not isinstance(getattr(experts, "act_fn", None), nn.Module) or not getattr(experts, "has_gate", True):
        raise UnsupportedArchitectureError(
            f"{arch}: {path} ({owner.__name__}) has no gated act_fn module at which its experts' activation could be frozen."
        )


def router_rules(model, layers: list[int]) -> list:
    """Rules freezing the mixture-of-experts MLPs of some blocks.

    Args:
        model: A TransformerBridge.
        layers: Blocks whose MLP is a mixture of experts (``MoEBridge``).

    Returns:
        A `tl_linmap.freeze.rules.Detach` of the routers' weights and indices, one of any shared
        experts' gates, and a `tl_linmap.freeze.rules.Experts` of the experts' activations (a block
        bound as a dense gated MLP, as some layers of interleaved stacks are, gets its gate).

    Raises:
        UnsupportedArchitectureError: naming the module and why, for a block whose router has no
            weight and index hook points, whose experts compute their activation inline, or
            that holds a part no rule covers.
    """
    arch = model.cfg.architecture
    hooks = model.hook_dict
    paths = {id(module): name for name, module in model.named_modules()}
    dense, routers, gates, acts, indices = [], [], [], [], []
    for layer in layers:
        mlp, prefix = model.blocks[layer].mlp, f"blocks.{layer}.mlp"
        if getattr(mlp, "bound_dense", False):
            if not getattr(mlp, "_bound_dense_gate", False):
                raise UnsupportedArchitectureError(f"{arch}: {prefix} is a dense layer of a mixture-of-experts stack without a gate.")
            dense.append(f"{prefix}.hook_pre")
            continue
        layer_routers = []
        for key, child in mlp.named_children():
            kinds = _class_names(child)
            if _ROUTER in kinds:
                layer_routers.append(key)
                routers += [f"{prefix}.{key}.{hook}" for hook in _ROUTER_HOOKS]
            elif "GatedMLPBridge" in kinds:  # a shared expert: its gate pre-activation
                gates.append(f"{prefix}.{key}.hook_pre")
            elif "MoEBridge" in kinds:  # the experts, wrapped: their act_fn is frozen below
                continue
            elif "LinearBridge" in kinds and "gate" in key:  # a shared expert's scalar gate, sigmoid(x w)
                gates.append(f"{prefix}.{key}.hook_out")
            elif hasattr(child, "original_component"):
                raise UnsupportedArchitectureError(
                    f"{arch}: {prefix}.{key} ({type(child).__name__}) is a part of a mixture of experts no rule covers."
                )
        for key, child in _unwrap(mlp).named_children():  # Hugging Face parts the bridge left unwrapped
            if not hasattr(child, "original_component") and not _is_experts(child) and any(True for _ in child.parameters()):
                raise UnsupportedArchitectureError(
                    f"{arch}: {prefix}'s Hugging Face {key} ({type(child).__name__}) is a part of a mixture of experts "
                    "the bridge exposes no hook point in, so no rule covers it."
                )
        if len(layer_routers) != 1:
            raise UnsupportedArchitectureError(f"{arch}: {prefix} has {len(layer_routers)} routers with expert weights; tl_linmap freezes exactly one.")
        found = experts_modules(mlp)
        if len(found) != 1:
            raise UnsupportedArchitectureError(f"{arch}: {prefix} holds {len(found)} Hugging Face experts modules; tl_linmap freezes exactly one.")
        _check_experts(arch, prefix, found[0])
        acts.append(f"{paths[id(found[0].act_fn)]}")
        indices.append(f"{prefix}.{layer_routers[0]}.hook_expert_indices")
    missing = [name for name in routers + gates + dense if name not in hooks]
    if missing:
        raise UnsupportedArchitectureError(f"{arch} has no hook point {missing[0]}: tl_linmap cannot freeze that mixture of experts.")
    if len(set(acts)) != len(acts):
        raise UnsupportedArchitectureError(f"{arch}: two blocks' experts share one act_fn module; their calls could not be told apart.")
    rules: list = []
    if dense:
        rules.append(Detach(tuple(dense), after_attention=True, kind="gate"))
    if routers:
        rules.append(Detach(tuple(routers), after_attention=True, kind="router", windows=False))
    if gates:
        rules.append(Detach(tuple(gates), after_attention=True, kind="shared expert gate", windows=False))
    if acts:
        rules.append(Experts(tuple(acts), tuple(indices)))
    return rules


_CONFIGS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _expert_configs(model) -> list:
    # Walking every module is not free on a real model, and its experts never change: cached.
    if model not in _CONFIGS:
        configs = {id(m.config): m.config for m in model.modules() if _is_experts(m)}
        _CONFIGS[model] = list(configs.values())
    return _CONFIGS[model]


@contextmanager
def eager(model) -> Iterator[None]:
    """Run the model's Hugging Face experts through their eager loop, then restore the setting.

    The eager loop is the experts class's own ``forward`` (`@use_experts_implementation`
    dispatches to it for ``"eager"``): no model code is copied. It accepts float64 (the grouped
    kernel does not) and calls ``act_fn`` once per expert hit, which the frozen experts need.

    Args:
        model: Any model; one without Hugging Face experts is left alone.

    Returns:
        A context manager; every config's ``_experts_implementation`` is as it was on exit, also on error.
    """
    configs = _expert_configs(model) if isinstance(model, nn.Module) else []
    # The setter recurses into sub-configs; the field it sets is restored as it was.
    saved = [(config, config._experts_implementation_internal) for config in configs]
    try:
        for config, _ in saved:
            config._experts_implementation_internal = "eager"
        yield
    finally:
        for config, value in saved:
            config._experts_implementation_internal = value


def _call_blocks(indices: Tensor, acts: Tensor) -> list[list[Tensor]]:
    # The eager loop visits the experts hit in ascending order; expert e's rows are
    # `torch.where(one_hot(indices).permute(2, 1, 0)[e])`: slot by slot, tokens ascending.
    blocks, start = [], 0
    for expert in torch.unique(indices).tolist():
        sizes = (indices == expert).sum(0).tolist()
        blocks.append(list(acts[start : start + sum(sizes)].split(sizes)))
        start += sum(sizes)
    if start != len(acts):
        raise FreezeError(f"The recorded experts' activations have {len(acts)} rows where the recorded routing gives {start}.")
    return blocks


def freeze_experts(rule, factors: dict | None) -> list:
    """Hooks detaching every expert call's activated gate, recording them in call order.

    Args:
        rule: A `tl_linmap.freeze.rules.Experts` rule.
        factors: Filled, per experts module path, with every call's output concatenated (or None).

    Returns:
        ``(name, fn)`` pairs: a reset at each router's indices (one forward's calls start
        there), and the detach at each ``act_fn`` module path (see `tl_linmap.freeze.apply.applied`).
    """
    hooks = []
    for act_name, index_name in zip(rule.names, rule.indices):
        calls: dict = {}

        def reset(indices: Tensor, hook=None, calls=calls) -> None:
            calls.update(n=int(torch.unique(indices).numel()), outputs=[])

        def detach(out: Tensor, hook=None, calls=calls, act_name=act_name) -> Tensor:
            frozen = out.detach()
            if factors is not None:
                calls["outputs"].append(frozen)
                if len(calls["outputs"]) == calls["n"]:
                    factors[act_name] = torch.cat(calls["outputs"])
            return frozen

        hooks += [(index_name, reset), (act_name, detach)]
    return hooks


def replay_experts(rule, factors: dict) -> list:
    """Hooks replacing every expert call's activated gate by the recorded one, for any batch.

    For a batch of ``k`` rows with the routing of the recorded one (``k`` copies of its tokens),
    expert ``e``'s call holds, slot by slot, the recorded rows of that slot tiled ``k`` times.

    Args:
        rule: A `tl_linmap.freeze.rules.Experts` rule.
        factors: Recorded by `freeze_experts`, with the routers' indices.

    Returns:
        ``(name, fn)`` pairs, as `freeze_experts`.

    Raises:
        KeyError: if a factor the rule needs was not recorded.
    """
    hooks = []
    for act_name, index_name in zip(rule.names, rule.indices):
        blocks = _call_blocks(factors[index_name], factors[act_name])
        tokens = len(factors[index_name])
        calls: dict = {}

        def prepare(indices: Tensor, hook=None, blocks=blocks, tokens=tokens, calls=calls) -> None:
            k = len(indices) // tokens
            calls.update(next=0, outputs=[torch.cat([slot.repeat(k, 1) for slot in slots]) for slots in blocks])

        def replace(out: Tensor, hook=None, calls=calls, act_name=act_name) -> Tensor:
            i = calls["next"]
            calls["next"] = i + 1
            frozen = calls["outputs"][i] if i < len(calls["outputs"]) else None
            if frozen is None or frozen.shape != out.shape:
                raise FreezeError(
                    f"{act_name}: call {i} of the experts does not match the recorded routing "
                    f"({tuple(out.shape)} rows, {None if frozen is None else tuple(frozen.shape)} recorded)."
                )
            return frozen

        hooks += [(index_name, prepare), (act_name, replace)]
    return hooks
