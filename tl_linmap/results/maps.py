"""Results: what the linear system of one inference gives back, as small dataclasses with methods.

- `LinearMap`: one target's operators ``J_i``, inputs ``x_i`` and affine part ``b``;
- `Contributions`: one target's per-token terms ``J_i x_i`` without the operators (matrix-free);
- `LinearMaps`: several targets of one inference, keyed by TransformerLens hook names, with
  per-head maps derived from ``hook_z``;
- `Attribution`, `GapRow`: a logit split over tokens, modules and heads; ordinary vs detached.

Every result that claims exactness checks itself with `TargetResult.check` (one tolerance per
dtype, `tl_linmap.base.exactness`).
"""

from __future__ import annotations

import dataclasses
import shutil
import warnings
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_linmap.base.checks import check_names, check_positive, is_int
from tl_linmap.base.compat import get_act_name
from tl_linmap.base.deprecation import (
    renamed_argument,
    renamed_attribute,
    renamed_fields,
    renamed_names,
)
from tl_linmap.base.errors import InputError
from tl_linmap.base.exactness import check_exact, relative
from tl_linmap.base.hook_names import EMBED_HOOK, OUTPUT_HOOK, RESIDUAL_HOOKS
from tl_linmap.base.saving import Saveable
from tl_linmap.base.spill import SpilledTensor
from tl_linmap.base.table import Table
from tl_linmap.present import display, views
from tl_linmap.reading.readouts import LinearReadout
from tl_linmap.reading.tokens import FrozenAffine, TokenReader, decode_tokens, token_id
from tl_linmap.results.logit_split import LogitSplit
from tl_linmap.results.svd import OperatorSVD, dimensionality, operator_svd


