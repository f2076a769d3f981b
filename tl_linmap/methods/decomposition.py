"""Decomposition: exact linear maps of every layer, module and head, and exact token attributions.

`layer_maps` computes many targets of one inference with shared forward passes (see
`tl_linmap.linear.dense.linear_maps`). The result, `tl_linmap.results.maps.LinearMaps`, is keyed by
TransformerLens hook names; heads are derived from ``hook_z`` through ``W_O`` (and, where the
architecture has one, the frozen post-attention norm), so they cost no extra Jacobian.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from tl_linmap.base.checks import check_layers
from tl_linmap.base.compat import check_model, get_act_name
from tl_linmap.base.errors import InputError
from tl_linmap.base.prompts import Prompt, read_prompts
from tl_linmap.base.table import Table
from tl_linmap.base.devices import resident
from tl_linmap.freeze.targets import resolve_target
from tl_linmap.linear.dense import (
    MapOptions,
    map_options,
    maps_of,
    plain_jacobians,
    split_targets,
)
from tl_linmap.reading.readouts import Direction, LinearReadout, Logit, LogitDiff
from tl_linmap.reading.tokens import token_id
from tl_linmap.results.attribution import Attribution, GapRow
from tl_linmap.results.maps import LinearMaps


def _layer_targets(model, layer: int, modules: bool) -> list[str]:
    names = [get_act_name("resid_mid", layer), get_act_name("resid_post", layer)]
    if modules:
        names = [get_act_name(n, layer) for n in ("resid_pre", "attn_out", "z", "mlp_out")] + names
    # Parallel attention+MLP blocks (Pythia) have no resid_mid; an attention-only model keeps its
    # (never fired) MLP hook points, but no MLP and no resid_mid.
    if getattr(model.cfg, "attn_only", False):
        names = [n for n in names if not n.endswith(("hook_mlp_out", "hook_resid_mid"))]
    return [n for n in names if n in model.hook_dict]


def layer_maps(
    model,
    prompt_or_tokens: Prompt,
    *,
    layers: Sequence[int] | None = None,
    position: int = -1,
    modules: bool = False,
    dtype: torch.dtype | None = torch.float64,
    rows_per_pass: int | None = None,
    check: bool = True,
    progress: bool | None = None,
    route: str = "auto",
    chunk_size: int | None = None,
    source: str | None = None,
    attention_mask: Tensor | None = None,
    memory: int | str | None = None,
    store: str | Path | None = None,
    maps_dtype: torch.dtype | None = None,
) -> LinearMaps | list[LinearMaps]:
    """Exact linear maps of the residual stream (and optionally every module) per layer.

    Args:
        model: A TransformerBridge or HookedTransformer of a supported architecture.
        prompt_or_tokens: One prompt as text or token ids.
        layers: Block indices (default: all).
        position: Sequence position of the targets (``-1``: the last token).
        modules: Also map ``hook_resid_pre``, ``hook_attn_out``, ``hook_mlp_out`` and
            ``attn.hook_z`` (for `tl_linmap.results.maps.LinearMaps.heads`).
        dtype: Working dtype (float64 default; the model comes back bit for bit).
        rows_per_pass: Rows per batched pass (see `tl_linmap.linear.dense.linear_maps`).
        check: Raise `tl_linmap.base.errors.FreezeError` unless every map is exact.
        progress: A progress bar over Jacobian rows or columns: None (default) once the call lasts a few seconds, True at once, False never.
        route: ``"rows"``, ``"columns"`` or ``"auto"`` (see `tl_linmap.linear.dense.linear_maps`;
            ``"auto"`` picks columns for many targets on short prompts).
        chunk_size: Deprecated name of ``rows_per_pass``.
        source: The hook point the maps start from (see `tl_linmap.linear.dense.linear_maps`);
            None: the token embeddings. With ``layers=None`` only the targets from the
            source on are mapped (the source itself, if a target, maps to the identity).
        attention_mask: With a padded token batch: 1 for real tokens, 0 for padding
            (see `tl_linmap.linear.dense.linear_maps`).
        memory: The call's memory budget (bytes or text such as ``"2GB"``; default at most 512 MiB):
            maps beyond half of it go to disk (see `tl_linmap.linear.dense.linear_maps`).
        store: None (in memory within ``memory``, the rest on disk), ``"memory"``, ``"disk"`` or a
            directory (see `tl_linmap.linear.dense.linear_maps`).
        maps_dtype: The dtype the maps are kept in after their check (None: ``dtype``).

    Returns:
        `tl_linmap.results.maps.LinearMaps` keyed by hook name (``blocks.L.hook_resid_post``, ...);
        for a list of prompts (or a token batch), one per prompt, their passes shared where
        their maps all stay in memory. Maps on disk are read back on access, bit for bit.

    Raises:
        InputError: for a bad model, prompt, ``layers`` or any argument of `tl_linmap.linear.dense.linear_maps`.
    """
    options = map_options(
        model, dtype=dtype, rows_per_pass=rows_per_pass, chunk_size=chunk_size, check=check, progress=progress,
        route=route, source=source, memory=memory, store=store, maps_dtype=maps_dtype,
    )
    targets = split_targets(model, _mapped_targets(model, layers, modules, source))
    prompts = read_prompts(model, prompt_or_tokens, position=position, attention_mask=attention_mask)
    return maps_of(model, prompts, targets, options)


def _mapped_targets(model, layers: Sequence[int] | None, modules: bool, source: str | None) -> list[str]:
    # layer_maps' targets: with every layer and a source, only those from the source on.
    every_layer = layers is None
    layers = check_layers(layers, model.cfg.n_layers)
    targets = [name for layer in layers for name in _layer_targets(model, layer, modules)]
    if every_layer and source is not None:
        targets = [name for name in targets if _block_order(name) >= _block_order(source)]
    return targets


# Where each of `_layer_targets`' hook points fires within its block.
_IN_BLOCK = ("hook_resid_pre", "attn.hook_z", "hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_resid_post")


def _block_order(name) -> tuple[int, int]:
    # (block, place in the block) of a hook name; anything unknown inside a block sorts first,
    # so that layer_maps keeps it and the frozen system checks the order for real.
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)", name) if isinstance(name, str) else None
    if match is None:
        return (-1, 0)
    rest = match.group(2)
    return (int(match.group(1)), _IN_BLOCK.index(rest) if rest in _IN_BLOCK else 0)


def _residual_components(model) -> list[str]:
    # The final residual stream is the embedding stream plus every module's output.
    names = [get_act_name("resid_pre", 0)]
    modules = ("attn_out",) if getattr(model.cfg, "attn_only", False) else ("attn_out", "mlp_out")
    for layer in range(model.cfg.n_layers):
        names += [get_act_name(module, layer) for module in modules]
    return names


def _final_readout(model, token, final: str) -> tuple[str, Tensor | None, Tensor, float]:
    # (label, u, w, unembed bias): the quantity is u · ln_final(resid) + b (u is None: w · resid directly).
    if isinstance(token, Direction):
        token.check(model)
        if resolve_target(model, token.hook) != final:
            raise InputError(
                f"token_attribution splits the final residual stream: give the Direction on {final!r}, "
                f"not {token.hook!r} (or split any map's readout with lm.logit_contributions(direction))."
            )
        return token.name, None, token.vector.detach(), 0.0
    if isinstance(token, (Logit, LogitDiff)):
        token.check(model)
        if token.hook != "output":
            raise InputError(f"token_attribution reads the model's logits: give the readout with hook='output', not {token.hook!r}.")
        pairs = [(token.token, 1.0)] if isinstance(token, Logit) else [(token.correct, 1.0), (token.incorrect, -1.0)]
        label = token.name
    elif isinstance(token, LinearReadout):
        raise InputError(f"token_attribution takes a token, a Logit, a LogitDiff or a Direction, got {type(token).__name__}.")
    else:
        pairs, label = [(token, 1.0)], None
    ids = [token_id(model, t) for t, _ in pairs]
    a = torch.tensor([coefficient for _, coefficient in pairs], dtype=torch.float64)
    u = resident(model, "W_U")[:, ids].double() @ a
    b_u = resident(model, "b_U")
    unembed_bias = 0.0 if b_u is None else float(b_u.detach()[ids].double() @ a)
    return label or model.tokenizer.decode(ids), u, u, unembed_bias


def token_attribution(model, maps: LinearMaps | Sequence[LinearMaps], token: int | str | LinearReadout) -> Attribution | list[Attribution]:
    """Split one output token's logit (or a logit difference) exactly into per-token, per-module, per-head parts.

    The logit is ``W_U[:, t] · ln_final(resid) + b_U[t]`` with ``ln_final`` frozen at its
    inference scale, so it is linear in the residual stream, which is the sum of the
    embedding stream and every module's output. A logit difference is the same with
    ``W_U[:, a] − W_U[:, b]``.

    Args:
        model: The model the maps came from.
        maps: From ``layer_maps(model, prompt, modules=True)`` over all layers; or the list
            ``layer_maps`` returns for several prompts.
        token: Output token id or string (a single token), or a linear readout
            (`tl_linmap.reading.readouts`): ``LogitDiff(" Paris", " London")``, ``Logit``, or a
            ``Direction`` on the last layer's ``hook_resid_post``.

    Returns:
        An `Attribution` (its ``token`` is the readout's name for a readout); for a list of
        maps, one per prompt (a token id is shared; the sum is already per prompt, so there
        is nothing to batch).

    Raises:
        InputError: for a bad model or token, maps that are not every layer's module maps,
            or an empty list.
    """
    check_model(model)
    if isinstance(maps, (list, tuple)):
        if not maps:
            raise InputError("maps is an empty list: pass layer_maps(model, prompts, modules=True) of at least one prompt.")
        for index, item in enumerate(maps):
            if not isinstance(item, LinearMaps):  # also keeps a nested list from giving nested results
                raise InputError(
                    f"maps[{index}] is a {type(item).__name__}: pass the list layer_maps(model, prompts, modules=True) "
                    "returns, one LinearMaps per prompt."
                )
        return [token_attribution(model, m, token) for m in maps]
    if not isinstance(maps, LinearMaps):
        raise InputError(
            f"maps must be the LinearMaps of layer_maps(model, prompt, modules=True), got {type(maps).__name__}."
        )
    label, u, w, unembed_bias = _final_readout(model, token, get_act_name("resid_post", model.cfg.n_layers - 1))
    missing = [n for n in [get_act_name("resid_post", model.cfg.n_layers - 1), *_residual_components(model)] if n not in maps]
    if missing or maps.final_norm is None:
        raise InputError(
            f"token_attribution needs every layer's module maps ({missing[:3]} are missing): "
            "pass maps = layer_maps(model, prompt, modules=True) over all layers."
        )
    final = maps[get_act_name("resid_post", model.cfg.n_layers - 1)]
    if w.shape[0] != final.output.shape[0]:
        raise InputError(f"The Direction's vector has {w.shape[0]} entries; the residual stream has {final.output.shape[0]}.")
    w = w.to(final.output)
    direction = w if u is None else maps.final_norm.matrix.T @ w
    offset = 0.0 if u is None else float(maps.final_norm.offset @ w)
    per_component = {name: maps[name].contributions() @ direction for name in _residual_components(model)}
    constant = offset + sum(float(maps[n].bias @ direction) for n in per_component)
    per_head, head_rest = {}, {}
    for layer in maps.readouts:
        for head, contribution in enumerate(maps.head_contributions(layer) @ direction):
            per_head[(layer, head)] = contribution
        z_bias = maps._per_head(layer, maps[get_act_name("z", layer)].bias) @ direction
        head_rest[layer] = float(maps[get_act_name("attn_out", layer)].bias @ direction - z_bias.sum())
    return Attribution(
        token=label,
        logit=float(final.output @ direction) + offset + unembed_bias,
        per_token=sum(per_component.values()),
        per_component=per_component,
        per_head=per_head,
        head_rest=head_rest,
        constant=constant,
        unembed_bias=unembed_bias,
        str_tokens=final.str_tokens,
    )


def nonlinearity_gap(
    model,
    prompt_or_tokens: Prompt,
    *,
    layers: Sequence[int] | None = None,
    position: int = -1,
    dtype: torch.dtype | None = torch.float64,
) -> Table:
    """Why detaching matters: ordinary vs detached Jacobians of ``hook_resid_post`` per layer.

    Args:
        model: A TransformerBridge or HookedTransformer of a supported architecture.
        prompt_or_tokens: One prompt.
        layers: Block indices (default: all).
        position: Sequence position.
        dtype: Working dtype.

    Returns:
        A `tl_linmap.base.table.Table` of `tl_linmap.results.attribution.GapRow`, one per layer.
    """
    check_model(model)
    targets = split_targets(model, _mapped_targets(model, layers, False, None))
    prompt = read_prompts(model, prompt_or_tokens, position=position, several=False)
    detached = maps_of(model, prompt, targets, MapOptions(dtype=dtype))
    names = [n for n in detached if n.endswith("hook_resid_post")]
    plain = plain_jacobians(model, prompt, names, dtype=dtype)
    rows = Table()
    for name in names:
        lm = detached[name]
        plain_map = dataclasses.replace(lm, operators=plain[name])
        gap = float((plain[name] - lm.operators).norm() / lm.operators.norm())
        rows.append(GapRow(name, lm.relative_error(), plain_map.relative_error(), gap))
    return rows
