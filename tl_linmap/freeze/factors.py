"""Recorded factors cut and padded: to a window of positions, to a longer prompt, to one block and position.

A replay substitutes recorded factors (`tl_linmap.freeze.hooks.replay_hooks`); these functions fit
them to a replay over fewer or more positions than the pass they were recorded in.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tl_linmap.base.compat import get_act_name
from tl_linmap.freeze.architectures import rules_for
from tl_linmap.freeze.hooks import Factors, HookList, factor_names_of
from tl_linmap.freeze.rules import Ratio
from tl_linmap.freeze.structure import layer_of


def slice_factors(model, factors: Factors, start: int, stop: int) -> Factors:
    """Factors of positions ``[start, stop)`` only, for replaying a window of the prompt.

    With the factors frozen, a window's linear part is exactly the full prompt's restricted
    to inputs in the window: what earlier positions add is all affine (their inputs are zero).

    Args:
        model: The model the factors were recorded on.
        factors: Recorded by `freeze_hooks`.
        start: First position kept.
        stop: One past the last position kept.

    Returns:
        The sliced factors, cut on every sequence axis the rule table names.
    """
    sliced = {}
    for rule in rules_for(model):
        for name in factor_names_of(rule):
            factor = factors[name]
            for axis in _position_axes(rule, factor):
                factor = factor.narrow(axis, start, stop - start)
            sliced[name] = factor
    return sliced


def pad_factors(model, factors: Factors, length: int) -> Factors:
    """Factors of a shorter prompt extended to ``length`` positions, for a batch padded on the right.

    The pad positions come after every real one, so under causal attention their values only
    need to be finite: a pattern (two position axes) is padded with zeros, so no real query
    reads a pad key; every other factor with ones.

    Args:
        model: The model the factors were recorded on.
        factors: Recorded by `freeze_hooks` on one prompt (batch 1).
        length: Positions wanted (at least the prompt's).

    Returns:
        The padded factors.
    """
    padded = {}
    for rule in rules_for(model):
        for name in factor_names_of(rule):
            factor = factors[name]
            axes = _position_axes(rule, factor)
            fill = 0.0 if len(axes) > 1 else 1.0
            for axis in axes:
                extra = list(factor.shape)
                extra[axis] = length - factor.shape[axis]
                factor = torch.cat([factor, factor.new_full(extra, fill)], dim=axis)
            padded[name] = factor
    return padded


def windowable(model) -> bool:
    """Whether every factor of the model can be cut to a window of the prompt (`slice_factors`).

    Args:
        model: A TransformerBridge or HookedTransformer of a supported architecture.

    Returns:
        False where some rule's factor would change with fewer positions (a pattern frozen
        through its queries and keys).
    """
    return all(rule.windows for rule in rules_for(model))


def _position_axes(rule, factor: Tensor) -> tuple[int, ...]:
    if isinstance(rule, Ratio):
        return (1,)
    if rule.position_axes is None:  # an attention-internal norm: per head (batch, head, pos, 1) or whole (batch, pos, 1)
        return (2,) if factor.ndim == 4 else (1,)
    return rule.position_axes


def trim_hooks(layer: int, position: int | Tensor) -> HookList:
    """Hooks that compute block ``layer`` after its attention at one position only.

    The attention output (at ``hook_z``, before the output projection) and the MLP branch's
    input (at ``ln2.hook_in``) are cut to ``position``; the block's residual additions then
    broadcast that one position over the sequence. So the block's output is right at
    ``position`` (and only there): what a target read at ``position`` after this block
    needs, without the output projection and MLP products of every other position (no
    wasted rows in reverse mode). The block's `after_attention` factors must be cut alike
    (`trim_factors`).

    Args:
        layer: Block index.
        position: Non-negative position kept, or one per batch row (a batch of prompts).

    Returns:
        ``(hook_name, fn)`` pairs for ``model.hooks(fwd_hooks=...)``.
    """

    def cut(act: Tensor, hook=None) -> Tensor:
        return at_rows(act, position)

    return [(get_act_name("z", layer), cut), (f"blocks.{layer}.ln2.hook_in", cut)]


def at_rows(act: Tensor, position: int | Tensor) -> Tensor:
    """Axis 1 of a tensor cut to one position, kept as an axis of length 1.

    Args:
        act: A tensor with batch and position axes first.
        position: One position for every row, or one per row (a tensor of ``len(act)`` ints).

    Returns:
        ``act[:, position:position + 1]``, or each row's own position.
    """
    if isinstance(position, Tensor):
        return act[torch.arange(len(act), device=act.device), position][:, None]
    return act[:, position : position + 1]


def trim_factors(model, factors: Factors, layer: int, position: int | Tensor) -> Factors:
    """The factors with block ``layer``'s `after_attention` ones cut to ``position`` (see `trim_hooks`).

    Args:
        model: The model the factors were recorded on.
        factors: Recorded by `freeze_hooks`.
        layer: Block index.
        position: Non-negative position kept, or one per prompt of batched factors.

    Returns:
        A new dict; the other factors are shared.
    """
    trimmed = dict(factors)
    for rule in rules_for(model):
        if rule.after_attention:
            for name in factor_names_of(rule):
                if layer_of(name) == layer:
                    trimmed[name] = at_rows(factors[name], position)
    return trimmed
