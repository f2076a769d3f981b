"""circuit-tracer's replacement models: their per-layer transcoders as splices.

A ``ReplacementModel`` (circuit-tracer 0.5, TransformerLens backend) is a HookedTransformer whose
MLPs are wrapped (``blocks.L.mlp.old_mlp``, with ``mlp.hook_in`` / ``mlp.hook_out`` around it) and
whose forward keeps the real MLP output: its permanent hooks only steer gradients (patterns and
norm scales detached, the MLP's reduced to the transcoder's skip path). tl_linmap splices each
layer's transcoder at ``mlp.hook_out`` (`ReplacementSplice`): the MLP's output becomes the
transcoder's reconstruction plus the error ``mlp - x̂``, constant by default (circuit-tracer's
convention) or live. Its JumpReLU and TopK keep negative pre-activations (``signed``).

A cross-layer transcoder's features are read at one layer and written into that layer's and every
later layer's MLP output: one `CrossLayerSplice` per layer, sharing the activations each layer's
encoder computed, so that layer ``l``'s output is ``Σ_{i≤l} a_i W_dec[i][:, l-i] + b_dec[l] (+ skip)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

from torch import Tensor

from tl_linmap.base.errors import UnsupportedArchitectureError
from tl_linmap.freeze.dictionary import Dictionary
from tl_linmap.freeze.rules import HookFn
from tl_linmap.freeze.splices import DictionarySplice, Splice, keep_hook


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
        return [(f"{block}.mlp.old_mlp", keep_hook(live, "orig"))]


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
        UnsupportedArchitectureError: for an activation no rule covers.
    """
    if not is_replacement(model):
        return []
    transcoders = model.transcoders
    out = model.original_feature_output_hook
    if not hasattr(transcoders, "transcoders"):
        return cross_layer_splices(model, transcoders, convention)
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


@dataclass(frozen=True, eq=False)
class CrossLayerSplice(DictionarySplice):
    """One layer of a cross-layer transcoder: its encoder read at ``hook_in``, and its MLP output rebuilt
    from the activations of this and every earlier layer (``shared``, filled by their encoders' hooks).

    Its freeze, replay and node hooks are a `DictionarySplice`'s, with the activations computed where
    the layer's input is read (later layers need them) and the output summed over the layers' decoders.

    Attributes:
        layer: The block.
        dictionary: Its encoder and its features' decoder into its own layer.
        decoders: ``W_dec[i][:, layer - i]`` for every ``i ≤ layer``: what layer ``i``'s features write here.
        b_dec: This layer's decoder bias.
        W_skip: ``(d, d)`` applied as ``x @ W_skip`` (circuit-tracer's orientation), or None.
        shared: Activations per layer, shared by the transcoder's splices in one hook list.
    """

    layer: int = 0
    decoders: tuple[Tensor, ...] = field(default=(), repr=False)
    b_dec: Tensor | None = field(default=None, repr=False)
    W_skip: Tensor | None = field(default=None, repr=False)
    shared: dict = field(default_factory=dict, repr=False)

    def _hooks(self, acts_of: Callable[[Dictionary, Tensor], Tensor], error_of: Callable[[Tensor, Tensor], Tensor], inputs: dict | None = None) -> list[tuple[str, HookFn]]:
        # Its input is always at a hook point of its own (the block's MLP input): ``inputs`` stays empty.
        live: dict = {}
        d = self.dictionary

        def encode(act: Tensor, hook=None) -> None:
            x = live["x"] = act.flatten(2)
            self.shared[self.layer] = acts_of(self.weights(x), x)

        def write(act: Tensor, hook=None) -> Tensor:
            x, orig = live.pop("x"), live.pop("orig")
            recons = self.b_dec.to(x) + sum(self.shared[i] @ w.to(x) for i, w in enumerate(self.decoders))
            if self.W_skip is not None:
                recons = recons + x @ self.W_skip.to(x)
            return error_of(recons.reshape(orig.shape), orig)

        return [(d.hook_in, encode), (f"blocks.{self.layer}.mlp.old_mlp", keep_hook(live, "orig")), (d.hook_out, write)]


def cross_layer_splices(model, clt, convention: str) -> list[Splice]:
    """A cross-layer transcoder's layers as splices sharing their activations.

    Args:
        model: A ``ReplacementModel`` with a ``CrossLayerTranscoder``.
        clt: The transcoder.
        convention: The error convention.

    Returns:
        One `CrossLayerSplice` per layer.

    Raises:
        UnsupportedArchitectureError: for an activation other than ReLU and JumpReLU.
    """
    act = clt.activation_function
    jump = type(act).__name__ == "JumpReLU"
    if not jump and getattr(act, "__name__", None) != "relu":
        raise UnsupportedArchitectureError(f"The ReplacementModel's cross-layer transcoder has the activation {act!r}: tl_linmap freezes ReLU and JumpReLU.")
    shared: dict = {}
    decoders = [clt._get_decoder_vectors(i).detach() for i in range(clt.n_layers)]  # (d_tc, n_layers - i, d_model)
    splices: list[Splice] = []
    for layer in range(clt.n_layers):
        options = dict(activation="jumprelu", threshold=act.threshold[layer].detach().reshape(-1)) if jump else dict(activation="relu")
        own = Dictionary(
            W_enc=clt._get_encoder_weights(layer).detach().T, b_enc=clt.b_enc[layer].detach(), W_dec=decoders[layer][:, 0],
            b_dec=clt.b_dec[layer].detach(), hook_in=f"blocks.{layer}.{clt.feature_input_hook}", hook_out=f"blocks.{layer}.{model.original_feature_output_hook}",
            signed=True, **options,
        )
        skip = None if clt.W_skip is None else clt.W_skip[layer].detach()
        splices.append(CrossLayerSplice(own, error=convention, layer=layer, decoders=tuple(decoders[i][:, layer - i] for i in range(layer + 1)),
                                        b_dec=clt.b_dec[layer].detach(), W_skip=skip, shared=shared))
    return splices
