"""circuit-tracer's replacement models: their per-layer transcoders as splices.

A ``ReplacementModel`` (circuit-tracer 0.5, TransformerLens backend) is a HookedTransformer whose
MLPs are wrapped (``blocks.L.mlp.old_mlp``, with ``mlp.hook_in`` / ``mlp.hook_out`` around it) and
whose forward keeps the real MLP output: its permanent hooks only steer gradients (patterns and
norm scales detached, the MLP's reduced to the transcoder's skip path). tl_linmap splices each
layer's transcoder at ``mlp.hook_out`` (`ReplacementSplice`): the MLP's output becomes the
transcoder's reconstruction plus the error ``mlp - x̂``, constant by default (circuit-tracer's
convention) or live. Its JumpReLU and TopK keep negative pre-activations (``signed``).

A cross-layer transcoder is refused (see `CROSS_LAYER`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch import Tensor

from tl_linmap.base.errors import UnsupportedArchitectureError
from tl_linmap.freeze.dictionary import Dictionary
from tl_linmap.freeze.splices import DictionarySplice, HookFn, Splice, _keep

CROSS_LAYER = (
    "a cross-layer transcoder's features write every later layer's MLP output, so one layer's output is a sum over "
    "the encoders of all earlier layers: tl_linmap's splices are one dictionary per hook point, and this release "
    "does not splice one dictionary across several (single-layer transcoders, with or without skip, are covered)"
)


def is_replacement(model) -> bool:
    """Whether a model is a circuit-tracer ``ReplacementModel`` on TransformerLens.

    Args:
        model: Any model.

    Returns:
        True when it carries transcoders and wraps its MLPs (``blocks.0.mlp.old_mlp``).
    """
    return hasattr(model, "transcoders") and hasattr(model, "original_feature_output_hook")


@dataclass(frozen=True, eq=False)
class ReplacementSplice(DictionarySplice):
    """One layer's transcoder of a ``ReplacementModel``, spliced at ``blocks.L.mlp.hook_out``.

    The model's own MLP output, for the error, is its wrapped MLP's (``blocks.L.mlp.old_mlp``):
    the value at ``mlp.hook_out`` has passed circuit-tracer's skip hook, whose gradient is the skip's.
    """

    def _original(self, live: dict) -> list[tuple[str, HookFn]]:
        block = ".".join(self.site.split(".")[:2])
        return [(f"{block}.mlp.old_mlp", _keep(live, "orig"))]


def _dictionary(transcoder, layer: int, hook_in: str, hook_out: str) -> Dictionary:
    act = transcoder.activation_function
    kind = type(act).__name__
    if kind == "JumpReLU":
        options = dict(activation="jumprelu", threshold=act.threshold.detach().expand(transcoder.W_enc.shape[0]))
    elif kind == "TopK":
        options = dict(activation="topk", k=act.k)
    elif getattr(act, "__name__", None) == "relu" or kind == "ReLU":
        options = dict(activation="relu")
    else:
        raise UnsupportedArchitectureError(
            f"The ReplacementModel's transcoder of layer {layer} ({hook_out!r}) has the activation {act!r}: tl_linmap "
            "freezes ReLU, JumpReLU and TopK (a 0/1 mask of its pre-activations)."
        )
    weights: dict[str, Tensor] = dict(
        W_enc=transcoder.W_enc.detach().T, b_enc=transcoder.b_enc.detach(), W_dec=transcoder.W_dec.detach(), b_dec=transcoder.b_dec.detach()
    )
    skip = getattr(transcoder, "W_skip", None)
    return Dictionary(**weights, W_skip=None if skip is None else skip.detach(), hook_in=hook_in, hook_out=hook_out, signed=True, **options)


def replacement_splices(model, convention: str) -> list[Splice]:
    """The transcoders of a circuit-tracer ``ReplacementModel``, one splice per layer.

    Args:
        model: Any model; only a ``ReplacementModel`` has any.
        convention: The error convention (``"constant"`` unless `tl_linmap.spliced` names another).

    Returns:
        The splices, in layer order.

    Raises:
        UnsupportedArchitectureError: for a cross-layer transcoder or an activation no rule covers.
    """
    if not is_replacement(model):
        return []
    transcoders = model.transcoders
    if not hasattr(transcoders, "transcoders"):
        raise UnsupportedArchitectureError(f"The ReplacementModel's {type(transcoders).__name__}: {CROSS_LAYER}.")
    out = model.original_feature_output_hook
    return [
        ReplacementSplice(_dictionary(tc, layer, f"blocks.{layer}.{model.feature_input_hook}", f"blocks.{layer}.{out}"), error=convention)
        for layer, tc in enumerate(transcoders.transcoders)
    ]


def replacement_rules(model, rules: tuple) -> tuple:
    """A HookedTransformer's rules with their hook names as a ``ReplacementModel`` has them.

    Args:
        model: A HookedTransformer.
        rules: From `tl_linmap.freeze.architectures.hooked_rules`.

    Returns:
        The rules, the MLP's own hook points (``blocks.L.mlp.hook_pre``) under ``blocks.L.mlp.old_mlp``.
    """
    if not is_replacement(model):
        return rules

    def moved(name: str) -> str:
        return name.replace(".mlp.hook_", ".mlp.old_mlp.hook_")

    return tuple(
        replace(rule, pairs=tuple((moved(a), moved(b)) for a, b in rule.pairs)) if hasattr(rule, "pairs") else replace(rule, names=tuple(map(moved, rule.names)))
        for rule in rules
    )
