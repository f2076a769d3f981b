"""Steering: add the concept a linear map carries into another prompt's residual stream.

A source prompt's map at ``blocks.L.hook_resid_post`` says which direction its tokens
write into layer L's residual stream. `steering_hooks` adds it to another run, scaled to
the residual norm at each position, so one ``alpha`` means the same on every layer and
model, in one of two ways:

- ``method="vector"`` (a `Steering`): one fixed concept vector, the sum of the source
  tokens' contributions ``Σ_i J_i x_i`` (or its top singular directions), at every position.
- ``method="operator"`` (an `OperatorSteering`, the paper's steering operator): the source's
  operators ``J_i`` applied to the steered prompt's *own* token embeddings, reused cyclically
  and summed over positions, so position ``p`` gets ``Σ_{i≤p} J_{i mod n} x_i^new``.

Both are the ``(name, fn)`` hook list that ``model.hooks``, ``run_with_hooks`` and
``model.generate`` take, with or without the KV cache, and say which source tokens were used.
`alpha_sweep` measures how far each ``alpha`` moves the concept; `compare_methods` sets the
two methods side by side on one fixed continuation.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_linmap.base.checks import is_int
from tl_linmap.base.compat import get_act_name
from tl_linmap.base.deprecation import renamed_fields
from tl_linmap.base.errors import InputError
from tl_linmap.base.hook_names import RESIDUAL_HOOKS
from tl_linmap.base.prompts import Prompt, to_tokens
from tl_linmap.base.progress import progress_bar
from tl_linmap.base.saving import Saveable
from tl_linmap.base.table import Table, table_row
from tl_linmap.freeze.dictionary import Dictionary
from tl_linmap.freeze.splices import DictionarySplice
from tl_linmap.freeze.splicing import as_dictionary, splices_of
from tl_linmap.freeze.structure import layer_of
from tl_linmap.methods.features import FeatureMap, check_feature, find_splice
from tl_linmap.present import display
from tl_linmap.reading.spectral import signed
from tl_linmap.reading.tokens import token_id
from tl_linmap.results.maps import LinearMap, LinearMaps

Positions = Literal["all"] | Sequence[int] | slice


SkipFirst = bool | Literal["auto"]


Method = Literal["vector", "operator"]


#: Alphas `alpha_sweep` tries by default (fractions of the residual norm).
DEFAULT_ALPHAS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3)


# Function words carry no concept: `word_tokens` leaves them out of the words it scores.
_FUNCTION_WORDS = frozenset({
    "a", "an", "the", "in", "on", "at", "of", "to", "for", "from", "by", "with", "and", "or", "but", "is", "are",
    "was", "were", "be", "been", "it", "its", "this", "that", "these", "those", "as", "into", "onto", "over",
    "under", "near", "my", "your", "his", "her", "our", "their",
})


def skips_first(source: LinearMap, skip_first: SkipFirst = "auto") -> bool:
    """Whether the concept vector leaves out the source prompt's first token.

    Args:
        source: The source map.
        skip_first: ``True`` / ``False``, or ``"auto"``: leave it out only when it is the
            model's BOS token (``tokenizer.bos_token_id`` at position 0), an attention sink
            prepended to the text. Models that prepend nothing (SmolLM2) start with a word
            of the concept, which ``"auto"`` keeps.

    Returns:
        True when the first token is left out (never for a one-token prompt).

    Raises:
        InputError: for any other ``skip_first``.
    """
    if not (isinstance(skip_first, bool) or (isinstance(skip_first, str) and skip_first == "auto")):
        raise InputError(f"skip_first must be True, False or 'auto', got {skip_first!r}.")
    if len(source.tokens) < 2:
        return False
    if isinstance(skip_first, bool):
        return skip_first
    tokenizer = getattr(source.reader.model, "tokenizer", None) if source.reader is not None else None
    bos = getattr(tokenizer, "bos_token_id", None)
    return bos is not None and int(source.tokens[0]) == bos


def concept_vector(
    source: LinearMap,
    *,
    how: Literal["contributions", "singular"] = "contributions",
    skip_first: SkipFirst = "auto",
    k: int = 1,
) -> Float[Tensor, " d_model"]:
    """The direction a source prompt's tokens write into its target.

    Args:
        source: A map of a residual-stream target.
        how: ``"contributions"``: the sum of the tokens' contributions ``Σ_i J_i x_i``;
            ``"singular"``: the top-``k`` left singular directions of the stacked operator
            ``[J_i … J_position]``, weighted by their singular values and signed along the output.
        skip_first: Leave out the first token: ``"auto"`` (default) only when it is the
            model's BOS token, whose operator dominates without carrying the concept; see
            `skips_first`. `steering_hooks` reports which tokens were used.
        k: Singular directions used with ``how="singular"``.

    Returns:
        A unit vector in the target's space.
    """
    if not isinstance(source, LinearMap):
        raise InputError(
            f"concept_vector takes one LinearMap of a residual-stream target, got {type(source).__name__}; "
            "from LinearMaps pick one, e.g. maps['blocks.15.hook_resid_post']."
        )
    if not source.target.endswith(RESIDUAL_HOOKS):
        raise InputError(f"The source map's target {source.target!r} is not a residual-stream vector.")
    if how == "singular" and (not is_int(k) or k < 1):
        raise InputError(f"k must be a positive number of singular directions, got {k!r}.")
    start = 1 if skips_first(source, skip_first) else 0
    if how == "contributions":
        vector = source.contributions()[start:].sum(0)
    elif how == "singular":
        stacked = torch.cat(list(source.operators[start : source.position + 1]), dim=1)
        u, values, vh = torch.linalg.svd(stacked, full_matrices=False)
        left, _ = signed(u[:, :k].T, vh[:k], source.output)
        vector = values[:k] @ left
    else:
        raise InputError(f"how must be 'contributions' or 'singular', got {how!r}.")
    return vector / vector.norm()


@renamed_fields(sources="str_tokens")
@dataclass(eq=False, repr=False)
class Steering(list, Saveable):
    """Steering hooks, with what they add: a ``[(hook_name, fn)]`` list for ``model.hooks``.

    At each steered position the residual ``r`` becomes ``r + alpha · ‖r‖ · vector``.

    Attributes:
        hook_name: The steered hook point, ``blocks.{layer}.hook_resid_post``.
        layer: The steered block.
        alpha: Strength, relative to the residual norm at each position.
        vector: The unit concept vector (`concept_vector`).
        str_tokens: The source prompt's tokens whose contributions built the vector, decoded.
        left_out: The source prompt's other tokens: a first token left out by ``skip_first``
            and any after the map's position (which contribute nothing to it).
        positions: ``"all"`` or the indices / slice steered in each forward call.
        how: How the vector was built (see `concept_vector`).
    """

    hook_name: str
    layer: int
    alpha: float
    vector: Float[Tensor, " d_model"] = field(repr=False)
    str_tokens: list[str]
    left_out: list[str]
    positions: Positions = "all"
    how: str = "contributions"

    _STR_TOKENS = None  # the tokens used, not the prompt: no prompt for a saved file's header

    def __post_init__(self) -> None:
        self.append((self.hook_name, self.steer))

    def steer(self, resid: Float[Tensor, "batch pos d_model"], hook=None) -> Float[Tensor, "batch pos d_model"]:
        """The hook function: add ``alpha · ‖r‖ · vector`` at the steered positions.

        Args:
            resid: The residual stream at ``hook_name``.
            hook: The hook point (unused; TransformerLens passes it).

        Returns:
            The steered residual stream.
        """
        scale = self.alpha * resid.norm(dim=-1, keepdim=True)
        return resid + _position_mask(self.positions, resid) * scale * self.vector.to(resid)

    def __repr__(self) -> str:
        left_out = ", ".join(map(repr, self.left_out)) or "none"
        return (
            f"Steering({self.hook_name}, alpha={self.alpha}, positions={self.positions!r}, how={self.how!r}; "
            f"vector from {', '.join(map(repr, self.str_tokens))}; left out: {left_out})"
        )

    def _repr_html_(self) -> str:
        facts = [("steers", self.hook_name, False), ("alpha", str(self.alpha), True), ("positions", repr(self.positions), False),
                 ("vector", f"{self.how} of {', '.join(map(repr, self.str_tokens))}", False), *_left_out(self)]
        return display.summary_html(f"Steering hooks: r + {self.alpha} · ‖r‖ · v", facts)


def _left_out(steering: Steering | OperatorSteering) -> list[display.Fact]:
    return [("left out", ", ".join(map(repr, steering.left_out)) or "none", False), ("hooks", str(len(steering)), True)]


def _position_mask(positions: Positions, resid: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "pos 1"]:
    # 1 at the steered positions of this forward call, 0 elsewhere.
    mask = torch.zeros(resid.shape[-2], 1, dtype=resid.dtype, device=resid.device)
    try:
        mask[slice(None) if positions == "all" else positions] = 1
    except IndexError as error:
        raise InputError(
            f"positions={positions!r} does not fit a forward call of {resid.shape[-2]} positions "
            "(a cached generation step has one): use positions='all' or indices within the prompt."
        ) from error
    return mask


@renamed_fields(sources="str_tokens")
@dataclass(eq=False, repr=False)
class OperatorSteering(list, Saveable):
    """The paper's steering operator: a ``[(hook_name, fn)]`` list for ``model.hooks``.

    The source prompt's operators ``J_0 … J_{n-1}`` (its map at ``blocks.{layer}.hook_resid_post``,
    the tokens kept by ``skip_first``) are applied to the steered run's own token embeddings
    ``x_p`` (``hook_embed``), reused cyclically when the run is longer than the source, and
    summed over positions: ``v_p = Σ_{i≤p} J_{i mod n} x_i``. At each steered position the
    residual ``r`` becomes ``r + alpha · ‖r‖ · v_p / ‖v_p‖`` (nothing where ``v_p = 0``).

    The hooks: ``hook_embed`` reads every token embedding the model computes (a
    HookedTransformer's ``generate`` embeds without it: there block 0's ``hook_resid_pre``,
    less ``hook_pos_embed`` for learned positions, gives the same vectors), block 0's
    ``attn.hook_attn_scores`` says how many positions a forward call reads from a KV cache
    (its keys outnumber its queries by that many), and ``hook_name`` adds the vectors. A call
    whose embeddings cover all its positions (cached ones included) starts a new sequence;
    otherwise the new embeddings extend the sequence the hooks saw last: each generated
    token's embedding extends the sum, so cached and uncached generation add the same vectors
    (also in a HookedTransformer's ``generate``, which embeds each new token on its own). The
    hooks keep that sequence between calls: use one `OperatorSteering` for one run at a time.

    Attributes:
        hook_name: The steered hook point, ``blocks.{layer}.hook_resid_post``.
        layer: The steered block.
        alpha: Strength, relative to the residual norm at each position.
        operators: The source operators cycled over, ``(n, d_model, d_embed)``.
        str_tokens: The source tokens whose operators are used, decoded, in cycle order.
        left_out: The source prompt's other tokens (a first token left out by ``skip_first``,
            any after the map's position).
        positions: ``"all"`` or the indices / slice steered in each forward call.
        learned_positions: Whether the model adds learned position embeddings to the residual
            stream (subtracted when the embeddings are read from ``hook_resid_pre``).
    """

    hook_name: str
    layer: int
    alpha: float
    operators: Float[Tensor, "n d_model d_embed"] = field(repr=False)
    str_tokens: list[str]
    left_out: list[str]
    positions: Positions = "all"
    learned_positions: bool = field(default=False, repr=False)
    _sequence: Tensor | None = field(default=None, init=False, repr=False)  # embeddings of the run so far
    _pending: list[Tensor] = field(default_factory=list, init=False, repr=False)  # embedded since the last steer
    _cached: int = field(default=0, init=False, repr=False)  # positions this call reads from a KV cache
    _embedded: bool = field(default=False, init=False, repr=False)  # hook_embed ran in this call
    _position_embeddings: Tensor | None = field(default=None, init=False, repr=False)

    _STR_TOKENS = None  # the tokens used, not the prompt: no prompt for a saved file's header

    def __post_init__(self) -> None:
        position_hook = [(get_act_name("pos_embed"), self._read_positions)] if self.learned_positions else []
        self.extend([
            (get_act_name("embed"), self._read_embeddings),
            *position_hook,
            (get_act_name("resid_pre", 0), self._read_residual_embeddings),
            (get_act_name("attn_scores", 0), self._read_cache_length),
            (self.hook_name, self.steer),
        ])

    def _read_embeddings(self, embed: Float[Tensor, "batch pos d_embed"], hook=None) -> Float[Tensor, "batch pos d_embed"]:
        self._pending.append(embed.detach())
        self._embedded = True
        return embed

    def _read_positions(self, pos_embed: Float[Tensor, "batch pos d_model"], hook=None) -> Float[Tensor, "batch pos d_model"]:
        self._position_embeddings = pos_embed.detach()
        return pos_embed

    def _read_residual_embeddings(self, resid: Float[Tensor, "batch pos d_model"], hook=None) -> Float[Tensor, "batch pos d_model"]:
        # Only where hook_embed did not run (a HookedTransformer's generate starts from the residual).
        if not self._embedded:
            positions = self._position_embeddings
            self._pending.append(resid.detach() - (positions[..., -resid.shape[1]:, :] if positions is not None else 0))
        self._embedded, self._position_embeddings = False, None
        return resid

    def _read_cache_length(self, scores: Float[Tensor, "batch head q k"], hook=None) -> Float[Tensor, "batch head q k"]:
        self._cached = scores.shape[-1] - scores.shape[-2]
        return scores

    def vectors(self, embeddings: Float[Tensor, "batch pos d_embed"]) -> Float[Tensor, "batch pos d_model"]:
        """The unscaled steering vectors of a sequence: ``v_p = Σ_{i≤p} J_{i mod n} x_i``.

        Args:
            embeddings: The steered sequence's token embeddings (``hook_embed``), from its first position.

        Returns:
            One vector per position, in the operators' dtype.
        """
        n, (batch, length, width) = len(self.operators), embeddings.shape
        cycles = -(-length // n)
        padded = torch.nn.functional.pad(embeddings.to(self.operators), (0, 0, 0, cycles * n - length))
        terms = einops.einsum(
            padded.reshape(batch, cycles, n, width), self.operators, "batch cycle n d_in, n d_out d_in -> batch cycle n d_out"
        )
        return terms.reshape(batch, cycles * n, -1)[:, :length].cumsum(1)

    def steer(self, resid: Float[Tensor, "batch pos d_model"], hook=None) -> Float[Tensor, "batch pos d_model"]:
        """The hook function: add ``alpha · ‖r‖ · v_p / ‖v_p‖`` at the steered positions.

        Args:
            resid: The residual stream at ``hook_name``.
            hook: The hook point (unused; TransformerLens passes it).

        Returns:
            The steered residual stream.

        Raises:
            InputError: when the hooks lack the token embeddings of some position of this call
                (``hook_embed`` not attached, or a KV-cached run the hooks did not see from its start).
        """
        chunks, self._pending, cached, self._cached = self._pending, [], self._cached, 0
        needed, seen = cached + resid.shape[1], 0 if self._sequence is None else self._sequence.shape[1]
        if chunks and chunks[-1].shape[1] == needed:  # this call embedded its whole sequence
            sequence = chunks[-1]
        elif chunks and seen and len(self._sequence) == len(resid) and seen + sum(c.shape[1] for c in chunks) >= needed:
            # New tokens after those seen (generate's next token, with or without the cache).
            sequence = torch.cat([self._sequence, *chunks], dim=1)
        else:
            raise InputError(
                f"The operator steering hooks at {self.hook_name} have the token embeddings of "
                f"{seen + sum(chunk.shape[1] for chunk in chunks)} positions for a forward call of {resid.shape[1]} "
                f"positions after {cached} cached ones: attach all the hooks of the OperatorSteering from the "
                "start of the run (around the whole model.generate call), and run the model from tokens or text."
            )
        self._sequence = sequence
        vectors = self.vectors(sequence)[:, -resid.shape[1]:]
        norms = vectors.norm(dim=-1, keepdim=True)
        units = (vectors / torch.where(norms > 0, norms, 1)).to(resid)
        scale = self.alpha * resid.norm(dim=-1, keepdim=True)
        return resid + _position_mask(self.positions, resid) * scale * units

    def __repr__(self) -> str:
        left_out = ", ".join(map(repr, self.left_out)) or "none"
        return (
            f"OperatorSteering({self.hook_name}, alpha={self.alpha}, positions={self.positions!r}; "
            f"operators of {', '.join(map(repr, self.str_tokens))}, cycled; left out: {left_out})"
        )

    def _repr_html_(self) -> str:
        facts = [("steers", self.hook_name, False), ("alpha", str(self.alpha), True), ("positions", repr(self.positions), False),
                 ("operators", f"{len(self.operators)}, of {', '.join(map(repr, self.str_tokens))}, cycled", False), *_left_out(self)]
        return display.summary_html(f"Operator steering hooks: r + {self.alpha} · ‖r‖ · v_p / ‖v_p‖", facts)


def _source_map(source: LinearMap | LinearMaps, layer: int) -> tuple[LinearMap, str]:
    # The source's residual-stream map, checked, and the hook point to steer.
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
    n_layers = source.reader.model.cfg.n_layers if source.reader is not None else None
    if n_layers is not None and layer >= n_layers:
        raise InputError(f"layer {layer} does not exist: the source's model has {n_layers} blocks (0..{n_layers - 1}).")
    return source, name


def steering_hooks(
    source: LinearMap | LinearMaps,
    *args,
    layer: int | None = None,
    alpha: float = 1.0,
    positions: Positions = "all",
    how: Literal["contributions", "singular"] = "contributions",
    skip_first: SkipFirst = "auto",
    method: Method = "vector",
) -> Steering | OperatorSteering:
    """Hooks that add a source prompt's concept to ``blocks.{layer}.hook_resid_post``.

    ``method="vector"``: at each steered position the residual ``r`` becomes
    ``r + alpha · ‖r‖ · v`` with ``v`` the unit `concept_vector`, the same at every position.

    ``method="operator"`` (the paper's steering operator): ``r_p + alpha · ‖r_p‖ · v_p / ‖v_p‖``
    with ``v_p = Σ_{i≤p} J_{i mod n} x_i``: the source's operators ``J`` applied to the steered
    run's own token embeddings ``x``, reused cyclically, summed over positions (see `OperatorSteering`).
    The paper's reference code scales by ``λ · ‖r_p‖ / (2 ‖v_p‖)``: its ``λ`` is ``2 · alpha``.

    A feature's map (`tl_linmap.feature_map` to a residual hook point) steers along that map at its
    target hook (``layer`` is then read from it; see also `feature_steering` for a decoder direction).

    Args:
        source: A map of layer ``layer``'s residual stream, or `LinearMaps` containing one; or a
            `tl_linmap.methods.features.FeatureMap` to a residual hook point.
        layer: Block whose output is steered (not for a `FeatureMap`).
        alpha: Strength, relative to the residual norm at each position.
        positions: ``"all"`` (also every new position during generation), or indices /
            a slice into the positions of each forward call.
        how: See `concept_vector` (``method="vector"`` only).
        skip_first: See `concept_vector`: ``"auto"`` leaves the first token out only when it
            is the model's BOS token; the result's ``str_tokens`` and ``left_out`` say which. With
            ``method="operator"`` the operators cycled over are those of the kept tokens.
        method: ``"vector"`` (a fixed concept vector) or ``"operator"`` (the steering operator).
        *args: Only the deprecated form ``steering_hooks(model, source, ...)``, whose ``model``
            was never used.

    Returns:
        A `Steering` (``method="vector"``) or `OperatorSteering`: the hook list for
        ``model.hooks(fwd_hooks=...)`` or ``run_with_hooks``, with what it adds and the tokens used.
    """
    if isinstance(source, FeatureMap):
        return _map_steering(source, alpha, positions)
    if args:
        if len(args) != 1 or isinstance(source, (LinearMap, LinearMaps)):
            raise InputError("steering_hooks takes the source map first: steering_hooks(source, layer=..., alpha=...).")
        warnings.warn("steering_hooks(model, source, ...) is deprecated: the model was unused; call steering_hooks(source, ...).",
                      DeprecationWarning, stacklevel=2)
        source = args[0]
    if method not in ("vector", "operator"):
        raise InputError(f"method must be 'vector' (a fixed concept vector) or 'operator' (the steering operator), got {method!r}.")
    if method == "operator" and how != "contributions":
        raise InputError(f"how={how!r} builds a concept vector: it applies to method='vector' only.")
    if layer is None:
        raise InputError("steering_hooks needs layer=: the block whose hook_resid_post is steered.")
    source, name = _source_map(source, layer)
    _check_alpha(alpha)
    _check_steered_positions(positions)
    start = 1 if skips_first(source, skip_first) else 0
    end = source.position % len(source.tokens) + 1
    decoded = source.str_tokens
    used = {"str_tokens": decoded[start:end], "left_out": decoded[:start] + decoded[end:]}
    if method == "operator":
        cfg = source.reader.model.cfg if source.reader is not None else None
        learned = getattr(cfg, "positional_embedding_type", None) == "standard"
        return OperatorSteering(name, layer, alpha, source.operators[start:end], positions=positions, learned_positions=learned,
                                **used)
    vector = concept_vector(source, how=how, skip_first=skip_first)
    return Steering(hook_name=name, layer=layer, alpha=alpha, vector=vector, positions=positions, how=how, **used)


def _check_alpha(alpha) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise InputError(f"alpha must be a number (a fraction of the residual norm, e.g. 0.25), got {alpha!r}.")


def _map_steering(source: FeatureMap, alpha: float, positions: Positions) -> Steering:
    # Along a feature's map to a residual hook point, at that hook.
    if len(source.values) == 1 or not source.target.endswith(RESIDUAL_HOOKS):
        raise InputError(
            f"A feature's map steers where it was read: give one to a residual hook point (target='blocks.L.hook_resid_post'), "
            f"not {source.target!r}; or steer along its decoder direction with feature_steering(model, site, feature)."
        )
    _check_alpha(alpha)
    _check_steered_positions(positions)
    vector = source.values / source.values.norm()
    return Steering(hook_name=source.target, layer=layer_of(source.target) or 0, alpha=alpha, vector=vector, positions=positions,
                    how=f"map of {source.site} #{source.feature}", str_tokens=[], left_out=[])


def feature_steering(source, feature: int, *, site: str | None = None, alpha: float = 1.0, positions: Positions = "all") -> Steering:
    """Hooks that add one feature's decoder direction where its dictionary writes: ``r + alpha · ‖r‖ · W_dec[f] / ‖W_dec[f]‖``.

    Args:
        source: A `tl_linmap.Dictionary` (or a SAELens SAE), or a model with dictionaries spliced in
            (`tl_linmap.spliced`, a ``HookedSAETransformer``, a ``ReplacementModel``; then ``site`` names one).
        feature: The feature id.
        site: The dictionary's output hook, for a model with several (default: its only one).
        alpha: Strength, relative to the norm at each position.
        positions: ``"all"`` or the indices / slice steered in each forward call.

    Returns:
        A `Steering` (``model.hooks(fwd_hooks=...)``, `alpha_sweep`, `compare_methods`) at the hook point the
        dictionary writes: the model needs no dictionary spliced to run it, except for a SAELens SAE, whose
        output hook point (``<hook>.hook_sae_output``) exists only while it is attached.

    Raises:
        InputError: for an unknown site or feature, several dictionaries and no site, or a bad alpha or positions.
    """
    if isinstance(source, Dictionary) or hasattr(source, "W_enc") and not hasattr(source, "hook_dict"):
        splice = DictionarySplice(as_dictionary(source))
    else:
        splices = splices_of(source)
        if site is None and len(splices) > 1:
            raise InputError(f"The model has {len(splices)} dictionaries: name one with site= ({', '.join(repr(s.site) for s in splices)}).")
        splice = find_splice(source, site if site is not None else (splices[0].site if splices else ""))
    fid = check_feature(splice, feature)
    _check_alpha(alpha)
    _check_steered_positions(positions)
    direction = splice.dictionary.W_dec[fid].detach()
    return Steering(hook_name=splice.output_hook, layer=layer_of(splice.site) or 0, alpha=alpha, vector=direction / direction.norm(),
                    positions=positions, how=f"decoder of {splice.site} #{fid}", str_tokens=[], left_out=[])


def _check_steered_positions(positions) -> None:
    # "all", a slice, or position indices; whether they fit is known only per forward call
    # (`_position_mask`), unlike a target position, which `read_prompts` checks against the prompts.
    if positions == "all" or isinstance(positions, slice):
        return
    if isinstance(positions, str) or not isinstance(positions, Sequence) or not all(is_int(p) for p in positions):
        raise InputError(f"positions must be 'all', a slice or a list of position indices, got {positions!r}.")


def word_tokens(model, text: str | Sequence[str]) -> list[str]:
    """Single vocabulary tokens that spell the words of a concept.

    Each word of ``text`` (function words such as "the" or "in" left out) is tried as
    written, lower-case and capitalised, each with and without a leading space; the
    variants that are one token are kept.

    Args:
        model: A TransformerBridge or HookedTransformer (for its tokenizer).
        text: The concept, e.g. ``"Chocolate cake"``, or its tokens (a `Steering`'s ``str_tokens``).

    Returns:
        The distinct single-token variants, e.g. ``[" Chocolate", " chocolate", " cake", "cake", ...]``.
    """
    words = re.findall(r"[^\W\d_]+", text if isinstance(text, str) else "".join(text))
    found: list[str] = []
    for word in (w for w in words if w.lower() not in _FUNCTION_WORDS):
        for form in dict.fromkeys((word, word.lower(), word.capitalize())):
            for variant in (" " + form, form):
                if variant not in found and len(model.to_tokens(variant, prepend_bos=False, move_to_device=False)[0]) == 1:
                    found.append(variant)
    return found


@table_row
@dataclass
class SweepRow:
    """How one steering strength moves the concept.

    Attributes:
        alpha: Steering strength (fraction of the residual norm).
        shift: Mean log-probability shift (nats) of the concept tokens, over every position
            that predicts a token of the unsteered greedy continuation, steered minus plain.
        mentions: How many tokens of the steered greedy continuation are concept tokens.
        text: The steered greedy continuation.
    """

    alpha: float
    shift: float
    mentions: int
    text: str


def _greedy(model, tokens: Int[Tensor, "1 pos"], max_new_tokens: int) -> Int[Tensor, "1 pos_out"]:
    # No KV cache: TransformerLens 4.3's cached generate() degenerates on SmolLM2 even unhooked.
    return model.generate(tokens, max_new_tokens=max_new_tokens, do_sample=False, use_past_kv_cache=False,
                          verbose=False, return_type="tokens")


def _continuation_logprobs(
    model, tokens: Int[Tensor, "1 pos"], start: int, concept: list[int]
) -> Float[Tensor, "n_new n_concept"]:
    # Teacher-forced: the positions start-1 .. pos-2 predict the continuation tokens start .. pos-1.
    return model(tokens)[0, start - 1 : -1].log_softmax(-1)[:, concept]


def alpha_sweep(
    model,
    source: LinearMap | LinearMaps | FeatureMap | Steering,
    prompt: Prompt,
    *,
    layer: int | None = None,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    concept_tokens: Sequence[int | str] | None = None,
    max_new_tokens: int = 20,
    positions: Positions = "all",
    how: Literal["contributions", "singular"] = "contributions",
    skip_first: SkipFirst = "auto",
    method: Method = "vector",
    progress: bool | None = None,
) -> Table:
    """Steer a prompt at several strengths and measure how far the concept moves.

    The comparison is on the same tokens for every alpha: the prompt's unsteered greedy
    continuation is scored teacher-forced with and without steering, and each row reports
    the concept tokens' mean log-probability shift over the positions that predict it
    (exactly 0 at ``alpha=0``), next to the steered greedy continuation and how many of its
    tokens are concept tokens.

    Args:
        model: The model (TransformerBridge or HookedTransformer) the source map was computed on.
        source: See `steering_hooks`; or a `Steering` already built (`feature_steering`), swept over ``alphas``
            (``layer``, ``positions``, ``how``, ``skip_first``, ``method`` are then its own).
        prompt: An unrelated prompt to steer (text or tokens).
        layer: Block whose output is steered (not for a `Steering`).
        alphas: Strengths to try.
        concept_tokens: Vocabulary ids or single-token strings whose log-probabilities are
            measured; default: `word_tokens` of the tokens that built the vector.
        max_new_tokens: Length of the continuations.
        positions: See `steering_hooks`.
        how: See `concept_vector`.
        skip_first: See `concept_vector`.
        method: ``"vector"`` or ``"operator"``; see `steering_hooks`.
        progress: A progress bar over alphas: None (default) once the call lasts a few seconds, True at once, False never.

    Returns:
        A `tl_linmap.base.table.Table` of `SweepRow`, one per alpha.

    Raises:
        InputError: for a bad source or layer, no alphas, or when no concept token is found or given.
    """
    if not alphas:
        raise InputError("alphas is empty: give the strengths to try, e.g. alphas=(0, 0.1, 0.2).")
    if isinstance(source, Steering):
        steering = source
    else:
        steering = steering_hooks(source, layer=layer, alpha=alphas[0], positions=positions, how=how, skip_first=skip_first,
                                  method=method)
    concept = _concept_ids(model, steering, concept_tokens)
    tokens = to_tokens(model, prompt)
    start = tokens.shape[1]
    rows = []
    with torch.no_grad():
        plain = _greedy(model, tokens, max_new_tokens)
        base = _continuation_logprobs(model, plain, start, concept)
        for alpha in progress_bar(len(alphas), "alpha sweep", progress, alphas):
            with model.hooks(fwd_hooks=dataclasses.replace(steering, alpha=alpha)):
                shift = float((_continuation_logprobs(model, plain, start, concept) - base).mean())
                new = _greedy(model, tokens, max_new_tokens)[0, start:]
            mentions = int(torch.isin(new, torch.tensor(concept, device=new.device)).sum())
            rows.append(SweepRow(alpha, shift, mentions, model.tokenizer.decode(new)))
    return Table(rows)


def _concept_ids(model, steering: Steering | OperatorSteering, concept_tokens: Sequence[int | str] | None) -> list[int]:
    # The measured vocabulary ids: those given, or the single-token words of the source tokens used.
    concept = [token_id(model, t) for t in (word_tokens(model, steering.str_tokens) if concept_tokens is None else concept_tokens)]
    if not concept:
        raise InputError("No concept token to measure: pass concept_tokens=[...] (ids or single-token strings).")
    return concept


@table_row
@dataclass
class MethodRow:
    """One concept at one strength, steered both ways and scored on the same fixed text.

    Attributes:
        concept: The concept's label.
        alpha: Steering strength (fraction of the residual norm), the same for both methods.
        vector: Mean log-probability shift (nats) of the concept tokens over the fixed
            continuation, concept vector (``method="vector"``) minus unsteered.
        operator: The same with the steering operator (``method="operator"``).
    """

    concept: str
    alpha: float
    vector: float
    operator: float


def compare_methods(
    model,
    sources: dict[str, LinearMap | LinearMaps],
    prompt: Prompt,
    continuation: str,
    *,
    layer: int,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    concept_tokens: dict[str, Sequence[int | str]] | None = None,
    skip_first: SkipFirst = "auto",
    progress: bool | None = None,
) -> Table:
    """The concept vector and the steering operator side by side, on one fixed text.

    ``prompt + continuation`` is scored teacher-forced: for each concept and alpha, the
    concept tokens' log-probabilities at every position that predicts a continuation token,
    steered with each method minus unsteered, averaged over positions and concept tokens
    (exactly 0 at ``alpha=0``). Both methods steer every position, the continuation's too
    (the operator's sum runs over the continuation's embeddings, as it would in generation).

    Args:
        model: The model (TransformerBridge or HookedTransformer) the source maps were computed on.
        sources: Concept label -> source map (see `steering_hooks`).
        prompt: A neutral prompt to steer (text or tokens).
        continuation: The fixed text after it whose tokens are scored.
        layer: Block whose output is steered.
        alphas: Strengths to try.
        concept_tokens: Concept label -> vocabulary ids or single-token strings measured
            (default: `word_tokens` of the source tokens used).
        skip_first: See `concept_vector`.
        progress: A progress bar: None (default) once the call lasts a few seconds, True at once, False never.

    Returns:
        A `tl_linmap.base.table.Table` of `MethodRow`, one per concept and alpha.

    Raises:
        InputError: for no sources or alphas, an empty continuation, or a concept without concept tokens.
    """
    if not isinstance(sources, dict) or not sources:
        raise InputError("sources must be a non-empty dict of concept label -> source map, e.g. {'Paris': lm}.")
    if not alphas:
        raise InputError("alphas is empty: give the strengths to try, e.g. alphas=(0, 0.1, 0.2).")
    if not isinstance(continuation, str) or not continuation:
        raise InputError(f"continuation must be the fixed text to score after the prompt, got {continuation!r}.")
    tokens = to_tokens(model, prompt)
    added = model.to_tokens(continuation, prepend_bos=False, move_to_device=False).to(tokens.device)
    start, text = tokens.shape[1], torch.cat([tokens, added], dim=1)
    rows = []
    with torch.no_grad(), progress_bar(len(sources) * len(alphas), "steering comparison", progress) as bar:
        for label, source in sources.items():
            hooks = {method: steering_hooks(source, layer=layer, skip_first=skip_first, method=method)
                     for method in ("vector", "operator")}
            concept = _concept_ids(model, hooks["vector"], None if concept_tokens is None else concept_tokens.get(label))
            base = _continuation_logprobs(model, text, start, concept)
            for alpha in alphas:
                shifts = {}
                for method, steering in hooks.items():
                    with model.hooks(fwd_hooks=dataclasses.replace(steering, alpha=alpha)):
                        shifts[method] = float((_continuation_logprobs(model, text, start, concept) - base).mean())
                rows.append(MethodRow(label, alpha, shifts["vector"], shifts["operator"]))
                bar.update()
    return Table(rows)