@dataclass(kw_only=True)
class TargetResult(Saveable):
    """What every result about one target vector shares: its affine part and the model's values.

    Attributes:
        bias: ``b``, everything that does not scale with the token embeddings
            (biases, learned positions), computed through the frozen system.
        output: The model's value of the target (reference forward, true working dtype).
        native_output: The value from a plain forward on the bridge's native norm path
            (HF computes RMSNorm in float32 even in float64 models).
        tokens: The input tokens.
        target: The hook name mapped (flattened after the position axis).
        position: The sequence position of the target.
        reader: How its vectors are read as tokens (`tl_linmap.reading.tokens.TokenReader`).
        source: The hook point the map starts from (``hook_embed``: the token embeddings);
            input ``i`` is its activation at position ``i``.
        scale: For a scalar readout (`tl_linmap.reading.readouts`), the size of what it adds up,
            ``‖w‖·‖y‖ + |c|``: its reconstruction error is relative to this, as a value near
            zero (a logit difference of two close logits) has no relative error of its own.
    """

    bias: Float[Tensor, " d_out"]
    output: Float[Tensor, " d_out"]
    native_output: Float[Tensor, " d_out"] = field(repr=False)
    tokens: Int[Tensor, " pos"] = field(repr=False)
    target: str = OUTPUT_HOOK
    position: int = -1
    reader: TokenReader | None = field(default=None, repr=False)
    source: str = EMBED_HOOK
    scale: float | None = field(default=None, repr=False)

    readout = renamed_attribute("readout", "reader")
    _TOKEN_IDS = "tokens"

    #: What `plot` draws, by kind: the name of a `tl_linmap.present.plotting` function; the first is the default.
    _PLOTS = {"contributions": "plot_contribution_heatmap", "logit": "plot_logit_contributions"}

    def contributions(self) -> Float[Tensor, "pos d_out"]:
        """Per-token contributions ``J_i x_i``; they sum to ``output - bias``.

        Returns:
            One output-space vector per input token.
        """
        raise NotImplementedError

    def __repr__(self) -> str:
        return display.linear_map_text(self)

    def _repr_html_(self) -> str:
        return display.linear_map_html(self)

    def show(self, backend: views.Backend = None) -> views.View:
        """The input tokens coloured by the size of their term ``‖J_i x_i‖``, for a notebook.

        With circuitsvis installed (the ``circuitsvis`` extra) its coloured tokens
        (`tl_linmap.present.views.colored_tokens`); otherwise, or with ``backend="html"``, this
        result's own HTML (its facts and the tokens coloured by their share of ``Σ_j ‖J_j x_j‖``).

        Args:
            backend: ``"circuitsvis"``, ``"html"``, or None (circuitsvis where installed).

        Returns:
            A `tl_linmap.present.views.View`, displayed as a cell's value.

        Raises:
            InputError: for another backend, or ``"circuitsvis"`` where it is not installed.
        """
        norms = self.contributions().norm(dim=-1)[:, None]
        return views.colored_tokens(self.str_tokens, norms, [f"‖J_i x_i‖ of {self.target}"], signed=False,
                                    html=self._repr_html_, backend=backend)

    def plot(self, kind: str | None = None, **options):
        """Draw this map with one of `tl_linmap.present.plotting`'s functions (needs the ``plot`` extra).

        Kinds, and the function that draws each (its options pass through):

        - ``"spectra"`` (a `LinearMap`'s default): `plot_spectra`, singular values of ``J_i``
          (``source=-1``, ``"all"`` for the stacked operator; ``skip_first``, ``normalize``);
        - ``"decoded"``: `plot_decoded`, the tokens the top singular vectors write (``source``,
          ``k``, ``top``, ``skip_first``);
        - ``"contributions"`` (a `Contributions`' default): `plot_contribution_heatmap`,
          ``‖J_i x_i‖`` per input token (``skip_first``);
        - ``"logit"``: `plot_logit_contributions`, one logit split over the input tokens
          (``token``, default the top token; ``skip_first``).

        Every kind takes ``ax=`` (draw into those axes). The spectra and decoded tokens need
        the operators, which a `Contributions` does not have.

        Args:
            kind: One of the kinds above (default: the first this result offers).
            **options: The plotting function's options.

        Returns:
            The matplotlib Figure.

        Raises:
            InputError: for a kind this result does not offer.
        """
        from tl_linmap.present import plotting

        return plotting.plot_of(kind, self._PLOTS)(self, **options)

    @property
    def str_tokens(self) -> list[str]:
        """The input tokens, decoded (one string per token of the prompt)."""
        return decode_tokens(self.reader.model if self.reader else None, self.tokens)

    sources = renamed_attribute("sources", "str_tokens")

    def reconstruct(self) -> Float[Tensor, " d_out"]:
        """The linear system's value ``Σ_i J_i x_i + b``.

        Returns:
            The reconstructed target vector.
        """
        return self.contributions().sum(0) + self.bias

    def relative_error(self) -> float:
        """``‖reconstruct() − output‖ / ‖output‖`` (for a scalar readout, over `scale`).

        Returns:
            The relative reconstruction error (below 1e-12 in float64).
        """
        if self.scale is not None:
            return float((self.reconstruct() - self.output).norm()) / max(self.scale, float(self.output.norm()), 1e-300)
        return relative(self.reconstruct(), self.output)

    def native_gap(self) -> float:
        """``‖output − native_output‖ / ‖output‖``: the bridge's native-path rounding, not an error of the map.

        Returns:
            The relative gap (about 1e-7 for RMSNorm models in float64, 0 for LayerNorm ones).
        """
        return relative(self.native_output, self.output)

    def check(self) -> float:
        """Raise `tl_linmap.base.errors.FreezeError` unless the result reconstructs its output exactly.

        Returns:
            The relative error, within `tl_linmap.base.exactness.tolerance` of the dtype.
        """
        return check_exact(self.relative_error(), self.output.dtype, self.target)

    def logits(self) -> Float[Tensor, " d_vocab"]:
        """The logits the linear system predicts: `reconstruct` read through the frozen final norm and ``W_U``.

        For the model's output these are its next-token logits (to the working dtype's rounding);
        for an inner residual target, that layer's logit lens.

        Returns:
            One logit per vocabulary token.

        Raises:
            InputError: without a token reader, or for a target outside the residual stream.
        """
        if self.reader is None or self.scale is not None:
            raise InputError("Only a map of a residual-stream vector has logits; a readout's map is already one number (reconstruct()).")
        return self.reader.logits(self.reconstruct(), affine=True)

    def top_tokens(self, k: int = 5) -> list[tuple[str, float]]:
        """The ``k`` tokens with the highest predicted logits (`logits`).

        Args:
            k: How many tokens.

        Returns:
            ``(token, logit)`` pairs, highest first.
        """
        check_positive("k", k)
        return self.reader.top(self.logits(), k)[0]

    def logit_contributions(self, token: int | str | LinearReadout) -> LogitSplit:
        """One vocabulary token's logit (or a linear readout) split exactly over the input tokens.

        For a target other than the model's output this is the logit lens of that target,
        made linear by ``ln_final`` frozen at the target position.

        Args:
            token: Vocabulary id or single-token string (e.g. ``" Paris"``), or a linear
                readout of this map's target vector (`tl_linmap.reading.readouts`: a
                ``LogitDiff``/``Logit`` is read through this map's token reader whatever its
                ``hook``; a ``Direction`` lives in this target's space).

        Returns:
            A `tl_linmap.results.logit_split.LogitSplit` (``token`` is the readout's name for a readout).

        Raises:
            InputError: without a readout, or for a target outside the residual stream.
        """
        if self.reader is None:
            raise InputError("This result has no token reader; compute it with tl_linmap.")
        if isinstance(token, LinearReadout):
            token.check(self.reader.model)
            w, c = token.weights(self.reader, self.output.shape[0])
            w, c = w.to(self.output), c.to(self.output)
            per_token = self.contributions() @ w
            return LogitSplit(token.name, self.str_tokens, per_token, float(self.bias @ w + c), float(self.output @ w + c))
        token = token_id(self.reader.model, token)
        logit = float(self.reader.logits(self.output, affine=True)[token])
        per_token = self.reader.logits(self.contributions())[:, token]
        constant = float(self.reader.logits(self.bias, affine=True)[token])
        return LogitSplit(self.reader.model.tokenizer.decode([token]), self.str_tokens, per_token, constant, logit)


