"""A TransformerBridge's structure: where its input-dependent factors are, and what no rule covers.

The bridge wraps each Hugging Face module in a component of a known kind (a normalisation,
an attention, an MLP, a mixture of experts, a linear map); the kind says which factor it has
and at which hook point. `check_supported` refuses a block holding anything else (a
state-space mixer, a convolution, a norm without ``hook_scale``), naming the module.
"""

from __future__ import annotations

import re
from collections import defaultdict

from tl_linmap.base.errors import UnsupportedArchitectureError
from tl_linmap.freeze import moe
from tl_linmap.freeze.rules import BRIDGE_POINTWISE, Detach, Ratio

#: Bridge component classes by what they are (matched on the class's MRO, so subclasses count).
NORMS = ("NormalizationBridge", "RMSNormalizationBridge", "LayerNormPreBridge", "RMSNormPreBridge")


ATTENTIONS = ("AttentionBridge",)


MLPS = ("MLPBridge",)


GATED_MLPS = ("GatedMLPBridge",)


MOES = ("MoEBridge",)


LINEARS = ("LinearBridge", "EmbeddingBridge", "RotaryEmbeddingBridge", "PosEmbedBridge")


#: Components that subclass a known kind but compute something no rule freezes, with the reason.
REFUSED_COMPONENTS = {
    "GatedRMSNormBridge": "a norm multiplied by an input-dependent gate",
    "SSMMixerBridge": "a state-space recurrence (selective scan)",
    "SSM2MixerBridge": "a state-space recurrence (selective scan)",
    "SSMBlockBridge": "a state-space block",
    "GatedDeltaNetBridge": "a gated linear-attention recurrence",
    "Lfm2ShortConvBridge": "an input-gated short convolution",
    "AltUpBlockBridge": "AltUp's input-dependent prediction and correction",
    "OpaqueBlockBridge": "a block whose computation TransformerLens does not expose",
    "DelegatedAttentionBlockBridge": "a block whose attention TransformerLens does not expose",
    "GlmMoeDsaAttentionBridge": "a dynamically sparse attention (an input-dependent token selection inside attention)",
}


#: Norm locations that act before any block (their factor is never trimmed).
BEFORE_BLOCKS = ("embed_ln", "ln_final")


_LAYER = re.compile(r"^blocks\.(\d+)\.")


def _is(component, kinds: tuple[str, ...]) -> bool:
    return any(cls.__name__ in kinds for cls in type(component).__mro__)


def _described(path: str, component) -> str:
    original = getattr(component, "original_component", None)
    wrapped = f" wrapping {type(original).__name__}" if original is not None else ""
    return f"{path} ({type(component).__name__}{wrapped})"


def check_supported(model) -> None:
    """Refuse a bridge that holds a module no freeze rule covers.

    Args:
        model: A TransformerBridge.

    Raises:
        UnsupportedArchitectureError: naming the first such module and why.
    """
    for layer, block in enumerate(model.blocks):
        problem = _block_problem(block, f"blocks.{layer}")
        if problem:
            raise UnsupportedArchitectureError(
                f"{model.cfg.architecture}: {problem}; tl_linmap has no freeze rule for it, so the "
                "detached system would not be the model's."
            )


def _block_problem(block, path: str) -> str | None:
    for component in (block, *block.children()):
        name = type(component).__name__
        if name in REFUSED_COMPONENTS:
            return f"{_described(path, component)} is {REFUSED_COMPONENTS[name]}"
    for key, child in block.named_children():
        if key in ("original_component", "_original_component") or not hasattr(child, "original_component"):
            continue
        if not _is(child, NORMS + ATTENTIONS + MLPS + MOES + LINEARS):
            return f"{_described(f'{path}.{key}', child)} is a component of a kind tl_linmap does not know"
    # A norm counts as covered only where a norm bridge (with hook_scale) wraps it, or where a
    # plain component wraps an RMS norm, whose factor a ratio at its hook_in/hook_out freezes.
    bridges = {id(m.original_component): m for m in block.modules() if getattr(m, "original_component", None) is not None}
    hf_block = getattr(block, "original_component", None)
    for hf_path, module in (hf_block.named_modules() if hf_block is not None else ()):
        if "norm" not in type(module).__name__.lower() or hasattr(module, "original_component"):
            continue
        bridge = bridges.get(id(module))
        hf_path = re.sub(r"\._?original_component", "", hf_path)  # as Hugging Face names it
        if bridge is None:
            return f"{path}: Hugging Face's {hf_path} ({type(module).__name__}) is a normalisation with no hook_scale"
        if not _is(bridge, NORMS) and not _is_rms(module):
            return (
                f"{path}: Hugging Face's {hf_path} ({type(module).__name__}) is a normalisation the bridge wraps in a "
                f"{type(bridge).__name__}, with no hook_scale, and it is not an RMS norm (a pointwise scaling)"
            )
    return None


