"""Decomposition: exact linear maps of every layer, module and head, and exact token attributions.

`layer_maps` computes many targets of one inference with shared forward passes (see
`tl_linmap.maps.linear_maps`). The result, `LinearMaps`, is keyed by TransformerLens hook
names; heads are derived from ``hook_z`` through ``W_O`` (and, where the architecture has
one, the frozen post-attention norm), so they cost no extra Jacobian.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import einops
import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import utilities as utils

from tl_linmap.analysis import OperatorSVD
from tl_linmap.inputs import RESIDUAL_HOOKS, Prompt
from tl_linmap.maps import FrozenAffine, LinearMap, linear_maps, plain_jacobians
from tl_linmap.table import Table

# Gemma-style sandwich norms: the attention/MLP output passes this norm before the residual.
_POST_ATTN_NORM = "ln1_post"


@dataclass
class HeadReadout:
    """How one layer's ``hook_z`` becomes its ``hook_attn_out``: ``post(z @ W_O + b_O)``."""

    W_O: Float[Tensor, "n_heads d_head d_model"]
    b_O: Float[Tensor, " d_model"]
    post: FrozenAffine | None = None

    def apply(self, per_head: Float[Tensor, "... n_heads d_model"]) -> Float[Tensor, "... n_heads d_model"]:
        """Map per-head output vectors through the frozen post-attention norm (linear part).

        Args:
            per_head: Head outputs in ``attn.hook_out`` space.

        Returns:
            Their shares of ``hook_attn_out``.
        """
        return per_head if self.post is None else per_head @ self.post.matrix.T

    def rest(self) -> Float[Tensor, " d_model"]:
        """The part of ``hook_attn_out`` that belongs to no head: ``post(b_O)`` plus the norm's offset.

        Returns:
            A residual-space vector.
        """
        if self.post is None:
            return self.b_O
        return self.post.matrix @ self.b_O + self.post.offset


