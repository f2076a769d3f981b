"""Freeze-rule value types: what to do with the factor ``A(x)`` found at some hook points.

Every nonlinearity of a supported transformer is a product ``A(x) · x`` whose factor
``A(x)`` is visible at one TransformerLens hook point. A rule names that hook point and
how to freeze the factor there; `tl_linmap.freeze.architectures` says which rules a model has.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Union

from torch import Tensor

#: A TransformerLens hook function: ``fn(act, hook=None)`` returns the replacement, or None to keep ``act``.
HookFn = Callable[..., "Tensor | None"]


@dataclass(frozen=True)
class Detach:
    """The activation at these hook points *is* the factor: detach it.

    Used for norm scales (``x / scale``), attention patterns (``pattern · V``), the gate
    pre-activation of gated MLPs (detaching ``x W_gate`` freezes the whole activated gate
    ``act(x W_gate)`` while ``x W_in`` stays linear) and a mixture-of-experts router's
    choice and weights.
    """

    names: tuple[str, ...]
    position_axes: tuple[int, ...] = (1,)  # where the factor's sequence axes are (for windows)
    #: Fires on the MLP branch or after the attention's output projection: on tensors
    #: `tl_linmap.freeze.factors.trim_hooks` cuts to the target position in the last block a target reads.
    after_attention: bool = False
    #: What the factor is, for the support matrix and error messages.
    kind: str = "norm"
    #: Whether a window of the prompt (`tl_linmap.freeze.factors.slice_factors`) replays the factor exactly.
    windows: bool = True

    def hook_names(self) -> list[str]:
        """Hook names this rule covers.

        Returns:
            The hook names, in block order.
        """
        return list(self.names)


@dataclass(frozen=True)
class Ratio:
    """A pointwise activation ``post = act(pre)`` written as ``(act(pre) / pre) · pre``.

    The ratio is frozen while ``pre`` stays live. ``ratio_at_zero`` is the limit of
    ``act(p) / p`` at ``p = 0`` (``act'(0) = 1/2`` for GELU and its tanh form); any
    finite value keeps the system exact since it multiplies ``pre == 0``.
    """

    pairs: tuple[tuple[str, str], ...]
    ratio_at_zero: float = 0.5
    after_attention: bool = True
    kind: str = "activation"
    windows: bool = True

    def hook_names(self) -> list[tuple[str, str]]:
        """(pre, post) hook-name pairs, one per block.

        Returns:
            ``[(blocks.L.mlp.hook_pre, blocks.L.mlp.hook_post), ...]`` (``hook_mid`` where a norm follows).
        """
        return list(self.pairs)


@dataclass(frozen=True)
class Experts:
    """A mixture of experts' experts, each ``act(x W_gate) · (x W_up)``: every call's activated gate frozen.

    Hugging Face's experts have no TransformerLens hook point inside, so the activated gate is
    frozen at the output of the experts' ``act_fn`` module, one call per expert the router
    chose (`tl_linmap.methods.experts`). ``names`` are those modules' paths in the model; the
    recorded factor of each is every call's output, concatenated in the eager loop's call order,
    which the router's recorded indices (``indices``, one hook name per block) reproduce.
    """

    names: tuple[str, ...]
    indices: tuple[str, ...]
    after_attention: bool = True
    kind: str = "experts"
    windows: bool = False

    def hook_names(self) -> list[str]:
        """Module paths of the experts' activations, one per block.

        Returns:
            ``[".../experts.act_fn", ...]``, in block order.
        """
        return list(self.names)


@dataclass(frozen=True)
class Rebuild:
    """A norm whose bridge refuses an edited ``hook_scale``: its output rebuilt with the scale frozen.

    TransformerLens 4.3's norm bridges apply an edited scale through the norm's weight, which a
    weightless norm (OLMo's LayerNorm, NanoChat's RMSNorm) lacks (`tl_linmap.freeze.structure.rebuilt_norm`).
    Its scale is read at ``hook_scale`` (observed, not edited) and ``hook_out`` is replaced by
    ``c(x) / scale`` with ``x`` from ``hook_in``, the scale frozen, and ``c`` the centering
    ``x - mean(x)`` of a LayerNorm (the identity for an RMSNorm): the same linear part and factor
    as `Detach` at ``hook_scale`` would freeze. The factor is recorded under the ``hook_scale`` name.
    """

    names: tuple[str, ...]  # the norms' hook_scale names
    centered: bool
    position_axes: tuple[int, ...] | None = (1,)
    after_attention: bool = False
    kind: str = "norm"
    windows: bool = True

    def hook_names(self) -> list[str]:
        """The norms' ``hook_scale`` names, under which their factors are recorded.

        Returns:
            The hook names, in block order.
        """
        return list(self.names)

    @staticmethod
    def hook_in(name: str) -> str:
        """The hook point whose value the norm normalises.

        Args:
            name: One of `names`.

        Returns:
            ``<norm>.hook_in``.
        """
        return name.removesuffix("hook_scale") + "hook_in"

    @staticmethod
    def hook_out(name: str) -> str:
        """The hook point where the rebuilt output replaces the norm's.

        Args:
            name: One of `names`.

        Returns:
            ``<norm>.hook_out``.
        """
        return name.removesuffix("hook_scale") + "hook_out"


Rule = Union[Detach, Ratio, Experts, Rebuild]


#: HookedTransformer MLP activations that are pointwise with ``f(0) = 0``, so ``f(x) = (f(x)/x)·x``
#: with the ratio frozen; a gated MLP freezes its whole activated gate, whatever its activation.
POINTWISE_ACTIVATIONS = frozenset({"relu", "gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh", "silu", "solu", "solu_ln"})


#: Hugging Face activation names (a bridge's ``cfg.act_fn``) that are pointwise with ``f(0) = 0``.
BRIDGE_POINTWISE = POINTWISE_ACTIVATIONS | {"gelu_python", "gelu_10", "gelu_accurate", "quick_gelu", "swish", "relu2", "relu6", "xielu", "bloom_gelu"}
