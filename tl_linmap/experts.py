"""Mixture-of-experts layers: the router's choice and weights, and the experts' activations, frozen.

A sparse MLP computes, for each token, ``Σ_{e ∈ top-k(x)} w_e(x) · E_e(x)`` where each expert
``E_e(x) = (act(x W_gate,e) ⊙ x W_up,e) W_down,e`` is a gated MLP. Its input-dependent factors:

- the router's choice and weights, both at the bridge's ``MoERouterBridge`` hook points
  (``hook_expert_weights``, ``(tokens, experts)``, and ``hook_expert_indices``, ``(tokens, k)``):
  detached, the weights are constants and the selection is replayed as recorded;
- every expert's activated gate ``act(x W_gate,e)``: Hugging Face's experts (one module
  holding every expert's weights) have no TransformerLens hook point inside, so it is frozen
  at the output of their ``act_fn`` module by a PyTorch forward hook. That is the one place
  tl_linmap hooks a module rather than a hook point (`tl_linmap.hooks.applied` registers and
  removes it with the hook-point hooks);
- any other gate of the block: a shared expert's gate pre-activation (``shared_expert.hook_pre``)
  and Qwen2-MoE's ``sigmoid(x w)`` shared-expert gate (its linear's ``hook_out``).

With all of them frozen each token's MLP output is the frozen-weighted sum of its experts'
linear-in-x outputs. The experts then run through Hugging Face's eager loop (`eager`): its
grouped kernel refuses float64, and only the eager loop calls ``act_fn`` once per expert, in an
order the recorded routing fixes (`Experts` replays rely on it).
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor, nn

from tl_linmap.errors import FreezeError, InputError, UnsupportedArchitectureError

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
        A `tl_linmap.rules.Detach` of the routers' weights and indices, one of any shared
        experts' gates, and a `tl_linmap.rules.Experts` of the experts' activations (a block
        bound as a dense gated MLP, as some layers of interleaved stacks are, gets its gate).

    Raises:
        UnsupportedArchitectureError: naming the module and why, for a block whose router has no
            weight and index hook points, whose experts compute their activation inline, or
            that holds a part no rule covers.
    """
    from tl_linmap.rules import Detach, Experts

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


def freeze_hooks(rule, factors: dict | None) -> list:
    """Hooks detaching every expert call's activated gate, recording them in call order.

    Args:
        rule: A `tl_linmap.rules.Experts` rule.
        factors: Filled, per experts module path, with every call's output concatenated (or None).

    Returns:
        ``(name, fn)`` pairs: a reset at each router's indices (one forward's calls start
        there), and the detach at each ``act_fn`` module path (see `tl_linmap.hooks.applied`).
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


def replay_hooks(rule, factors: dict) -> list:
    """Hooks replacing every expert call's activated gate by the recorded one, for any batch.

    For a batch of ``k`` rows with the routing of the recorded one (``k`` copies of its tokens),
    expert ``e``'s call holds, slot by slot, the recorded rows of that slot tiled ``k`` times.

    Args:
        rule: A `tl_linmap.rules.Experts` rule.
        factors: Recorded by `freeze_hooks`, with the routers' indices.

    Returns:
        ``(name, fn)`` pairs, as `freeze_hooks`.

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