@dataclass
class LinearMaps(Mapping):
    """Linear maps of several hook points of one inference, indexed by hook name.

    Attributes:
        maps: `LinearMap` per hook name.
        readouts: Per layer, how ``hook_z`` becomes ``hook_attn_out`` (for `heads`).
        final_norm: ``ln_final`` frozen at the target position (for attributions).
    """

    maps: dict[str, LinearMap]
    readouts: dict[int, HeadReadout] = field(default_factory=dict, repr=False)
    final_norm: FrozenAffine | None = field(default=None, repr=False)

    def __getitem__(self, name: str) -> LinearMap:
        return self.maps[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.maps)

    def __len__(self) -> int:
        return len(self.maps)

    def operators(self) -> dict[str, Float[Tensor, "pos d_out d_in"]]:
        """Every map's operators.

        Returns:
            A dict of tensors keyed by hook name.
        """
        return {name: lm.operators for name, lm in self.maps.items()}

    def contributions(self) -> dict[str, Float[Tensor, "pos d_out"]]:
        """Every map's per-token contributions ``J_i x_i``.

        Returns:
            A dict of tensors keyed by hook name.
        """
        return {name: lm.contributions() for name, lm in self.maps.items()}

    def _residual(self, targets: Sequence[str] | None) -> list[str]:
        # Only residual-stream maps can be read through the unembedding (not hook_z).
        if targets is not None:
            return list(targets)
        return [n for n in self.maps if n.endswith(RESIDUAL_HOOKS)]

    def svd(self, k: int | None = None, *, skip_first: bool = False, targets: Sequence[str] | None = None) -> dict[str, OperatorSVD]:
        """`LinearMap.svd` of every residual-stream map.

        Args:
            k: Pairs kept per operator (default: all).
            skip_first: Leave the first token out of the stacked operators.
            targets: Hook names (default: every residual-stream map, i.e. not ``hook_z``).

        Returns:
            An `OperatorSVD` per hook name.
        """
        return {name: self.maps[name].svd(k, skip_first=skip_first) for name in self._residual(targets)}

    def decode(
        self, k: int = 3, top: int = 10, tokens: list[int] | int | None = None, *,
        skip_first: bool = False, stacked: bool = False, targets: Sequence[str] | None = None,
    ) -> Table:
        """`LinearMap.decode` of every residual-stream map, in one table (layer by layer).

        Args:
            k: Pairs per operator.
            top: Tokens per vector.
            tokens: Input token indices (default: all up to the target position).
            skip_first: Leave the first token out.
            stacked: Also read each stacked operator.
            targets: Hook names (default: every residual-stream map, i.e. not ``hook_z``).

        Returns:
            A `tl_linmap.table.Table` of `tl_linmap.analysis.DecodedPair`.
        """
        rows = Table()
        for name in self._residual(targets):
            rows.extend(self.maps[name].decode(k, top, tokens, skip_first=skip_first, stacked=stacked))
        return rows

    def dimensionality(self, *, skip_first: bool = False, per_token: bool = True, targets: Sequence[str] | None = None) -> Table:
        """`LinearMap.dimensionality` of every map, in one table (per layer: ``source="all"`` rows).

        Args:
            skip_first: Leave the first token out.
            per_token: One row per token as well as each stacked operator's.
            targets: Hook names (default: every map).

        Returns:
            A `tl_linmap.table.Table` of `tl_linmap.analysis.RankRow`.
        """
        rows = Table()
        for name in targets or self.maps:
            rows.extend(self.maps[name].dimensionality(skip_first=skip_first, per_token=per_token))
        return rows

    def to_cache(self, model):
        """Per-token contributions as a TransformerLens ``ActivationCache``.

        The leading axis of every entry indexes *source tokens* (the token whose
        embedding the contribution comes from), so code written for a cache of one
        prompt (``cache["blocks.3.hook_attn_out"]``, ``cache.stack_activation``, ...)
        reads contributions instead of activations.

        Args:
            model: The model the maps came from.

        Returns:
            An ``ActivationCache`` without batch axis.
        """
        from transformer_lens.ActivationCache import ActivationCache

        return ActivationCache(self.contributions(), model, has_batch_dim=False)

    def _per_head(self, layer: int, vector: Tensor) -> Tensor:
        readout = self.readouts[layer]
        split = einops.rearrange(vector, "... (h dh) -> ... h dh", h=readout.W_O.shape[0])
        return readout.apply(einops.einsum(split, readout.W_O, "... h dh, h dh dm -> ... h dm"))

    def head_contributions(self, layer: int) -> Float[Tensor, "n_heads pos d_model"]:
        """Per-head, per-token contributions to ``hook_attn_out``, without per-head operators.

        Args:
            layer: Block index (needs ``modules=True`` in `layer_maps`).

        Returns:
            ``J_{h,i} x_i`` for every head ``h`` and source token ``i``.
        """
        z = self.maps[utils.get_act_name("z", layer)]
        return einops.rearrange(self._per_head(layer, z.contributions()), "pos h d -> h pos d")

    def heads(self, layer: int) -> list[LinearMap]:
        """Per-head linear maps of one layer's ``hook_attn_out``.

        Head ``h``'s share is ``post(z_h @ W_O[h])``; the shares plus `HeadReadout.rest`
        sum exactly to ``hook_attn_out``.

        Args:
            layer: Block index (needs ``modules=True`` in `layer_maps`).

        Returns:
            One `LinearMap` per head, targets named ``blocks.L.attn.hook_result.H``.
        """
        z = self.maps[utils.get_act_name("z", layer)]
        operators = self._per_head(layer, einops.rearrange(z.operators, "pos d_z d_in -> pos d_in d_z"))
        operators = einops.rearrange(operators, "pos d_in h d_model -> h pos d_model d_in")
        bias, output, native = (self._per_head(layer, v) for v in (z.bias, z.output, z.native_output))
        name = utils.get_act_name("result", layer)
        readout = z.readout and dataclasses.replace(z.readout, residual=True)  # heads write the residual stream
        return [
            LinearMap(
                operators=operators[h], inputs=z.inputs, bias=bias[h], output=output[h],
                native_output=native[h], tokens=z.tokens, target=f"{name}.{h}", position=z.position,
                readout=readout,
            )
            for h in range(len(operators))
        ]


def _layer_targets(model, layer: int, modules: bool) -> list[str]:
    names = [utils.get_act_name("resid_mid", layer), utils.get_act_name("resid_post", layer)]
    if modules:
        names = [utils.get_act_name(n, layer) for n in ("resid_pre", "attn_out", "z", "mlp_out")] + names
    # Parallel attention+MLP blocks (Pythia) have no resid_mid.
    return [n for n in names if n in model.hook_dict]