@dataclass(kw_only=True, repr=False)
class LinearMap(TargetResult):
    """The detached-Jacobian linear system of one target vector of one inference.

    Attributes:
        operators: ``J_i``, one ``d_out x d_in`` block per input token (zero after ``position``).
        inputs: ``x_i``, the token embeddings (output of ``hook_embed``), or the source's
            activations (``source``), flattened after the position axis.
    """

    operators: Float[Tensor, "pos d_out d_in"]
    inputs: Float[Tensor, "pos d_in"]

    _PLOTS = {"spectra": "plot_spectra", "decoded": "plot_decoded", **TargetResult._PLOTS}

    def contributions(self) -> Float[Tensor, "pos d_out"]:
        """Per-token contributions ``J_i x_i``.

        Returns:
            One output-space vector per input token; they sum to ``output - bias``.
        """
        return einops.einsum(self.operators, self.inputs, "pos d_out d_in, pos d_in -> pos d_out")

    def svd(self, k: int | None = None, *, skip_first: bool = False) -> OperatorSVD:
        """SVD of each token's operator and of the stacked operator ``[J_0 … J_position]``.

        Args:
            k: Pairs kept per operator (default: all).
            skip_first: Leave the first token (BOS, attention sink) out of the stacked operator.

        Returns:
            An `tl_linmap.results.svd.OperatorSVD`, each pair signed so that ``u`` points along the output.
        """
        return operator_svd(
            self.operators, self.output, self.position, target=self.target, str_tokens=self.str_tokens,
            reader=self.reader, k=k, skip_first=skip_first,
        )

    def decode(
        self, k: int = 3, top: int = 10, sources: int | Sequence[int] | None = None, *,
        skip_first: bool = False, stacked: bool = False, tokens: int | Sequence[int] | None = None,
    ) -> Table:
        """The top-k singular pairs of the operators, read as tokens (see `OperatorSVD.decode`).

        Args:
            k: Pairs per operator.
            top: Tokens per vector.
            sources: Input token indices (default: all up to the target position; ``-1`` is
                the prompt's last token).
            skip_first: Leave the first token out.
            stacked: Also read the stacked operator ``[J_0 … J_n]``.
            tokens: Deprecated name of ``sources``.

        Returns:
            A `tl_linmap.base.table.Table` of `tl_linmap.results.svd.DecodedPair`.
        """
        sources = renamed_argument("tokens", tokens, "sources", sources)
        return self.svd(k, skip_first=skip_first).decode(k, top, sources, skip_first=skip_first, stacked=stacked)

    def dimensionality(self, *, skip_first: bool = False, per_token: bool = True) -> Table:
        """Stable, effective and 90%/99% energy ranks of each operator and the stacked one.

        Args:
            skip_first: Leave the first token out.
            per_token: One row per token as well as the stacked operator's (False: that row only).

        Returns:
            A `tl_linmap.base.table.Table` of `tl_linmap.results.svd.RankRow`.
        """
        return dimensionality(
            self.operators, self.position, target=self.target, str_tokens=self.str_tokens,
            skip_first=skip_first, per_token=per_token,
        )


@dataclass(kw_only=True, repr=False)
class Contributions(TargetResult):
    """Per-token contributions ``J_i x_i`` of one target, computed by forward passes.

    Attributes:
        values: One output-space vector per input token (zero after ``position``).
    """

    values: Float[Tensor, "pos d_out"]

    def contributions(self) -> Float[Tensor, "pos d_out"]:
        """Per-token contributions ``J_i x_i``.

        Returns:
            `values`; they sum to ``output - bias``.
        """
        return self.values


@dataclass
class HeadSplit(Saveable):
    """How one layer's ``hook_z`` becomes its ``hook_attn_out``: ``post(z @ W_O + b_O)``.

    Attributes:
        W_O: The heads' output weights.
        b_O: The output bias (zeros where the model has none).
        post: The post-attention norm frozen at the target position, or None.
        pattern: The layer's frozen attention pattern ``[head, query, key]``, which made ``z``
            (None where the pattern is frozen through queries and keys and was not recorded).
    """

    W_O: Float[Tensor, "n_heads d_head d_model"]
    b_O: Float[Tensor, " d_model"]
    post: FrozenAffine | None = None
    pattern: Float[Tensor, "n_heads query key"] | None = field(default=None, repr=False)

    def _facts(self) -> list[display.Fact]:
        heads, d_head, d_model = self.W_O.shape
        post = "none" if self.post is None else "frozen (an affine map)"
        pattern = "not recorded" if self.pattern is None else display.shape_text(self.pattern)
        return [("heads", str(heads), True), ("d_head", str(d_head), True), ("d_model", str(d_model), True),
                ("post-attention norm", post, False), ("frozen pattern", pattern, False)]

    def __repr__(self) -> str:
        return display.summary_text(type(self).__name__, self._facts())

    def _repr_html_(self) -> str:
        return display.summary_html("HeadSplit: hook_z to hook_attn_out, post(z @ W_O + b_O)", self._facts())

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