def _is_rms(module) -> bool:
    # x · w / rms(x): a diagonal scaling of x, so its factor is the ratio out / x.
    return "rmsnorm" in type(module).__name__.lower() and getattr(module, "bias", None) is None


def norm_ratios(model) -> list:
    """Rules for RMS norms the bridge wraps without a ``hook_scale`` (MLA's query latent norm).

    Such a norm computes ``x · w / rms(x)``, a diagonal scaling of ``x``: its factor is the ratio
    ``out / x`` between the wrapping component's ``hook_in`` and ``hook_out``, which a `Ratio`
    freezes exactly as freezing ``rms(x)`` would.

    Args:
        model: A TransformerBridge (checked by `check_supported`).

    Returns:
        One `Ratio` rule per location of such norms (none for most models).
    """

    groups: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for block in model.blocks:
        for component in block.modules():
            original = getattr(component, "original_component", None)
            if original is None or _is(component, NORMS) or not _is_rms(original) or not hasattr(component, "hook_in"):
                continue
            pair = (component.hook_in.name, component.hook_out.name)
            location = _LAYER.sub("blocks.{}.", pair[0])
            if pair not in groups[location]:  # a bridge is reachable under its parent and its parent's original
                groups[location].append(pair)
    return [
        Ratio(tuple(sorted(pairs, key=lambda pair: _block_order(pair[0]))), after_attention=".attn." not in location, kind="norm (ratio)")
        for location, pairs in groups.items()
    ]


def each_block(model, suffix: str) -> list[str]:
    """One hook name per block, checked to exist.

    Args:
        model: A TransformerBridge.
        suffix: The hook's name inside a block, e.g. ``"attn.hook_pattern"``.

    Returns:
        ``blocks.L.<suffix>`` for every block.

    Raises:
        UnsupportedArchitectureError: if a block lacks it.
    """
    names = [f"blocks.{layer}.{suffix}" for layer in range(model.cfg.n_layers)]
    missing = [name for name in names if name not in model.hook_dict]
    if missing:
        raise UnsupportedArchitectureError(
            f"{model.cfg.architecture} has no hook point {missing[0]}: tl_linmap cannot freeze that block's "
            f"{suffix.split('.')[0]} factor."
        )
    return names


def norm_scales(hook_names) -> dict[str, tuple[str, ...]]:
    """Every normalisation's ``hook_scale``, grouped by where the norm sits.

    Args:
        hook_names: The model's hook names.

    Returns:
        ``{"blocks.{}.ln1": ("blocks.0.ln1.hook_scale", ...), "ln_final": ("ln_final.hook_scale",)}``,
        names in block order.
    """
    groups: dict[str, list[str]] = defaultdict(list)
    for name in hook_names:
        if name.endswith(".hook_scale"):
            groups[_LAYER.sub("blocks.{}.", name)[: -len(".hook_scale")]].append(name)
    return {location: tuple(sorted(names, key=_block_order)) for location, names in groups.items()}


def layer_of(name: str) -> int | None:
    """The block a hook name belongs to.

    Args:
        name: A hook name.

    Returns:
        Its block index, or None for a hook outside the blocks.
    """
    match = _LAYER.match(name)
    return int(match.group(1)) if match else None


def _block_order(name: str) -> int:
    # A sort key: hooks outside the blocks first, then block by block.
    layer = layer_of(name)
    return -1 if layer is None else layer


#: Norm bridges that apply no weight to an edited scale (TransformerLens's param-free norms).
PARAM_FREE_NORMS = ("LayerNormPreBridge", "RMSNormPreBridge")


def rebuilt_norm(model, scale: str) -> bool | None:
    """Whether a norm's factor is frozen by rebuilding its output (`tl_linmap.freeze.rules.Rebuild`).

    TransformerLens 4.3's norm bridge applies an edited ``hook_scale`` through the norm's weight
    (``NormalizationBridge._apply_weight_and_bias`` reads ``self.weight``), so a norm without
    one (OLMo's LayerNorm, NanoChat's RMSNorm) fails once a hook edits its scale, unless its
    bridge is a param-free one that applies no weight.

    Args:
        model: A TransformerBridge.
        scale: The norm's ``hook_scale`` name.

    Returns:
        None where an edited scale works (the scale is detached in place), else whether the norm
        subtracts the mean (a LayerNorm) before dividing by its scale.
    """
    norm = model.get_submodule(scale.removesuffix(".hook_scale"))
    if _is(norm, PARAM_FREE_NORMS) or getattr(norm, "weight", None) is not None:
        return None
    return not norm.uses_rms_norm