def layer_maps(
    model,
    prompt_or_tokens: Prompt,
    *,
    layers: Sequence[int] | None = None,
    position: int = -1,
    modules: bool = False,
    dtype: torch.dtype | None = torch.float64,
    chunk_size: int | None = None,
    progress: bool = False,
    route: str = "auto",
) -> LinearMaps:
    """Exact linear maps of the residual stream (and optionally every module) per layer.

    Args:
        model: A TransformerBridge of a supported architecture.
        prompt_or_tokens: One prompt as text or token ids.
        layers: Block indices (default: all).
        position: Sequence position of the targets.
        modules: Also map ``hook_resid_pre``, ``hook_attn_out``, ``hook_mlp_out`` and
            ``attn.hook_z`` (for `LinearMaps.heads`), and keep what token attributions need.
        dtype: Working dtype (float64 default; the model's own is restored).
        chunk_size: Rows (backward) or columns (forward) per batched pass.
        progress: Show a progress bar over Jacobian rows or columns.
        route: ``"backward"`` (one batched backward per target), ``"forward"`` (basis
            embeddings pushed through the frozen system: every target's columns at once) or
            ``"auto"`` (whichever costs fewer products; forward for many targets).

    Returns:
        `LinearMaps` keyed by hook name (``blocks.L.hook_resid_post``, ...).
    """
    layers = list(range(model.cfg.n_layers)) if layers is None else list(layers)
    targets = [name for layer in layers for name in _layer_targets(model, layer, modules)]
    post_norms = [f"blocks.{layer}.{_POST_ATTN_NORM}" for layer in layers if modules]
    post_norms = [n for n in post_norms if f"{n}.hook_scale" in model.hook_dict]
    norms = post_norms + (["ln_final"] if modules else [])
    maps, frozen = linear_maps(
        model, prompt_or_tokens, targets, position=position, dtype=dtype, chunk_size=chunk_size, progress=progress,
        norms=norms, route=route,
    )
    readouts = {}
    if modules:
        for layer in layers:
            w_o = model.blocks[layer].attn.W_O.detach()
            b_o = model.blocks[layer].attn.b_O
            dtype_like = maps[utils.get_act_name("z", layer)].operators
            readouts[layer] = HeadReadout(
                W_O=w_o.to(dtype_like),
                b_O=(torch.zeros(w_o.shape[-1]) if b_o is None else b_o.detach()).to(dtype_like),
                post=frozen.get(f"blocks.{layer}.{_POST_ATTN_NORM}"),
            )
    return LinearMaps(maps, readouts, frozen.get("ln_final"))


@dataclass
class Attribution:
    """One output token's logit, split exactly over source tokens, layers, modules and heads.

    ``per_token.sum() + constant + unembed_bias == logit`` (to float64 rounding); the
    same holds per component and, within each layer's attention, per head plus
    ``head_rest``.

    Attributes:
        token: The output token (decoded).
        logit: Its logit from the maps' outputs (the model's own value).
        per_token: Contribution of each source token's embedding.
        per_component: Per source token, keyed by hook name: ``blocks.0.hook_resid_pre``
            (the embeddings themselves) and every layer's ``hook_attn_out`` / ``hook_mlp_out``.
        per_head: ``(layer, head) -> (pos,)`` contributions within ``hook_attn_out``.
        head_rest: Per layer, the constant of ``hook_attn_out`` that belongs to no head.
        constant: Every affine part inside the network (biases, positions, ln_final's offset).
        unembed_bias: ``b_U[token]`` (zero when the model has none).
    """

    token: str
    logit: float
    per_token: Float[Tensor, " pos"]
    per_component: dict[str, Float[Tensor, " pos"]]
    per_head: dict[tuple[int, int], Float[Tensor, " pos"]]
    head_rest: dict[int, float]
    constant: float
    unembed_bias: float

    def total(self) -> float:
        """The sum of all parts.

        Returns:
            ``per_token.sum() + constant + unembed_bias``, equal to `logit`.
        """
        return float(self.per_token.sum()) + self.constant + self.unembed_bias