def cast_map(lm: LinearMap, dtype: torch.dtype) -> LinearMap:
    """A map with every float tensor in ``dtype`` (its operators, inputs, ``b``, outputs, reader's norm).

    Args:
        lm: The map.
        dtype: A floating dtype.

    Returns:
        A new `LinearMap` (the same one where nothing changes).
    """
    if lm.operators.dtype == dtype and lm.inputs.dtype == dtype:
        return lm
    tensors = {name: getattr(lm, name).to(dtype) for name in ("operators", "inputs", "bias", "output", "native_output")}
    reader = lm.reader
    if reader is not None and reader.final_norm is not None:
        reader = dataclasses.replace(reader, final_norm=cast_affine(reader.final_norm, dtype))
    return dataclasses.replace(lm, reader=reader, **tensors)


def cast_affine(affine: FrozenAffine | None, dtype: torch.dtype) -> FrozenAffine | None:
    """A frozen norm in ``dtype``.

    Args:
        affine: The frozen norm, or None.
        dtype: A floating dtype.

    Returns:
        The cast norm, or None.
    """
    return None if affine is None else FrozenAffine(affine.matrix.to(dtype), affine.offset.to(dtype))


class SpilledMap(NamedTuple):
    """A `LinearMap` whose operators live on disk (`tl_linmap.base.spill`), read back on access.

    Attributes:
        fields: The map without its operators (they are an empty tensor on the ``meta`` device).
        operators: Where the operators are.
    """

    fields: LinearMap
    operators: SpilledTensor

    @classmethod
    def of(cls, lm: LinearMap) -> SpilledMap:
        """The spilled map of a `LinearMap` whose ``operators`` is a `SpilledTensor`.

        Args:
            lm: The map, its operators a file's tensor.

        Returns:
            The map's fields and its operators' file, apart.
        """
        empty = torch.empty(lm.operators.shape, dtype=lm.operators.dtype, device="meta")
        return cls(dataclasses.replace(lm, operators=empty), lm.operators)

    def load(self) -> LinearMap:
        """The map, its operators read from disk.

        Returns:
            The `LinearMap`, bit for bit as computed.
        """
        return dataclasses.replace(self.fields, operators=self.operators.load())


def _on_disk(lm: LinearMap) -> bool:
    # A map whose operators are a file's tensor (as saving writes and loading reads a spilled map).
    return isinstance(lm.operators, SpilledTensor)


class MapStore(Mapping):
    """`LinearMaps.maps` where some maps live on disk: each read back when indexed, none kept.

    Iterating, ``.items()`` and every `LinearMaps` method read one spilled map at a time, so
    memory holds the maps kept in memory and one more. A temporary directory is removed with
    the store (when no result refers to it any longer); a directory the user named is kept.
    Saved (`save`), the spilled maps are copied into the result's file one at a time, and loaded
    they are read from that file on access, as they were from their own.

    Args:
        maps: Per hook name, in order, a `LinearMap` (kept in memory, or on disk where its
            ``operators`` is a `SpilledTensor`) or a `SpilledMap`.
        directory: Where the spilled maps' files are (None: the first spilled map's folder).
        temporary: Remove ``directory`` with this store.
    """

    def __init__(self, maps: Mapping[str, LinearMap | SpilledMap], directory: Path | None = None, temporary: bool = False):
        self._maps = {name: SpilledMap.of(lm) if isinstance(lm, LinearMap) and _on_disk(lm) else lm for name, lm in maps.items()}
        spilled = [lm.operators.path for lm in self._maps.values() if isinstance(lm, SpilledMap)]
        self.directory = directory if directory is not None or not spilled else Path(spilled[0]).parent
        if temporary and directory is not None:
            self._cleanup = weakref.finalize(self, shutil.rmtree, str(directory), True)

    def __getitem__(self, name: str) -> LinearMap:
        lm = self._maps[name]
        return lm.load() if isinstance(lm, SpilledMap) else lm

    def __iter__(self) -> Iterator[str]:
        return iter(self._maps)

    def __len__(self) -> int:
        return len(self._maps)

    @property
    def spilled(self) -> list[str]:
        """The hook names whose operators are on disk."""
        return [name for name, lm in self._maps.items() if isinstance(lm, SpilledMap)]

    def nbytes(self) -> int:
        """Bytes of the operators held in memory.

        Returns:
            The sum over the maps kept in memory.
        """
        return sum(lm.operators.nbytes for lm in self._maps.values() if isinstance(lm, LinearMap))

    def cast(self, dtype: torch.dtype) -> MapStore:
        """The maps kept in memory in ``dtype`` (spilled ones were written in it already).

        Args:
            dtype: A floating dtype.

        Returns:
            A store sharing this one's files (and their lifetime).
        """
        store = MapStore({
            name: cast_map(lm, dtype) if isinstance(lm, LinearMap) else SpilledMap(cast_map(lm.fields, dtype), lm.operators)
            for name, lm in self._maps.items()
        }, self.directory)
        store._owner = self  # the files live as long as any store that reads them
        return store

    def _saved_form(self) -> dict[str, LinearMap]:
        # What a saved result's file holds in this store's place (tl_linmap.base.saving): a spilled map as
        # a LinearMap whose operators are its SpilledTensor, copied into the file without the others.
        return {name: dataclasses.replace(lm.fields, operators=lm.operators) if isinstance(lm, SpilledMap) else lm
                for name, lm in self._maps.items()}

    def __repr__(self) -> str:
        return f"MapStore({len(self)} maps, {len(self.spilled)} on disk in {str(self.directory)!r})"