def scale_axes(model, location: str) -> tuple[int, ...] | None:
    """Where a norm's scale has its sequence axis.

    A bridge runs per-head query/key norms on ``(batch, head, pos, d_head)`` and every other
    norm on ``(batch, pos, d)``.

    Args:
        model: A TransformerBridge.
        location: As keyed by `norm_scales`.

    Returns:
        The axes, or None where the layout is read off the recorded factor (attention-internal
        norms: per head with four axes, over the whole width with three).
    """
    return None if ".attn." in location else (1,)


def attention_rules(model) -> list:
    """The rules of every block's attention.

    Where the bridge computes attention itself, ``hook_pattern`` is inside the computation and
    is detached. Where it wraps Hugging Face's attention whole (a plain ``AttentionBridge``),
    ``hook_pattern`` only observes; the pattern is then frozen through what it is computed
    from, the query and key projections (``attn.q.hook_out``, ``attn.k.hook_out``): with both
    detached, ``softmax(q kᵀ)`` is constant and the values stay live. A window of the prompt
    would recompute that softmax over fewer keys, so such rules do not slice.

    Args:
        model: A TransformerBridge.

    Returns:
        One `Detach` rule per kind of attention.

    Raises:
        UnsupportedArchitectureError: for a wrapped attention without separate query and key projections.
    """

    inside, from_qk = [], []
    for layer, block in enumerate(model.blocks):
        if _pattern_inside(block.attn):
            inside.append(f"blocks.{layer}.attn.hook_pattern")
        else:
            from_qk += [f"blocks.{layer}.attn.{qk}.hook_out" for qk in "qk"]
    missing = [name for name in inside + from_qk if name not in model.hook_dict]
    if missing:
        raise UnsupportedArchitectureError(
            f"{model.cfg.architecture}: {_described(missing[0].rsplit('.', 2)[0], model.blocks[layer_of(missing[0])].attn)} "
            f"has no hook point {missing[0]}, so its attention pattern cannot be frozen."
        )
    rules = [Detach(tuple(inside), position_axes=(2, 3), kind="pattern")] if inside else []
    if from_qk:
        rules.append(Detach(tuple(from_qk), kind="pattern (q, k)", windows=False))
    return rules


def _pattern_inside(attn) -> bool:
    # The plain AttentionBridge fires hook_pattern after Hugging Face's forward, unless the
    # wrapped module takes the pattern function in (TransformerLens's native attention).
    forward_owner = next(cls.__name__ for cls in type(attn).__mro__ if "forward" in vars(cls))
    return forward_owner != "AttentionBridge" or bool(getattr(attn.original_component, "accepts_pattern_fn", False))


def mlp_rules(model) -> list:
    """The rules of every block's MLP, by its kind.

    Args:
        model: A TransformerBridge.

    Returns:
        `Detach` of the gate for gated MLPs, a `Ratio` for pointwise activations, a router's
        rules for mixtures of experts; one rule per kind, over the blocks that have it.

    Raises:
        UnsupportedArchitectureError: for an activation that is not zero at zero, or an MLP of
            no known kind.
    """

    gates, ratios, routed = [], [], []
    for layer, block in enumerate(model.blocks):
        mlp = getattr(block, "mlp", None)
        if mlp is None:
            continue
        pre, post = f"blocks.{layer}.mlp.hook_pre", f"blocks.{layer}.mlp.hook_post"
        if _is(mlp, MOES):
            routed.append(layer)
        elif _is(mlp, GATED_MLPS):
            gates.append(pre)
        elif _is(mlp, MLPS):
            act = model.cfg.act_fn
            if act not in BRIDGE_POINTWISE:
                raise UnsupportedArchitectureError(
                    f"{model.cfg.architecture}: blocks.{layer}.mlp applies act_fn={act!r}; tl_linmap freezes only "
                    f"activations with f(0) = 0 as f(x)/x ({', '.join(sorted(BRIDGE_POINTWISE))})."
                )
            ratios.append((pre, post))
        else:
            raise UnsupportedArchitectureError(f"{model.cfg.architecture}: {_described(f'blocks.{layer}.mlp', mlp)} is an MLP of no known kind.")
    rules: list = []
    if gates:
        rules.append(Detach(tuple(gates), after_attention=True, kind="gate"))
    if ratios:
        rules.append(Ratio(tuple(ratios)))
    if routed:
        rules += moe.router_rules(model, routed)
    return rules