def _residual_components(model) -> list[str]:
    # The final residual stream is the embedding stream plus every module's output.
    names = [utils.get_act_name("resid_pre", 0)]
    for layer in range(model.cfg.n_layers):
        names += [utils.get_act_name("attn_out", layer), utils.get_act_name("mlp_out", layer)]
    return names


def token_attribution(model, maps: LinearMaps, token: int | str) -> Attribution:
    """Split one output token's logit exactly into per-token, per-module, per-head parts.

    The logit is ``W_U[:, t] · ln_final(resid) + b_U[t]`` with ``ln_final`` frozen at its
    inference scale, so it is linear in the residual stream, which is the sum of the
    embedding stream and every module's output.

    Args:
        model: The model the maps came from.
        maps: From ``layer_maps(model, prompt, modules=True)`` over all layers.
        token: Output token id or string (a single token).

    Returns:
        An `Attribution`.
    """
    if isinstance(token, str):
        ids = model.to_tokens(token, prepend_bos=False)[0]
        if len(ids) != 1:
            raise ValueError(f"{token!r} is {len(ids)} tokens; give one token (or its id).")
        token = int(ids[0])
    final = maps[utils.get_act_name("resid_post", model.cfg.n_layers - 1)]
    w_u = model.W_U.detach()[:, token].to(final.output)
    b_u = getattr(model, "b_U", None)
    unembed_bias = 0.0 if b_u is None else float(b_u[token])
    direction = maps.final_norm.matrix.T @ w_u
    per_component = {name: maps[name].contributions() @ direction for name in _residual_components(model)}
    constant = float(maps.final_norm.offset @ w_u) + sum(float(maps[n].bias @ direction) for n in per_component)
    per_head, head_rest = {}, {}
    for layer in maps.readouts:
        for head, contribution in enumerate(maps.head_contributions(layer) @ direction):
            per_head[(layer, head)] = contribution
        z_bias = maps._per_head(layer, maps[utils.get_act_name("z", layer)].bias) @ direction
        head_rest[layer] = float(maps[utils.get_act_name("attn_out", layer)].bias @ direction - z_bias.sum())
    return Attribution(
        token=model.tokenizer.decode([token]),
        logit=float(final.output @ direction + maps.final_norm.offset @ w_u) + unembed_bias,
        per_token=sum(per_component.values()),
        per_component=per_component,
        per_head=per_head,
        head_rest=head_rest,
        constant=constant,
        unembed_bias=unembed_bias,
    )


@dataclass
class GapRow:
    """The ordinary Jacobian next to the detached one, for one layer's residual stream.

    Attributes:
        target: Hook name.
        detached_error: Relative reconstruction error of the detached system.
        plain_error: The same with the ordinary Jacobian in place of the detached one
            (same exact bias ``b``): how far the linearisation is from the model.
        operator_gap: ``‖J_plain − J_detached‖_F / ‖J_detached‖_F``.
    """

    target: str
    detached_error: float
    plain_error: float
    operator_gap: float


def nonlinearity_gap(
    model,
    prompt_or_tokens: Prompt,
    *,
    layers: Sequence[int] | None = None,
    position: int = -1,
    dtype: torch.dtype | None = torch.float64,
) -> list[GapRow]:
    """Why detaching matters: ordinary vs detached Jacobians of ``hook_resid_post`` per layer.

    Args:
        model: A TransformerBridge of a supported architecture.
        prompt_or_tokens: One prompt.
        layers: Block indices (default: all).
        position: Sequence position.
        dtype: Working dtype.

    Returns:
        One `GapRow` per layer.
    """
    detached = layer_maps(model, prompt_or_tokens, layers=layers, position=position, dtype=dtype)
    names = [n for n in detached if n.endswith("hook_resid_post")]
    first = detached[names[0]]
    plain = plain_jacobians(model, first.tokens, names, position=first.position, dtype=dtype)
    rows = []
    for name in names:
        lm = detached[name]
        plain_map = dataclasses.replace(lm, operators=plain[name])
        gap = float((plain[name] - lm.operators).norm() / lm.operators.norm())
        rows.append(GapRow(name, lm.relative_error(), plain_map.relative_error(), gap))
    return rows
