"""Steering: add the concept a linear map carries into another prompt's residual stream.

A source prompt's map at ``blocks.L.hook_resid_post`` says which direction its tokens
write into layer L's residual stream. `steering_hooks` adds that direction to another
run, scaled to the residual norm at each position, so one ``alpha`` means the same on
every layer and model. The hooks work with ``model.hooks``, ``run_with_hooks`` and
``model.generate`` (with or without the KV cache: a cached step sees one position).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Union

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import utilities as utils

from tl_linmap.analysis import top_singular
from tl_linmap.decomposition import LinearMaps
from tl_linmap.errors import InputError
from tl_linmap.freezing import HookList
from tl_linmap.maps import LinearMap

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
        stacked = torch.cat(list(source.operators[start:]), dim=1)
        svd = top_singular(stacked, k, output=source.output)
        vector = svd.values @ svd.left
    else:
        raise InputError(f"how must be 'contributions' or 'singular', got {how!r}.")
    return vector / vector.norm()


def steering_hooks(
    model,
    source: LinearMap | LinearMaps,
    *,
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
        model: The model to steer (the source map may come from the same model).
        source: A map of layer ``layer``'s residual stream, or `LinearMaps` containing one.
        layer: Block whose output is steered.
        alpha: Strength, relative to the residual norm at each position.
        positions: ``"all"`` (also every new position during generation), or indices /
            a slice into the positions of each forward call.
        how: See `concept_vector`.
        skip_first: See `concept_vector`.

    Returns:
        ``(hook_name, fn)`` pairs for ``model.hooks(fwd_hooks=...)`` or ``run_with_hooks``.
    """
    name = utils.get_act_name("resid_post", layer)
    if isinstance(source, LinearMaps):
        if name not in source:
            raise InputError(f"The maps hold no {name!r}; compute layer_maps with that layer.")
        source = source[name]
    if ".hook_resid_" not in source.target:
        raise InputError(f"The source map's target {source.target!r} is not a residual-stream vector.")
    vector = concept_vector(source, how=how, skip_first=skip_first)

    def steer(resid: Tensor, hook=None) -> Tensor:
        mask = torch.zeros(resid.shape[-2], 1, dtype=resid.dtype, device=resid.device)
        mask[slice(None) if positions == "all" else positions] = 1
        scale = alpha * resid.norm(dim=-1, keepdim=True)
        return resid + mask * scale * vector.to(resid)

    return [(name, steer)]