@dataclass(frozen=True)
class ExpertContributions:
    """Which expert of one block carried which token's contribution to a target.

    With every factor frozen the target is affine in the block's MLP output, and that output is
    the frozen-weighted sum of the experts' outputs, each linear in the token embeddings; so
    ``J_i x_i`` splits exactly into one part per expert of the block and the rest (every other
    path: attention, the residual stream, a shared expert, other blocks).

    Attributes:
        values: ``(expert, pos, d_out)``: token ``i``'s contribution through expert ``experts[j]``.
        rest: ``(pos, d_out)``: token ``i``'s contribution along every other path.
        experts: The experts the router chose for some token up to the target (the others carry nothing).
        layer: The block.
        target: Target hook name.
        position: Target position.
        tokens: The prompt's token ids.
    """

    values: Float[Tensor, "expert pos d_out"]
    rest: Float[Tensor, "pos d_out"]
    experts: tuple[int, ...]
    layer: int
    target: str
    position: int
    tokens: Tensor

    def contributions(self) -> Float[Tensor, "pos d_out"]:
        """Per-token contributions ``J_i x_i``: the experts' parts plus the rest.

        Returns:
            ``values.sum(0) + rest``.
        """
        return self.values.sum(0) + self.rest

    def norms(self) -> Float[Tensor, "expert pos"]:
        """How much each expert carried of each token's contribution.

        Returns:
            The norm of every ``values[j, i]``.
        """
        return self.values.norm(dim=-1)

    def __repr__(self) -> str:
        carried = self.norms().sum(1)
        top = ", ".join(f"{e}: {float(c):.3g}" for e, c in sorted(zip(self.experts, carried.tolist()), key=lambda ec: -ec[1])[:4])
        return (
            f"ExpertContributions(block {self.layer}, {self.target} at position {self.position}, "
            f"{len(self.experts)} experts; summed norm carried: {top})"
        )


def expert_contributions(
    model, prompt_or_tokens, layer: int, *, target: str = "output", position: int = -1, dtype: torch.dtype | None = torch.float64
) -> ExpertContributions:
    """Split every token's contribution to a target by the expert of one block that carried it.

    Each expert's part is a replay of the frozen system with the block's frozen router weights
    kept for that expert only, minus one with them all zero: one forward of one row per token each.

    Args:
        model: A TransformerBridge of a supported mixture-of-experts architecture.
        prompt_or_tokens: One prompt as text or token ids.
        layer: A block whose MLP is a mixture of experts.
        target: ``"output"`` or a hook name.
        position: Target position (``-1``: the last token).
        dtype: Working dtype (the model comes back bit for bit).

    Returns:
        An `ExpertContributions`.

    Raises:
        InputError: for a block without a router, or a bad prompt, target, position or dtype.
    """
    from tl_linmap.compat import check_model
    from tl_linmap.hooks import rules_for
    from tl_linmap.implicit import _one_token_each
    from tl_linmap.system import frozen_system

    check_model(model)
    names = [n for rule in rules_for(model) if rule.kind == "router" for n in rule.hook_names()]
    weights = next((n for n in names if n.startswith(f"blocks.{layer}.") and n.endswith(".hook_expert_weights")), None)
    if not isinstance(layer, int) or weights is None:
        routed = sorted({int(n.split(".")[1]) for n in names})
        raise InputError(f"layer={layer!r} is not a block with a mixture-of-experts router; this model's are {routed}.")
    indices = weights.replace("hook_expert_weights", "hook_expert_indices")
    with frozen_system(model, prompt_or_tokens, [target], position=position, dtype=dtype) as system:
        name, last = system.names[0], system.position
        x = system.x[0].detach()
        rows = _one_token_each(x, range(last + 1))
        experts = tuple(torch.unique(system.factors[indices][: last + 1]).tolist())  # rows are the prompt's tokens
        recorded = system.factors[weights]

        def through(keep: list[int]) -> Tensor:
            mask = torch.zeros(recorded.shape[-1], dtype=recorded.dtype, device=recorded.device)
            mask[keep] = 1
            masked = dataclasses.replace(system, factors={**system.factors, weights: recorded * mask}, biases=None)
            return masked.push(rows)[0][name]

        with torch.no_grad():
            none = through([])
            values = torch.stack([through([e]) - none for e in experts])
            total = system.push(rows)[0][name]
        return ExpertContributions(
            values=_padded(values, len(x)), rest=_padded(total - values.sum(0), len(x)), experts=experts, layer=layer,
            target=name, position=last, tokens=system.tokens[0],
        )


def _padded(values: Tensor, n: int) -> Tensor:
    # Tokens after the target contribute nothing: zero rows up to the prompt's length.
    return torch.cat([values, values.new_zeros(*values.shape[:-2], n - values.shape[-2], values.shape[-1])], dim=-2)
