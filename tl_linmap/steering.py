"""Steering: add the concept a linear map carries into another prompt's residual stream.

A source prompt's map at ``blocks.L.hook_resid_post`` says which direction its tokens
write into layer L's residual stream. `steering_hooks` adds that direction to another
run, scaled to the residual norm at each position, so one ``alpha`` means the same on
every layer and model. The hooks work with ``model.hooks``, ``run_with_hooks`` and
``model.generate`` (with or without the KV cache: a cached step sees one position).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Literal, Union

import torch
from jaxtyping import Float
from torch import Tensor

from tl_linmap.compat import get_act_name
from tl_linmap.errors import InputError
from tl_linmap.hooks import HookList
from tl_linmap.results import LinearMap, LinearMaps

Positions = Union[Literal["all"], Sequence[int], slice]


def concept_vector(
    source: LinearMap,
    *,
    how: Literal["contributions", "singular"] = "contributions",
    skip_first: bool = True,
    k: int = 1,
) -> Float[Tensor, " d_model"]:
    """The direction a source prompt's tokens write into its target.

    Args:
        source: A map of a residual-stream target.
        how: ``"contributions"``: the sum of the tokens' contributions ``Σ_i J_i x_i``;
            ``"singular"``: the top-``k`` left singular directions of the stacked operator
            ``[J_0 … J_n]``, weighted by their singular values and signed along the output.
        skip_first: Leave out the first token (BOS or attention sink, whose operator
            dominates without carrying the concept).
        k: Singular directions used with ``how="singular"``.

    Returns:
        A unit vector in the target's space.
    """
    start = 1 if skip_first and len(source.tokens) > 1 else 0
    if how == "contributions":
        vector = source.contributions()[start:].sum(0)
    elif how == "singular":
        stacked = torch.cat(list(source.operators[start : source.position + 1]), dim=1)
        u, values, _ = torch.linalg.svd(stacked, full_matrices=False)
        left = u[:, :k].T
        left = left * torch.where(left @ source.output >= 0, 1.0, -1.0).to(left)[:, None]  # along the output
        vector = values[:k] @ left
    else:
        raise InputError(f"how must be 'contributions' or 'singular', got {how!r}.")
    return vector / vector.norm()


def steering_hooks(
    source: LinearMap | LinearMaps,
    *args,
    layer: int,
    alpha: float = 1.0,
    positions: Positions = "all",
    how: Literal["contributions", "singular"] = "contributions",
    skip_first: bool = True,
) -> HookList:
    """Hooks that add a source prompt's concept to ``blocks.{layer}.hook_resid_post``.

    At each steered position the residual ``r`` becomes ``r + alpha · ‖r‖ · v`` with
    ``v`` the unit `concept_vector`.

    Args:
        source: A map of layer ``layer``'s residual stream, or `LinearMaps` containing one.
        layer: Block whose output is steered.
        alpha: Strength, relative to the residual norm at each position.
        positions: ``"all"`` (also every new position during generation), or indices /
            a slice into the positions of each forward call.
        how: See `concept_vector`.
        skip_first: See `concept_vector`.
        *args: Only the deprecated form ``steering_hooks(model, source, ...)``, whose ``model``
            was never used.

    Returns:
        ``(hook_name, fn)`` pairs for ``model.hooks(fwd_hooks=...)`` or ``run_with_hooks``.
    """
    if args:
        if len(args) != 1 or isinstance(source, (LinearMap, LinearMaps)):
            raise InputError("steering_hooks takes the source map first: steering_hooks(source, layer=..., alpha=...).")
        warnings.warn("steering_hooks(model, source, ...) is deprecated: the model was unused; call steering_hooks(source, ...).",
                      DeprecationWarning, stacklevel=2)
        source = args[0]
    if not isinstance(source, (LinearMap, LinearMaps)):
        raise InputError(f"source must be a LinearMap or LinearMaps of a residual-stream target, got {type(source).__name__}.")
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
        raise InputError(f"layer must be a block index, got {layer!r}.")
    name = get_act_name("resid_post", layer)
    if isinstance(source, LinearMaps):
        if name not in source:
            raise InputError(f"The maps hold no {name!r}; compute layer_maps with that layer.")
        source = source[name]
    if ".hook_resid_" not in source.target:
        raise InputError(f"The source map's target {source.target!r} is not a residual-stream vector.")
    n_layers = source.readout.model.cfg.n_layers if source.readout is not None else None
    if n_layers is not None and layer >= n_layers:
        raise InputError(f"layer {layer} does not exist: the source's model has {n_layers} blocks (0..{n_layers - 1}).")
    vector = concept_vector(source, how=how, skip_first=skip_first)

    def steer(resid: Tensor, hook=None) -> Tensor:
        mask = torch.zeros(resid.shape[-2], 1, dtype=resid.dtype, device=resid.device)
        mask[slice(None) if positions == "all" else positions] = 1
        scale = alpha * resid.norm(dim=-1, keepdim=True)
        return resid + mask * scale * vector.to(resid)

    return [(name, steer)]
