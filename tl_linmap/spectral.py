"""Spectral: singular directions of the operators, read as tokens, and how many dimensions they use.

Every SVD result is an `OperatorSVD`, from the dense operators (`tl_linmap.results.LinearMap.svd`)
or matrix-free (`tl_linmap.implicit.MatrixFree.svd`), and decodes the same way. Each pair is
signed so that ``u`` points along the target's actual output (``u · y >= 0``). Every function
that summarises over input tokens takes ``skip_first``: the first token (BOS, or the first word
where there is none) is usually an attention sink whose operator dwarfs the others.

Input token indices follow one convention everywhere: Python-style over the prompt, so ``-1``
is the prompt's last token; an index after the target position names an operator that is zero
and is refused.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import einops
import torch
from jaxtyping import Float
from torch import Tensor

from tl_linmap._deprecated import renamed_argument
from tl_linmap.errors import InputError
from tl_linmap.inputs import check_positive, is_int
from tl_linmap.readout import Readout
from tl_linmap.table import Table


@dataclass
class Singular:
    """Singular triplets of one operator (a building block of `OperatorSVD`).

    Attributes:
        values: Singular values, descending.
        left: Left singular vectors as rows (output space).
        right: Right singular vectors as rows (input space; for a stacked operator
            ``(k, n_stacked, d_in)``, split per token).
    """

    values: Float[Tensor, " r"]
    left: Float[Tensor, "k d_out"]
    right: Tensor


def signed(left: Tensor, right: Tensor, output: Tensor) -> tuple[Tensor, Tensor]:
    """Flip each singular pair so that ``u · output >= 0`` (``(u, v)`` and ``(−u, −v)`` are one triplet).

    Args:
        left: Left vectors as rows (``(..., k, d_out)``).
        right: The matching right vectors as rows.
        output: The target's value.

    Returns:
        The signed ``(left, right)``.
    """
    sign = torch.where(left @ output >= 0, 1.0, -1.0).to(left)
    return left * sign[..., None], right * sign.reshape(*sign.shape, *([1] * (right.ndim - sign.ndim)))


def top_singular(operator: Float[Tensor, "d_out d_in"], k: int, output: Float[Tensor, " d_out"] | None = None) -> Singular:
    """Deprecated: use ``LinearMap.svd(k)`` (an `OperatorSVD`, which decodes).

    Args:
        operator: One ``J_i``.
        k: Number of triplets.
        output: If given, each pair is flipped so that ``u · output >= 0``.

    Returns:
        A `Singular`.
    """
    warnings.warn("top_singular is deprecated; use LinearMap.svd(k), whose result decodes.", DeprecationWarning, stacklevel=2)
    u, s, vh = torch.linalg.svd(operator, full_matrices=False)
    left, right = u[:, :k].T, vh[:k]
    if output is not None:
        left, right = signed(left, right, output)
    return Singular(s[:k], left, right)


def energy_rank(values: Float[Tensor, " k"], fraction: float) -> int:
    """How many of the largest singular values hold ``fraction`` of the squared Frobenius norm.

    Args:
        values: Singular values (any order).
        fraction: Share of ``Σ σ²``, e.g. 0.9.

    Returns:
        The smallest ``r`` with ``Σ_{j<r} σ_j² >= fraction · Σ σ²``.
    """
    energy = values.sort(descending=True).values.pow(2)
    cumulative = energy.cumsum(0) / energy.sum()
    return int((cumulative < fraction - 1e-12).sum()) + 1


def stable_rank(values: Float[Tensor, " k"]) -> float:
    """``Σ σ² / σ_max²``.

    Args:
        values: Singular values.

    Returns:
        The stable rank (1 for a rank-one operator).
    """
    return float(values.pow(2).sum() / values.max().pow(2))


def effective_rank(values: Float[Tensor, " k"]) -> float:
    """``exp`` of the entropy of the normalised singular values (Roy & Vetterli).

    Args:
        values: Singular values.

    Returns:
        The effective rank (``k`` for a flat spectrum of ``k`` values, 1 for rank one).
    """
    p = values / values.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def input_index(source: int, n_tokens: int, position: int) -> int:
    """One input token index, Python-style over the prompt, checked against the target position.

    Args:
        source: Index into the prompt (``-1``: its last token).
        n_tokens: Prompt length.
        position: Target position (non-negative); later tokens have zero operators.

    Returns:
        The non-negative index.

    Raises:
        InputError: outside the prompt, or after the target position.
    """
    if not is_int(source) or not -n_tokens <= int(source) < n_tokens:
        raise InputError(f"An input token index must be an int in [{-n_tokens}, {n_tokens}) (-1: the last token), got {source!r}.")
    source = int(source)
    index = source % n_tokens
    if index > position:
        raise InputError(
            f"Input token {source} (index {index}) comes after the target position {position}: its operator is zero. "
            f"Pass a source in [0, {position}] (or map a later position)."
        )
    return index


def stacked_tokens(position: int, skip_first: bool) -> list[int]:
    """The input tokens whose operators the stacked operator ``[J_i …]`` holds.

    Args:
        position: Target position (non-negative).
        skip_first: Leave the first token out.

    Returns:
        Token indices up to the target position.

    Raises:
        InputError: if ``skip_first`` leaves none (a one-token prompt).
    """
    tokens = list(range(1 if skip_first else 0, position + 1))
    if not tokens:
        raise InputError(
            "skip_first leaves no token to analyse: the target is at position 0, which reads the first token only. "
            "Pass skip_first=False (or map a later position)."
        )
    return tokens


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

    def _repr_html_(self) -> str:
        return Table([self])._repr_html_()


@dataclass
class OperatorSVD:
    """Singular value decompositions of one map's operators, each pair signed along the output.

    Attributes:
        target: Hook name.
        sources: The prompt's tokens, decoded.
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
        readout: How vectors are read as tokens.
    """

    target: str
    sources: list[str]
    position: int
    tokens: list[int]
    values: Float[Tensor, "n r"]
    left: Float[Tensor, "n k d_out"]
    right: Float[Tensor, "n k d_in"]
    energy: Float[Tensor, " n"] | None = None
    stacked: Singular | None = None
    stacked_tokens: list[int] = field(default_factory=list)
    readout: Readout | None = field(default=None, repr=False)

    def _rows(self, sources: int | Sequence[int] | None, skip_first: bool) -> list[int]:
        # Rows of `values` for the input indices asked for.
        if sources is None:
            chosen = list(self.tokens)
        else:
            chosen = [input_index(s, len(self.sources), self.position) for s in _source_list(sources)]
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
            A `tl_linmap.table.Table` of `DecodedPair`, grouped by operator.

        Raises:
            InputError: without a readout, for a target outside the residual stream, an index
                this SVD does not hold, or ``k < 1``.
        """
        sources = renamed_argument("tokens", tokens, "sources", sources)
        if self.readout is None:
            raise InputError("This SVD has no readout; compute it from a map made by tl_linmap.")
        check_positive("k", k)
        check_positive("top", top, at_most=self.readout.model.cfg.d_vocab)
        rows = self._rows(sources, skip_first)
        k = min(k, self.left.shape[1])
        writes = self.readout.top(self.readout.logits(self.left[rows, :k]), top)
        reads = self.readout.top(self.readout.cosines(self.right[rows, :k]), top)
        table = Table()
        for a, row in enumerate(rows):
            i = self.tokens[row]
            for j in range(k):
                sigma = float(self.values[row, j])
                share = None if self.energy is None else sigma**2 / float(self.energy[row])
                table.append(DecodedPair(self.target, i, self.sources[i], j, sigma, share, writes[a * k + j], reads[a * k + j]))
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
        writes = self.readout.top(self.readout.logits(self.stacked.left[:k]), top)
        reads = self.readout.top(self.readout.cosines(blocks[torch.arange(len(main)), main]), top)
        total = float(self.stacked.values.pow(2).sum())
        return [
            DecodedPair(self.target, "all", self.sources[self.stacked_tokens[m]], j, float(values[j]),
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
    target: str, sources: list[str], readout: Readout | None, k: int | None = None, skip_first: bool = False,
) -> OperatorSVD:
    """SVD of every token's operator and of the stacked operator of one map.

    Args:
        operators: ``J_i`` for every input token.
        output: The target's value (for the signs).
        position: Target position; operators after it are zero and left out.
        target: Hook name.
        sources: The prompt's tokens, decoded.
        readout: How vectors are read as tokens.
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
        target, sources, position, list(range(position + 1)), s, left, right, s.pow(2).sum(-1),
        Singular(ss, s_left, split), stacked, readout,
    )


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
    operators: Float[Tensor, "pos d_out d_in"], position: int, *, target: str, sources: list[str],
    skip_first: bool = False, per_token: bool = True,
) -> Table:
    """Stable rank, effective rank and 90%/99% energy ranks of each operator and the stacked one.

    Args:
        operators: ``J_i`` for every input token.
        position: Target position.
        target: Hook name.
        sources: The prompt's tokens, decoded.
        skip_first: Leave the first token out (its row and the stacked operator).
        per_token: Include one row per token (False: only the stacked operator's row).

    Returns:
        A `tl_linmap.table.Table` of `RankRow`: per token, then ``source="all"``.
    """
    tokens = stacked_tokens(position, skip_first)
    rows = Table()
    if per_token:
        values = torch.linalg.svdvals(operators[tokens])
        rows.extend(_rank_row(target, i, sources[i], v) for i, v in zip(tokens, values))
    wide = einops.rearrange(operators[tokens], "pos d_out d_in -> d_out (pos d_in)")
    rows.append(_rank_row(target, "all", f"{len(tokens)} tokens", torch.linalg.svdvals(wide)))
    return rows


@dataclass
class LogitSplit:
    """One token's logit (through the frozen final norm) split exactly over input tokens.

    For a target other than the model's output this is the logit lens of that target, made
    linear by freezing ``ln_final`` at the inference scale of the target position.

    Attributes:
        token: The output token.
        sources: The decoded input tokens.
        per_token: ``w · J_i x_i`` per input token.
        constant: The affine part: ``w · b``, the norm's offset and ``b_U``.
        logit: The logit read off the target's own value.
    """

    token: str
    sources: list[str]
    per_token: Float[Tensor, " pos"]
    constant: float
    logit: float

    def total(self) -> float:
        """The sum of the parts.

        Returns:
            ``per_token.sum() + constant``, equal to `logit` to rounding.
        """
        return float(self.per_token.sum()) + self.constant