class MissingMapError(InputError, KeyError):
    """`LinearMaps` holds no map of that name (a `KeyError` too, as a mapping's lookups expect)."""

    __str__ = InputError.__str__  # KeyError's would quote the message


@renamed_fields(readouts="head_splits")
@dataclass
class LinearMaps(Mapping, Saveable):
    """Linear maps of several hook points of one inference, indexed by hook name.

    Attributes:
        maps: `LinearMap` per hook name: a dict, or a `MapStore` where some maps live on disk
            (`tl_linmap.linear.dense.linear_maps` under a ``memory=`` budget or ``store="disk"``):
            indexing reads such a map back, bit for bit, and every method reads one at a time.
        head_splits: Per layer whose ``hook_z`` was mapped, how it becomes ``hook_attn_out`` (for `heads`).
        norms: Norm modules frozen at the target position (``"ln_final"`` always), as affine maps.
    """

    maps: Mapping[str, LinearMap]
    head_splits: dict[int, HeadSplit] = field(default_factory=dict, repr=False)
    norms: dict[str, FrozenAffine] = field(default_factory=dict, repr=False)

    #: What `plot` draws, by kind: the name of a `tl_linmap.present.plotting` function; the first is the default.
    _PLOTS = {"spectra": "plot_spectra", "decoded": "plot_decoded", "contributions": "plot_contribution_heatmap"}

    def __post_init__(self) -> None:
        # Loaded from a file that holds spilled maps, they stay there (read back on access).
        if not isinstance(self.maps, MapStore) and any(_on_disk(lm) for lm in self.maps.values()):
            self.maps = MapStore(self.maps)

    def __getitem__(self, name: str | LinearReadout) -> LinearMap:
        if isinstance(name, LinearReadout):
            name = name.name
        if not isinstance(name, str) or name not in self.maps:
            hint = f" It holds {', '.join(list(self.maps)[:6])}{', ...' if len(self.maps) > 6 else ''}."
            raise MissingMapError(f"No map of {name!r}: index by hook name.{hint}")
        return self.maps[name]

    def _names(self, names: Sequence[str] | None, default: Sequence[str], argument: str = "targets") -> list[str]:
        # Hook names asked for (a list, not one string), each held here; None: the default.
        if names is None:
            return list(default)
        names = check_names(argument, names, f"[{next(iter(self.maps), 'output')!r}]")
        if not names:
            raise InputError(f"{argument} is empty: give at least one hook name, or {argument}=None for every map.")
        for name in names:
            self[name]  # raises MissingMapError naming the maps held
        return names

    def __iter__(self) -> Iterator[str]:
        return iter(self.maps)

    @property
    def spilled(self) -> list[str]:
        """The hook names whose operators live on disk (read back on access); empty where all are in memory."""
        return list(getattr(self.maps, "spilled", []))

    @property
    def directory(self) -> Path | None:
        """Where the spilled maps' files are (None where every map is in memory)."""
        return getattr(self.maps, "directory", None)

    def _prompt(self) -> dict | None:
        return self.maps[next(iter(self.maps))]._prompt() if self.maps else None

    def __len__(self) -> int:
        return len(self.maps)

    def __repr__(self) -> str:
        return display.linear_maps_text(self)

    def _repr_html_(self) -> str:
        return display.linear_maps_html(self)

    def show(self, targets: Sequence[str] | None = None, backend: views.Backend = None) -> views.View:
        """The input tokens coloured by ``‖J_i x_i‖`` in each map, for a notebook.

        With circuitsvis installed (the ``circuitsvis`` extra) its coloured tokens with a selector
        over the maps (`tl_linmap.present.views.colored_tokens`); otherwise, or with
        ``backend="html"``, one row of coloured tokens per map. Each map has its own scale.

        Args:
            targets: Hook names (default: every map).
            backend: ``"circuitsvis"``, ``"html"``, or None (circuitsvis where installed).

        Returns:
            A `tl_linmap.present.views.View`, displayed as a cell's value.

        Raises:
            InputError: for a name these maps do not hold, no maps, or a bad backend.
        """
        names = self._names(targets, self.maps)
        if not names:
            raise InputError("These maps are empty: there is nothing to show.")
        norms = {name: self[name].contributions().norm(dim=-1) for name in names}
        first = self[names[0]]
        tokens = first.str_tokens
        title = f"‖J_i x_i‖ per input token in {len(names)} maps at position {first.position % len(tokens)}"
        return views.colored_tokens(tokens, torch.stack(list(norms.values()), dim=1), names, signed=False,
                                    html=lambda: display.token_rows_html(title, tokens, norms), backend=backend)

    def pattern(self, layer: int, head: int | None = None) -> Float[Tensor, "*n_heads query key"]:
        """A layer's attention pattern, as frozen in these maps (the one every map here holds fixed).

        Args:
            layer: Block index (its ``attn.hook_z`` must be mapped: ``modules=True``).
            head: A head index, or None for every head.

        Returns:
            ``pattern[h, q, k]``, head ``h``'s weight on key position ``k`` at query position
            ``q`` (each row sums to one); ``[q, k]`` for one head.

        Raises:
            InputError: for a layer whose ``hook_z`` is not mapped, a head that does not exist, or
                a model whose pattern is frozen through its queries and keys (none was recorded).
        """
        layer, _ = self._z(layer)
        pattern = self.head_splits[layer].pattern
        if pattern is None:
            raise InputError(
                f"Layer {layer}'s pattern was not recorded: this model's attention is frozen through its queries and "
                "keys (its hook_pattern only observes). Read the pattern off model.run_with_cache instead."
            )
        return pattern if head is None else pattern[self._head_index(layer, head)]

    def show_pattern(self, layer: int, head: int | None = None, backend: views.Backend = None) -> views.View:
        """A layer's frozen attention pattern (`pattern`) as heatmaps, for a notebook.

        With circuitsvis installed (the ``circuitsvis`` extra) ``attention_heads`` (every head) or
        ``attention_pattern`` (one); otherwise, or with ``backend="html"``, one table per head.

        Args:
            layer: Block index (its ``attn.hook_z`` must be mapped: ``modules=True``).
            head: A head index, or None for every head.
            backend: ``"circuitsvis"``, ``"html"``, or None (circuitsvis where installed).

        Returns:
            A `tl_linmap.present.views.View`, displayed as a cell's value.

        Raises:
            InputError: as `pattern`, or for a bad backend.
        """
        pattern = self.pattern(layer, head)
        layer, z = self._z(layer)
        heads = range(len(pattern)) if head is None else [int(head)]
        pattern = pattern if head is None else pattern[None]
        names = [f"L{layer}H{h}" for h in heads]
        tokens = z.str_tokens
        title = f"Frozen attention pattern of layer {layer}" + ("" if head is None else f", head {int(head)}")
        return views.attention(tokens, pattern, names, html=lambda: display.pattern_html(title, tokens, pattern, names), backend=backend)

    def to_table(self) -> Table:
        """One row per map: its target, its width and its relative reconstruction error.

        Returns:
            A `tl_linmap.base.table.Table` of `tl_linmap.present.display.MapRow`, in the maps' order
            (ranks per map: `dimensionality`; singular pairs as tokens: `decode`).
        """
        return display.map_rows(self)

    def plot(self, kind: str | None = None, **options):
        """Draw the maps, one line or row per map, with a `tl_linmap.present.plotting` function (``plot`` extra).

        Kinds, and the function that draws each (its options pass through):

        - ``"spectra"`` (default): `plot_spectra`, singular values of one input token's ``J_i``
          in every map (``source=-1``, ``"all"`` for the stacked operators; ``skip_first``, ``normalize``);
        - ``"decoded"``: `plot_decoded`, the tokens each residual-stream map's top singular
          vectors write, as `decode` reads them (``source``, ``k``, ``top``, ``skip_first``);
        - ``"contributions"``: `plot_contribution_heatmap`, ``‖J_i x_i‖`` per map and input token (``skip_first``).

        Every kind takes ``ax=``. Plot a subset as ``LinearMaps({name: maps[name] for name in names})``;
        one map's logit split is ``maps[name].plot("logit")``.

        Args:
            kind: One of the kinds above (default: ``"spectra"``).
            **options: The plotting function's options.

        Returns:
            The matplotlib Figure.

        Raises:
            InputError: for another kind.
        """
        from tl_linmap.present import plotting

        draw = plotting.plot_of(kind, self._PLOTS)
        # Only residual-stream maps can be read through the unembedding (not hook_z), as in `decode`.
        return draw({name: self[name] for name in self._residual(None)} if kind == "decoded" else self, **options)

    @property
    def final_norm(self) -> FrozenAffine | None:
        """``ln_final`` frozen at the target position (for logit attributions)."""
        return self.norms.get("ln_final")

    def operators(self) -> dict[str, Float[Tensor, "pos d_out d_in"]]:
        """Every map's operators.

        Returns:
            A dict of tensors keyed by hook name.
        """
        return {name: lm.operators for name, lm in self.maps.items()}

    def contributions(self) -> dict[str, Float[Tensor, "pos d_out"]]:
        """Every map's per-token contributions ``J_i x_i``.

        Returns:
            A dict of tensors keyed by hook name, each ``(source token, d_out)``.
        """
        return {name: lm.contributions() for name, lm in self.maps.items()}

    def stack_contributions(self, names: Sequence[str] | None = None) -> Float[Tensor, "component source d_out"]:
        """Per-token contributions of several maps stacked, like ``ActivationCache.stack_activation``.

        The second axis indexes *source tokens* (whose embedding the term comes from), not
        positions: every entry is a term of the vector at the maps' one target position.

        Args:
            names: Hook names (default: every map; they must share ``d_out``).

        Returns:
            ``(len(names), n_tokens, d_out)``.

        Raises:
            InputError: for a name these maps do not hold, or maps of different widths.
        """
        names = self._names(names, self.maps, "names")
        widths = {name: self[name].output.shape[0] for name in names}
        if len(set(widths.values())) > 1:
            raise InputError(
                f"Only maps of one width stack; these have d_out {widths}. Pass names of one width, "
                "e.g. the residual-stream ones."
            )
        return torch.stack([self[name].contributions() for name in names])

    def to_cache(self, model):
        """Deprecated: an ``ActivationCache`` whose position axis held source tokens; use `stack_contributions`.

        Args:
            model: The model the maps came from.

        Returns:
            An ``ActivationCache`` without batch axis.
        """
        from transformer_lens.ActivationCache import ActivationCache

        warnings.warn(
            "LinearMaps.to_cache is deprecated: its position axis held source tokens, which "
            "position-slicing cache methods misread. Use maps.contributions() or maps.stack_contributions().",
            DeprecationWarning, stacklevel=2,
        )
        return ActivationCache(self.contributions(), model, has_batch_dim=False)

    def _residual(self, targets: Sequence[str] | None) -> list[str]:
        # Only residual-stream maps can be read through the unembedding (not hook_z).
        return self._names(targets, [n for n in self.maps if n.endswith(RESIDUAL_HOOKS)])

    def svd(self, k: int | None = None, *, skip_first: bool = False, targets: Sequence[str] | None = None) -> dict[str, OperatorSVD]:
        """`LinearMap.svd` of every residual-stream map.

        Args:
            k: Pairs kept per operator (default: all).
            skip_first: Leave the first token out of the stacked operators.
            targets: Hook names (default: every residual-stream map, i.e. not ``hook_z``).

        Returns:
            An `tl_linmap.results.svd.OperatorSVD` per hook name.
        """
        return {name: self[name].svd(k, skip_first=skip_first) for name in self._residual(targets)}

    def decode(
        self, k: int = 3, top: int = 10, sources: int | Sequence[int] | None = None, *,
        skip_first: bool = False, stacked: bool = False, targets: Sequence[str] | None = None,
        tokens: int | Sequence[int] | None = None,
    ) -> Table:
        """`LinearMap.decode` of every residual-stream map, in one table (layer by layer).

        Args:
            k: Pairs per operator.
            top: Tokens per vector.
            sources: Input token indices (default: all up to the target position).
            skip_first: Leave the first token out.
            stacked: Also read each stacked operator.
            targets: Hook names (default: every residual-stream map, i.e. not ``hook_z``).
            tokens: Deprecated name of ``sources``.

        Returns:
            A `tl_linmap.base.table.Table` of `tl_linmap.results.svd.DecodedPair`.
        """
        sources = renamed_argument("tokens", tokens, "sources", sources)
        rows = Table()
        for name in self._residual(targets):
            rows.extend(self[name].decode(k, top, sources, skip_first=skip_first, stacked=stacked))
        return rows

    def dimensionality(self, *, skip_first: bool = False, per_token: bool = True, targets: Sequence[str] | None = None) -> Table:
        """`LinearMap.dimensionality` of every map, in one table.

        Args:
            skip_first: Leave the first token out.
            per_token: One row per token as well as each stacked operator's (False: one
                row per map, its stacked operator's).
            targets: Hook names (default: every map).

        Returns:
            A `tl_linmap.base.table.Table` of `tl_linmap.results.svd.RankRow`.
        """
        rows = Table()
        for name in self._names(targets, self.maps):
            rows.extend(self[name].dimensionality(skip_first=skip_first, per_token=per_token))
        return rows

    def _per_head(self, layer: int, vector: Tensor) -> Tensor:
        split_heads = self.head_splits[layer]
        split = einops.rearrange(vector, "... (h dh) -> ... h dh", h=split_heads.W_O.shape[0])
        return split_heads.apply(einops.einsum(split, split_heads.W_O, "... h dh, h dh dm -> ... h dm"))

    def _z(self, layer: int) -> tuple[int, LinearMap]:
        # The layer (as an int) and its hook_z map, which per-head maps are derived from.
        if not is_int(layer):
            raise InputError(f"layer must be a block index (int), got {layer!r}.")
        layer = int(layer)
        name = get_act_name("z", layer)
        if name not in self.maps or layer not in self.head_splits:
            raise InputError(
                f"Head maps of layer {layer} need {name!r}, and these maps have hook_z of layers {sorted(self.head_splits)}: "
                "compute layer_maps(..., modules=True) with that layer."
            )
        return layer, self.maps[name]

    def head_contributions(self, layer: int) -> Float[Tensor, "n_heads pos d_model"]:
        """Per-head, per-token contributions to ``hook_attn_out``, without per-head operators.

        Args:
            layer: Block index (its ``attn.hook_z`` must be mapped: ``modules=True``).

        Returns:
            ``J_{h,i} x_i`` for every head ``h`` and source token ``i``.
        """
        layer, z = self._z(layer)
        return einops.rearrange(self._per_head(layer, z.contributions()), "pos h d -> h pos d")

    def heads(self, layer: int) -> LinearMaps:
        """Per-head linear maps of one layer's ``hook_attn_out``, keyed ``blocks.L.attn.hook_result.H``.

        Head ``h``'s share is ``post(z_h @ W_O[h])``; the shares plus `HeadSplit.rest`
        sum exactly to ``hook_attn_out``.

        Args:
            layer: Block index (its ``attn.hook_z`` must be mapped: ``modules=True``).

        Returns:
            `LinearMaps` with one map per head, in head order (see also `head`), each exact.

        Raises:
            InputError: for a layer whose ``hook_z`` is not mapped.
            FreezeError: if a head's map does not reconstruct its share of ``hook_attn_out``.
        """
        layer, z = self._z(layer)
        operators = self._per_head(layer, einops.rearrange(z.operators, "pos d_z d_in -> pos d_in d_z"))
        operators = einops.rearrange(operators, "pos d_in h d_model -> h pos d_model d_in")
        bias, output, native = (self._per_head(layer, v) for v in (z.bias, z.output, z.native_output))
        name = get_act_name("result", layer)
        reader = z.reader and dataclasses.replace(z.reader, residual=True)  # heads write the residual stream
        maps = {
            f"{name}.{h}": LinearMap(
                operators=operators[h], inputs=z.inputs, bias=bias[h], output=output[h],
                native_output=native[h], tokens=z.tokens, target=f"{name}.{h}", position=z.position,
                reader=reader, source=z.source,
            )
            for h in range(len(operators))
        }
        for lm in maps.values():
            lm.check()
        return LinearMaps(maps, norms=self.norms)

    def head(self, layer: int, head: int) -> LinearMap:
        """One head's linear map of ``hook_attn_out`` (see `heads`).

        Args:
            layer: Block index.
            head: Head index.

        Returns:
            A `LinearMap`.

        Raises:
            InputError: for a layer whose ``hook_z`` is not mapped, or a head that does not exist.
        """
        layer, _ = self._z(layer)
        return self.heads(layer)[f"{get_act_name('result', layer)}.{self._head_index(layer, head)}"]

    def _head_index(self, layer: int, head: int) -> int:
        n_heads = self.head_splits[layer].W_O.shape[0]
        if not is_int(head) or not 0 <= int(head) < n_heads:
            raise InputError(f"Layer {layer} has {n_heads} heads; head must be an int in [0, {n_heads}), got {head!r}.")
        return int(head)


__getattr__ = renamed_names(__name__, {"HeadReadout": "HeadSplit"})


def cast_maps(maps: LinearMaps, dtype: torch.dtype) -> LinearMaps:
    """Maps with every float tensor in ``dtype``: the maps kept in memory, head splits, frozen norms.

    Args:
        maps: The maps (spilled ones were written in ``dtype`` already).
        dtype: A floating dtype.

    Returns:
        New `LinearMaps` (the maps on disk shared).
    """
    store = maps.maps.cast(dtype) if isinstance(maps.maps, MapStore) else {name: cast_map(lm, dtype) for name, lm in maps.maps.items()}
    splits = {
        layer: HeadSplit(W_O=s.W_O.to(dtype), b_O=s.b_O.to(dtype), post=cast_affine(s.post, dtype),
                         pattern=None if s.pattern is None else s.pattern.to(dtype))
        for layer, s in maps.head_splits.items()
    }
    return LinearMaps(store, head_splits=splits, norms={name: cast_affine(n, dtype) for name, n in maps.norms.items()})
