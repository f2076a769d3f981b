"""Singular value decompositions of a map's operators, decoded, and their ranks."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import einops
import torch
from jaxtyping import Float
from torch import Tensor

from tl_linmap.base.checks import check_positive, is_int
from tl_linmap.base.deprecation import (
    renamed_argument,
    renamed_fields,
)
from tl_linmap.base.errors import InputError
from tl_linmap.base.saving import Saveable
from tl_linmap.base.table import Table, table_row
from tl_linmap.present import display
from tl_linmap.reading.spectral import (
    Singular,
    effective_rank,
    energy_rank,
    input_index,
    signed,
    stable_rank,
    stacked_tokens,
)
from tl_linmap.reading.tokens import TokenReader


@table_row
@dataclass
class DecodedPair:
    """One singular pair of one operator, read as tokens.

    Attributes:
        target: Hook name of the map.
        source: Input token index of the operator ``J_i``, or ``"all"`` for the stacked
            operator ``[J_0 … J_n]``.
        token: The input token (for ``"all"``: the token whose block of ``v`` is largest).
        index: ``j`` of ``σ_j`` (0 = largest).
        sigma: The singular value.
        share: ``σ_j² / ‖J‖_F²``, the pair's share of the operator's energy (None where only
            the top singular values are known, as matrix-free).
        left: Tokens the left vector ``u`` writes (frozen ``ln_final``, then ``W_U``), with logits.
        right: Tokens whose embeddings ``v`` reads (cosine with ``W_E``; for ``"all"``: of
            the largest block).
        block_share: For ``"all"``: the largest block's share of ``‖v‖²`` (None for
            one token's operator).
    """

    target: str
    source: int | str
    token: str
    index: int
    sigma: float
    share: float | None
    left: list[tuple[str, float]]
    right: list[tuple[str, float]]
    block_share: float | None = None


@table_row
@dataclass
class SingularRow:
    """The largest singular values of one operator of an `OperatorSVD`.

    Attributes:
        target: Hook name of the map.
        source: Input token index of ``J_i``, or ``"all"`` for the stacked operator.
        token: The input token (``"all"``: how many tokens are stacked).
        norm: ``‖J‖_F`` (None where only the top values are known, as matrix-free).
        sigma: The largest singular values, descending.
    """

    target: str
    source: int | str
    token: str
    norm: float | None
    sigma: list[float]


@renamed_fields(sources="str_tokens", readout="reader")
@dataclass
class OperatorSVD(Saveable):
    """Singular value decompositions of one map's operators, each pair signed along the output.

    Attributes:
        target: Hook name.
        str_tokens: The prompt's tokens, decoded.
        position: Target position (non-negative).
        tokens: Input token indices with an SVD of their own operator here.
        values: Per entry of ``tokens``, singular values of ``J_i`` (all of them from the dense
            operators, the top k matrix-free), descending.
        left: Per entry of ``tokens``, the top-k left singular vectors as rows (output space).
        right: Per entry of ``tokens``, the top-k right singular vectors as rows (input space).
        energy: Per entry of ``tokens``, ``‖J_i‖_F²`` (None when unknown, as matrix-free).
        stacked: The SVD of ``[J_i for i in stacked_tokens]`` side by side (all values, top-k
            vectors, right vectors split per token), or None.
        stacked_tokens: Input tokens in ``stacked``.
        reader: How vectors are read as tokens.
    """

    target: str
    str_tokens: list[str]
    position: int
    tokens: list[int]
    values: Float[Tensor, "n r"]
    left: Float[Tensor, "n k d_out"]
    right: Float[Tensor, "n k d_in"]
    energy: Float[Tensor, " n"] | None = None
    stacked: Singular | None = None
    stacked_tokens: list[int] = field(default_factory=list)
    reader: TokenReader | None = field(default=None, repr=False)

    def _facts(self) -> list[display.Fact]:
        facts = [("target", self.target, False), ("position", f"{self.position} ({self.str_tokens[self.position]!r})", False),
                 ("operators", str(len(self.tokens)), True), ("vectors kept", str(self.left.shape[1]), True)]
        if self.stacked is not None:
            facts.append(("stacked σ_0", f"{float(self.stacked.values[0]):.4g}", True))
        return facts

    def __repr__(self) -> str:
        order = self.values[:, 0].argsort(descending=True)[:5].tolist()
        largest = ", ".join(f"{self.tokens[r]}:{self.str_tokens[self.tokens[r]]!r} {float(self.values[r, 0]):.3g}" for r in order)
        return display.summary_text(type(self).__name__, self._facts(), f"largest σ_0: {largest}")

    def _repr_html_(self) -> str:
        return display.summary_html(f"SVD of the operators of {self.target}", self._facts(), self.to_table()._repr_html_())

    def to_table(self, top: int = 5) -> Table:
        """The largest singular values of each operator, then of the stacked one.

        Args:
            top: Values per operator.

        Returns:
            A `tl_linmap.base.table.Table` of `SingularRow`, per input token in `tokens`, then
            ``source="all"`` when this SVD has the stacked operator.
        """
        check_positive("top", top)
        rows = Table(
            SingularRow(self.target, i, self.str_tokens[i], None if self.energy is None else float(self.energy[r].sqrt()),
                        self.values[r, :top].tolist())
            for r, i in enumerate(self.tokens)
        )
        if self.stacked is not None:
            values = self.stacked.values
            rows.append(SingularRow(self.target, "all", f"{len(self.stacked_tokens)} tokens", float(values.norm()), values[:top].tolist()))
        return rows

    def plot(self, *, normalize: bool = False, ax=None):
        """Singular values of every operator here, one line per input token (needs the ``plot`` extra).

        Args:
            normalize: Divide each line by its largest value.
            ax: Matplotlib axes to draw into (default: a new figure).

        Returns:
            The Figure (`tl_linmap.present.plotting.plot_singular_values`); the same operator
            across maps is `tl_linmap.present.plotting.plot_spectra`.
        """
        from tl_linmap.present.plotting import plot_singular_values

        return plot_singular_values(self, normalize=normalize, ax=ax)

    def _rows(self, sources: int | Sequence[int] | None, skip_first: bool) -> list[int]:
        # Rows of `values` for the input indices asked for.
        if sources is None:
            chosen = list(self.tokens)
        else:
            chosen = [input_index(s, len(self.str_tokens), self.position) for s in _source_list(sources)]
        missing = [i for i in chosen if i not in self.tokens]
        if missing:
            raise InputError(f"This SVD holds the operators of tokens {self.tokens}, not of {missing}.")
        return [self.tokens.index(i) for i in chosen if not (skip_first and i == 0)]

    def decode(
        self, k: int = 3, top: int = 10, sources: int | Sequence[int] | None = None, *,
        skip_first: bool = False, stacked: bool = False, tokens: int | Sequence[int] | None = None,
    ) -> Table:
        """Read the top singular pairs as tokens.

        Args:
            k: Pairs per operator.
            top: Tokens per vector.
            sources: Input token indices whose operators are read (default: every one this
                SVD holds; ``-1`` is the prompt's last token).
            skip_first: Leave the first token's operator out.
            stacked: Also read the stacked operator's pairs (rows with ``source="all"``).
            tokens: Deprecated name of ``sources``.

        Returns:
            A `tl_linmap.base.table.Table` of `DecodedPair`, grouped by operator.

        Raises:
            InputError: without a readout, for a target outside the residual stream, an index
                this SVD does not hold, or ``k < 1``.
        """
        sources = renamed_argument("tokens", tokens, "sources", sources)
        if self.reader is None:
            raise InputError("This SVD has no token reader; compute it from a map made by tl_linmap.")
        check_positive("k", k)
        check_positive("top", top, at_most=self.reader.model.cfg.d_vocab)
        rows = self._rows(sources, skip_first)
        k = min(k, self.left.shape[1])
        writes = self.reader.top(self.reader.logits(self.left[rows, :k]), top)
        reads = self.reader.top(self.reader.cosines(self.right[rows, :k]), top)
        table = Table()
        for a, row in enumerate(rows):
            i = self.tokens[row]
            for j in range(k):
                sigma = float(self.values[row, j])
                share = None if self.energy is None or not self.energy[row] else sigma**2 / float(self.energy[row])  # a zero operator: no share
                table.append(DecodedPair(self.target, i, self.str_tokens[i], j, sigma, share, writes[a * k + j], reads[a * k + j]))
        if stacked:
            table.extend(self._decode_stacked(k, top))
        return table

    def _decode_stacked(self, k: int, top: int) -> list[DecodedPair]:
        if self.stacked is None:
            raise InputError("This SVD has no stacked operator (matrix-free SVDs are per token).")
        k = min(k, self.stacked.left.shape[0])
        values = self.stacked.values[:k]
        blocks = self.stacked.right[:k]  # (k, n_stacked, d_in)
        share = blocks.pow(2).sum(-1)  # each v has unit norm, so these are its shares per token
        main = share.argmax(-1)
        writes = self.reader.top(self.reader.logits(self.stacked.left[:k]), top)
        reads = self.reader.top(self.reader.cosines(blocks[torch.arange(len(main)), main]), top)
        total = float(self.stacked.values.pow(2).sum())
        return [
            DecodedPair(self.target, "all", self.str_tokens[self.stacked_tokens[m]], j, float(values[j]),
                        float(values[j]) ** 2 / total, writes[j], reads[j], float(share[j, m]))
            for j, m in enumerate(main.tolist())
        ]


def _source_list(sources) -> list:
    # One index (an int, a 0-d tensor) or several (a list, a range, a 1-d tensor); anything
    # else is passed on whole, for `input_index` to refuse by name.
    if isinstance(sources, Tensor):
        sources = sources.tolist()
    if is_int(sources) or isinstance(sources, str) or not isinstance(sources, Iterable):
        return [sources]
    return list(sources)


def operator_svd(
    operators: Float[Tensor, "pos d_out d_in"], output: Float[Tensor, " d_out"], position: int, *,
    target: str, str_tokens: list[str], reader: TokenReader | None, k: int | None = None, skip_first: bool = False,
) -> OperatorSVD:
    """SVD of every token's operator and of the stacked operator of one map.

    Args:
        operators: ``J_i`` for every input token.
        output: The target's value (for the signs).
        position: Target position; operators after it are zero and left out.
        target: Hook name.
        str_tokens: The prompt's tokens, decoded.
        reader: How vectors are read as tokens.
        k: Pairs kept per operator (default: all).
        skip_first: Leave the first token out of the stacked operator.

    Returns:
        An `OperatorSVD` with all singular values and the top-k vectors.

    Raises:
        InputError: for ``k < 1``.
    """
    if k is not None:
        check_positive("k", k)
    live = operators[: position + 1]
    u, s, vh = torch.linalg.svd(live, full_matrices=False)
    k = k or s.shape[-1]
    left, right = signed(einops.rearrange(u[..., :k], "pos d k -> pos k d"), vh[:, :k], output)
    stacked = stacked_tokens(position, skip_first)
    wide = einops.rearrange(live[stacked], "pos d_out d_in -> d_out (pos d_in)")
    su, ss, svh = torch.linalg.svd(wide, full_matrices=False)
    s_left, s_right = signed(su[:, :k].T, svh[:k], output)
    split = einops.rearrange(s_right, "k (pos d) -> k pos d", pos=len(stacked))
    return OperatorSVD(
        target, str_tokens, position, list(range(position + 1)), s, left, right, s.pow(2).sum(-1),
        Singular(ss, s_left, split), stacked, reader,
    )


@table_row
@dataclass
class RankRow:
    """How many dimensions one operator uses.

    Attributes:
        target: Hook name.
        source: Input token index, or ``"all"`` for the stacked operator.
        token: The input token (``"all"``: how many tokens are stacked).
        norm: ``‖J‖_F``.
        stable_rank: ``Σσ² / σ_max²``.
        effective_rank: ``exp`` of the entropy of the normalised singular values.
        rank90: Singular values holding 90% of ``Σσ²``.
        rank99: The same for 99%.
    """

    target: str
    source: int | str
    token: str
    norm: float
    stable_rank: float
    effective_rank: float
    rank90: int
    rank99: int


def _rank_row(target: str, source: int | str, token: str, values: Tensor) -> RankRow:
    return RankRow(target, source, token, float(values.norm()), stable_rank(values), effective_rank(values),
                   energy_rank(values, 0.9), energy_rank(values, 0.99))


def dimensionality(
    operators: Float[Tensor, "pos d_out d_in"], position: int, *, target: str, str_tokens: list[str],
    skip_first: bool = False, per_token: bool = True,
) -> Table:
    """Stable rank, effective rank and 90%/99% energy ranks of each operator and the stacked one.

    Args:
        operators: ``J_i`` for every input token.
        position: Target position.
        target: Hook name.
        str_tokens: The prompt's tokens, decoded.
        skip_first: Leave the first token out (its row and the stacked operator).
        per_token: Include one row per token (False: only the stacked operator's row).

    Returns:
        A `tl_linmap.base.table.Table` of `RankRow`: per token, then ``source="all"``.
    """
    tokens = stacked_tokens(position, skip_first)
    rows = Table()
    if per_token:
        values = torch.linalg.svdvals(operators[tokens])
        rows.extend(_rank_row(target, i, str_tokens[i], v) for i, v in zip(tokens, values))
    wide = einops.rearrange(operators[tokens], "pos d_out d_in -> d_out (pos d_in)")
    rows.append(_rank_row(target, "all", f"{len(tokens)} tokens", torch.linalg.svdvals(wide)))
    return rows
